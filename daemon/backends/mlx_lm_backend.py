"""A chat model on MLX (mlx-lm), behind the ``ChatModel`` interface.

mlx / mlx_lm are imported lazily so that importing this module never loads ``mlx.core`` before
``preload_openblas()`` ran.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import ChatMessage, GenerationStep, ModelLoadError, ShouldStop

logger = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _never() -> bool:
    return False


class MlxChatModel:
    """One mlx-lm model folder (``config.json``, ``model*.safetensors``, tokenizer files); use on the model thread."""

    def __init__(self, model: str | os.PathLike[str]) -> None:
        self.path = Path(model)
        self.name = self.path.name or str(model)
        self._model: Any = None
        self._tokenizer: Any = None  # mlx_lm TokenizerWrapper

    def load(self) -> None:
        if not (self.path / "config.json").is_file():
            # mlx_lm.load would treat a missing folder as a Hugging Face repo id and try to download it.
            raise ModelLoadError(
                f"chat model not found: {self.path} has no config.json "
                "(run `sottovoce models fetch-defaults` or pass --llm-model DIR)"
            )
        import mlx_lm

        started = time.perf_counter()
        try:
            model_and_tokenizer = mlx_lm.load(str(self.path))  # (model, tokenizer) without return_config
            self._model, self._tokenizer = model_and_tokenizer[0], model_and_tokenizer[1]
            loaded = time.perf_counter()
            # Warm-up, greedy and sampled: MLX's CPU backend builds each fused kernel with the C++ compiler on first
            # use (seconds on a cold $TMPDIR/mlx cache), which the first real answer should not wait for.
            for temperature in (0.0, 0.7):
                for _ in self.stream(
                    [ChatMessage("user", "Hi")], max_tokens=2, temperature=temperature, should_stop=_never
                ):
                    pass
        except Exception as exc:
            self._model = self._tokenizer = None
            raise ModelLoadError(f"cannot load chat model from {self.path}: {_one_line(exc)}") from exc
        logger.debug(
            "loaded chat model %s in %.2f s, warm-up %.2f s", self.name, loaded - started, time.perf_counter() - loaded
        )

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The token ids of ``messages`` rendered for generation (chat template, or "role: content" lines)."""
        tokenizer = self._loaded_tokenizer()
        if tokenizer.has_chat_template:
            chat = [{"role": m.role, "content": m.content} for m in messages]
            return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
        # Base models have no template: a plain transcript that ends where the assistant's turn starts.
        text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
        return list(tokenizer.encode(text))

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: ShouldStop,
    ) -> Iterator[GenerationStep]:
        """Yield the answer as it is generated; the last step has finish_reason "stop", "length" or "cancelled".

        ``generated_tokens`` counts the tokens sampled so far, the end-of-turn token included (as mlx-lm does).
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
        # The temperature goes in as an array: mlx-lm's compiled sampler would bake a Python float into a fused kernel,
        # and MLX's CPU backend builds each new kernel with the C++ compiler (~1-1.5 s per distinct temperature).
        temp: Any = mx.array(temperature, dtype=mx.float32) if temperature > 0 else 0.0
        responses = mlx_lm.stream_generate(
            self._model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=temp)
        )
        prompt_seconds = 0.0
        try:
            for response in responses:
                if not prompt_seconds:
                    # prompt_tps is measured up to the first token; fall back to our clock if it is unusable.
                    tps = response.prompt_tps
                    prompt_seconds = n_prompt / tps if tps > 0 else time.perf_counter() - started
                step = GenerationStep(
                    text=response.text,
                    prompt_tokens=n_prompt,
                    generated_tokens=response.generation_tokens,
                    finish_reason=response.finish_reason,
                    prompt_seconds=prompt_seconds,
                )
                yield step
                if step.finish_reason is not None:
                    return
                if should_stop():
                    # Text the detokenizer still holds back (a lone space, half a UTF-8 character) is dropped.
                    yield GenerationStep("", n_prompt, step.generated_tokens, "cancelled", prompt_seconds)
                    return
        finally:
            responses.close()  # leaves mlx_lm's generation context at once when cancelled or abandoned

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError("MlxChatModel used before load()")
        return self._tokenizer
