"""The segmenter thread: voice activity over each client's incoming audio, cutting finished stretches of speech
and handing them to the model thread while the person is still talking, so that at `ask` only the tail is left.

Fed by the IO thread (audio blocks, asks, drops) through a queue; owns one UtteranceTracker per client. It runs
no MLX: it only decides where to cut. Jobs reach the model thread in the order they were cut, and an ask always
after its own stretches.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .vad import CutPolicy, UtteranceTracker
from .worker import AskJob, StretchJob

log = logging.getLogger(__name__)


class Segmenter:
    def __init__(
        self,
        submit: Callable[[Any], None],
        policy: CutPolicy = CutPolicy(),  # noqa: B008
        idle: Callable[[], bool] = lambda: True,
    ) -> None:
        """``idle()`` tells whether the model thread has nothing to do: tentative stretches are sent only then,
        so speculation never delays real work when the machine cannot keep up with the speech."""
        self._submit = submit
        self._idle = idle
        self._policy = policy
        self._inbox: queue.SimpleQueue[tuple[str, bytes, Any, Any]] = queue.SimpleQueue()
        self._trackers: dict[bytes, tuple[int, UtteranceTracker]] = {}
        self._thread = threading.Thread(target=self._run, name="sottovoce-segmenter", daemon=True)

    # ---- called from the IO thread ----
    def start(self) -> None:
        self._thread.start()

    def audio(self, identity: bytes, utterance: int, pcm: np.ndarray) -> None:
        if pcm.size:
            self._inbox.put(("audio", identity, utterance, pcm))

    def ask(self, job: AskJob) -> None:
        """Finish the job's utterance and queue the ask behind its stretches."""
        self._inbox.put(("ask", identity_of(job), job.utterance, job))

    def drop(self, identity: bytes) -> None:
        self._inbox.put(("drop", identity, None, None))

    def stop(self) -> None:
        self._inbox.put(("stop", b"", None, None))
        self._thread.join(5)

    # ---- the segmenter thread ----
    def _run(self) -> None:
        while True:
            kind, identity, utterance, item = self._inbox.get()
            try:
                if kind == "stop":
                    return
                if kind == "audio":
                    self._on_audio(identity, utterance, item)
                elif kind == "ask":
                    self._on_ask(identity, utterance, item)
                elif kind == "drop":
                    self._trackers.pop(identity, None)
            except Exception:
                # A bug here must not stop the ask: it falls back to transcribing the whole recording.
                log.exception("segmenter failed on %s; falling back to whole-recording transcription", kind)
                self._trackers.pop(identity, None)
                if kind == "ask":
                    self._submit(item)

    def _on_audio(self, identity: bytes, utterance: int, pcm: np.ndarray) -> None:
        current = self._trackers.get(identity)
        if current is None or current[0] != utterance:
            current = (utterance, UtteranceTracker(self._policy))
            self._trackers[identity] = current
        tracker = current[1]
        for stretch in tracker.feed(pcm):
            if stretch.tentative and not self._idle():
                continue
            if stretch.speech:
                audio = tracker.audio(stretch.start, stretch.end)
                self._submit(
                    StretchJob(
                        identity,
                        utterance,
                        stretch.start,
                        stretch.end,
                        audio,
                        speech_until=stretch.speech_until,
                        tentative=stretch.tentative,
                    )
                )

    def _on_ask(self, identity: bytes, utterance: int, job: AskJob) -> None:
        current = self._trackers.pop(identity, None)
        if current is None or current[0] != utterance:
            self._submit(job)  # nothing tracked (e.g. all audio arrived before a restart): whole recording
            return
        tracker = current[1]
        tail = tracker.finish()
        job.incremental = True
        job.speech = tracker.has_speech()
        job.tail = tracker.audio(tail.start, tail.end) if tail is not None and tail.speech else None
        job.tail_start = tail.start if tail is not None else tracker.samples
        job.tail_speech_until = tail.speech_until if tail is not None else 0
        self._submit(job)


def identity_of(job: AskJob) -> bytes:
    return job.identity
