"""Model folders for the MLX backends: a local folder, or a Hugging Face hub id resolved through the local HF cache.

Settings may name a hub id such as ``mlx-community/Meta-Llama-3-8B-Instruct-4bit`` (the factory passes hub ids on
unchanged). ``huggingface_hub.snapshot_download`` returns its snapshot folder from the local cache (``HF_HUB_CACHE``),
downloading it first when it is missing and the hub can be reached; with ``HF_HUB_OFFLINE=1`` only the cache is used.
Nothing here imports MLX.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from .base import ModelLoadError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
GET_A_MODEL = "get one with `sottovoce models fetch-defaults` or `sottovoce models import`"


def looks_like_hub_id(spec: str) -> bool:
    """True for ``org/name`` (no leading ``/``, ``.`` or ``~``, exactly one slash)."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_folder(spec: str, *, what: str, folder_hint: str, allow_patterns: Sequence[str] | None = None) -> Path:
    """The folder holding ``spec``'s ``config.json``: ``spec`` itself, or the cached snapshot of a hub id.

    ``what`` names the model in messages ("chat model", "Whisper model"); ``folder_hint`` says how to get a local
    folder. Raises a one-line ``ModelLoadError``. A hub id missing from the cache is downloaded here when the hub
    can be reached (``HF_HUB_OFFLINE`` unset), which can take minutes for a large model.
    """
    path = Path(spec)
    if path.exists() or not looks_like_hub_id(spec):
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{what} not found: {path} has no config.json ({folder_hint})")
        return path
    logger.info("%s %s is not a local folder: looking it up in the Hugging Face cache (or hub)", what, spec)
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, allow_patterns=list(allow_patterns) if allow_patterns else None))
    except Exception as exc:
        raise ModelLoadError(
            f"{what} {spec} is neither a local folder nor a Hugging Face model cached or downloadable here "
            f"({_short(exc)}); {GET_A_MODEL}"
        ) from exc
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{what} {spec}: the Hugging Face snapshot {folder} has no config.json; {GET_A_MODEL}")
    logger.debug("%s %s resolved to %s", what, spec, folder)
    return folder
