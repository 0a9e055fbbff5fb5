"""Import a model into the store: detect its format, copy it (or convert it for MLX) into a staging folder, then
rename. Also makes the MLX copy of a CTranslate2/GGUF entry when the MLX engine first needs it."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from sottovoce.daemon.models import store
from sottovoce.daemon.models.errors import ModelImportError
from sottovoce.daemon.models.store import FORMAT_KIND, Kind, ModelEntry

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def default_dtype() -> str:
    """float32 on the CPU (half precision is several times slower there), float16 on Metal/CUDA."""
    import mlx.core as mx

    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return "float16" if gpu else "float32"


def _source_path(src: Path) -> tuple[Path, str]:
    """The file or folder to convert and its format; a folder holding exactly one .gguf means that file."""
    if not src.exists():
        raise ModelImportError(f"{src} does not exist")
    fmt = store.detect_format(src)
    if fmt is None and src.is_dir():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0], "gguf"
        if len(ggufs) > 1:
            raise ModelImportError(f"{src} holds several .gguf files; import one of them")
    if fmt is None:
        raise ModelImportError(
            f"{src} is not a model this can import (a GGUF file, a CTranslate2 Whisper folder with model.bin, "
            "or an mlx-whisper/mlx-lm folder)"
        )
    return src, fmt


def _default_name(src: Path, fmt: str) -> str:
    if fmt == "ct2":
        from sottovoce.daemon.models import ct2_whisper

        _, variables = ct2_whisper.read_model_bin(src / "model.bin")
        try:
            return ct2_whisper.default_name(ct2_whisper.dimensions(variables))
        except KeyError:
            raise ModelImportError(f"{src} is not a CTranslate2 Whisper model") from None
    stem = src.stem if fmt == "gguf" else src.name
    # Drop a GGUF quantization suffix ("SmolLM2-135M-Instruct.Q4_1" -> "smollm2-135m-instruct").
    stem = re.sub(r"[.\s_-](?:I?Q\d\w*|[BF]\d\d|F32|F16|BF16)$", "", stem, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-.").lower()
    return name or "model"


def import_model(
    src: Path | str,
    *,
    name: str | None = None,
    kind: Kind | None = None,
    dtype: str | None = None,
    quantize: int | None = None,
    force: bool = False,
    progress: bool = True,
    source: str | None = None,
    mlx: bool = False,
) -> ModelEntry:
    """Put ``src`` (GGUF file, CTranslate2 Whisper folder, or an MLX folder) into the store as ``name``.

    Models are copied as they are (faster-whisper and llama.cpp run them directly). ``mlx`` (implied by ``dtype`` or
    ``quantize``) converts a CTranslate2/GGUF model for MLX instead. The model appears under its name only once
    complete; on any error nothing is left in the store. ``source`` overrides what the manifest records as the origin
    (the registry passes the package name).
    """
    src = Path(src).expanduser().resolve()
    path, fmt = _source_path(src)
    detected = FORMAT_KIND[fmt]
    if kind is not None and kind != detected:
        raise ModelImportError(f"{src} is {store.article(detected)} model ({fmt}), not {store.article(kind)} model")
    if dtype is not None and dtype not in DTYPES:
        raise ModelImportError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    mlx = mlx or dtype is not None or quantize is not None
    if quantize is not None and fmt != "gguf":
        raise ModelImportError("--quantize is only supported when importing a GGUF chat model")
    if quantize is not None and quantize not in (4, 8):
        raise ModelImportError(f"unsupported quantization {quantize} bits; use 4 or 8")
    if fmt.startswith("mlx-") and dtype is not None:
        raise ModelImportError(f"{src} is already an MLX folder and is copied as is; leave out --dtype")
    name = store.check_name(name or _default_name(path, fmt))
    convert = mlx and not fmt.startswith("mlx-")
    dtype = dtype or (default_dtype() if convert else None)

    with store.staging(name, force=force) as tmp:
        extra: dict[str, object] = {"format_in": fmt}
        try:
            if convert:
                extra.update(_convert(path, fmt, tmp, dtype=dtype or "float32", quantize=quantize, progress=progress))
                extra["model_format"] = "mlx-whisper" if detected == "whisper" else "mlx-lm"
            elif fmt == "ct2":
                dtype = _ct2_dtype(path)  # reads and checks model.bin before anything is copied
                _copy_ct2(path, tmp)
                extra["model_format"] = "ct2"
            elif fmt == "gguf":
                shutil.copyfile(path, tmp / path.name)
                extra["model_format"] = "gguf"
                dtype, quantization = _gguf_type(tmp / path.name)
                quantize = quantize or quantization
            else:
                # Already MLX: copy (the store owns its folders; the original may be deleted later).
                shutil.copytree(path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(store.MANIFEST))
                files = sorted(tmp.glob("weights.safetensors" if detected == "whisper" else "model*.safetensors"))
                dtype = store.safetensors_dtype(files[0]) if files else "unknown"
                extra["model_format"] = fmt
        except ModelImportError:
            raise
        except (RuntimeError, ValueError, OSError) as e:
            # MLX and the file system report as RuntimeError/OSError (a full disk, an odd tensor): one line, and
            # the traceback in the debug log.
            log.debug("importing %s failed", src, exc_info=True)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelImportError(f"cannot import {src}: {first}") from e
        store.write_manifest(
            tmp,
            kind=detected,
            source=source or str(path),
            dtype=dtype or "unknown",
            quantization=quantize,
            **extra,
        )
    entry = store.read_entry(store.models_dir() / name)
    assert entry is not None
    log.info("imported %s as %s (%s, %d bytes)", src, name, entry.kind, entry.size_bytes)
    return entry


def _convert(path: Path, fmt: str, dst: Path, *, dtype: str, quantize: int | None, progress: bool) -> dict[str, object]:
    """Convert a CTranslate2 Whisper folder or a GGUF file into an MLX folder ``dst`` (imports MLX)."""
    if fmt == "ct2":
        from sottovoce.daemon.models import ct2_whisper

        ct2_whisper.convert(path, dst, dtype=dtype, progress=progress)
        return {}
    from sottovoce.daemon.models import gguf_llm

    return dict(gguf_llm.convert(path, dst, dtype=dtype, quantize=quantize, progress=progress))


CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json")


def _copy_ct2(src: Path, dst: Path) -> None:
    """A CTranslate2 Whisper folder's files (faster-whisper needs model.bin, config.json and a vocabulary)."""
    for name in CT2_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    vocabularies = sorted(src.glob("vocabulary.*"))
    if not vocabularies:
        raise ModelImportError(f"{src} has no vocabulary.txt/vocabulary.json, which CTranslate2 needs")
    for vocabulary in vocabularies:
        shutil.copyfile(vocabulary, dst / vocabulary.name)


