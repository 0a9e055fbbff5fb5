"""Read a GGUF file's scalar metadata from its header (no weights, no MLX, no llama.cpp): what `models list` shows.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value count, then per pair:
a u64-length UTF-8 key, a u32 value type and the value; arrays are a u32 element type, a u64 count and the elements.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from sottovoce.daemon.models.errors import ModelImportError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

FILE_TYPES = {
    0: ("F32", None), 1: ("F16", None), 2: ("Q4_0", 4), 3: ("Q4_1", 4), 7: ("Q8_0", 8), 8: ("Q5_0", 5),
    9: ("Q5_1", 5), 10: ("Q2_K", 2), 11: ("Q3_K_S", 3), 12: ("Q3_K_M", 3), 13: ("Q3_K_L", 3), 14: ("Q4_K_S", 4),
    15: ("Q4_K_M", 4), 16: ("Q5_K_S", 5), 17: ("Q5_K_M", 5), 18: ("Q6_K", 6), 32: ("BF16", None),
}  # fmt: skip
"""llama.cpp's ``general.file_type`` (llama_ftype) -> (name, bits per quantized weight)."""


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelImportError(f"{f.name} is cut short (its GGUF header ends early)")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise ModelImportError(f"{f.name} is not a valid GGUF file (a string of {n} bytes)")
    return f.read(n).decode("utf-8", errors="replace")


def _skip(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, count = _read(f, "<I"), _read(f, "<Q")
        if inner in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[inner]) * count, 1)
        else:
            for _ in range(count):
                _skip(f, inner)
        return None
    raise ModelImportError(f"{f.name} is not a valid GGUF file (value type {kind})")


def read_scalars(path: Path) -> dict[str, Any]:
    """Every scalar (number, bool, string) key of the header; arrays (the vocabulary) are skipped."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelImportError(f"{path} is not a GGUF file")
            version = _read(f, "<I")
            if version < 2:
                raise ModelImportError(f"{path} is GGUF version {version}; re-convert it with a current llama.cpp")
            _read(f, "<Q")  # tensor count
            values: dict[str, Any] = {}
            for _ in range(_read(f, "<Q")):
                key = _string(f)
                value = _skip(f, _read(f, "<I"))
                if value is not None:
                    values[key] = value
            return values
    except OSError as e:
        raise ModelImportError(f"cannot read {path}: {e.strerror or e}") from e


def quantization(path: Path) -> tuple[str, int | None]:
    """(weight type, bits per quantized weight): ("Q4_1", 4), ("F16", None), ("unknown", None)."""
    file_type = read_scalars(path).get("general.file_type")
    return FILE_TYPES.get(file_type, ("unknown", None)) if isinstance(file_type, int) else ("unknown", None)
