"""Build tiny, randomly initialised models offline for tests and benchmarks.

- ``build_tiny_whisper(dest)``: an English-only mlx-whisper folder (``config.json`` + ``weights.safetensors``). The
  tokenizer comes from the tiktoken files shipped inside mlx_whisper, so loading and decoding need no download.
- ``build_tiny_llm(dest)``: an mlx-lm llama folder (``config.json``, ``model.safetensors``) next to a byte-level BPE
  tokenizer trained here with ``tokenizers`` and a ChatML chat template, loadable by ``mlx_lm.load(dest)`` offline.

Random weights say nothing about quality; they exercise the real loading, decoding and streaming code paths.
Everything is seeded, so the same seed gives the same files and the same (greedy) outputs.

Run ``python tests/tiny_models.py DIR`` to build both into ``DIR/whisper`` and ``DIR/llm`` (integration tests start a
daemon with ``--whisper-model DIR/whisper --llm-model DIR/llm``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
WHISPER_TEXT = " hello world"
"""What the tiny Whisper says for any audio that reaches it (it is not a speech model)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Plain prose for the BPE merges; its content only shapes which merges exist.
_CORPUS = """\
The assistant listens while a key is held, writes down what was said, and answers in a few short sentences.
Nothing leaves the machine: the microphone, the transcript and the answer all stay on the desk it runs on.
When the room is quiet the model is never called, because silence and hum are stopped before they reach it.
Questions about the weather, a recipe, the capital of a country or the meaning of a word are all welcome.
Numbers such as 3, 14, 159 and 2025 appear in answers too, with units like seconds, metres and kilograms.
A good answer is brief, polite and correct; a long answer is read aloud slowly and tires the listener.
Once upon a time a small fox found a lantern in the snow and carried it home to show its brothers.
"""


def build_tiny_whisper(dest: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a random English-only Whisper (2+2 layers, width 64) to ``dest``; returns the folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,  # fixed by the 30 s window: 3000 mel frames, conv stride 2
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=51864,  # english-only vocabulary (gpt2.tiktoken + specials)
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=2,
    )
    mx.random.seed(seed)
    model = Whisper(dims, dtype=mx.float32)
    _script_decoder(model)
    # float16 on disk like mlx-community's checkpoints, so loaders must cast for the CPU.
    params: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in params.items()}
    mx.save_safetensors(str(dest / "weights.safetensors"), weights)
    config = {**dataclasses.asdict(dims), "model_type": "whisper"}
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dest


def _script_decoder(model) -> None:
    """Make the random decoder say ``WHISPER_TEXT`` (greedy, any audio) and then end, in a handful of steps.

    A purely random decoder loops on one word up to 224 tokens per window and then runs the whole temperature
    fallback: ~25 s per call. Here the positional embedding points each position at the next token of a script
    (``<|0.00|> hello world <|1.00|> <|endoftext|>``) with a large logit margin, so decoding is confident
    (avg logprob ~0: no fallback, segment kept) and short. The encoder, cross-attention and blocks stay random and
    are still computed; their residual outputs are scaled down so they cannot derail the script.
    """
    import mlx.core as mx
    from mlx_whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(multilingual=False)
    script = [tokenizer.timestamp_begin, *tokenizer.encode(WHISPER_TEXT), tokenizer.timestamp_begin + 50]
    targets = [*script, tokenizer.eot]
    decoder = model.decoder
    n_ctx, width = decoder.positional_embedding.shape
    directions = mx.random.normal((len(targets), width))
    directions = directions / mx.linalg.norm(directions, axis=-1, keepdims=True)
    embedding = decoder.token_embedding.weight
    # Output rows of the script tokens: 3x a typical row norm (~1), so their logit (~24) dwarfs the rest (<~5).
    embedding[mx.array(targets)] = 3.0 * directions
    decoder.token_embedding.weight = embedding
    # Position i predicts targets[i]; every later position predicts end-of-text, so any window ends quickly.
    rows = [directions[min(i, len(targets) - 1)] for i in range(n_ctx)]
    decoder.positional_embedding = 30.0 * mx.stack(rows)
    for block in decoder.blocks:
        for layer in (block.attn.out, block.cross_attn.out, block.mlp2):
            layer.weight = 0.05 * layer.weight
            layer.bias = 0.05 * layer.bias


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()  # mlx-lm picks its BPE streaming detokenizer from this
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tokenizer


def build_tiny_llm(dest: str | os.PathLike[str], *, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a random llama (2 layers, width 64) with a trained BPE tokenizer and ChatML template to ``dest``.

    The end-of-turn token's output row is zero, so greedy decoding never ends the turn by itself: tests of
    ``length``/``cancelled`` stay deterministic, and a test of ``stop`` adds an end-of-turn id it knows will come.
    """
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save(str(dest / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")

    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": eos_id,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    lm_head = model.lm_head.weight
    model.lm_head.weight = mx.where(mx.arange(lm_head.shape[0])[:, None] == eos_id, 0.0, lm_head)
    mx.eval(model.parameters())
    save_model(dest, model)
    save_config(config, dest / "config.json")
    return dest


def build_all(dest: str | os.PathLike[str], *, seed: int = 0) -> tuple[Path, Path]:
    """Build both models under ``dest``; returns ``(whisper_dir, llm_dir)``."""
    dest = Path(dest)
    return build_tiny_whisper(dest / "whisper", seed=seed), build_tiny_llm(dest / "llm", seed=seed)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to create whisper/ and llm/ in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from sottovoce.daemon.blas import preload_openblas

    preload_openblas()
    whisper_dir, llm_dir = build_all(args.dest, seed=args.seed)
    print(f"whisper: {whisper_dir}\nllm: {llm_dir}")  # CLI output
    return 0


if __name__ == "__main__":
    sys.exit(main())
