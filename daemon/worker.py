"""The model thread: the one thread that loads and runs every MLX model (MLX streams belong to their thread).

Asks come in through a bounded ``queue.Queue``; replies go out through ``emit``, which the server makes thread-safe
(``loop.call_soon_threadsafe``). A cancel flag is checked between tokens. Exceptions become error replies; the
thread itself never dies on a bad ask.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
from sottovoce.client.protocol import (
    SAMPLE_RATE,
    AnswerChunk,
    Done,
    Error,
    ErrorCode,
    Message,
    Transcript,
)

from .backends.base import ChatMessage, ChatModel, ModelLoadError, Transcriber

log = logging.getLogger(__name__)

Emit = Callable[[bytes, Message, bool], None]
"""emit(identity, message, final): send a reply; ``final`` marks the ask's last one."""


@dataclasses.dataclass
class AskJob:
    identity: bytes
    ask_id: str
    text: str | None
    pcm: np.ndarray | None
    max_tokens: int
    temperature: float
    language: str | None
    stream: bool
    system_prompt: str
    client_label: str = "?"
    received: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class ModelState:
    """What `status` reports about one model (read from the IO thread; plain values only)."""

    name: str
    loaded: bool = False
    error: str | None = None
    load_seconds: float | None = None


class ModelWorker:
    def __init__(
        self,
        transcriber: Transcriber,
        chat_model: ChatModel,
        emit: Emit,
        *,
        queue_depth: int,
        log_text: bool = False,
    ) -> None:
        self._transcriber = transcriber
        self._chat = chat_model
        self._emit = emit
        self._log_text = log_text
        self._queue: queue.Queue[AskJob | None] = queue.Queue(maxsize=queue_depth)
        self._thread = threading.Thread(target=self._run, name="sottovoce-models", daemon=True)
        self.whisper = ModelState(transcriber.name)
        self.llm = ModelState(chat_model.name)
        self.ready = threading.Event()
        self.asks_served = 0

    # ---- called from the IO thread ----
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: AskJob) -> bool:
        """Queue an ask; False when the queue is full (the caller answers `busy`)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        # Unblock a full queue: the worker drains jobs as cancelled until it reaches the sentinel.
        while True:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    return
        self._thread.join(timeout)

    # ---- the model thread ----
    def _run(self) -> None:
        self._load(self._transcriber, self.whisper)
        self._load(self._chat, self.llm)
        self.ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                self._drain_as_cancelled()
                return
            try:
                self._serve(job)
            except Exception as exc:  # a bug or a model failure must not kill the thread
                log.exception("ask %s failed", job.ask_id)
                code = ErrorCode.MODEL_ERROR if _is_model_failure(exc) else ErrorCode.INTERNAL
                self._emit(job.identity, Error(ref=job.ask_id, code=code, text=f"{type(exc).__name__}: {exc}"), True)

    def _drain_as_cancelled(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._cancelled(job)

    def _load(self, model: Transcriber | ChatModel, state: ModelState) -> None:
        started = time.perf_counter()
        try:
            model.load()
        except ModelLoadError as exc:
            state.error = str(exc)
            log.error("could not load %s: %s", state.name, exc)
            return
        except Exception as exc:
            state.error = f"{type(exc).__name__}: {exc}"
            log.exception("could not load %s", state.name)
            return
        state.loaded = True
        state.load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.1f s", state.name, state.load_seconds)

    def _serve(self, job: AskJob) -> None:
        if job.cancelled.is_set():
            self._cancelled(job)
            return
        seconds: dict[str, float] = {"queued": time.perf_counter() - job.received}
        transcript: str | None = None
        language = job.language
        if job.pcm is not None:
            if not self.whisper.loaded:
                self._model_unavailable(job, self.whisper)
                return
            started = time.perf_counter()
            result = self._transcriber.transcribe(job.pcm, language=job.language)
            seconds["transcribe"] = time.perf_counter() - started
            transcript, language = result.text, result.language
            audio_seconds = job.pcm.size / SAMPLE_RATE
            self._emit(
                job.identity,
                Transcript(
                    ref=job.ask_id,
                    text=result.text,
                    language=result.language,
                    no_speech=result.no_speech,
                    audio_seconds=audio_seconds,
                ),
                False,
            )
            if result.no_speech:
                # Nothing was said: never hand Whisper's silence hallucinations to the LLM.
                seconds["total"] = time.perf_counter() - job.received
                self._finish(
                    job,
                    Done(ref=job.ask_id, transcript="", no_speech=True, language=language, seconds=seconds),
                )
                return
            if job.cancelled.is_set():
                self._cancelled(job)
                return
        question = job.text if job.text is not None else transcript or ""
        if not self.llm.loaded:
            self._model_unavailable(job, self.llm)
            return
        messages = [ChatMessage("system", job.system_prompt), ChatMessage("user", question)]
        started = time.perf_counter()
        parts: list[str] = []
        first_token: float | None = None
        step = None
        for step in self._chat.stream(
            messages, max_tokens=job.max_tokens, temperature=job.temperature, should_stop=job.cancelled.is_set
        ):
            if step.text:
                if first_token is None:
                    first_token = time.perf_counter()
                parts.append(step.text)
                if job.stream:
                    self._emit(job.identity, AnswerChunk(ref=job.ask_id, text=step.text), False)
        if step is None or step.finish_reason == "cancelled" or job.cancelled.is_set():
            self._cancelled(job)
            return
        now = time.perf_counter()
        seconds["prompt"] = step.prompt_seconds
        seconds["first_token"] = (first_token or now) - started
        seconds["generate"] = now - started
        seconds["total"] = now - job.received
        self.asks_served += 1
        self._finish(
            job,
            Done(
                ref=job.ask_id,
                transcript=transcript,
                answer="".join(parts),
                language=language,
                prompt_tokens=step.prompt_tokens,
                tokens=step.generated_tokens,
                finish_reason=step.finish_reason,
                seconds={k: round(v, 4) for k, v in seconds.items()},
            ),
        )

    def _finish(self, job: AskJob, done: Done) -> None:
        audio = f"{job.pcm.size / SAMPLE_RATE:.1f}s audio" if job.pcm is not None else "text"
        log.info(
            "ask %s from %s: %s, %d+%d tokens, %s",
            job.ask_id,
            job.client_label,
            audio,
            done.prompt_tokens,
            done.tokens,
            " ".join(f"{k}={v:.2f}" for k, v in done.seconds.items()),
        )
        if self._log_text:
            log.info("ask %s: transcript=%r answer=%r", job.ask_id, done.transcript, done.answer)
        self._emit(job.identity, done, True)

    def _cancelled(self, job: AskJob) -> None:
        self._emit(job.identity, Error(ref=job.ask_id, code=ErrorCode.CANCELLED, text="the ask was cancelled"), True)

    def _model_unavailable(self, job: AskJob, state: ModelState) -> None:
        text = f"{state.name} is not loaded: {state.error or 'still loading'}"
        self._emit(job.identity, Error(ref=job.ask_id, code=ErrorCode.MODEL_ERROR, text=text), True)


def _is_model_failure(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return isinstance(exc, ModelLoadError | MemoryError) or module.startswith(("mlx", "mlx_lm", "mlx_whisper"))
