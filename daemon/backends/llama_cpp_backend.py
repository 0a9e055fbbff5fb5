"""A chat model on llama.cpp (llama-cpp-python), behind the ``ChatModel`` interface: GGUF files as users already have
them (Ollama, LM Studio, the registry), run with llama.cpp's quantized CPU kernels.

The prompt is the GGUF's own chat template (``tokenizer.chat_template`` in its metadata, rendered with
llama-cpp-python's Jinja2 formatter); a model without one gets "role: content" lines, as on MLX.

Prompt caching keeps the promise the MLX backend makes (see ``mlx_lm_backend``), with llama.cpp's one live context:

- The context keeps the tokens it last evaluated; llama-cpp-python's ``generate`` reuses their longest common prefix
  with a new prompt and evaluates only the rest.
- **Conversations.** With a ``cache_key``, the sequence state (its KV cells) of the whole exchange is saved after the
  answer beside the exact tokens it holds, in an LRU of ``max_conversations``. An ask whose conversation was pushed out
  of the live context by another client's restores it first.
- **System prompt.** A prompt that shares less than its system message with both the live context and its own
  conversation starts from the saved state of that system prompt (computed once per distinct prompt, LRU of
  ``max_system_prompts``).

States are saved per sequence (``llama_state_seq_get_data``): KV cells only, tens of KiB per token for a small model,
not the logits that llama-cpp-python's own ``save_state`` copies (100 MB for a 49k vocabulary).
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import openmp
from .base import (
    ChatMessage,
    GenerationStep,
    ModelLoadError,
    ModelRuntimeError,
    ShouldStop,
    common_prefix_length,
    never,
    one_line,
    role_lines,
    system_prefix_length,
)

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
"""Tokens of context (prompt + answer): the system prompt, `history_turns` turns and an answer fit well within it."""


@dataclasses.dataclass
class _SavedState:
    tokens: list[int]
    """Exactly the tokens whose KV cells ``data`` holds, in order."""
    data: bytes


def find_gguf(path: Path) -> Path:
    """The GGUF file itself, or the only ``.gguf`` in a folder (a store entry); ModelLoadError otherwise."""
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if files:
            raise ModelLoadError(f"{path} holds several .gguf files; name one of them with --llm-model")
    raise ModelLoadError(
        f"chat model not found: {path} is not a GGUF file or a folder with one; "
        "run `sottovoce models fetch-defaults` or `sottovoce models import FILE.gguf`"
    )


class LlamaCppChatModel:
    """One GGUF chat model; use on the model thread only (the context and caches are not locked)."""

    engine = "llama.cpp"
    engine_reason = ""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        max_conversations: int = 8,
        max_system_prompts: int = 4,
        context_tokens: int = DEFAULT_CONTEXT,
        threads: int = 0,
        name: str | None = None,
    ) -> None:
        """``context_tokens``: llama.cpp's context size (capped by the model's training length); ``threads``: CPU
        threads (0 = one per core); ``name``: what `status` shows (default: the file's name)."""
        if max_conversations < 0 or max_system_prompts < 0:
            raise ValueError("cache sizes must not be negative")
        self.path = Path(model)
        self.name = name or (self.path.stem if self.path.suffix == ".gguf" else self.path.name)
        self.max_conversations = max_conversations
        self.max_system_prompts = max_system_prompts
        self.context_tokens = context_tokens
        self.threads = threads or os.cpu_count() or 1
        self._llm: Any = None
        self._template: Any = None
        self._system_template: Any = None
        self._conversations: collections.OrderedDict[str, _SavedState] = collections.OrderedDict()
        self._system_caches: collections.OrderedDict[tuple[int, ...], _SavedState] = collections.OrderedDict()

    def load(self) -> None:
        gguf = find_gguf(self.path)
        openmp.wait_passively()  # before the engine's OpenMP runtime starts
        started = time.perf_counter()
        try:
            from llama_cpp import Llama

            llm = Llama(
                model_path=str(gguf),
                n_ctx=self.context_tokens,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )
            self._llm = llm
            self._template, self._system_template = self._templates(llm)
            loaded = time.perf_counter()
            for _ in self.stream([ChatMessage("user", "Hi")], max_tokens=2, temperature=0.0, should_stop=never):
                pass  # warm-up: the first decode allocates llama.cpp's compute buffers
        except ModelLoadError:
            self._llm = None
            raise
        except Exception as exc:
            self._llm = None
            raise ModelLoadError(f"cannot load chat model from {gguf}: {one_line(exc)}") from exc
        finally:
            self._conversations.clear()
            self._system_caches.clear()
        logger.debug(
            "loaded chat model %s (llama.cpp, %d threads, context %d) in %.2f s, warm-up %.2f s",
            self.name,
            self.threads,
            llm.n_ctx(),
            loaded - started,
            time.perf_counter() - loaded,
        )

    @staticmethod
    def _templates(llm: Any) -> tuple[Any, Any]:
        """The GGUF's chat template, rendering for generation and without the assistant's header; (None, None)
        when the GGUF has none."""
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            logger.info("the GGUF has no chat template: the prompt is plain 'role: content' lines")
            return None, None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token: int) -> str:
            return str(llm._model.token_get_text(token)) if token != -1 else ""

        eos, bos = token_text(llm.token_eos()), token_text(llm.token_bos())
        return (
            Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True),
            Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=False),
        )

    def unload(self) -> None:
        """Free the weights, the context and every kept state; ``load()`` brings the model back."""
        llm, self._llm = self._llm, None
        self._conversations.clear()
        self._system_caches.clear()
        if llm is not None:
            llm.close()

    def _loaded(self) -> Any:
        if self._llm is None:
            raise RuntimeError("LlamaCppChatModel used before load()")
        return self._llm

    # ---- prompts ----

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The token ids of ``messages`` rendered for generation (chat template, or "role: content" lines)."""
        return self._render(messages, add_generation_prompt=True)

    def _render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> list[int]:
        llm = self._loaded()
        formatter = self._template if add_generation_prompt else self._system_template
        if formatter is None:
            text = role_lines(messages, add_generation_prompt=add_generation_prompt)
            return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
        rendered = formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        # The template writes the special tokens (BOS included where the model wants one) as text.
        return list(llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True))

    def _system_prefix_length(self, messages: Sequence[ChatMessage], prompt: Sequence[int]) -> int:
        """How many leading prompt tokens come from the system message alone (0 without one)."""
        return system_prefix_length(lambda m: self._render(m, add_generation_prompt=False), messages, prompt)

    # ---- saved states ----

    @property
    def cached_conversations(self) -> list[str]:
        """Keys with a kept state, least recently used first."""
        return list(self._conversations)

    def forget(self, cache_key: str) -> None:
        """Drop the state kept for ``cache_key`` (unknown keys are fine)."""
        self._conversations.pop(cache_key, None)

    def _live_tokens(self) -> list[int]:
        return [int(t) for t in self._loaded()._input_ids]

    def _save(self) -> _SavedState:
        llm = self._loaded()
        from llama_cpp import llama_cpp as lib

        ctx = llm._ctx.ctx
        size = lib.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(ctx, buffer, size, 0)
        if written <= 0 or written > size:
            raise ModelRuntimeError("llama.cpp could not save the conversation's state")
        return _SavedState(self._live_tokens(), bytes(buffer)[:written])

    def _restore(self, saved: _SavedState) -> None:
        llm = self._loaded()
        from llama_cpp import llama_cpp as lib

        llm._ctx.kv_cache_clear()
        buffer = (ctypes.c_uint8 * len(saved.data)).from_buffer_copy(saved.data)
        if lib.llama_state_seq_set_data(llm._ctx.ctx, buffer, len(saved.data), 0) != len(saved.data):
            llm.reset()
            raise ModelRuntimeError("llama.cpp could not restore a saved conversation state")
        n = len(saved.tokens)
        llm.input_ids[:n] = saved.tokens
        llm.n_tokens = n
        llm._requires_eval = True  # the logits are not restored: generate() evaluates at least one token again

    def _system_state(self, tokens: Sequence[int]) -> bool:
        """Put the state of ``tokens`` (a system prompt) into the context; True if it was kept from earlier."""
        key = tuple(tokens)
        saved = self._system_caches.get(key)
        if saved is not None:
            self._system_caches.move_to_end(key)
            self._restore(saved)
            return True
        llm = self._loaded()
        llm.reset()
        llm.eval(list(tokens))
        if self.max_system_prompts:
            self._system_caches[key] = self._save()
            while len(self._system_caches) > self.max_system_prompts:
                self._system_caches.popitem(last=False)
        return False

    def _prepare(self, prompt: list[int], system_length: int, cache_key: str | None) -> int:
        """Leave the context holding the best reusable prefix of ``prompt``; return how many prompt tokens an earlier
        ask computed (the rest: a system prompt seen for the first time, evaluated just now, or nothing)."""
        limit = len(prompt) - 1  # generation starts from the last prompt token's logits: evaluate at least that one
        needed = max(1, min(system_length, limit))
        live = self._live_tokens()
        live_shared = common_prefix_length(live, prompt)
        kept = self._conversations.pop(cache_key, None) if cache_key is not None else None
        if kept is not None:
            shared = common_prefix_length(kept.tokens, prompt)
            if shared >= needed and shared > live_shared:
                self._restore(kept)
                return min(shared, limit)
            if shared < needed:
                logger.debug("conversation state %r not reusable (%d of %d tokens shared)", cache_key, shared, limit)
        if live_shared >= needed:
            return min(live_shared, limit)
        if system_length > 0 and limit > 0:
            prefix = min(system_length, limit)
            return prefix if self._system_state(prompt[:prefix]) else 0
        return 0

    def _keep(self, cache_key: str) -> None:
        if not self.max_conversations:
            return
        self._conversations[cache_key] = self._save()
        self._conversations.move_to_end(cache_key)
        while len(self._conversations) > self.max_conversations:
            evicted, _ = self._conversations.popitem(last=False)
            logger.debug("conversation state %r evicted (least recently used)", evicted)

    # ---- generation ----

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: ShouldStop,
        cache_key: str | None = None,
    ) -> Iterator[GenerationStep]:
        """Yield the answer as it is generated; the last step has finish_reason "stop", "length" or "cancelled".

        ``generated_tokens`` counts the tokens sampled so far, the end-of-turn token included (as on MLX);
        ``cached_tokens`` the prompt tokens an earlier ask computed; ``prompt_seconds`` the time from the start of the
        ask to the first token."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        llm = self._loaded()
        prompt = self.prompt_tokens(messages)
        n_prompt = len(prompt)
        if should_stop():
            yield GenerationStep("", n_prompt, 0, "cancelled")
            return
        room = llm.n_ctx() - n_prompt
        if room < 1:
            raise ModelRuntimeError(
                f"the conversation ({n_prompt} tokens) does not fit the chat model's context of {llm.n_ctx()} tokens; "
                "lower history_turns or start a new conversation"
            )
        max_tokens = min(max_tokens, room)
        started = time.perf_counter()
        keep = cache_key is not None
        try:
            n_cached = self._prepare(prompt, self._system_prefix_length(messages, prompt), cache_key)
            # Plain temperature sampling, as on MLX (llama.cpp's default top-k/top-p/min-p would change answers).
            tokens = llm.generate(prompt, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        except BaseException:
            llm.reset()
            raise
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        prompt_seconds = 0.0
        generated = 0
        try:
            for token in tokens:
                generated += 1
                if not prompt_seconds:
                    prompt_seconds = max(time.perf_counter() - started, 1e-9)
                    logger.debug(
                        "prompt %d tokens, %d cached, %d evaluated in %.3f s",
                        n_prompt,
                        n_cached,
                        n_prompt - n_cached,
                        prompt_seconds,
                    )
                if _is_eog(llm, token):
                    tail = decoder.decode(b"", final=True)
                    yield GenerationStep(tail, n_prompt, generated, "stop", prompt_seconds, n_cached)
                    return
                text = decoder.decode(llm.detokenize([token]))
                finish = "length" if generated >= max_tokens else None
                yield GenerationStep(text, n_prompt, generated, finish, prompt_seconds, n_cached)
                if finish is not None:
                    return
                if should_stop():
                    yield GenerationStep("", n_prompt, generated, "cancelled", prompt_seconds, n_cached)
                    return
        except GeneratorExit:
            raise  # abandoned at a yield: the context holds exactly what it evaluated
        except BaseException:
            keep = False
            llm.reset()  # a failure inside llama.cpp: the context may hold part of a batch
            raise
        finally:
            tokens.close()
            if keep:
                assert cache_key is not None
                self._keep(cache_key)


def _is_eog(llm: Any, token: int) -> bool:
    from llama_cpp import llama_cpp as lib

    return bool(lib.llama_vocab_is_eog(llm._model.vocab, token))
