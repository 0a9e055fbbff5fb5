"""The `ChatModel` promise, on every engine (mlx-lm and llama.cpp) and the real SmolLM2-135M-Instruct.

Every test body runs on each engine; what differs per engine (decoding tokens, counting the tokens the engine
produced, seeding the sampler, building a small context) lives in the small adapters below. llama.cpp loads the
store's Q4_1 GGUF as it is; MLX its converted float32 copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import real_models  # type: ignore[import-not-found]

from sottovoce.client.config import DEFAULT_SYSTEM_PROMPT
from sottovoce.daemon.backends.base import ChatMessage, ChatModel, GenerationStep, ModelLoadError, ModelRuntimeError

# slow: loading SmolLM2 on MLX and generating with it take seconds.
pytestmark = [pytest.mark.realmodels, pytest.mark.slow, real_models.needs_real_models, pytest.mark.timeout(600)]

LLM = "smollm2-135m-instruct"
MESSAGES = [ChatMessage("system", DEFAULT_SYSTEM_PROMPT), ChatMessage("user", "What is the capital of France?")]
STORY = [ChatMessage("system", DEFAULT_SYSTEM_PROMPT), ChatMessage("user", "Tell me a long story about a fox.")]


# ------------------------------------------------------------------------------------------- engine adapters


class MlxEngine:
    name = "mlx"
    module = "mlx_lm"

    @staticmethod
    def at(path: Path, **kwargs: Any) -> ChatModel:
        from sottovoce.daemon.backends.mlx_lm_backend import MlxChatModel

        return MlxChatModel(path, **kwargs)

    @classmethod
    def make(cls, **kwargs: Any) -> ChatModel:
        return cls.at(real_models.mlx_copy(LLM), **kwargs)

    @staticmethod
    def small_context(tokens: int) -> ChatModel | None:
        return None  # mlx-lm has no fixed context: its KV cache grows with the conversation

    @staticmethod
    def decode(chat: Any, tokens: list[int]) -> str:
        return str(chat._tokenizer.decode(tokens))

    @staticmethod
    def seed(chat: Any, seed: int) -> None:
        import mlx.core as mx

        mx.random.seed(seed)

    @staticmethod
    def count_produced(monkeypatch: pytest.MonkeyPatch, chat: Any) -> list[int]:
        """One entry per token mlx-lm's generator handed out."""
        import mlx_lm

        produced: list[int] = []
        real = mlx_lm.stream_generate

        def stream_generate(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for response in real(*args, **kwargs):
                produced.append(response.token)
                yield response

        monkeypatch.setattr(mlx_lm, "stream_generate", stream_generate)
        return produced


class LlamaCppEngine:
    name = "llama.cpp"
    module = "llama_cpp"

    @staticmethod
    def at(path: Path, **kwargs: Any) -> ChatModel:
        from sottovoce.daemon.backends.llama_cpp_backend import LlamaCppChatModel

        return LlamaCppChatModel(path, **kwargs)

    @classmethod
    def make(cls, **kwargs: Any) -> ChatModel:
        return cls.at(real_models.gguf_path(LLM), **kwargs)

    @classmethod
    def small_context(cls, tokens: int) -> ChatModel | None:
        return cls.make(context_tokens=tokens)

    @staticmethod
    def decode(chat: Any, tokens: list[int]) -> str:
        return bytes(chat._llm.detokenize(tokens, special=True)).decode("utf-8")

    @staticmethod
    def seed(chat: Any, seed: int) -> None:
        chat._llm.set_seed(seed)

    @staticmethod
    def count_produced(monkeypatch: pytest.MonkeyPatch, chat: Any) -> list[int]:
        """One entry per token llama.cpp sampled."""
        produced: list[int] = []
        llm = chat._llm
        real = llm.sample

        def sample(*args: Any, **kwargs: Any) -> int:
            token = int(real(*args, **kwargs))
            produced.append(token)
            return token

        monkeypatch.setattr(llm, "sample", sample)
        return produced


ENGINES: dict[str, Any] = {"mlx": MlxEngine, "llama.cpp": LlamaCppEngine}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> Any:
    pytest.importorskip(ENGINES[request.param].module)
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def chat(engine: Any) -> Iterator[Any]:
    model = engine.make()
    model.load()
    yield model
    model.unload()


def run(
    chat: Any,
    messages: list[ChatMessage] = MESSAGES,
    *,
    max_tokens: int = 12,
    temperature: float = 0.0,
    stop_after: int | None = None,
) -> list[GenerationStep]:
    steps: list[GenerationStep] = []

    def should_stop() -> bool:
        return stop_after is not None and len(steps) >= stop_after

    for step in chat.stream(messages, max_tokens=max_tokens, temperature=temperature, should_stop=should_stop):
        steps.append(step)
    return steps


def text(steps: list[GenerationStep]) -> str:
    return "".join(s.text for s in steps)


# ---------------------------------------------------------------------------------------------------- prompts


def test_prompt_is_the_models_chatml_template(engine: Any, chat: Any) -> None:
    assert chat.engine == engine.name
    prompt = chat.prompt_tokens(MESSAGES)
    assert engine.decode(chat, prompt) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_greedy_answer_is_right(chat: Any) -> None:
    steps = run(chat, max_tokens=48)
    assert steps[-1].finish_reason == "stop", text(steps)
    assert "Paris" in text(steps)
    assert steps[-1].generated_tokens == len(steps)  # the end-of-turn token counts, and its step has no text
    assert steps[-1].text == ""


# -------------------------------------------------------------------------------------------------- streaming


def test_streams_until_max_tokens(engine: Any, chat: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = engine.count_produced(monkeypatch, chat)
    steps = run(chat, STORY, max_tokens=12)

    assert [s.generated_tokens for s in steps] == list(range(1, 13))
    assert [s.finish_reason for s in steps] == [None] * 11 + ["length"]
    assert len(produced) == 12 and text(steps) == engine.decode(chat, produced)
    assert {s.prompt_tokens for s in steps} == {len(chat.prompt_tokens(STORY))}
    assert steps[0].prompt_seconds > 0 and {s.prompt_seconds for s in steps} == {steps[0].prompt_seconds}
    # Greedy decoding is deterministic.
    assert text(run(chat, STORY, max_tokens=12)) == text(steps)


def test_cancel_stops_generation(engine: Any, chat: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = engine.count_produced(monkeypatch, chat)
    steps = run(chat, STORY, max_tokens=50, stop_after=3)

    assert [s.finish_reason for s in steps] == [None, None, None, "cancelled"]
    assert steps[-1].generated_tokens == 3 and steps[-1].text == ""
    assert len(produced) == 3  # generation stopped: no token was made for nobody


def test_cancelled_before_start_runs_nothing(engine: Any, chat: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = engine.count_produced(monkeypatch, chat)
    steps = run(chat, max_tokens=50, stop_after=0)
    assert steps == [GenerationStep("", len(chat.prompt_tokens(MESSAGES)), 0, "cancelled")]
    assert produced == []


def test_sampling_respects_max_tokens(engine: Any, chat: Any) -> None:
    engine.seed(chat, 1)
    steps = run(chat, STORY, max_tokens=5, temperature=0.9)
    assert [s.generated_tokens for s in steps] == [1, 2, 3, 4, 5]
    assert steps[-1].finish_reason == "length"


def test_max_tokens_must_be_positive(chat: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        run(chat, max_tokens=0)


# ------------------------------------------------------------------------------------------ loading, failures


def test_missing_model_is_a_one_line_load_error(engine: Any, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-llm"
    with pytest.raises(ModelLoadError) as excinfo:
        engine.at(missing).load()
    message = str(excinfo.value)
    assert "\n" not in message and str(missing) in message and len(message) < 400, message


def test_unload_then_stream_is_an_error_and_load_again_works(engine: Any) -> None:
    model = engine.make()
    with pytest.raises(RuntimeError, match="before load"):
        run(model)
    model.load()
    first = text(run(model))

    model.unload()
    model.unload()  # twice is harmless

    with pytest.raises(RuntimeError, match="before load"):
        run(model)
    model.load()
    assert text(run(model)) == first


def test_conversation_longer_than_the_context(engine: Any) -> None:
    model = engine.small_context(256)
    if model is None:
        pytest.skip(f"{engine.name} has no fixed context to overflow")
    model.load()
    long = [
        ChatMessage("system", DEFAULT_SYSTEM_PROMPT),
        *[
            ChatMessage("user" if i % 2 == 0 else "assistant", "Tell me more about foxes and snow. " * 5)
            for i in range(6)
        ],
    ]
    assert len(model.prompt_tokens(long)) > 256

    with pytest.raises(ModelRuntimeError, match=r"does not fit the chat model's context of 256 tokens"):
        run(model, long)

    # The model still answers the next ask, and an answer that would overrun the context stops at its end.
    assert "Paris" in text(run(model, max_tokens=48))
    n_prompt = len(model.prompt_tokens(STORY))
    steps = run(model, STORY, max_tokens=1000)
    assert steps[-1].generated_tokens <= 256 - n_prompt
