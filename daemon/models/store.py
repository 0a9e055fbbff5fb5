"""The user's model store: one folder per model, each with a ``sottovoce.json`` manifest.

Models are kept in the format they came in: CTranslate2 Whisper folders and GGUF chat models as they are (the fast
engines run them directly), MLX folders as they are. The MLX engine runs a CTranslate2/GGUF model from a converted
copy inside its folder (``mlx/``), made on first use (``importer.ensure_mlx_copy``).

Nothing here imports MLX: the client CLI lists and finds models without the daemon's heavy dependencies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import platformdirs

from sottovoce.daemon.models.errors import ModelImportError, ModelLoadError

log = logging.getLogger(__name__)

Kind = Literal["whisper", "llm"]
KINDS: tuple[Kind, ...] = ("whisper", "llm")
MANIFEST = "sottovoce.json"
MANIFEST_FORMAT = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_PARTIAL = ".partial-"


def models_dir() -> Path:
    """``$SOTTOVOCE_MODELS_DIR`` if set, else the per-user data folder (``~/.local/share/sottovoce/models``)."""
    env = os.environ.get("SOTTOVOCE_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("sottovoce")) / "models"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: Kind
    path: Path
    size_bytes: int
    dtype: str
    """Weights' float type ("float32", "float16", "bfloat16"); with quantization, that of the scales."""
    source: str
    """Where it came from (a file, folder or registry package); "unknown" for a folder copied in by hand."""
    quantization: int | None = None
    """Bits per quantized weight, or None."""
    format: str = "unknown"
    """How the weights are stored: "ct2" (CTranslate2), "gguf", "mlx-whisper" or "mlx-lm"."""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


# ---- recognising folders -------------------------------------------------------------------------------------


def article(kind: str) -> str:
    """'a whisper', 'an llm': the article for a model kind in messages."""
    return f"an {kind}" if kind[:1] in "aeiou" or kind == "llm" else f"a {kind}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_mlx_whisper(path: Path) -> bool:
    config = _read_json(path / "config.json")
    has_weights = (path / "weights.safetensors").is_file() or (path / "weights.npz").is_file()
    return config is not None and "n_mels" in config and has_weights


def is_mlx_lm(path: Path) -> bool:
    config = _read_json(path / "config.json")
    # mlx_lm.load globs model*.safetensors and needs a tokenizer beside them.
    has_weights = any(path.glob("model*.safetensors"))
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return config is not None and "model_type" in config and has_weights and has_tokenizer


