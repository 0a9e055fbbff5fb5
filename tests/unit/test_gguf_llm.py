"""GGUF -> mlx-lm: a random mlx-lm model is written as GGUF the way llama.cpp's converter lays it out (q/k rows
permuted, llama.cpp tensor names, tokenizer in the metadata), converted back, and must give the same logits."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
tokenizers = pytest.importorskip("tokenizers")

import mlx_lm  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.gguf import permute_weights, translate_weight_names  # noqa: E402
from mlx_lm.models import llama, qwen2  # noqa: E402

from sottovoce.daemon.models import gguf_llm, gguf_tokenizer, store  # noqa: E402
from sottovoce.daemon.models.errors import ModelImportError  # noqa: E402
from sottovoce.daemon.models.importer import _default_name, import_model  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, it's 2024 and 17 gulls cry.",
    "Name three colours: red, green and blue!",
]
SAMPLES = ["Hello world, it's 12345 o'clock in Paris.", "colours  of  the sea\n\nred"]


def flat(tree: Any) -> list[tuple[str, Any]]:
    return cast("list[tuple[str, Any]]", tree_flatten(tree))


def load(path: Path) -> tuple[Any, Any]:
    loaded = mlx_lm.load(str(path))
    return loaded[0], loaded[1]


# ---- a tiny tokenizer and model --------------------------------------------------------------------------------


def trained_tokenizer() -> Any:
    """A byte-level BPE like SmolLM's (digits split one by one), trained on a few sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def tokenizer_metadata(tok: Any, **overrides: Any) -> dict[str, Any]:
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf_tokenizer.CONTROL if t in SPECIALS else gguf_tokenizer.NORMAL for t in tokens]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(0, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    meta.update(overrides)
    return meta


def model_args(arch: str, vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 100000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": arch == "llama",
    }


def random_model(arch: str, vocab_size: int, seed: int = 0) -> Any:
    mx.random.seed(seed)
    module = llama if arch == "llama" else qwen2
    model = module.Model(module.ModelArgs.from_dict(model_args(arch, vocab_size)))
    # Norms start as ones and biases as zeros: make every tensor distinct so a swapped name changes the logits.
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.3) for k, v in flat(model.parameters())]))
    mx.eval(model.parameters())
    return model


def gguf_tensors(model: Any, arch: str) -> dict[str, Any]:
    """The model's tensors under llama.cpp's names; llama's q/k rows permuted as llama.cpp's converter does."""
    args = model.args
    out = {}
    for name, w in flat(model.parameters()):
        if arch == "llama" and "self_attn.q_proj" in name:
            w = permute_weights(w, args.num_attention_heads)
        elif arch == "llama" and "self_attn.k_proj" in name:
            w = permute_weights(w, args.num_attention_heads, args.num_key_value_heads)
        out[translate_weight_names(name)] = w
    return out


