"""The model thread: the one thread that loads and runs every MLX model (MLX streams belong to their thread).

Jobs come in through a ``queue.Queue`` (the server bounds how many asks may wait); replies go out through
``emit``, which the server makes thread-safe (``loop.call_soon_threadsafe``). A cancel flag is checked between
tokens. Exceptions become error replies; the thread itself never dies on a bad ask.

Voice asks come two ways: the seed's (the whole recording transcribed after the ask) and the incremental one
(stretches transcribed while the person talks, see ``segmenter``; at the ask only the tail is left).
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
    TranscriptChunk,
)

from .backends.base import ChatMessage, ChatModel, ModelLoadError, ModelRuntimeError, Transcriber, TranscriptResult
from .textguard import cut_repetitions

log = logging.getLogger(__name__)

Emit = Callable[[bytes, Message, bool], None]
"""emit(identity, message, final): send a reply; ``final`` marks the ask's last one."""


@dataclasses.dataclass
class AskJob:
    identity: bytes
    ask_id: str
    text: str | None
    pcm: np.ndarray | None
    """The whole recording (voice asks); used as is unless the segmenter made the ask incremental."""
    max_tokens: int
    temperature: float
    language: str | None
    stream: bool
    system_prompt: str
    client_label: str = "?"
    utterance: int = 0
    incremental: bool = False
    speech: bool = True
    """Incremental asks: False when the voice activity detector heard no speech at all."""
    tail: np.ndarray | None = None
    """Incremental asks: the audio after the last stretch cut, if it holds speech."""
    tail_start: int = 0
    tail_speech_until: int = 0
    received: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancel_code: str = ErrorCode.CANCELLED
    """The code a cancelled ask ends with (`shutting-down` when the daemon stops)."""
    _state: str = "queued"
    _state_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def claim(self) -> bool:
        """The model thread takes the job; False when the IO thread withdrew it first (it has answered already)."""
        with self._state_lock:
            if self._state == "withdrawn":
                return False
            self._state = "running"
            return True

    def withdraw(self) -> bool:
        """The IO thread takes back a job not yet started (a cancel of a queued ask is answered at once, freeing
        the client); False when the model thread already runs it (then ``cancelled`` stops it between tokens)."""
        with self._state_lock:
            if self._state != "queued":
                return False
            self._state = "withdrawn"
            self.cancelled.set()
            return True


@dataclasses.dataclass
class StretchJob:
    """A finished stretch of speech to transcribe before the ask comes."""

    identity: bytes
    utterance: int
    start: int
    end: int
    pcm: np.ndarray
    speech_until: int = 0
    tentative: bool = False
    """Cut at a short pause: kept aside, used only if no more speech follows (see vad.Stretch)."""


@dataclasses.dataclass
class ForgetJob:
    """The client reset or went away: drop its early transcripts and its conversation (and that KV cache)."""

    identity: bytes


@dataclasses.dataclass
class WarmJob:
    """Load the models now (the tray sends `warm` when the hotkey goes down): the ask will not wait for them."""


@dataclasses.dataclass
class _Early:
    """Stretches of one utterance transcribed before its ask."""

    utterance: int
    texts: list[str] = dataclasses.field(default_factory=list)
    language: str | None = None
    seconds: float = 0.0
    tentative: tuple[int, int, TranscriptResult] | None = None
    """(start, speech_until, result) of the last tentative stretch."""

    def reuse(self, start: int, speech_until: int) -> TranscriptResult | None:
        """The tentative transcript, if it covered exactly these words."""
        if self.tentative is not None and self.tentative[:2] == (start, speech_until):
            return self.tentative[2]
        return None


@dataclasses.dataclass
class ModelState:
    """What `status` reports about one model (read from the IO thread; plain values only)."""

    name: str
    engine: str = ""
    """What runs the model ("mlx", "faster-whisper", "llama.cpp", "openai") and why."""
    engine_reason: str = ""
    keep_alive: float = 0.0
    """Unload after this many idle seconds; 0 = never."""
    loaded: bool = False
    error: str | None = None
    load_seconds: float | None = None
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    loads: int = 0

    def idle_seconds(self) -> float:
        return time.monotonic() - self.last_used

    def unload_due_in(self) -> float | None:
        if not self.loaded or self.keep_alive <= 0:
            return None
        return max(0.0, self.keep_alive - self.idle_seconds())


Job = AskJob | StretchJob | ForgetJob | WarmJob | None
MAX_PROMPT_CHARS = 200
"""Context given to Whisper for the next stretch (its initial_prompt is limited to half its 448-token window)."""


