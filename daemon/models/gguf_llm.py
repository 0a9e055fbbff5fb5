"""GGUF chat model (llama or qwen2 architecture) -> mlx-lm folder, without torch or transformers' GGUF loader.

``mx.load`` reads GGUF natively: F32/F16 tensors as arrays, Q4_0/Q4_1/Q8_0 as MLX affine-quantized triples
(``weight``, ``scales``, ``biases``, group size 32), which are dequantized here. The HF-style ``config.json`` is
rebuilt from the metadata (``rope_theta`` included: mlx-lm silently falls back to 10000 without it, and SmolLM2
needs 100000), the tokenizer from the tokenizer metadata (``gguf_tokenizer``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sottovoce.daemon.models import gguf_tokenizer
from sottovoce.daemon.models.errors import ModelImportError

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2")
GROUP_SIZE = 32
"""Quantization group size: 64 made SmolLM2 speak nonsense at 4 bits, 32 kept it right (GUIDE section 5)."""

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _meta(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    return gguf_tokenizer._meta(meta, key, default)


def load_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    import mlx.core as mx

    try:
        loaded = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        # MLX's own message already names truncation ("extends past the end of the file ...").
        raise ModelImportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    weights, meta = cast("tuple[dict[str, mx.array], dict[str, Any]]", loaded)
    return weights, meta


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ModelImportError(f"unsupported tensor {gguf_name!r} in the GGUF file (only dense llama/qwen2 models)")


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (its rope pairs interleaved dims; HF/mlx-lm's rotates halves)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def build_config(meta: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    arch = _meta(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelImportError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in weights:
        raise ModelImportError("GGUF models with per-frequency rope scaling (LLaMA-3.1 style) are not supported")

    def need(key: str) -> Any:
        value = _meta(meta, f"{arch}.{key}")
        if value is None:
            raise ModelImportError(f"the GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    embed = weights.get("token_embd.weight")
    if embed is None:
        raise ModelImportError("the GGUF file has no token_embd.weight")
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(meta, f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(meta, f"{arch}.rope.freq_base", 10000.0 if arch == "llama" else 1000000.0)),
        "max_position_embeddings": int(_meta(meta, f"{arch}.context_length", 2048)),
        "vocab_size": int(embed.shape[0]),
        "tie_word_embeddings": "output.weight" not in weights,
    }
    head_dim = _meta(meta, f"{arch}.attention.key_length")
    if head_dim is not None and int(head_dim) != hidden // heads:
        if arch != "llama":
            raise ModelImportError(f"{arch} with head_dim {head_dim} != hidden/heads is not supported")
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in weights
        config["mlp_bias"] = "blk.0.ffn_up.bias" in weights
    scaling = _meta(meta, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelImportError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
        config["rope_scaling"] = {"type": "linear", "factor": float(need("rope.scaling.factor"))}
    return config


def _unpermute_qk(name: str, w: mx.array, config: dict[str, Any]) -> mx.array:
    """llama.cpp's convert permuted the rows of q and k (weights and biases) for its interleaved rope; qwen2 uses
    NeoX rope and is stored unpermuted. Rows are output features, so packed quantized rows permute the same way."""
    if config["model_type"] != "llama":
        return w
    if ".attn_q." in name:
        return unpermute(w, config["num_attention_heads"])
    if ".attn_k." in name:
        return unpermute(w, config["num_key_value_heads"])
    return w


def quantized_tensors(
    weights: dict[str, mx.array], config: dict[str, Any], dtype: mx.Dtype
) -> dict[str, tuple[int, mx.array, mx.array, mx.array]]:
    """GGUF block-quantized tensors as MLX affine triples, keyed by mlx-lm module path: (bits, weight, scales, biases).

    Q4_0/Q4_1/Q8_0 are affine over groups of 32, exactly MLX's QuantizedLinear layout, so ``--quantize`` can keep
    them bit for bit instead of re-quantizing dequantized values onto a new grid (which compounds the error).
    """
    out: dict[str, tuple[int, mx.array, mx.array, mx.array]] = {}
    for name, w in weights.items():
        base = name.removesuffix(".weight")
        scales, biases = weights.get(f"{base}.scales"), weights.get(f"{base}.biases")
        if not name.endswith(".weight") or scales is None or biases is None:
            continue
        bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
        out[hf_name(name).removesuffix(".weight")] = (
            bits,
            _unpermute_qk(name, w, config),
            _unpermute_qk(name, scales.astype(dtype), config),
            _unpermute_qk(name, biases.astype(dtype), config),
        )
    return out


def map_weights(
    weights: dict[str, mx.array], config: dict[str, Any], dtype: mx.Dtype, progress: bool
) -> dict[str, mx.array]:
    """GGUF tensors -> mlx-lm parameter names, as float ``dtype`` (block-quantized ones dequantized)."""
    import mlx.core as mx
    from tqdm import tqdm

    out: dict[str, mx.array] = {}
    names = sorted(n for n in weights if not n.endswith((".scales", ".biases")))
    for name in tqdm(names, desc="llm weights", unit="tensor", disable=not progress):
        w = weights[name]
        base = name.removesuffix(".weight")
        if f"{base}.scales" in weights:
            scales, biases = weights[f"{base}.scales"], weights.get(f"{base}.biases")
            bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            # float32 scales: dequantizing with GGUF's float16 scales would round every weight to float16
            w = mx.dequantize(
                w,
                scales.astype(mx.float32),
                None if biases is None else biases.astype(mx.float32),
                group_size=GROUP_SIZE,
                bits=bits,
            )
        w = _unpermute_qk(name, w, config).astype(dtype)
        mx.eval(w)  # tensor by tensor, so the peak stays one float copy of the model
        out[hf_name(name)] = w
    return out


def build_model(config: dict[str, Any], weights: dict[str, mx.array]) -> nn.Module:
    """The mlx-lm model class for the config, with ``weights`` loaded strictly (every shape checked)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = model.sanitize(dict(weights)) if hasattr(model, "sanitize") else weights
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelImportError(f"the GGUF weights do not fit mlx-lm's {config['model_type']}: {e}") from None
    model.eval()
    return model