def arch_metadata(arch: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "general.architecture": arch,
        "general.name": f"tiny {arch}",
        f"{arch}.context_length": mx.array(args["max_position_embeddings"], dtype=mx.uint32),
        f"{arch}.embedding_length": mx.array(args["hidden_size"], dtype=mx.uint32),
        f"{arch}.block_count": mx.array(args["num_hidden_layers"], dtype=mx.uint32),
        f"{arch}.feed_forward_length": mx.array(args["intermediate_size"], dtype=mx.uint32),
        f"{arch}.attention.head_count": mx.array(args["num_attention_heads"], dtype=mx.uint32),
        f"{arch}.attention.head_count_kv": mx.array(args["num_key_value_heads"], dtype=mx.uint32),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(args["rms_norm_eps"], dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(args["rope_theta"], dtype=mx.float32),
    }


def write_gguf(path: Path, arch: str = "llama", seed: int = 0, **meta_overrides: Any) -> tuple[Any, Any]:
    """A tiny chat model as GGUF (float32 tensors, via mx.save_gguf); returns (reference model, trained tokenizer)."""
    tok = trained_tokenizer()
    model = random_model(arch, tok.get_vocab_size(), seed)
    meta = {**arch_metadata(arch, model_args(arch, tok.get_vocab_size())), **tokenizer_metadata(tok)}
    meta.update(meta_overrides)
    meta = {k: v for k, v in meta.items() if v is not None}
    mx.save_gguf(str(path), gguf_tensors(model, arch), meta)
    return model, tok


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "store"


def _assert_store_clean(store_dir: Path) -> None:
    assert not store_dir.exists() or list(store_dir.iterdir()) == []


IDS = [[1, 40, 41, 200, 7, 99, 300, 2, 5, 17, 123, 250]]


def _logits(model: Any) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


# ---- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_gives_the_same_logits(tmp_path: Path, store_dir: Path, arch: str) -> None:
    reference, _ = write_gguf(tmp_path / "tiny.gguf", arch)
    entry = import_model(tmp_path / "tiny.gguf", name="tiny", progress=False, mlx=True)
    assert entry.kind == "llm" and entry.dtype == "float32" and entry.quantization is None
    config = json.loads((entry.path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is (arch == "llama")
    assert config["num_key_value_heads"] == 2
    model, _ = load(entry.path)
    np.testing.assert_allclose(_logits(model), _logits(reference), rtol=1e-4, atol=1e-4)


def test_tokenizer_matches_the_original(tmp_path: Path, store_dir: Path) -> None:
    _, original = write_gguf(tmp_path / "tiny.gguf")
    entry = import_model(tmp_path / "tiny.gguf", name="tiny", progress=False, mlx=True)
    _, tok = load(entry.path)
    for text in SAMPLES:
        assert tok.encode(text) == original.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1  # <|im_start|> x2, <|im_end|> as one token each
    assert tok.eos_token_ids == {0, 2}  # GGUF's eos plus the template's end of turn
    special = json.loads((entry.path / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}


def test_add_bos_token_is_honoured(tmp_path: Path, store_dir: Path) -> None:
    write_gguf(tmp_path / "tiny.gguf", **{"tokenizer.ggml.add_bos_token": mx.array(True)})
    entry = import_model(tmp_path / "tiny.gguf", name="tiny", progress=False, mlx=True)
    _, tok = load(entry.path)
    ids = tok.encode("Hello")
    assert ids[0] == 1 and ids.count(1) == 1


def test_float16_output(tmp_path: Path, store_dir: Path) -> None:
    reference, _ = write_gguf(tmp_path / "tiny.gguf")
    entry = import_model(tmp_path / "tiny.gguf", name="tiny", dtype="float16", progress=False, mlx=True)
    assert entry.dtype == "float16"
    model, _ = load(entry.path)
    np.testing.assert_allclose(_logits(model).astype(np.float32), _logits(reference), atol=0.1, rtol=0.05)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = mx.random.normal((8 * 6, 5))
    np.testing.assert_array_equal(np.array(gguf_llm.unpermute(permute_weights(w, 8), 8)), np.array(w))
    np.testing.assert_array_equal(np.array(gguf_llm.unpermute(permute_weights(w, 8, 2), 2)), np.array(w))


def test_names() -> None:
    assert gguf_llm.hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert gguf_llm.hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_llm.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ModelImportError, match="ffn_gate_exps"):
        gguf_llm.hf_name("blk.0.ffn_gate_exps.weight")
    assert _default_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), "gguf") == "smollm2-135m-instruct"
    assert _default_name(Path("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"), "gguf") == "qwen2.5-coder-0.5b-instruct"
    assert _default_name(Path("Tiny Model F16.gguf"), "gguf") == "tiny-model"


def test_quantized_import_is_verified_and_loads(
    tmp_path: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_gguf(tmp_path / "tiny.gguf")
    # A random model's next-token guesses are near ties, so its agreement says little: the bar is set here.
    monkeypatch.setattr(gguf_llm, "MIN_AGREEMENT", 1.01)
    with pytest.raises(ModelImportError, match="4-bit quantization changes the model's answers"):
        import_model(tmp_path / "tiny.gguf", name="tiny", quantize=4, progress=False, mlx=True)
    _assert_store_clean(store_dir)

    monkeypatch.setattr(gguf_llm, "MIN_AGREEMENT", 0.0)
    entry = import_model(tmp_path / "tiny.gguf", name="tiny", quantize=4, progress=False, mlx=True)
    assert entry.quantization == 4 and entry.dtype == "float32"
    config = json.loads((entry.path / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    weights = mx.load(str(entry.path / "model.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.scales"].dtype == mx.float32
    model, tok = load(entry.path)
    assert model(mx.array(IDS)).shape == (1, len(IDS[0]), tok.vocab_size)


def test_truncated_and_foreign_files_leave_nothing(tmp_path: Path, store_dir: Path) -> None:
    write_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    for keep in (10, 2000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:keep])
        with pytest.raises(ModelImportError, match="cannot read") as info:
            import_model(tmp_path / "cut.gguf", name="cut", progress=False, mlx=True)
        assert "\n" not in str(info.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    with pytest.raises(ModelImportError, match="not a model this can import"):
        import_model(tmp_path / "junk.gguf", progress=False, mlx=True)
    _assert_store_clean(store_dir)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"general.architecture": "gemma"}, "architecture 'gemma' is not supported"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer type 'llama' is not supported"),
        ({"tokenizer.ggml.pre": "mystery"}, "pre-tokenizer 'mystery' is not supported"),
        ({"llama.attention.head_count": None}, "lacks llama.attention.head_count"),
        ({"llama.rope.scaling.type": "yarn"}, "rope scaling 'yarn' is not supported"),
    ],
)
def test_unsupported_models_are_refused(
    tmp_path: Path, store_dir: Path, overrides: dict[str, Any], message: str
) -> None:
    write_gguf(tmp_path / "odd.gguf", **overrides)
    with pytest.raises(ModelImportError, match=message):
        import_model(tmp_path / "odd.gguf", name="odd", progress=False, mlx=True)
    _assert_store_clean(store_dir)


# ---- block-quantized GGUF (Q8_0), written by hand: mx.save_gguf only writes float tensors --------------------


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value: Any) -> bytes:
    if isinstance(value, str):
        return struct.pack("<I", 8) + _gguf_string(value)
    if isinstance(value, list):  # lists of strings only, here
        return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_string(v) for v in value)
    array = np.array(value)
    if array.ndim == 1:
        return struct.pack("<IIQ", 9, 5, len(array)) + array.astype("<i4").tobytes()
    codes = {np.dtype("uint32"): (4, "<I"), np.dtype("float32"): (6, "<f"), np.dtype("bool"): (7, "<?")}
    code, fmt = codes[array.dtype]
    return struct.pack("<I", code) + struct.pack(fmt, array.item())