def is_ct2(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def detect_format(path: Path) -> str | None:
    """ "mlx-whisper", "mlx-lm", "ct2" (CTranslate2), "gguf" (a file, or a folder holding exactly one), or None."""
    if path.is_file():
        return "gguf" if is_gguf(path) else None
    if not path.is_dir():
        return None
    if is_mlx_whisper(path):
        return "mlx-whisper"
    if is_mlx_lm(path):
        return "mlx-lm"
    if is_ct2(path):
        return "ct2"
    ggufs = list(path.glob("*.gguf"))
    if len(ggufs) == 1 and is_gguf(ggufs[0]):
        return "gguf"
    return None


def gguf_file(folder: Path) -> Path:
    """The one GGUF file in a store folder."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(f"{folder} should hold exactly one .gguf file, not {len(files)}")
    return files[0]


MLX_COPY = "mlx"
"""Sub-folder of a CTranslate2/GGUF store entry holding its MLX conversion."""


def mlx_copy_path(entry: ModelEntry) -> Path:
    """Where the MLX conversion of a CTranslate2/GGUF entry lives (it may not exist yet)."""
    return entry.path / MLX_COPY


FORMAT_KIND: dict[str, Kind] = {"mlx-whisper": "whisper", "mlx-lm": "llm", "ct2": "whisper", "gguf": "llm"}


def safetensors_dtype(path: Path) -> str:
    """The float type of a safetensors file's float tensors, read from its JSON header (no weights loaded)."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return "unknown"
    counts: dict[str, int] = {}
    for key, info in header.items():
        if key != "__metadata__" and info.get("dtype") in names:
            counts[names[info["dtype"]]] = counts.get(names[info["dtype"]], 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- manifest and listing ------------------------------------------------------------------------------------


def write_manifest(
    folder: Path, *, kind: Kind, source: str, dtype: str, quantization: int | None = None, **extra: Any
) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "source": source,
        "dtype": dtype,
        "quantization": quantization,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_entry(folder: Path) -> ModelEntry | None:
    """The store entry for one folder; a folder without a manifest is recognised by its files."""
    manifest = _read_json(folder / MANIFEST)
    if manifest is not None and manifest.get("kind") in KINDS:
        kind: Kind = manifest["kind"]
        dtype = str(manifest.get("dtype", "unknown"))
        source = str(manifest.get("source", "unknown"))
        bits = manifest.get("quantization")
        quantization = int(bits) if isinstance(bits, int) else None
        # Manifests before the fast engines had no "model_format": those folders were MLX conversions.
        fmt = str(manifest.get("model_format") or detect_format(folder) or "unknown")
    else:
        fmt = detect_format(folder) or "unknown"
        if fmt not in ("mlx-whisper", "mlx-lm"):
            return None
        kind = FORMAT_KIND[fmt]
        weights = sorted(folder.glob("weights.safetensors" if kind == "whisper" else "model*.safetensors"))
        dtype = safetensors_dtype(weights[0]) if weights else "unknown"
        source = "unknown"
        quant = (_read_json(folder / "config.json") or {}).get("quantization")
        quantization = quant.get("bits") if isinstance(quant, dict) else None
    return ModelEntry(folder.name, kind, folder, _folder_size(folder), dtype, source, quantization, fmt)


def list_models() -> list[ModelEntry]:
    """Every model in the store, sorted by kind then name (half-written imports are not listed)."""
    root = models_dir()
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        entry = read_entry(folder)
        if entry is not None:
            entries.append(entry)
    return sorted(entries, key=lambda e: (e.kind, e.name))


# ---- resolve -------------------------------------------------------------------------------------------------


HOW_TO_GET = "run `sottovoce models fetch-defaults` or `sottovoce models import PATH`"


def find(spec: str) -> ModelEntry | None:
    """The store entry named ``spec`` (surrounding spaces ignored), or None. Which engine can run it, and paths or hub
    ids that are not store names, are ``sottovoce.daemon.engines``' business."""
    spec = spec.strip()
    if not _NAME_RE.match(spec) or ".." in spec:
        return None
    folder = models_dir() / spec
    return read_entry(folder) if folder.is_dir() else None


# ---- atomic writes -------------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or ".." in name:
        raise ModelImportError(
            f"bad model name {name!r}: use letters, digits and . _ + - (no slashes, at most 128 characters)"
        )
    return name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(root: Path) -> None:
    """Remove folders left by an import that was killed (its pid is gone): they are never listed or resolved."""
    for folder in root.glob(f"{_PARTIAL}*"):
        try:
            pid = int(folder.name[len(_PARTIAL) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing a half-written import: %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staging(name: str, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty folder inside the store; on success it is renamed to ``name``, on any error it is removed.

    The folder is on the store's file system, so the final rename is atomic: a reader sees either no model or a
    complete one. ``force`` replaces an existing model of that name.
    """
    check_name(name)
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    final = root / name
    if final.exists() and not force:
        raise ModelImportError(f"a model named {name!r} is already in {root}; pick another --name or pass --force")
    # mkdir (not mkdtemp, which makes 0700 folders) so the model gets the user's usual permissions.
    tmp = root / f"{_PARTIAL}{os.getpid()}-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = root / f"{_PARTIAL}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(final)
            except OSError as e:
                raise ModelImportError(f"could not move the new model into {final}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
