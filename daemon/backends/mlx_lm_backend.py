"""A chat model on MLX (mlx-lm), behind the ``ChatModel`` interface, with prompt caches.

Prompt caching (mlx-lm's KV caches, as ``mlx_lm/server.py`` reuses them):

- **System prompt.** The KV cache of the tokens a conversation starts with (the system message as the chat template
  renders it) is computed once per distinct system prompt and kept, keyed by those tokens, in a small LRU. Asks copy
  it (``copy.deepcopy``, as mlx-lm's ``LRUPromptCache`` does); it is never mutated.
- **Conversations.** With a ``cache_key``, the cache of the whole exchange (prompt + generated tokens) is kept after
  the answer, beside the exact token list it holds. The next ask with that key keeps the longest common token prefix
  of its new prompt and those tokens (``trim_prompt_cache``) and prefills only the rest. A history window that drops
  its oldest turn shares only the system prompt (and the next turn's header) with the cache: the cache is trimmed
  back to that and the rest prefilled, the same as a fresh prompt after the system cache. Caches that cannot be
  trimmed (rotating past their window, recurrent state) are used only when the new prompt extends them exactly;
  otherwise the ask starts again from the system cache. At most ``max_conversations`` are kept (least recently used
  dropped first); ``forget(key)`` drops one.
- **Consistency.** A conversation's cache is taken out of the LRU while an ask uses it and put back with the tokens
  it then holds: after an answer, a cancel, or an abandoned stream (mlx-lm has already fed every token it handed out
  through the model, so the cache holds exactly prompt + tokens seen). A failure inside MLX drops it instead.

mlx / mlx_lm are imported lazily so that importing this module never loads ``mlx.core`` before
``preload_openblas()`` ran.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import (
    ChatMessage,
    GenerationStep,
    ModelLoadError,
    ShouldStop,
    common_prefix_length,
    never,
    one_line,
    role_lines,
    system_prefix_length,
)
from .hub import model_folder

logger = logging.getLogger(__name__)

PREFILL_STEP = 2048
"""Tokens per forward pass when prefilling a system-prompt cache (mlx-lm's default prefill step)."""


@dataclasses.dataclass
class _KeptCache:
    tokens: list[int]
    """Exactly the tokens whose keys and values ``cache`` holds, in order."""
    cache: list[Any]
    """mlx-lm's per-layer cache objects (``make_prompt_cache``)."""


class MlxChatModel:
    """One mlx-lm model folder (``config.json``, ``model*.safetensors``, tokenizer files) or a Hugging Face hub id;
    use on the model thread only (the caches are not locked)."""

    engine = "mlx"
    engine_reason = ""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        max_conversations: int = 8,
        max_system_prompts: int = 4,
        prepare: Callable[[], str] | None = None,
    ) -> None:
        """``max_conversations``: conversation caches kept (LRU); ``max_system_prompts``: system-prompt caches kept;
        ``prepare``: called at load, returns the folder to load (it converts a store model for MLX on first use)."""
        if max_conversations < 0 or max_system_prompts < 0:
            raise ValueError("cache sizes must not be negative")
        self.spec = os.fspath(model)
        self.path = Path(model)
        self.name = self.path.name or self.spec
        self.max_conversations = max_conversations
        self.max_system_prompts = max_system_prompts
        self.prepare = prepare
        self._model: Any = None
        self._tokenizer: Any = None  # mlx_lm TokenizerWrapper
        self._conversations: collections.OrderedDict[str, _KeptCache] = collections.OrderedDict()
        self._system_caches: collections.OrderedDict[tuple[int, ...], list[Any]] = collections.OrderedDict()

    def load(self) -> None:
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

        if self.prepare is not None:
            self.spec = self.prepare()
        # A missing folder that looks like "org/name" is looked up in the Hugging Face cache (mlx_lm.load would do
        # that too, but with a traceback instead of a message saying how to get a model).
        folder = model_folder(
            self.spec,
            what="chat model",
            folder_hint="run `sottovoce models fetch-defaults` or pass --llm-model DIR",
            allow_patterns=DEFAULT_ALLOW_PATTERNS,
        )
        import mlx_lm

        started = time.perf_counter()
        try:
            model_and_tokenizer = mlx_lm.load(str(folder))  # (model, tokenizer) without return_config
            self._model, self._tokenizer = model_and_tokenizer[0], model_and_tokenizer[1]
            self.path = folder
            loaded = time.perf_counter()
            # Warm-up, greedy and sampled: MLX's CPU backend builds each fused kernel with the C++ compiler on first
            # use (seconds on a cold $TMPDIR/mlx cache), which the first real answer should not wait for.
            for temperature in (0.0, 0.7):
                for _ in self.stream(
                    [ChatMessage("user", "Hi")], max_tokens=2, temperature=temperature, should_stop=never
                ):
                    pass
        except Exception as exc:
            self._model = self._tokenizer = None
            raise ModelLoadError(f"cannot load chat model from {folder}: {one_line(exc)}") from exc
        finally:
            self._conversations.clear()
            self._system_caches.clear()
        logger.debug(
            "loaded chat model %s in %.2f s, warm-up %.2f s", self.name, loaded - started, time.perf_counter() - loaded
        )

    def unload(self) -> None:
        """Free the weights, the tokenizer and every kept KV cache; ``load()`` brings the model back."""
        self._model = self._tokenizer = None
        self._conversations.clear()
        self._system_caches.clear()
        import mlx.core as mx

        mx.clear_cache()  # hand MLX's buffer cache back to the system too

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The token ids of ``messages`` rendered for generation (chat template, or "role: content" lines)."""
        return self._render(messages, add_generation_prompt=True)

    def _render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> list[int]:
        tokenizer = self._loaded_tokenizer()
        if tokenizer.has_chat_template:
            chat = [{"role": m.role, "content": m.content} for m in messages]
            return list(tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt))
        return list(tokenizer.encode(role_lines(messages, add_generation_prompt=add_generation_prompt)))

    # ---- prompt caches ----

    @property
    def cached_conversations(self) -> list[str]:
        """Keys with a kept cache, least recently used first."""
        return list(self._conversations)

    def forget(self, cache_key: str) -> None:
        """Drop the KV cache kept for ``cache_key`` (unknown keys are fine)."""
        self._conversations.pop(cache_key, None)

    def _system_prefix_length(self, messages: Sequence[ChatMessage], prompt: Sequence[int]) -> int:
        """How many leading prompt tokens come from the system message alone (0 without one)."""
        return system_prefix_length(lambda m: self._render(m, add_generation_prompt=False), messages, prompt)

    def _system_cache(self, tokens: Sequence[int]) -> tuple[list[Any], bool]:
        """The (shared, read-only) cache of ``tokens``, computed on first use; True if it was already there."""
        key = tuple(tokens)
        cache = self._system_caches.get(key)
        if cache is not None:
            self._system_caches.move_to_end(key)
            return cache, True
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self._model)
        for start in range(0, len(tokens), PREFILL_STEP):
            self._model(mx.array(list(tokens[start : start + PREFILL_STEP]))[None], cache=cache)
            mx.eval([c.state for c in cache])
        if self.max_system_prompts:
            self._system_caches[key] = cache
            while len(self._system_caches) > self.max_system_prompts:
                self._system_caches.popitem(last=False)
        return cache, False

    def _start_cache(self, prompt: list[int], system_length: int, cache_key: str | None) -> tuple[list[Any], int, int]:
        """A cache for this ask, how many leading prompt tokens it holds, and how many of those an earlier ask
        computed (the rest: a system prompt seen for the first time, prefilled just now). At least one prompt token is
        left to prefill: generation starts from the last prompt token's logits."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        limit = len(prompt) - 1
        kept = self._conversations.pop(cache_key, None) if cache_key is not None else None
        if kept is not None:
            shared = min(common_prefix_length(kept.tokens, prompt), limit)
            excess = len(kept.tokens) - shared
            if shared > 0 and shared >= min(system_length, limit):
                if excess == 0:
                    return kept.cache, shared, shared
                if can_trim_prompt_cache(kept.cache) and trim_prompt_cache(kept.cache, excess) == excess:
                    return kept.cache, shared, shared
            logger.debug(
                "conversation cache %r not reusable (%d of %d tokens shared)", cache_key, shared, len(kept.tokens)
            )
        prefix = min(system_length, limit)
        if prefix > 0:
            system_cache, reused = self._system_cache(prompt[:prefix])
            return copy.deepcopy(system_cache), prefix, prefix if reused else 0
        return make_prompt_cache(self._model), 0, 0

    def _keep(self, cache_key: str, tokens: list[int], cache: list[Any]) -> None:
        offset = next((c.offset for c in cache if isinstance(getattr(c, "offset", None), int)), len(tokens))
        if offset != len(tokens):  # never expected: mlx-lm feeds every token it hands out through the model
            logger.warning("dropping conversation cache %r: it holds %d tokens, not %d", cache_key, offset, len(tokens))
            return
        if not self.max_conversations:
            return
        self._conversations[cache_key] = _KeptCache(tokens, cache)
        self._conversations.move_to_end(cache_key)
        while len(self._conversations) > self.max_conversations:
            evicted, _ = self._conversations.popitem(last=False)
            logger.debug("conversation cache %r evicted (least recently used)", evicted)

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

        ``generated_tokens`` counts the tokens sampled so far, the end-of-turn token included (as mlx-lm does).
        ``cached_tokens`` counts the prompt tokens whose KV cache an earlier ask computed (not prefilled now);
        ``prompt_seconds`` is the measured time from the start of the ask to the first token (finding, copying or
        trimming a cache, and the prefill, a new system prompt's included).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.sample_utils import make_sampler

        tokenizer = self._loaded_tokenizer()
        prompt = self.prompt_tokens(messages)
        n_prompt = len(prompt)
        if should_stop():
            yield GenerationStep("", n_prompt, 0, "cancelled")
            return

        started = time.perf_counter()
        cache, n_start, n_cached = self._start_cache(prompt, self._system_prefix_length(messages, prompt), cache_key)
        tokens = list(prompt)  # what the cache holds once the prompt is in; each token mlx-lm hands out is added
        # The temperature goes in as an array: mlx-lm's compiled sampler would bake a Python float into a fused kernel,
        # and MLX's CPU backend builds each new kernel with the C++ compiler (~1-1.5 s per distinct temperature).
        temp: Any = mx.array(temperature, dtype=mx.float32) if temperature > 0 else 0.0
        responses = mlx_lm.stream_generate(
            self._model,
            tokenizer,
            prompt[n_start:],
            max_tokens=max_tokens,
            sampler=make_sampler(temp=temp),
            prompt_cache=cache,
        )
        prompt_seconds = 0.0
        keep = cache_key is not None
        try:
            for response in responses:
                tokens.append(response.token)
                if not prompt_seconds:
                    prompt_seconds = max(time.perf_counter() - started, 1e-9)
                    logger.debug(
                        "prompt %d tokens, %d cached, %d prefilled in %.3f s",
                        n_prompt,
                        n_cached,
                        n_prompt - n_cached,
                        prompt_seconds,
                    )
                step = GenerationStep(
                    text=response.text,
                    prompt_tokens=n_prompt,
                    generated_tokens=response.generation_tokens,
                    finish_reason=response.finish_reason,
                    prompt_seconds=prompt_seconds,
                    cached_tokens=n_cached,
                )
                yield step
                if step.finish_reason is not None:
                    return
                if should_stop():
                    # Text the detokenizer still holds back (a lone space, half a UTF-8 character) is dropped.
                    yield GenerationStep(
                        "", n_prompt, step.generated_tokens, "cancelled", prompt_seconds, cached_tokens=n_cached
                    )
                    return
        except GeneratorExit:
            raise  # abandoned at a yield: the cache holds exactly ``tokens``
        except BaseException:
            keep = False  # failed inside MLX: the cache may hold part of a step
            raise
        finally:
            responses.close()  # leaves mlx_lm's generation context at once when cancelled or abandoned
            if keep:
                assert cache_key is not None
                self._keep(cache_key, tokens, cache)

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError("MlxChatModel used before load()")
        return self._tokenizer
