"""The segmenter thread: voice activity over each client's incoming audio, cutting finished stretches of speech
and handing them to the model thread while the person is still talking, so that at `ask` only the tail is left.

Fed by the IO thread (audio blocks, asks, resets, drops); owns one UtteranceTracker per client. It runs no MLX: it
only decides where to cut. Jobs reach the model thread in the order they were cut, and an ask always after its own
stretches.

Fairness. One thread listens to every client, so no client may hold it up for another:

- Each client has its own lane of pending work. The thread always takes the lane whose next piece of audio is
  due first, where "due" is when that audio would have arrived had the client streamed it in real time (a virtual
  clock per client, as in Virtual Clock fair queuing). A person talking is always on time; a client that dumps a
  long recording at once is far in the future, so it is listened to only when nobody else is waiting.
- Audio is queued in slices of at most ``SLICE_SAMPLES``, so the longest wait behind another client is one slice.
- A client may run at most ``lead_seconds`` ahead of real time. Past that the rest of its recording is not listened
  to while it arrives (its queued audio is dropped here; the daemon still buffers it). Only if the client asks with
  that recording is the rest listened to, from where listening stopped, and with the lowest priority (due when it
  would have arrived in real time): a dump that is never asked about costs nothing, one that is costs its sender's
  ask the time, and live speech of others still goes first. Listening to dumps as they came in was what let a
  600 s dump stall everybody else.
- A client that goes away (``drop``) loses its lane at once: its queued audio is never processed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .vad import SAMPLE_RATE, CutPolicy, UtteranceTracker
from .worker import AskJob, StretchJob

log = logging.getLogger(__name__)

SLICE_SAMPLES = SAMPLE_RATE // 2
"""0.5 s: the most audio listened to in one go (about 45 ms of Silero on one slow core)."""


@dataclasses.dataclass
class _Event:
    kind: str  # "audio" | "ask" | "forget"
    utterance: int
    item: Any
    due: float


@dataclasses.dataclass
class _Lane:
    """One client's pending work (guarded by the segmenter's lock) and its tracker (segmenter thread only)."""

    events: collections.deque[_Event] = dataclasses.field(default_factory=collections.deque)
    clock: float = 0.0
    """Virtual time at which the audio received so far would have finished arriving, spoken in real time."""
    bulk_utterance: int | None = None
    """This recording ran ahead of real time: it is no longer listened to as it arrives."""
    utterance: int = -1
    listened: int = 0
    """Samples of ``utterance`` queued or fed to the tracker (where listening resumes at the ask)."""
    tracker: tuple[int, UtteranceTracker] | None = None


class Segmenter:
    def __init__(
        self,
        submit: Callable[[Any], None],
        policy: CutPolicy = CutPolicy(),  # noqa: B008
        idle: Callable[[], bool] = lambda: True,
        *,
        lead_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``idle()`` tells whether the model thread has nothing to do: tentative stretches are sent only then,
        so speculation never delays real work when the machine cannot keep up with the speech."""
        self._submit = submit
        self._idle = idle
        self._policy = policy
        self._lead = lead_seconds
        self._clock = clock
        self._lanes: dict[bytes, _Lane] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sottovoce-segmenter", daemon=True)

    # ---- called from the IO thread ----
    def start(self) -> None:
        self._thread.start()

    def audio(self, key: bytes, utterance: int, pcm: np.ndarray) -> None:
        if not pcm.size:
            return
        with self._cond:
            lane = self._lanes.setdefault(key, _Lane())
            now = self._clock()
            start = max(lane.clock, now)
            lane.clock = start + pcm.size / SAMPLE_RATE
            if lane.utterance != utterance:
                lane.utterance, lane.listened = utterance, 0
            if lane.bulk_utterance == utterance:
                return
            if lane.clock - now > self._lead:
                log.info(
                    "client %s sends audio %.0f s ahead of real time: its recording is transcribed after the ask",
                    key.hex()[:12],
                    lane.clock - now,
                )
                lane.bulk_utterance = utterance
                kept = collections.deque(e for e in lane.events if e.kind != "audio")
                lane.listened -= sum(e.item.size for e in lane.events if e.kind == "audio" and e.utterance == utterance)
                lane.events = kept
                return
            self._queue_audio(lane, utterance, pcm, start)
            self._cond.notify()

    def _queue_audio(self, lane: _Lane, utterance: int, pcm: np.ndarray, due: float) -> None:
        for offset in range(0, pcm.size, SLICE_SAMPLES):
            piece = pcm[offset : offset + SLICE_SAMPLES]
            lane.events.append(_Event("audio", utterance, piece, due + offset / SAMPLE_RATE))
        lane.listened += pcm.size

    def ask(self, job: AskJob) -> None:
        """Finish the job's utterance and queue the ask behind its stretches."""
        with self._cond:
            lane = self._lanes.setdefault(job.identity, _Lane())
            now = self._clock()
            if lane.bulk_utterance == job.utterance and job.pcm is not None and lane.utterance == job.utterance:
                # The rest of a recording that ran ahead: listened to now, due as if it had come in real time.
                rest = job.pcm[lane.listened :]
                self._queue_audio(lane, job.utterance, rest, max(lane.clock - rest.size / SAMPLE_RATE, now))
            lane.events.append(_Event("ask", job.utterance, job, now))
            self._cond.notify()

    def reset(self, key: bytes) -> None:
        """A new recording starts: the audio still queued for the old one is not worth listening to."""
        with self._cond:
            lane = self._lanes.get(key)
            if lane is not None:
                lane.events = collections.deque(e for e in lane.events if e.kind == "ask")
                lane.events.append(_Event("forget", -1, None, self._clock()))  # drops the tracker, in order

    def drop(self, key: bytes) -> None:
        """The client is gone: forget it now, queued audio included (an ask it had queued is withdrawn by the
        server, so nothing waits for it)."""
        with self._cond:
            lane = self._lanes.pop(key, None)
        if lane is not None and any(e.kind == "ask" for e in lane.events):
            for event in lane.events:
                if event.kind == "ask":
                    self._submit(event.item)  # the worker ends it (withdrawn or cancelled) as for any ask

    def pending_seconds(self) -> float:
        """Audio of all clients still waiting to be listened to (at most ``lead_seconds`` per client)."""
        with self._cond:
            return sum(e.item.size for lane in self._lanes.values() for e in lane.events if e.kind == "audio") / (
                SAMPLE_RATE
            )

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5)

    # ---- the segmenter thread ----
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
            self.run_pending(limit=1)

    def _has_work(self) -> bool:
        return any(lane.events for lane in self._lanes.values())

    def run_pending(self, limit: int | None = None) -> int:
        """Process up to ``limit`` events (all when None), most overdue lane first; returns how many ran.
        The thread calls it one event at a time; the fuzz harness calls it to drain deterministically."""
        done = 0
        while limit is None or done < limit:
            with self._cond:
                lanes = [(lane.events[0].due, key, lane) for key, lane in self._lanes.items() if lane.events]
                if not lanes:
                    return done
                _, key, lane = min(lanes, key=lambda t: t[0])
                event = lane.events.popleft()
            done += 1
            try:
                if event.kind == "audio":
                    self._on_audio(key, lane, event.utterance, event.item)
                elif event.kind == "ask":
                    self._on_ask(lane, event.utterance, event.item)
                elif event.kind == "forget":
                    lane.tracker = None
            except Exception:
                # A bug here must not stop the ask: it falls back to transcribing the whole recording.
                log.exception("segmenter failed on %s; falling back to whole-recording transcription", event.kind)
                lane.tracker = None
                if event.kind == "ask":
                    self._submit(event.item)
        return done

    def _on_audio(self, key: bytes, lane: _Lane, utterance: int, pcm: np.ndarray) -> None:
        current = lane.tracker
        if current is None or current[0] != utterance:
            current = lane.tracker = (utterance, UtteranceTracker(self._policy))
        tracker = current[1]
        for stretch in tracker.feed(pcm):
            if stretch.tentative and not self._idle():
                continue
            if stretch.speech:
                audio = tracker.audio(stretch.start, stretch.end)
                self._submit(
                    StretchJob(
                        key,
                        utterance,
                        stretch.start,
                        stretch.end,
                        audio,
                        speech_until=stretch.speech_until,
                        tentative=stretch.tentative,
                    )
                )

    def _on_ask(self, lane: _Lane, utterance: int, job: AskJob) -> None:
        current, lane.tracker = lane.tracker, None
        if current is None or current[0] != utterance:
            self._submit(job)  # nothing tracked (all audio came before a reset, or a bug): whole recording
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
