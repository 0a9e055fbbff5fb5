"""Shared test setup: offline Hugging Face, OpenBLAS before mlx, tiny models built once per session.

pytest runs with ``--import-mode=importlib`` and no ``tests/__init__.py``, so this folder is put on ``sys.path`` here:
test modules (and subprocess helpers) import ``tiny_models`` and ``fakes`` by plain name.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# Before anything can import huggingface_hub or mlx: never touch the network, and give MLX the fast BLAS.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from sottovoce.daemon.blas import preload_openblas

preload_openblas()

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402
import tiny_models  # noqa: E402

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny English-only mlx-whisper folder; it says " hello world" for any audio that reaches it."""
    started = time.perf_counter()
    path = tiny_models.build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))
    logger.info("built tiny whisper in %.2f s", time.perf_counter() - started)
    return path


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mlx-lm llama folder with a trained BPE tokenizer and a ChatML template (end-of-turn never greedy)."""
    started = time.perf_counter()
    path = tiny_models.build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))
    logger.info("built tiny llm in %.2f s", time.perf_counter() - started)
    return path