# ---- quantization, verified ------------------------------------------------------------------------------------

# Short on purpose: MLX's CPU quantized matmul is slow (~2x dense per token, ~15x on a prompt), so each verified
# token costs; two chat prompts with their answers give ~100 compared positions.
VERIFY_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")
VERIFY_TOKENS = 24
MIN_AGREEMENT = 0.85
"""Share of positions (prompts and the float model's greedy answers, teacher-forced) where the quantized model
predicts the same next token. Measured on SmolLM2 (Q4_1 GGUF): keeping its blocks 1.0; 8-bit re-quantization 0.97;
re-quantizing the dequantized weights onto a fresh 4-bit/group-32 grid 0.62 (its haiku turned into repetition);
4-bit/group-64 0.65 (it answered the France question with nonsense)."""


def _verification_sequences(model: nn.Module, dst: Path, eos: set[int]) -> list[list[int]]:
    """Each prompt (chat-formatted with the saved tokenizer: that exercises it too) plus the greedy answer."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(dst)
    sequences = []
    for prompt in VERIFY_PROMPTS:
        if tokenizer.has_chat_template:
            ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
        else:
            ids = list(tokenizer.encode(prompt))
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids]), cache=cache)
        for _ in range(VERIFY_TOKENS):
            token = int(mx.argmax(logits[0, -1]).item())  # type: ignore[arg-type]
            ids.append(token)
            if token in eos:
                break
            logits = model(mx.array([[token]]), cache=cache)
        sequences.append(ids)
    return sequences


def quantize_verified(
    model: nn.Module,
    config: dict[str, Any],
    bits: int,
    dst: Path,
    gguf_blocks: dict[str, tuple[int, mx.array, mx.array, mx.array]],
) -> tuple[nn.Module, dict[str, Any], float]:
    """Quantize to at most ``bits`` per weight (embeddings and output head 8), group 32; refuse if answers drift.

    Tensors the GGUF already holds at no more than that many bits keep their exact GGUF blocks; the rest are
    quantized from the float weights. Scales keep the float dtype (float32 on the CPU: bf16 scales ran ~8x slower).
    """
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    eos = config.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    sequences = _verification_sequences(model, dst, eos_ids)
    references = [mx.argmax(model(mx.array([s]))[0], axis=-1) for s in sequences]

    def limit(path: str) -> int:
        # The token embeddings (and an untied output head) are the most sensitive tensors: keep them at 8 bits.
        return max(bits, 8) if path.endswith(("embed_tokens", "lm_head")) else bits

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        kept = gguf_blocks.get(path)
        chosen = kept[0] if kept is not None and kept[0] <= limit(path) else limit(path)
        return True if chosen == bits else {"group_size": GROUP_SIZE, "bits": chosen}

    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits-per-weight summary
        model, config = quantize_model(model, config, GROUP_SIZE, bits, quant_predicate=predicate)
    exact = []
    for path, (b, w, scales, biases) in gguf_blocks.items():
        if b <= limit(path):
            exact += [(f"{path}.weight", w), (f"{path}.scales", scales), (f"{path}.biases", biases)]
    model.load_weights(exact, strict=False)
    mx.eval(model.parameters())

    same = total = 0
    for s, ref in zip(sequences, references, strict=True):
        predicted = mx.argmax(model(mx.array([s]))[0], axis=-1)
        same += int(mx.sum(predicted == ref).item())  # type: ignore[arg-type]
        total += len(s)
    agreement = same / total
    log.info("%d-bit quantization keeps %.1f%% of next-token predictions", bits, 100 * agreement)
    if agreement < MIN_AGREEMENT:
        raise ModelImportError(
            f"{bits}-bit quantization changes the model's answers ({agreement:.0%} of next tokens kept, "
            f"{MIN_AGREEMENT:.0%} needed); import it without --quantize or with --quantize 8"
        )
    return model, config, agreement


def convert(
    src: Path, dst: Path, *, dtype: str = "float32", quantize: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Convert the GGUF file ``src`` into the existing empty folder ``dst``; returns facts for the manifest."""
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ModelImportError(f"unsupported dtype {dtype!r} (use float32 or float16)")
    weights, meta = load_gguf(src)
    config = build_config(meta, weights)
    config.update({k: v for k, v in gguf_tokenizer.build(meta, dst).items() if k.endswith("_id") and v is not None})
    target = getattr(mx, dtype)
    model = build_model(config, map_weights(weights, config, target, progress))
    blocks = quantized_tensors(weights, config, target) if quantize is not None else {}
    del weights
    info: dict[str, Any] = {"architecture": config["model_type"], "gguf_name": _meta(meta, "general.name")}
    if quantize is not None:
        model, config, agreement = quantize_verified(model, config, quantize, dst, blocks)
        info["quantization_agreement"] = round(agreement, 3)
    save_model(dst, model, donate_model=True)
    save_config(config, config_path=dst / "config.json")
    return info