def _q8_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """GGML Q8_0 blocks (f16 scale + 32 int8 per block along rows) and the values they decode to."""
    blocks = w.reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1) / 127).astype(np.float16)
    q = np.round(blocks / np.where(d == 0, 1, d.astype(np.float32))[:, None]).astype(np.int8)
    raw = b"".join(di.tobytes() + qi.tobytes() for di, qi in zip(d, q, strict=True))
    return raw, (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(w.shape)


def write_q8_gguf(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """GGUF v3 with 2-D tensors in Q8_0 and the rest in F32; returns the values each tensor decodes to."""
    infos, data, decoded = b"", b"", {}
    for name, w in tensors.items():
        w = np.array(w, dtype=np.float32)
        if w.ndim == 2:
            raw, decoded[name] = _q8_0(w)
            kind = 8
        else:
            raw, decoded[name], kind = w.tobytes(), w, 0
        data += b"\0" * (-len(data) % 32)
        dims = w.shape[::-1]  # GGML lists the innermost dimension first
        infos += _gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, len(data))
        data += raw
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    header += b"".join(_gguf_string(k) + _gguf_value(v) for k, v in meta.items()) + infos
    path.write_bytes(header + b"\0" * (-len(header) % 32) + data)
    return decoded


def test_q8_0_blocks_are_dequantized_and_kept_exactly(
    tmp_path: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = trained_tokenizer()
    reference = random_model("llama", tok.get_vocab_size())
    meta = {**arch_metadata("llama", model_args("llama", tok.get_vocab_size())), **tokenizer_metadata(tok)}
    meta = {k: (np.array(v) if isinstance(v, mx.array) else v) for k, v in meta.items()}
    decoded = write_q8_gguf(tmp_path / "q8.gguf", gguf_tensors(reference, "llama"), meta)

    # The float import equals a model holding the values the Q8_0 blocks decode to (q/k rows unpermuted).
    entry = import_model(tmp_path / "q8.gguf", name="q8", progress=False, mlx=True)
    weights = mx.load(str(entry.path / "model.safetensors"))
    args = reference.args
    q = gguf_llm.unpermute(mx.array(decoded["blk.1.attn_q.weight"]), args.num_attention_heads)
    np.testing.assert_allclose(np.array(weights["model.layers.1.self_attn.q_proj.weight"]), np.array(q), atol=1e-6)
    np.testing.assert_allclose(
        np.array(weights["model.layers.0.mlp.down_proj.weight"]), decoded["blk.0.ffn_down.weight"], atol=1e-6
    )

    # --quantize 8 keeps the GGUF's own blocks, so it predicts exactly what the float import does.
    monkeypatch.setattr(gguf_llm, "MIN_AGREEMENT", 0.999)
    quantized = import_model(tmp_path / "q8.gguf", name="q8-int8", quantize=8, progress=False, mlx=True)
    manifest = json.loads((quantized.path / store.MANIFEST).read_text())
    assert manifest["quantization_agreement"] == 1.0
    float_model, _ = load(entry.path)
    int8_model, _ = load(quantized.path)
    np.testing.assert_allclose(_logits(int8_model), _logits(float_model), atol=1e-3)