class ModelWorker:
    def __init__(
        self,
        transcriber: Transcriber,
        chat_model: ChatModel,
        emit: Emit,
        *,
        log_text: bool = False,
        history_turns: int = 0,
        whisper_keep_alive: float = 0.0,
        llm_keep_alive: float = 0.0,
        language: str | None = None,
    ) -> None:
        self._language = language
        self._transcriber = transcriber
        self._history_turns = history_turns
        self._conversations: dict[bytes, list[ChatMessage]] = {}
        self._chat = chat_model
        self._emit = emit
        self._log_text = log_text
        self._queue: queue.Queue[Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sottovoce-models", daemon=True)
        self._early: dict[bytes, _Early] = {}
        self.whisper = ModelState(
            transcriber.name, transcriber.engine, transcriber.engine_reason, keep_alive=whisper_keep_alive
        )
        self.llm = ModelState(chat_model.name, chat_model.engine, chat_model.engine_reason, keep_alive=llm_keep_alive)
        self.ready = threading.Event()
        self.asks_served = 0
        self._busy = False

    # ---- called from other threads ----
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: AskJob | StretchJob | ForgetJob | WarmJob) -> None:
        self._queue.put(job)

    def pending(self) -> int:
        return self._queue.qsize()

    def idle(self) -> bool:
        """Nothing running or waiting: speculative work would delay nobody."""
        return not self._busy and self._queue.empty()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the model thread ----
    def _run(self) -> None:
        self._load(self._transcriber, self.whisper)
        self._load(self._chat, self.llm)
        self.ready.set()
        while True:
            try:
                job = self._queue.get(timeout=self._next_unload_in())
            except queue.Empty:
                self._unload_idle()
                continue
            if job is None:
                self._drain_as_cancelled()
                return
            if isinstance(job, ForgetJob):
                self._forget(job.identity)
                continue
            if isinstance(job, WarmJob):
                self._ensure_loaded(self._transcriber, self.whisper)
                self._ensure_loaded(self._chat, self.llm)
                continue
            self._busy = True
            try:
                if isinstance(job, StretchJob):
                    self._transcribe_stretch(job)
                else:
                    self._serve(job)
            except Exception as exc:  # a bug or a model failure must not kill the thread
                log.exception("job for %s failed", job.identity.hex())
                if isinstance(job, AskJob):
                    self._early.pop(job.identity, None)
                    code = ErrorCode.MODEL_ERROR if _is_model_failure(exc) else ErrorCode.INTERNAL
                    error = Error(ref=job.ask_id, code=code, text=f"{type(exc).__name__}: {exc}")
                    self._emit(job.identity, error, True)
            finally:
                self._busy = False

    def _forget(self, identity: bytes) -> None:
        self._early.pop(identity, None)
        if self._conversations.pop(identity, None) is not None:
            self._chat.forget(identity.hex())

    def _drain_as_cancelled(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, AskJob) and job.claim():
                job.cancel_code = ErrorCode.SHUTTING_DOWN
                self._cancelled(job)

    # ---- keep-alive: models unload when idle and load again on the next use ----
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
        state.loaded, state.error = True, None
        state.name = model.name  # a server's model or a hub snapshot is named once loaded
        state.loads += 1
        state.last_used = time.monotonic()
        state.load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.1f s", state.name, state.load_seconds)

    def _ensure_loaded(self, model: Transcriber | ChatModel, state: ModelState) -> bool:
        """Load a model that was unloaded (or failed before: the file may be back); True when it is usable."""
        if not state.loaded:
            self._load(model, state)
        state.last_used = time.monotonic()
        return state.loaded

    def _next_unload_in(self) -> float | None:
        due = [d for d in (self.whisper.unload_due_in(), self.llm.unload_due_in()) if d is not None]
        return min(due) + 0.01 if due else None

    def _unload_idle(self) -> None:
        for model, state in ((self._transcriber, self.whisper), (self._chat, self.llm)):
            if state.unload_due_in() == 0.0:
                model.unload()
                state.loaded = False
                log.info("unloaded %s after %.0f s idle", state.name, state.idle_seconds())

    # ---- transcription ----
    def _transcribe(self, pcm: np.ndarray, language: str | None, prompt: str | None = None) -> TranscriptResult:
        result = (
            self._transcriber.transcribe(pcm, language=language, prompt=prompt)
            if prompt
            else self._transcriber.transcribe(pcm, language=language)
        )
        text = cut_repetitions(result.text)
        return dataclasses.replace(result, text=text, no_speech=result.no_speech or not text)

    def _transcribe_stretch(self, job: StretchJob) -> None:
        early = self._early.get(job.identity)
        if early is None or early.utterance != job.utterance:
            early = self._early[job.identity] = _Early(job.utterance)
        if not self._ensure_loaded(self._transcriber, self.whisper):
            return  # the ask will report the model error
        started = time.perf_counter()
        result = early.reuse(job.start, job.speech_until) if not job.tentative else None
        if result is None:
            # The text so far is Whisper's context for this stretch, as it would be inside one long transcription.
            context = " ".join(early.texts)[-MAX_PROMPT_CHARS:] or None
            # The language found in the first stretch holds for the rest: short stretches misdetect on their own.
            result = self._transcribe(job.pcm, self._language or early.language, prompt=context)
        early.seconds += time.perf_counter() - started
        if job.tentative:
            early.tentative = (job.start, job.speech_until, result)
            return
        if result.no_speech:
            return
        early.texts.append(result.text)
        early.language = early.language or result.language
        chunk = TranscriptChunk(text=result.text, start=job.start / SAMPLE_RATE, end=job.end / SAMPLE_RATE)
        self._emit(job.identity, chunk, False)

    def _transcribe_ask(self, job: AskJob, seconds: dict[str, float]) -> TranscriptResult:
        """The ask's transcript: the whole recording (seed design), or early stretches + the tail (incremental)."""
        assert job.pcm is not None
        started = time.perf_counter()
        if not job.incremental:
            result = self._transcribe(job.pcm, job.language)
            seconds["transcribe"] = time.perf_counter() - started
            return result
        early = self._early.pop(job.identity, None)
        texts = list(early.texts) if early is not None and early.utterance == job.utterance else []
        language = early.language if early is not None else None
        if job.speech and job.tail is not None:
            tail = early.reuse(job.tail_start, job.tail_speech_until) if early is not None else None
            if tail is None:
                context = " ".join(texts)[-MAX_PROMPT_CHARS:] or None
                tail = self._transcribe(job.tail, job.language or language, prompt=context)
            if not tail.no_speech:
                texts.append(tail.text)
                language = language or tail.language
        seconds["transcribe"] = time.perf_counter() - started
        if early is not None:
            seconds["transcribe_early"] = early.seconds
        text = " ".join(texts).strip()
        return TranscriptResult(text, language or job.language, not text, len(texts))

    # ---- asks ----
    def _serve(self, job: AskJob) -> None:
        if not job.claim():  # withdrawn while queued: the IO thread has sent its final reply
            self._early.pop(job.identity, None)
            return
        if job.cancelled.is_set():
            self._early.pop(job.identity, None)
            self._cancelled(job)
            return
        seconds: dict[str, float] = {"queued": time.perf_counter() - job.received}
        transcript: str | None = None
        language = job.language
        if job.pcm is not None:
            if not self._ensure_loaded(self._transcriber, self.whisper):
                self._early.pop(job.identity, None)
                self._model_unavailable(job, self.whisper)
                return
            result = self._transcribe_ask(job, seconds)
            transcript, language = result.text, result.language
            audio_seconds = job.pcm.size / SAMPLE_RATE
            heard = Transcript(
                ref=job.ask_id,
                text=result.text,
                language=result.language,
                no_speech=result.no_speech,
                audio_seconds=audio_seconds,
            )
            self._emit(job.identity, heard, False)
            if result.no_speech:
                # Nothing was said: never hand Whisper's silence hallucinations to the LLM.
                seconds["total"] = time.perf_counter() - job.received
                done = Done(ref=job.ask_id, transcript="", no_speech=True, language=language, seconds=_round(seconds))
                self._finish(job, done)
                return
            if job.cancelled.is_set():
                self._cancelled(job)
                return
        question = job.text if job.text is not None else transcript or ""
        if not self._ensure_loaded(self._chat, self.llm):
            self._model_unavailable(job, self.llm)
            return
        history = self._conversations.get(job.identity, [])
        messages = [ChatMessage("system", job.system_prompt), *history, ChatMessage("user", question)]
        started = time.perf_counter()
        parts: list[str] = []
        first_token: float | None = None
        step = None
        for step in self._chat.stream(
            messages,
            max_tokens=job.max_tokens,
            temperature=job.temperature,
            should_stop=job.cancelled.is_set,
            cache_key=job.identity.hex() if self._history_turns else None,
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
        self._remember(job.identity, question, "".join(parts))
        seconds["prompt"] = step.prompt_seconds
        seconds["first_token"] = (first_token or now) - started
        seconds["generate"] = now - started
        seconds["total"] = now - job.received
        self.asks_served += 1
        done = Done(
            ref=job.ask_id,
            transcript=transcript,
            answer="".join(parts),
            language=language,
            prompt_tokens=step.prompt_tokens,
            cached_tokens=step.cached_tokens,
            tokens=step.generated_tokens,
            finish_reason=step.finish_reason,
            seconds=_round(seconds),
        )
        self._finish(job, done)

    def _remember(self, identity: bytes, question: str, answer: str) -> None:
        """Keep the last `history_turns` turns, so a follow-up question can refer to them."""
        if not self._history_turns:
            return
        history = self._conversations.setdefault(identity, [])
        history += [ChatMessage("user", question), ChatMessage("assistant", answer)]
        del history[: max(0, len(history) - 2 * self._history_turns)]

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
        text = "the daemon is shutting down" if job.cancel_code == ErrorCode.SHUTTING_DOWN else "the ask was cancelled"
        self._emit(job.identity, Error(ref=job.ask_id, code=job.cancel_code, text=text), True)

    def _model_unavailable(self, job: AskJob, state: ModelState) -> None:
        text = f"{state.name} is not loaded: {state.error or 'still loading'}"
        self._emit(job.identity, Error(ref=job.ask_id, code=ErrorCode.MODEL_ERROR, text=text), True)


def _round(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in seconds.items()}


def _is_model_failure(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return isinstance(exc, ModelLoadError | ModelRuntimeError | MemoryError) or module.startswith(
        ("mlx", "mlx_lm", "mlx_whisper", "ctranslate2", "faster_whisper", "llama_cpp")
    )
