"""Rebuild a Hugging Face tokenizer (``tokenizer.json`` + config files) from a GGUF file's tokenizer metadata.

Only byte-level BPE ("gpt2" in GGUF: SmolLM, Qwen2, LLaMA-3, ...) is supported. The pre-tokenizer is not stored in
GGUF, only named (``tokenizer.ggml.pre``); the regexes below are llama.cpp's for those names, which match the
original tokenizers'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sottovoce.daemon.models.errors import ModelImportError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
)
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
)
# pre name -> (how digits are split first, regex for a Split step or None for ByteLevel's own GPT-2 regex)
_PRE: dict[str, tuple[bool, str | None]] = {
    "default": (False, None),
    "gpt2": (False, None),
    "gpt-2": (False, None),
    "smollm": (True, None),
    "starcoder": (True, None),
    "refact": (True, None),
    "qwen2": (False, _QWEN2_RE),
    "llama-bpe": (False, _LLAMA3_RE),
    "llama3": (False, _LLAMA3_RE),
    "smaug-bpe": (False, _LLAMA3_RE),
}
# Special tokens that end an assistant turn in common chat templates: also stop generation on them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "<|endoftext|>")


def _meta(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    return value.item() if hasattr(value, "item") and getattr(value, "size", 0) == 1 else value


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    digits, regex = _PRE[pre]
    steps: list[Any] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def build(meta: dict[str, Any], dst: Path) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns ids for config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _meta(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelImportError(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2': SmolLM, Qwen2, LLaMA-3)"
        )
    pre = str(_meta(meta, "tokenizer.ggml.pre", "default"))
    if pre not in _PRE:
        raise ModelImportError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_PRE))})")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges_raw:
        raise ModelImportError("the GGUF file has no tokenizer tokens/merges")
    types_meta = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types_meta.tolist()] if types_meta is not None else [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelImportError("the GGUF tokenizer metadata is inconsistent (token and type counts differ)")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate (rare padding entries) keeps its first id
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelImportError(f"the GGUF tokenizer has a malformed merge {m!r}")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    # Control tokens (<|im_start|>, ...) are special; user-defined ones are matched in text but decoded as text.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == USER_DEFINED])

    def token(key: str) -> tuple[int | None, str | None]:
        i = _meta(meta, key)
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    bos_id, bos = token("tokenizer.ggml.bos_token_id")
    eos_id, eos = token("tokenizer.ggml.eos_token_id")
    _, unk = token("tokenizer.ggml.unknown_token_id")
    _, pad = token("tokenizer.ggml.padding_token_id")
    add_bos = bool(_meta(meta, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(dst / "tokenizer.json"))

    chat_template = _meta(meta, "tokenizer.chat_template")
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_meta(meta, f"{_meta(meta, 'general.architecture')}.context_length", 2048)),
    }
    if chat_template:
        config["chat_template"] = chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n", "utf-8")

    # Stop on the template's end-of-turn token too (GGUF names one eos; chat templates may end turns otherwise).
    eos_ids = [eos_id] if eos_id is not None else []
    for name in _END_OF_TURN:
        if chat_template and name in chat_template and name in vocab and vocab[name] not in eos_ids:
            eos_ids.append(vocab[name])
    return {
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None,
        "has_chat_template": bool(chat_template),
    }
