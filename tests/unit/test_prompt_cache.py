"""Prompt caches in MlxChatModel (system prompt + per-conversation KV caches) on the tiny offline llama.

Every cached answer is compared with the greedy answer of the same prompt prefilled from scratch: a wrong offset,
a cache mutated by another ask or a token missing from the cache changes the random model's output at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

import mlx_lm

from sottovoce.daemon.backends.base import ChatMessage, GenerationStep
from sottovoce.daemon.backends.mlx_lm_backend import MlxChatModel, common_prefix_length

log = logging.getLogger(__name__)

SYSTEM = ChatMessage("system", "You are a helpful voice assistant. Answer in one or two short sentences, politely.")


def conversation(*turns: str) -> list[ChatMessage]:
    """system, then alternating user / assistant contents."""
    return [SYSTEM] + [ChatMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def reference(tiny_llm_dir: Path) -> MlxChatModel:
    """Never given a cache key and never shares its system cache: the from-scratch answer."""
    model = MlxChatModel(str(tiny_llm_dir), max_conversations=0, max_system_prompts=0)
    model.load()
    return model


@pytest.fixture
def chat(tiny_llm_dir: Path) -> MlxChatModel:
    model = MlxChatModel(str(tiny_llm_dir), max_conversations=3)
    model.load()
    return model


class RecordingStream:
    """Wraps mlx_lm.stream_generate to record the prompt tokens it is given (what is actually prefilled)."""

    def __init__(self) -> None:
        self.real = mlx_lm.stream_generate
        self.prompts: list[list[int]] = []

    def __call__(self, model: Any, tokenizer: Any, prompt: Any, **kwargs: Any) -> Iterator[Any]:
        self.prompts.append(list(prompt))
        return self.real(model, tokenizer, prompt, **kwargs)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> RecordingStream:
    recording = RecordingStream()
    monkeypatch.setattr(mlx_lm, "stream_generate", recording)
    return recording


def ask(
    model: MlxChatModel,
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


def text(steps: list[GenerationStep]) -> str:
    return "".join(s.text for s in steps)


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([5], [1]) == 0


def test_first_turn_matches_an_uncached_model(chat: MlxChatModel, reference: MlxChatModel) -> None:
    messages = conversation("What is the capital of France?")
    n_prompt = len(chat.prompt_tokens(messages))

    cold = ask(chat, messages, key="a")
    assert text(cold) == text(ask(reference, messages))
    assert cold[-1].finish_reason == "length" and cold[-1].generated_tokens == 10
    # Nothing was cached before: this ask computed the system prompt's cache (kept for the next asks) and the rest.
    n_system = chat._system_prefix_length(messages, chat.prompt_tokens(messages))
    assert 0 < n_system < n_prompt
    assert {s.cached_tokens for s in cold} == {0}
    assert list(chat._system_caches) == [tuple(chat.prompt_tokens(messages)[:n_system])]
    assert {s.prompt_tokens for s in cold} == {n_prompt}
    assert all(s.prompt_seconds > 0 for s in cold) and len({s.prompt_seconds for s in cold}) == 1
    # The kept cache holds the prompt and every generated token.
    kept = chat._conversations["a"]
    assert len(kept.tokens) == n_prompt + 10 and kept.cache[0].offset == n_prompt + 10

    # The same question again: all but the last prompt token come from the conversation cache.
    again = ask(chat, messages, key="a")
    assert text(again) == text(cold)
    assert {s.cached_tokens for s in again} == {n_prompt - 1}


def test_follow_up_matches_an_uncached_model(
    chat: MlxChatModel, reference: MlxChatModel, recorder: RecordingStream
) -> None:
    first = conversation("What is the capital of France?")
    answer = text(ask(chat, first, key="a", max_tokens=8))
    follow_up = conversation("What is the capital of France?", answer, "And of Italy?")
    n_first = len(chat.prompt_tokens(first))
    n_follow = len(chat.prompt_tokens(follow_up))
    recorder.prompts.clear()

    steps = ask(chat, follow_up, key="a")

    assert text(steps) == text(ask(reference, follow_up))
    cached = steps[0].cached_tokens
    assert cached >= n_first  # the whole previous prompt, and the answer as far as it re-tokenizes the same
    assert {s.cached_tokens for s in steps} == {cached}
    assert recorder.prompts[0] == chat.prompt_tokens(follow_up)[cached:]  # only the rest was prefilled
    assert len(recorder.prompts[0]) == n_follow - cached


def test_system_cache_is_shared_by_keys_and_never_changed(chat: MlxChatModel, reference: MlxChatModel) -> None:
    one = conversation("What is the capital of France?")
    two = conversation("Tell me a story about a fox.")
    assert text(ask(chat, one, key="a")) == text(ask(reference, one))
    assert len(chat._system_caches) == 1
    ((system_tokens, system_cache),) = chat._system_caches.items()
    offsets = [c.offset for c in system_cache]

    steps = ask(chat, two, key="b")

    assert len(chat._system_caches) == 1 and chat._system_caches[system_tokens] is system_cache
    assert [c.offset for c in system_cache] == offsets  # the shared cache was copied, not extended
    assert steps[0].cached_tokens == len(system_tokens)
    assert text(steps) == text(ask(reference, two))
    # No key at all still uses the system cache, and keeps no conversation.
    assert ask(chat, two)[0].cached_tokens == len(system_tokens)
    assert chat.cached_conversations == ["a", "b"]


def test_a_new_system_prompt_gets_its_own_cache(chat: MlxChatModel, reference: MlxChatModel) -> None:
    messages = conversation("Hello there.")
    ask(chat, messages, key="a")
    other = [ChatMessage("system", "Speak like a pirate."), *messages[1:]]

    steps = ask(chat, other, key="a")

    assert text(steps) == text(ask(reference, other))
    assert len(chat._system_caches) == 2
    assert steps[0].cached_tokens == 0  # computed now, for this ask and the next ones
    assert ask(chat, other, key="b")[0].cached_tokens == chat._system_prefix_length(other, chat.prompt_tokens(other))


def test_history_window_dropping_the_oldest_turn(chat: MlxChatModel, reference: MlxChatModel) -> None:
    """The worker keeps the last N turns: once the oldest drops out, only the system prompt (and the next turn's
    header) still matches the cached tokens. The cache is trimmed back to that, never reused past it."""
    turns: list[str] = []
    shared: list[int] = []
    for i, question in enumerate(["Hello.", "What is the weather?", "And tomorrow?", "Thanks, bye."]):
        window = [*turns, question][-3:]  # the last two questions and the answer between them
        messages = conversation(*window)
        prompt = chat.prompt_tokens(messages)
        if "a" in chat.cached_conversations:
            shared.append(common_prefix_length(chat._conversations["a"].tokens, prompt))
        steps = ask(chat, messages, key="a", max_tokens=6)
        assert text(steps) == text(ask(reference, messages, max_tokens=6)), f"turn {i}"
        system_cached = chat._system_prefix_length(messages, prompt) if i else 0  # turn 0 computes it
        assert steps[0].cached_tokens == max([*shared[-1:], system_cached])
        turns += [question, text(steps)]
    # Turn 1 extends turn 0; turns 2 and 3 start at a newer question than the cache: only the system prompt and the
    # next turn's header are shared.
    n_system = chat._system_prefix_length(messages, prompt)
    assert shared[0] > n_system + 10
    for n in shared[1:]:
        assert n_system <= n < n_system + 10
        assert "<|im_start|>user\n".startswith(chat._tokenizer.decode(prompt[n_system:n]))


def test_lru_eviction_and_forget(chat: MlxChatModel) -> None:
    assert chat.max_conversations == 3
    for key in "abcd":
        ask(chat, conversation(f"Question {key}?"), key=key, max_tokens=2)
    assert chat.cached_conversations == ["b", "c", "d"]  # "a" was the least recently used
    ask(chat, conversation("Question b?"), key="b", max_tokens=2)
    assert chat.cached_conversations == ["c", "d", "b"]

    chat.forget("c")
    chat.forget("never-seen")
    assert chat.cached_conversations == ["d", "b"]

    messages = conversation("Question c?")
    n_system = chat._system_prefix_length(messages, chat.prompt_tokens(messages))
    assert ask(chat, messages, key="c", max_tokens=2)[0].cached_tokens == n_system  # forgotten: system cache only
    assert ask(chat, conversation("Question a?"), key="a", max_tokens=2)[0].cached_tokens == n_system


def test_cancel_then_ask_again(chat: MlxChatModel, reference: MlxChatModel) -> None:
    messages = conversation("Tell me a long story about a fox.")
    cancelled = ask(chat, messages, key="a", max_tokens=50, stop_after=3)
    assert cancelled[-1].finish_reason == "cancelled"
    n_prompt = len(chat.prompt_tokens(messages))
    assert chat._conversations["a"].cache[0].offset == len(chat._conversations["a"].tokens) == n_prompt + 3

    # The person asks again (same history): the answer is the fresh model's.
    steps = ask(chat, messages, key="a")
    assert text(steps) == text(ask(reference, messages))
    assert steps[0].cached_tokens == n_prompt - 1
    # Or the worker kept the partial answer in the history and the person follows up.
    follow_up = conversation("Tell me a long story about a fox.", text(cancelled), "Shorter, please.")
    assert text(ask(chat, follow_up, key="a")) == text(ask(reference, follow_up))


def test_abandoned_stream_keeps_a_consistent_cache(chat: MlxChatModel, reference: MlxChatModel) -> None:
    messages = conversation("Count to ten.")
    stream = chat.stream(messages, max_tokens=20, temperature=0.0, should_stop=lambda: False, cache_key="a")
    next(stream), next(stream)
    stream.close()  # the consumer went away between tokens
    kept = chat._conversations["a"]
    assert kept.cache[0].offset == len(kept.tokens) == len(chat.prompt_tokens(messages)) + 2
    assert text(ask(chat, messages, key="a")) == text(ask(reference, messages))


def test_cancelled_before_start_leaves_the_cache(chat: MlxChatModel) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    before = chat._conversations["a"]
    assert ask(chat, messages, key="a", stop_after=0) == [
        GenerationStep("", len(chat.prompt_tokens(messages)), 0, "cancelled")
    ]
    assert chat._conversations["a"] is before


def test_failure_inside_generation_drops_the_conversation(
    chat: MlxChatModel, reference: MlxChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    real = mlx_lm.stream_generate

    def failing(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, response in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise RuntimeError("boom")
            yield response

    monkeypatch.setattr(mlx_lm, "stream_generate", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ask(chat, messages, key="a")
    assert "a" not in chat.cached_conversations
    monkeypatch.setattr(mlx_lm, "stream_generate", real)
    assert text(ask(chat, messages, key="a")) == text(ask(reference, messages))


def test_sampled_answers_use_the_cache_too(chat: MlxChatModel) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    steps = list(chat.stream(messages, max_tokens=4, temperature=0.8, should_stop=lambda: False, cache_key="a"))
    assert steps[-1].generated_tokens == 4 and steps[0].cached_tokens == len(chat.prompt_tokens(messages)) - 1


def test_measure_prefill_cold_vs_follow_up(tiny_llm_dir: Path) -> None:
    """Not a pass/fail test of speed: logs the numbers for the benchmark (run with -s or --log-cli-level=INFO)."""
    model = MlxChatModel(str(tiny_llm_dir))
    model.load()
    history: list[str] = ["Tell me about the lantern the small fox found in the snow. " * 8]
    rows = []
    for turn in range(4):
        messages = conversation(*history)
        started = time.perf_counter()
        steps = ask(model, messages, key="bench", max_tokens=16)
        rows.append((turn, steps[0].prompt_tokens, steps[0].cached_tokens, steps[0].prompt_seconds))
        assert time.perf_counter() - started > 0
        history += [text(steps), "Why did it carry it home? Say more about the brothers and the snow. " * 4]
    cold = MlxChatModel(str(tiny_llm_dir), max_conversations=0, max_system_prompts=0)
    cold.load()
    uncached = ask(cold, conversation(*history[:-1]), max_tokens=16)[0]
    for turn, n_prompt, n_cached, seconds in rows:
        log.info("turn %d: prompt %d tokens, %d cached, prefill %.4f s", turn, n_prompt, n_cached, seconds)
    log.info("uncached last prompt: %d tokens, prefill %.4f s", uncached.prompt_tokens, uncached.prompt_seconds)
    assert rows[-1][2] > rows[0][2]


def test_unload_frees_caches_and_load_brings_the_model_back(chat: MlxChatModel, reference: MlxChatModel) -> None:
    messages = conversation("Hello.")
    ask(chat, messages, key="a", max_tokens=3)
    assert chat.cached_conversations and chat._system_caches

    chat.unload()

    assert chat._model is None and chat.cached_conversations == [] and not chat._system_caches
    with pytest.raises(RuntimeError, match="before load"):
        ask(chat, messages, key="a")
    chat.load()
    steps = ask(chat, messages, key="a")
    assert steps[0].cached_tokens == 0 and text(steps) == text(ask(reference, messages))
