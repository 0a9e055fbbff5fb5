"""CTranslate2 (faster-whisper) Whisper folder -> mlx-whisper folder (``config.json`` + ``weights.safetensors``).

``model.bin`` (binary version 6): u32 version, string spec name, u32 revision, u32 count, then per variable: string
name, u8 rank, u32 dims, u8 dtype, u32 byte count, raw bytes; then u32 alias count and (alias, target) string pairs.
Strings are a u16 length (counting a trailing NUL) then the bytes.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any, cast

import numpy as np

from sottovoce.daemon.models.errors import ModelImportError

BINARY_VERSION = 6
# CTranslate2 DataType codes; bfloat16 (5) has no numpy type and is widened by hand.
_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BF16 = 5


class _Reader:
    """Bounds-checked little-endian reads over the file's bytes: a truncated file fails with a clear error."""

    def __init__(self, data: bytes | mmap.mmap, path: Path) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelImportError(
                f"{self.path} is truncated or corrupt (wanted {n} bytes at offset {self.pos} of {len(self.data)})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ModelImportError(f"{self.path} is corrupt (a variable name is not UTF-8)") from None


def read_model_bin(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 ``model.bin``: (spec name, variables as numpy arrays; aliases resolved)."""
    try:
        with path.open("rb") as f:
            # Memory-mapped: the arrays are views of the file, so a large model is not held twice in memory.
            data: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except OSError as e:
        raise ModelImportError(f"cannot read {path}: {e.strerror or e}") from e
    r = _Reader(data, path)
    version = r.u32()
    if version != BINARY_VERSION:
        raise ModelImportError(
            f"{path} is not a CTranslate2 model of binary version {BINARY_VERSION} (found {version}); "
            "re-convert it with a current ctranslate2"
        )
    spec = r.string()
    r.u32()  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.u32()):
        name = r.string()
        shape = tuple(r.u32() for _ in range(r.u8()))
        code = r.u8()
        nbytes = r.u32()
        if code not in _DTYPES:
            raise ModelImportError(f"{path} is corrupt (variable {name!r} has unknown data type {code})")
        dtype = _DTYPES[code]
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
            raise ModelImportError(f"{path} is corrupt (variable {name!r}: shape {shape} does not fit {nbytes} bytes)")
        array = np.frombuffer(r.take(nbytes), dtype=dtype).reshape(shape)
        if code == _BF16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    for _ in range(r.u32()):
        alias, target = r.string(), r.string()
        if target in variables:
            variables[alias] = variables[target]
    return spec, variables


def weights_dtype(path: Path) -> str:
    """The type most of a ``model.bin``'s weight matrices are stored in ("int8", "float16", "float32", ...)."""
    _, variables = read_model_bin(path)
    counts: dict[str, int] = {}
    for name, array in variables.items():
        if name.endswith("/weight") and array.ndim >= 2:
            counts[str(array.dtype)] = counts.get(str(array.dtype), 0) + 1  # bfloat16 reads as float32
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"


def _weight(v: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """A float weight; int8/int16 quantized CTranslate2 weights are scaled back (q / scale per output row)."""
    w = v[f"{prefix}/weight"]
    scale = v.get(f"{prefix}/weight_scale")
    if scale is not None:
        scale = scale.astype(np.float32)
        w = w.astype(np.float32) / (scale[:, None] if scale.ndim == 1 else scale)
    return w


def _scalar(v: dict[str, np.ndarray], name: str) -> int:
    return int(v[name].reshape(-1)[0])


def _count_layers(v: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    return 1 + max((int(m.group(1)) for k in v if (m := pattern.match(k))), default=-1)


def dimensions(v: dict[str, np.ndarray]) -> dict[str, int]:
    """The 10 ``ModelDimensions`` fields, read off the weights' shapes and the stored head counts."""
    conv1 = v["encoder/conv1/weight"]  # (n_audio_state, n_mels, 3)
    embeddings = v["decoder/embeddings/weight"]  # (n_vocab, n_text_state)
    return {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(conv1.shape[0]),
        "n_audio_head": _scalar(v, "encoder/num_heads"),
        "n_audio_layer": _count_layers(v, "encoder"),
        "n_vocab": int(embeddings.shape[0]),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(embeddings.shape[1]),
        "n_text_head": _scalar(v, "decoder/num_heads"),
        "n_text_layer": _count_layers(v, "decoder"),
    }


def _linear(out: dict[str, np.ndarray], v: dict[str, np.ndarray], src: str, dst: str) -> None:
    out[f"{dst}.weight"] = _weight(v, src)
    out[f"{dst}.bias"] = v[f"{src}/bias"]


def _layer_norm(out: dict[str, np.ndarray], v: dict[str, np.ndarray], src: str, dst: str) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _fused(v: dict[str, np.ndarray], src: str, parts: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    w, b = _weight(v, src), v[f"{src}/bias"]
    if w.shape[0] % parts or b.shape[0] != w.shape[0]:
        raise ModelImportError(f"unexpected shape {w.shape} for the fused projection {src}")
    return np.split(w, parts), np.split(b, parts)


def _self_attention(out: dict[str, np.ndarray], v: dict[str, np.ndarray], src: str, dst: str) -> None:
    # linear_0 is q|k|v fused. Whisper's key projection has no bias (CTranslate2 stores zeros there); a key bias
    # would only add a per-row constant to the attention logits, which softmax cancels, so dropping it is exact.
    (wq, wk, wv), (bq, _, bv) = _fused(v, f"{src}/linear_0", 3)
    out[f"{dst}.query.weight"], out[f"{dst}.query.bias"] = wq, bq
    out[f"{dst}.key.weight"] = wk
    out[f"{dst}.value.weight"], out[f"{dst}.value.bias"] = wv, bv
    _linear(out, v, f"{src}/linear_1", f"{dst}.out")


def _cross_attention(out: dict[str, np.ndarray], v: dict[str, np.ndarray], src: str, dst: str) -> None:
    # linear_0 is the query, linear_1 the fused k|v over the audio features, linear_2 the output.
    _linear(out, v, f"{src}/linear_0", f"{dst}.query")
    (wk, wv), (_, bv) = _fused(v, f"{src}/linear_1", 2)
    out[f"{dst}.key.weight"] = wk
    out[f"{dst}.value.weight"], out[f"{dst}.value.bias"] = wv, bv
    _linear(out, v, f"{src}/linear_2", f"{dst}.out")


def _block(out: dict[str, np.ndarray], v: dict[str, np.ndarray], src: str, dst: str, cross: bool) -> None:
    _self_attention(out, v, f"{src}/self_attention", f"{dst}.attn")
    _layer_norm(out, v, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
    if cross:
        _cross_attention(out, v, f"{src}/attention", f"{dst}.cross_attn")
        _layer_norm(out, v, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
    _linear(out, v, f"{src}/ffn/linear_0", f"{dst}.mlp1")
    _linear(out, v, f"{src}/ffn/linear_1", f"{dst}.mlp2")
    _layer_norm(out, v, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")


def map_weights(v: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
    """CTranslate2 variables -> mlx-whisper parameter names (float arrays, dtype unchanged)."""
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        # PyTorch/CTranslate2 conv weights are (out, in, kernel); MLX's Conv1d wants (out, kernel, in).
        out[f"encoder.{conv}.weight"] = _weight(v, f"encoder/{conv}").transpose(0, 2, 1)
        out[f"encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"]
    for i in range(dims["n_audio_layer"]):
        _block(out, v, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    _layer_norm(out, v, "encoder/layer_norm", "encoder.ln_post")
    # The encoder's sinusoidal positions are recomputed by mlx-whisper; the decoder's are learned.
    out["decoder.token_embedding.weight"] = _weight(v, "decoder/embeddings")
    out["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(dims["n_text_layer"]):
        _block(out, v, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    _layer_norm(out, v, "decoder/layer_norm", "decoder.ln")
    return out


def _alignment_heads(config: dict[str, Any], dims: dict[str, int]) -> np.ndarray | None:
    heads = config.get("alignment_heads")
    if not heads:
        return None
    array = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
    if (array[:, 0] >= dims["n_text_layer"]).any() or (array[:, 1] >= dims["n_text_head"]).any():
        raise ModelImportError("config.json's alignment_heads do not fit the model's decoder")
    return array


def _check_against_mlx(weights: dict[str, np.ndarray], dims: dict[str, int]) -> None:
    """Every parameter mlx-whisper's model has must be there with the same shape (nothing missing, nothing extra)."""
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    # Built lazily: MLX does not materialise the random initial weights unless they are evaluated.
    params = tree_flatten(Whisper(ModelDimensions(**dims)).parameters())
    expected = {k: tuple(p.shape) for k, p in cast("list[tuple[str, Any]]", params)}
    expected.pop("alignment_heads", None)
    got = {k: tuple(a.shape) for k, a in weights.items() if k != "alignment_heads"}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    bad = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing:
        raise ModelImportError(f"the converted weights do not fit mlx-whisper (missing {missing[0]})")
    if extra:
        raise ModelImportError(f"the converted weights do not fit mlx-whisper (unexpected {extra[0]})")
    if bad:
        k = bad[0]
        raise ModelImportError(f"the converted weights do not fit mlx-whisper ({k}: {got[k]}, wants {expected[k]})")


def convert(src: Path, dst: Path, *, dtype: str = "float32", progress: bool = True) -> dict[str, Any]:
    """Convert the CTranslate2 Whisper folder ``src`` into the existing empty folder ``dst``; returns the config."""
    import mlx.core as mx
    from tqdm import tqdm

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ModelImportError(f"unsupported dtype {dtype!r} (use float32 or float16)")
    try:
        ct2_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelImportError(f"cannot read {src / 'config.json'}: {e}") from e
    spec, variables = read_model_bin(src / "model.bin")
    if spec != "WhisperSpec":
        raise ModelImportError(f"{src} is a CTranslate2 {spec or 'unknown'} model, not Whisper")
    try:
        dims = dimensions(variables)
        weights = map_weights(variables, dims)
    except KeyError as e:
        raise ModelImportError(f"{src / 'model.bin'} lacks the variable {e.args[0]!r}: not a Whisper model") from None
    _check_against_mlx(weights, dims)
    heads = _alignment_heads(ct2_config, dims)

    target = getattr(mx, dtype)
    arrays: dict[str, mx.array] = {}
    for name, array in tqdm(weights.items(), desc="whisper weights", unit="tensor", disable=not progress):
        if not np.issubdtype(array.dtype, np.floating):
            raise ModelImportError(f"{name} is not a float tensor ({array.dtype}) after dequantization")
        arrays[name] = mx.array(np.ascontiguousarray(array)).astype(target)
    if heads is not None:
        # mlx-whisper keeps alignment_heads as a module attribute, so load_model's update() restores it.
        arrays["alignment_heads"] = mx.array(heads)
    mx.save_safetensors(str(dst / "weights.safetensors"), arrays, metadata={"format": "mlx"})
    config: dict[str, Any] = {**dims, "model_type": "whisper"}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def default_name(dims: dict[str, int]) -> str:
    """ "whisper-tiny.en", "whisper-base", ... from the dimensions (a fallback for unknown shapes)."""
    sizes = {(384, 4): "tiny", (512, 6): "base", (768, 12): "small", (1024, 24): "medium", (1280, 32): "large"}
    size = sizes.get((dims["n_audio_state"], dims["n_audio_layer"]), f"{dims['n_audio_state']}x{dims['n_audio_layer']}")
    if size == "large" and dims["n_mels"] == 128:
        size = "large-v3" if dims["n_text_layer"] == 32 else "large-v3-turbo"
    elif size == "large" and dims["n_text_layer"] == 4:
        size = "large-turbo"
    return f"whisper-{size}{'.en' if dims['n_vocab'] < 51865 else ''}"