def _ct2_dtype(folder: Path) -> str:
    from sottovoce.daemon.models import ct2_whisper

    return ct2_whisper.weights_dtype(folder / "model.bin")


def _gguf_type(path: Path) -> tuple[str, int | None]:
    """(weight type, bits) of a GGUF file, read from its header: ("Q4_1", 4)."""
    from sottovoce.daemon.models import gguf_header

    return gguf_header.quantization(path)


def ensure_mlx_copy(entry: ModelEntry, *, progress: bool = False) -> Path:
    """The MLX folder for a store entry: the entry itself when it is MLX, else its converted copy (``mlx/`` inside
    it), converted now if missing. Imports MLX: call it where MLX runs (the MLX backends' ``load``)."""
    if entry.format in ("mlx-whisper", "mlx-lm"):
        return entry.path
    target = store.mlx_copy_path(entry)
    want = "mlx-whisper" if entry.kind == "whisper" else "mlx-lm"
    if store.detect_format(target) == want:
        return target
    source = entry.path if entry.format == "ct2" else store.gguf_file(entry.path)
    log.info("converting %s for MLX (once; kept in %s)", entry.name, target)
    tmp = entry.path / f"{store.MLX_COPY}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _convert(source, entry.format, tmp, dtype=default_dtype(), quantize=None, progress=progress)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except ModelImportError:
        raise
    except (RuntimeError, ValueError, OSError) as e:
        log.debug("converting %s failed", entry.path, exc_info=True)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelImportError(f"cannot convert {entry.name} for MLX: {first}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
