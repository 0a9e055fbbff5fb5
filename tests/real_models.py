"""The small real models, from the store that `scripts/install.sh` fills (`.work/models`, or $SOTTOVOCE_MODELS_DIR).

The store keeps them as the registry ships them: Whisper tiny.en and base as CTranslate2 folders, SmolLM2-135M-Instruct
as a Q4_1 GGUF. ``mlx_copy`` gives the MLX engine's converted copy (made once, kept in the store). Tests that need them
are skipped with a clear reason where the store is empty; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORE = Path(os.environ.get("SOTTOVOCE_MODELS_DIR") or ROOT / ".work" / "models")
NAMES = ("whisper-tiny.en", "whisper-base", "smollm2-135m-instruct")
MISSING = [name for name in NAMES if not (STORE / name / "sottovoce.json").is_file()]
ENGINE_FLAGS = {
    "fast": ["--stt-engine", "faster-whisper", "--llm-engine", "llama.cpp"],
    "mlx": ["--stt-engine", "mlx", "--llm-engine", "mlx"],
}
"""Daemon flags per engine family; parametrize end-to-end tests over these."""

needs_real_models = pytest.mark.skipif(
    bool(MISSING), reason=f"models {MISSING} not in {STORE}: run scripts/install.sh (sottovoce models fetch-defaults)"
)


def store_path(name: str) -> Path:
    """The store folder of one of the real models (CTranslate2 folder, or the folder holding the GGUF)."""
    return STORE / name


def gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    (path,) = sorted(store_path(name).glob("*.gguf"))
    return path


def mlx_copy(name: str) -> Path:
    """The MLX engine's converted copy of a store model (converted on first call, then kept in the store)."""
    os.environ.setdefault("SOTTOVOCE_MODELS_DIR", str(STORE))
    from sottovoce.daemon.models import store
    from sottovoce.daemon.models.importer import ensure_mlx_copy

    entry = store.read_entry(store_path(name))
    assert entry is not None, f"{name} is not in {STORE}"
    return ensure_mlx_copy(entry)
