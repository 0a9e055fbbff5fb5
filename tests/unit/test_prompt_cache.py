"""Prompt caches (system prompt + per-conversation KV caches) in every chat engine: MLX on the tiny offline llama,
llama.cpp on the real SmolLM2 GGUF.

The promise, the same on both: a system prompt is computed once, a follow-up pays only for its new tokens, cached
answers equal uncached ones, conversations are kept in an LRU that ``forget`` can shorten, a cancel or an abandoned
stream leaves a consistent cache, and a failure drops the conversation. Every cached answer is compared with the
greedy answer of the same prompt computed from scratch: a wrong offset, a cache mutated by another ask or a token
missing from the cache changes the output (at once on the random tiny model).

What differs per engine lives in the adapters below:
- MLX keeps KV caches objects (``_conversations[k].cache``); llama.cpp has one live context and saves the KV cells of
  a conversation (``_conversations[k].data``) beside the exact tokens they hold.
- llama.cpp samples a token before evaluating it, so a kept state holds every token handed out but the last; mlx-lm
  feeds each token through the model before handing it out.
- llama.cpp's ``generate`` also reuses the live context's longest common prefix with a new prompt: an ask right after
  another can reuse more than the system prompt (``expected_cached``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import real_models  # type: ignore[import-not-found]

from sottovoce.daemon.backends import llama_cpp_backend, mlx_lm_backend
from sottovoce.daemon.backends.base import ChatMessage, GenerationStep, common_prefix_length

log = logging.getLogger(__name__)

SYSTEM = ChatMessage("system", "You are a helpful voice assistant. Answer in one or two short sentences, politely.")


def conversation(*turns: str) -> list[ChatMessage]:
    """system, then alternating user / assistant contents."""
    return [SYSTEM] + [ChatMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


# ------------------------------------------------------------------------------------------- engine adapters


class MlxEngine:
    name = "mlx"
    module = "mlx_lm"
    unevaluated_tail = 0
    """Tokens handed out but not in the kept cache (mlx-lm has fed every token it handed out)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.folder: Path = request.getfixturevalue("tiny_llm_dir")

    def make(self, **kwargs: Any) -> Any:
        return mlx_lm_backend.MlxChatModel(str(self.folder), **kwargs)

    @staticmethod
    def loaded(chat: Any) -> bool:
        return chat._model is not None

    @staticmethod
    def held(chat: Any, key: str) -> int:
        """How many tokens the kept cache of ``key`` really holds."""
        return int(chat._conversations[key].cache[0].offset)

    @staticmethod
    def decode(chat: Any, tokens: list[int]) -> str:
        return str(chat._tokenizer.decode(tokens))

    @staticmethod
    def live_tokens(chat: Any) -> list[int] | None:
        return None  # no live context: every ask starts from a kept cache or from nothing

    @staticmethod
    def from_scratch(reference: Any) -> None:
        pass  # a model without caches computes every prompt from scratch

    @staticmethod
    def system_snapshot(cache: Any) -> Any:
        return [c.offset for c in cache]

    @staticmethod
    def seed(chat: Any, seed: int) -> None:
        import mlx.core as mx

        mx.random.seed(seed)

    @staticmethod
    def record_prefills(monkeypatch: pytest.MonkeyPatch, chat: Any) -> list[list[int]]:
        """The prompt tokens each generation was given to prefill (after the reused cache)."""
        import mlx_lm

        prompts: list[list[int]] = []
        real = mlx_lm.stream_generate

        def stream_generate(model: Any, tokenizer: Any, prompt: Any, **kwargs: Any) -> Iterator[Any]:
            prompts.append(list(prompt))
            return real(model, tokenizer, prompt, **kwargs)

        monkeypatch.setattr(mlx_lm, "stream_generate", stream_generate)
        return prompts

    @staticmethod
    def break_generation(monkeypatch: pytest.MonkeyPatch, chat: Any) -> None:
        """Make generation fail inside the engine after one token."""
        import mlx_lm

        real = mlx_lm.stream_generate

        def failing(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for i, response in enumerate(real(*args, **kwargs)):
                if i == 1:
                    raise RuntimeError("boom")
                yield response

        monkeypatch.setattr(mlx_lm, "stream_generate", failing)


class LlamaCppEngine:
    name = "llama.cpp"
    module = "llama_cpp"
    unevaluated_tail = 1
    """llama.cpp hands a token out before evaluating it: the last one is not in the context when the answer ends."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.gguf = real_models.gguf_path()

    def make(self, **kwargs: Any) -> Any:
        return llama_cpp_backend.LlamaCppChatModel(self.gguf, **kwargs)

    @staticmethod
    def loaded(chat: Any) -> bool:
        return chat._llm is not None

    @staticmethod
    def held(chat: Any, key: str) -> int:
        """How many tokens the saved state of ``key`` really holds: restored into the context (which then holds
        exactly that conversation, a state the backend may be in anyway), its KV cells counted."""
        from llama_cpp import llama_cpp as lib

        chat._restore(chat._conversations[key])
        return int(lib.llama_memory_seq_pos_max(lib.llama_get_memory(chat._llm._ctx.ctx), 0)) + 1

    @staticmethod
    def decode(chat: Any, tokens: list[int]) -> str:
        return bytes(chat._llm.detokenize(tokens, special=True)).decode("utf-8")

    @staticmethod
    def live_tokens(chat: Any) -> list[int] | None:
        return list(chat._live_tokens())

    @staticmethod
    def from_scratch(reference: Any) -> None:
        reference._llm.reset()  # or generate would reuse the prefix the previous reference ask left

    @staticmethod
    def system_snapshot(saved: Any) -> Any:
        return list(saved.tokens), bytes(saved.data)

    @staticmethod
    def seed(chat: Any, seed: int) -> None:
        chat._llm.set_seed(seed)

    @staticmethod
    def record_prefills(monkeypatch: pytest.MonkeyPatch, chat: Any) -> list[list[int]]:
        """The prompt tokens each generation evaluated (its first ``eval``, before the first token is sampled)."""
        llm = chat._llm
        prompts: list[list[int]] = []
        real_generate, real_eval = llm.generate, llm.eval
        state = {"first": False}

        def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
            state["first"] = True
            return real_generate(*args, **kwargs)

        def eval_(tokens: Any) -> None:
            if state["first"]:
                prompts.append(list(tokens))
                state["first"] = False
            real_eval(tokens)

        monkeypatch.setattr(llm, "generate", generate)
        monkeypatch.setattr(llm, "eval", eval_)
        return prompts

    @staticmethod
    def break_generation(monkeypatch: pytest.MonkeyPatch, chat: Any) -> None:
        """Make generation fail inside the engine after one token."""
        llm = chat._llm
        real = llm.generate

        def failing(*args: Any, **kwargs: Any) -> Iterator[int]:
            tokens = real(*args, **kwargs)
            yield next(tokens)
            tokens.close()
            raise RuntimeError("boom")

        monkeypatch.setattr(llm, "generate", failing)


ENGINES: dict[str, Any] = {"mlx": MlxEngine, "llama.cpp": LlamaCppEngine}


@pytest.fixture(
    scope="module",
    params=["mlx", pytest.param("llama.cpp", marks=[pytest.mark.realmodels, real_models.needs_real_models])],
)
def engine(request: pytest.FixtureRequest) -> Any:
    pytest.importorskip(ENGINES[request.param].module)
    return ENGINES[request.param](request)


@pytest.fixture(scope="module")
def reference(engine: Any) -> Any:
    """Never given a cache key and keeps no system cache: the from-scratch answer (see ``uncached``)."""
    model = engine.make(max_conversations=0, max_system_prompts=0)
    model.load()
    return model


@pytest.fixture
def chat(engine: Any) -> Iterator[Any]:
    model = engine.make(max_conversations=3)
    model.load()
    yield model
    model.unload()


def ask(
    model: Any,
    messages: list[ChatMessage],
    key: str | None = None,
    max_tokens: int = 10,
    stop_after: int | None = None,
) -> list[GenerationStep]:
    steps: list[GenerationStep] = []

    def should_stop() -> bool:
        return stop_after is not None and len(steps) >= stop_after

    for step in model.stream(messages, max_tokens=max_tokens, temperature=0.0, should_stop=should_stop, cache_key=key):
        steps.append(step)
    return steps


def uncached(engine: Any, reference: Any, messages: list[ChatMessage], max_tokens: int = 10) -> str:
    """The greedy answer computed from scratch."""
    engine.from_scratch(reference)
    return text(ask(reference, messages, max_tokens=max_tokens))


def text(steps: list[GenerationStep]) -> str:
    return "".join(s.text for s in steps)


def n_system(chat: Any, messages: list[ChatMessage]) -> int:
    return int(chat._system_prefix_length(messages, chat.prompt_tokens(messages)))


def expected_cached(engine: Any, chat: Any, messages: list[ChatMessage], from_caches: int) -> int:
    """The ``cached_tokens`` an ask of ``messages`` reports, where ``from_caches`` come from the kept caches.

    On MLX that is all. llama.cpp's live context also holds the previous ask: when it shares at least the system
    prompt with the new one, that prefix is reused instead (call this just before the ask)."""
    live = engine.live_tokens(chat)
    if live is None:
        return from_caches
    prompt = chat.prompt_tokens(messages)
    limit = len(prompt) - 1
    shared = min(common_prefix_length(live, prompt), limit)
    return max(from_caches, shared) if shared >= max(1, min(n_system(chat, messages), limit)) else from_caches


def assert_kept(engine: Any, chat: Any, key: str, messages: list[ChatMessage], steps: list[GenerationStep]) -> None:
    """The kept state of ``key`` holds the prompt and the answer's tokens (all that were evaluated), nothing else."""
    tokens = chat._conversations[key].tokens
    prompt = chat.prompt_tokens(messages)
    assert tokens[: len(prompt)] == prompt
    assert len(tokens) == len(prompt) + steps[-1].generated_tokens - engine.unevaluated_tail
    assert engine.held(chat, key) == len(tokens)


# ------------------------------------------------------------------------------------------------------ tests


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([5], [1]) == 0


def test_first_turn_matches_an_uncached_model(engine: Any, chat: Any, reference: Any) -> None:
    messages = conversation("Tell me a long story about a fox.")
    n_prompt = len(chat.prompt_tokens(messages))

    cold = ask(chat, messages, key="a")
    assert text(cold) == uncached(engine, reference, messages)
    assert cold[-1].finish_reason == "length" and cold[-1].generated_tokens == 10
    # Nothing was cached before: this ask computed the system prompt's cache (kept for the next asks) and the rest.
    n_sys = n_system(chat, messages)
    assert 0 < n_sys < n_prompt
    assert {s.cached_tokens for s in cold} == {0}
    assert list(chat._system_caches) == [tuple(chat.prompt_tokens(messages)[:n_sys])]
    assert {s.prompt_tokens for s in cold} == {n_prompt}
    assert cold[0].prompt_seconds > 0 and {s.prompt_seconds for s in cold} == {cold[0].prompt_seconds}
    assert_kept(engine, chat, "a", messages, cold)

    # The same question again: all but the last prompt token come from the conversation cache.
    again = ask(chat, messages, key="a")
    assert text(again) == text(cold)
    assert {s.cached_tokens for s in again} == {n_prompt - 1}


def test_follow_up_pays_only_for_its_new_tokens(
    engine: Any, chat: Any, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = conversation("What is the capital of France?")
    answer = text(ask(chat, first, key="a", max_tokens=8))
    follow_up = conversation("What is the capital of France?", answer, "And of Italy?")
    n_first = len(chat.prompt_tokens(first))
    n_follow = len(chat.prompt_tokens(follow_up))
    prefills = engine.record_prefills(monkeypatch, chat)

    steps = ask(chat, follow_up, key="a")

    assert text(steps) == uncached(engine, reference, follow_up)
    cached = steps[0].cached_tokens
    assert cached >= n_first  # the whole previous prompt, and the answer as far as it re-tokenizes the same
    assert {s.cached_tokens for s in steps} == {cached}
    assert prefills[0] == chat.prompt_tokens(follow_up)[cached:]  # only the rest was prefilled
    assert len(prefills[0]) == n_follow - cached


def test_system_cache_is_shared_by_keys_and_never_changed(engine: Any, chat: Any, reference: Any) -> None:
    one = conversation("What is the capital of France?")
    two = conversation("Tell me a story about a fox.")
    assert text(ask(chat, one, key="a")) == uncached(engine, reference, one)
    assert len(chat._system_caches) == 1
    ((system_tokens, system_cache),) = chat._system_caches.items()
    snapshot = engine.system_snapshot(system_cache)

    expected = expected_cached(engine, chat, two, len(system_tokens))
    steps = ask(chat, two, key="b")

    assert len(chat._system_caches) == 1 and chat._system_caches[system_tokens] is system_cache
    assert engine.system_snapshot(system_cache) == snapshot  # the shared cache was copied, not extended
    assert steps[0].cached_tokens == expected >= len(system_tokens)
    assert text(steps) == uncached(engine, reference, two)
    # No key at all still uses the system cache, and keeps no conversation.
    expected = expected_cached(engine, chat, two, len(system_tokens))
    assert ask(chat, two)[0].cached_tokens == expected >= len(system_tokens)
    assert chat.cached_conversations == ["a", "b"]
    assert engine.system_snapshot(system_cache) == snapshot


def test_a_new_system_prompt_gets_its_own_cache(engine: Any, chat: Any, reference: Any) -> None:
    messages = conversation("Hello there.")
    ask(chat, messages, key="a")
    other = [ChatMessage("system", "Speak like a pirate."), *messages[1:]]

    steps = ask(chat, other, key="a")

    assert text(steps) == uncached(engine, reference, other)
    assert len(chat._system_caches) == 2
    assert steps[0].cached_tokens == 0  # computed now, for this ask and the next ones
    expected = expected_cached(engine, chat, other, n_system(chat, other))
    assert ask(chat, other, key="b")[0].cached_tokens == expected >= n_system(chat, other)


@pytest.mark.slow
def test_history_window_dropping_the_oldest_turn(engine: Any, chat: Any, reference: Any) -> None:
    """The worker keeps the last N turns: once the oldest drops out, only the system prompt (and the next turn's
    header) still matches the cached tokens. The cache is trimmed back to that, never reused past it."""
    turns: list[str] = []
    shared: list[int] = []
    for i, question in enumerate(["Hello.", "What is the weather?", "And tomorrow?", "Thanks, bye."]):
        window = [*turns, question][-3:]  # the last two questions and the answer between them
        messages = conversation(*window)
        prompt = chat.prompt_tokens(messages)
        if "a" in chat.cached_conversations:
            shared.append(mlx_lm_backend.common_prefix_length(chat._conversations["a"].tokens, prompt))
        system_cached = n_system(chat, messages) if i else 0  # turn 0 computes it
        expected = expected_cached(engine, chat, messages, max([*shared[-1:], system_cached]))
        steps = ask(chat, messages, key="a", max_tokens=6)
        assert text(steps) == uncached(engine, reference, messages, max_tokens=6), f"turn {i}"
        assert steps[0].cached_tokens == expected, f"turn {i}"
        turns += [question, text(steps)]
    # Turn 1 extends turn 0; turns 2 and 3 start at a newer question than the cache: only the system prompt and the
    # next turn's header are shared.
    n_sys = n_system(chat, messages)
    assert shared[0] > n_sys + 10
    for n in shared[1:]:
        assert n_sys <= n < n_sys + 10
        assert "<|im_start|>user\n".startswith(engine.decode(chat, prompt[n_sys:n]))


def test_lru_eviction_and_forget(engine: Any, chat: Any) -> None:
    assert chat.max_conversations == 3
    for key in "abcd":
        ask(chat, conversation(f"Question {key}?"), key=key, max_tokens=2)
    assert chat.cached_conversations == ["b", "c", "d"]  # "a" was the least recently used
    ask(chat, conversation("Question b?"), key="b", max_tokens=2)
    assert chat.cached_conversations == ["c", "d", "b"]

    chat.forget("c")
    chat.forget("never-seen")
    assert chat.cached_conversations == ["d", "b"]

    for key in "ca":  # forgotten, evicted: the system cache only (or, on llama.cpp, what the live context shares)
        messages = conversation(f"Question {key}?")
        expected = expected_cached(engine, chat, messages, n_system(chat, messages))
        assert ask(chat, messages, key=key, max_tokens=2)[0].cached_tokens == expected
        assert expected < len(chat.prompt_tokens(messages)) - 3  # not the whole question: its conversation is gone
    assert chat.cached_conversations == ["b", "c", "a"]


def test_cancel_then_ask_again(engine: Any, chat: Any, reference: Any) -> None:
    messages = conversation("Tell me a long story about a fox.")
    cancelled = ask(chat, messages, key="a", max_tokens=50, stop_after=3)
    assert [s.finish_reason for s in cancelled] == [None, None, None, "cancelled"]
    assert_kept(engine, chat, "a", messages, cancelled)
    n_prompt = len(chat.prompt_tokens(messages))

    # The person asks again (same history): the answer is the fresh model's.
    steps = ask(chat, messages, key="a")
    assert text(steps) == uncached(engine, reference, messages)
    assert steps[0].cached_tokens == n_prompt - 1
    # Or the worker kept the partial answer in the history and the person follows up.
    follow_up = conversation("Tell me a long story about a fox.", text(cancelled), "Shorter, please.")
    assert text(ask(chat, follow_up, key="a")) == uncached(engine, reference, follow_up)


def test_abandoned_stream_keeps_a_consistent_cache(engine: Any, chat: Any, reference: Any) -> None:
    messages = conversation("Count to ten.")
    stream = chat.stream(messages, max_tokens=20, temperature=0.0, should_stop=lambda: False, cache_key="a")
    steps = [next(stream), next(stream)]
    stream.close()  # the consumer went away between tokens
    assert_kept(engine, chat, "a", messages, steps)
    assert text(ask(chat, messages, key="a")) == uncached(engine, reference, messages)


def test_cancelled_before_start_leaves_the_cache(chat: Any) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    before = chat._conversations["a"]
    assert ask(chat, messages, key="a", stop_after=0) == [
        GenerationStep("", len(chat.prompt_tokens(messages)), 0, "cancelled")
    ]
    assert chat._conversations["a"] is before


def test_failure_inside_generation_drops_the_conversation(
    engine: Any, chat: Any, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    with monkeypatch.context() as patched:
        engine.break_generation(patched, chat)
        with pytest.raises(RuntimeError, match="boom"):
            ask(chat, messages, key="a")
    assert "a" not in chat.cached_conversations
    assert text(ask(chat, messages, key="a")) == uncached(engine, reference, messages)


def test_sampled_answers_use_the_cache_too(engine: Any, chat: Any) -> None:
    messages = conversation("Tell me a long story about a fox.")
    ask(chat, messages, key="a", max_tokens=3)
    engine.seed(chat, 0)
    steps = list(chat.stream(messages, max_tokens=4, temperature=0.8, should_stop=lambda: False, cache_key="a"))
    assert steps[-1].generated_tokens == 4 and steps[0].cached_tokens == len(chat.prompt_tokens(messages)) - 1


@pytest.mark.slow
def test_measure_prefill_cold_vs_follow_up(engine: Any) -> None:
    """Logs the numbers for the benchmark (run with -s or --log-cli-level=INFO); speed itself is bench/'s business.
    Asserts only that later turns reuse more."""
    model = engine.make()
    model.load()
    history: list[str] = ["Tell me about the lantern the small fox found in the snow. " * 8]
    rows = []
    for turn in range(4):
        messages = conversation(*history)
        steps = ask(model, messages, key="bench", max_tokens=16)
        rows.append((turn, steps[0].prompt_tokens, steps[0].cached_tokens, steps[0].prompt_seconds))
        history += [text(steps), "Why did it carry it home? Say more about the brothers and the snow. " * 4]
    cold = engine.make(max_conversations=0, max_system_prompts=0)
    cold.load()
    uncached_step = ask(cold, conversation(*history[:-1]), max_tokens=16)[0]
    for turn, n_prompt, n_cached, seconds in rows:
        log.info(
            "%s turn %d: prompt %d tokens, %d cached, prefill %.4f s", engine.name, turn, n_prompt, n_cached, seconds
        )
    log.info(
        "uncached last prompt: %d tokens, prefill %.4f s", uncached_step.prompt_tokens, uncached_step.prompt_seconds
    )
    assert rows[0][2] == 0 and rows[-1][2] > rows[1][2] > rows[0][2]
    model.unload()
    cold.unload()


def test_unload_frees_caches_and_load_brings_the_model_back(engine: Any, chat: Any, reference: Any) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    assert chat.cached_conversations and chat._system_caches

    chat.unload()

    assert not engine.loaded(chat) and chat.cached_conversations == [] and not chat._system_caches
    with pytest.raises(RuntimeError, match="before load"):
        ask(chat, messages, key="a")
    chat.load()
    steps = ask(chat, messages, key="a")
    assert steps[0].cached_tokens == 0 and text(steps) == uncached(engine, reference, messages)
