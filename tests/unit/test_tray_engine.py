"""The tray's IO thread against a real daemon server (fake models, in this process) and a scripted microphone:
chunk order and edges, the ask, streamed answers, and every way a turn can go wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeChat, FakeTranscriber
from inproc import RunningServer

from sottovoce.client.config import Settings
from sottovoce.client.protocol import CHUNK_SAMPLES, SAMPLE_RATE
from sottovoce.tray import engine as engine_mod
from sottovoce.tray import state as s
from sottovoce.tray.audio import AudioBlock, MicrophoneError
from sottovoce.tray.engine import Cancel, Engine, Start, Stop, TrayClient

BLOCK = 1024


class ScriptedMic:
    """Stands in for audio.Microphone: the test pushes blocks; the stream clock advances with the audio."""

    def __init__(self, sink: Callable[[AudioBlock], None], *, rate: int = SAMPLE_RATE) -> None:
        self.sink = sink
        self.rate = rate
        self.clock = 1000.0
        self.opened_at = time.monotonic()
        self.device_name = "scripted"
        self.is_open = False
        self.opens = 0
        self.fail: str | None = None
        self.stall = False
        self.value = 0.1

    def open(self, name: str | None, *, rescan: bool = False) -> str | None:
        if self.fail:
            raise MicrophoneError(self.fail)
        self.is_open = True
        self.opens += 1
        return None

    def time(self) -> float:
        return self.clock

    def stalled(self, now: float) -> bool:
        return self.is_open and self.stall

    def close(self) -> None:
        self.is_open = False

    def emit(self, seconds: float, value: float | None = None, counter: list[int] | None = None) -> None:
        """``seconds`` of audio in blocks; samples carry a running index (``counter``) or a constant ``value``."""
        n_total = int(seconds * self.rate)
        block = round(BLOCK * self.rate / SAMPLE_RATE)
        for start in range(0, n_total, block):
            n = min(block, n_total - start)
            if counter is not None:
                pcm = (np.arange(counter[0], counter[0] + n) % 1000 / 1000.0 + 0.001).astype(np.float32)
                counter[0] += n
            else:
                pcm = np.full(n, self.value if value is None else value, np.float32)
            if self.is_open:
                self.sink(AudioBlock(pcm, self.rate, self.clock, time.monotonic()))
            self.clock += n / self.rate


class RecordingClient(TrayClient):
    sent: list[np.ndarray]

    def send_chunk(self, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> str:
        self.sent.append(np.array(pcm))
        return super().send_chunk(pcm, rate)


class Harness:
    def __init__(self, endpoint: str, preroll: float = 0.3, mic_rate: int = SAMPLE_RATE) -> None:
        self.endpoint = endpoint
        self.events: list[s.Event] = []
        self.sent: list[np.ndarray] = []
        self.mics: list[ScriptedMic] = []
        self.mic_fail: str | None = None
        self.mic_rate = mic_rate
        self.engine = Engine(
            self.events.append,
            endpoint=endpoint,
            preroll_seconds=preroll,
            microphone_factory=self._mic,
            client_factory=self._client,
        )

    def _mic(self, sink: Callable[[AudioBlock], None]) -> Any:
        mic = ScriptedMic(sink, rate=self.mic_rate)
        mic.fail = self.mic_fail
        self.mics.append(mic)
        return mic

    def _client(self, endpoint: str) -> TrayClient:
        client = RecordingClient(
            endpoint, timeout=engine_mod.REQUEST_TIMEOUT, connect_timeout=engine_mod.REQUEST_TIMEOUT
        )
        client.sent = self.sent
        return client

    @property
    def mic(self) -> ScriptedMic:
        return self.mics[-1]

    def wait_for(self, kind: type[s.Event], timeout: float = 10.0, after: int = 0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events[after:]:
                if isinstance(event, kind):
                    return event
            time.sleep(0.01)
        raise AssertionError(f"no {kind.__name__} within {timeout} s; events: {self.events}")

    def of(self, kind: type[s.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def turn(self, n: int, speech: float = 1.5, value: float | None = None) -> None:
        self.engine.command(Start(n, time.monotonic()))
        self.wait_for_capture(n)
        self.mic.emit(speech, value=value)
        self.engine.command(Stop(n, time.monotonic()))
        time.sleep(0.1)  # the scripted stream clock runs only when we emit: let the IO thread see the release
        self.mic.emit(0.2, value=value)

    def wait_for_capture(self, n: int) -> None:
        deadline = time.monotonic() + 5
        while not any(isinstance(e, s.CaptureStarted) and e.turn == n for e in self.events):
            assert time.monotonic() < deadline, self.events
            time.sleep(0.005)


@pytest.fixture(autouse=True)
def fast_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(engine_mod, "RECONNECT_EVERY", 0.2)
    monkeypatch.setattr(engine_mod, "HEARTBEAT_IDLE", 0.5)
    monkeypatch.setattr(engine_mod, "HEARTBEAT_RECORDING", 0.3)
    monkeypatch.setattr(engine_mod, "PROBE_AFTER_SILENCE", 0.5)
    monkeypatch.setattr(engine_mod, "MIC_RETRY_EVERY", 0.2)


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/d.sock"


def daemon(endpoint: str, chat: FakeChat | None = None, transcriber: FakeTranscriber | None = None) -> RunningServer:
    # incremental=False: the fake Whisper then hears the whole recording (no voice activity detection on
    # the synthetic test signals), so the answer tells which audio reached it.
    settings = Settings(endpoint=endpoint, incremental=False)
    return RunningServer(endpoint, settings, transcriber or FakeTranscriber(), chat or FakeChat())


@pytest.fixture
def harness(endpoint: str) -> Iterator[Harness]:
    h = Harness(endpoint)
    yield h
    h.engine.shutdown()
    assert not h.engine.is_alive()


def test_a_turn_sends_preroll_speech_and_ask_in_order(harness: Harness, endpoint: str) -> None:
    with daemon(endpoint):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        counter = [0]
        mic = harness.mic
        mic.emit(1.0, counter=counter)  # before the press: only the last 0.3 s may be sent
        harness.wait_for(s.MicOk)  # announced when audio flows
        time.sleep(0.2)  # let the IO thread take it in as pre-roll
        press_index = counter[0]
        harness.engine.command(Start(1, time.monotonic()))
        harness.wait_for_capture(1)
        mic.emit(1.5, counter=counter)
        release_index = counter[0]
        harness.engine.command(Stop(1, time.monotonic()))
        time.sleep(0.2)  # the scripted stream clock runs only when we emit: let the IO thread see the release
        mic.emit(0.5, counter=counter)  # after the release: cut off
        answered = harness.wait_for(s.Answered)
    assert answered.turn == 1 and answered.transcript.startswith("heard ")
    assert answered.answer.startswith("you said: heard")
    deltas = "".join(e.text for e in harness.of(s.AnswerDelta))
    assert deltas == answered.answer
    kinds = [type(e) for e in harness.events if isinstance(e, s.CaptureStarted | s.Heard | s.AnswerDelta | s.Answered)]
    assert kinds[0] is s.CaptureStarted and kinds[1] is s.Heard and kinds[-1] is s.Answered

    sent = harness.sent
    assert all(c.size == CHUNK_SAMPLES for c in sent[:-1]) and 0 < sent[-1].size <= CHUNK_SAMPLES
    pcm = np.concatenate(sent)
    first = press_index - int(0.3 * SAMPLE_RATE)
    expected = (np.arange(first, release_index) % 1000 / 1000.0 + 0.001).astype(np.float32)
    np.testing.assert_array_equal(pcm, expected)

    details = answered.details
    assert details["audio_seconds"] == pytest.approx(1.8, abs=0.001)
    assert details["down_to_first_chunk"] <= details["down_to_first_live_chunk"]
    for key in (
        "down_to_first_chunk",
        "down_to_first_live_chunk",
        "up_to_ask",
        "up_to_transcript",
        "up_to_first_answer",
        "up_to_done",
    ):
        assert 0 <= details[key] < 5, key


def test_tray_starts_before_the_daemon(harness: Harness, endpoint: str) -> None:
    harness.engine.start()
    down = harness.wait_for(s.DaemonDown)
    assert "not running" in down.reason
    time.sleep(0.5)
    assert len(harness.of(s.DaemonDown)) == 1  # said once, not on every retry
    harness.engine.command(Start(1, time.monotonic()))
    failed = harness.wait_for(s.TurnFailed)
    assert failed.code == "daemon-lost"
    with daemon(endpoint):
        up = harness.wait_for(s.DaemonUp, timeout=5)
        assert "fake-whisper" in up.description
        harness.turn(2)
        assert harness.wait_for(s.Answered).turn == 2


def test_daemon_stopped_mid_recording_fails_fast_and_recovers(harness: Harness, endpoint: str) -> None:
    with daemon(endpoint):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.engine.command(Start(1, time.monotonic()))
        harness.wait_for_capture(1)
        harness.mic.emit(0.5, value=0.1)
    stopped = time.monotonic()
    harness.mic.emit(0.5, value=0.1)
    failed = harness.wait_for(s.TurnFailed, timeout=5)
    assert failed.turn == 1 and failed.code == "daemon-lost"
    harness.wait_for(s.DaemonDown)
    assert time.monotonic() - stopped < 3
    n = len(harness.events)
    with daemon(endpoint):
        harness.wait_for(s.DaemonUp, after=n, timeout=5)
        harness.turn(2, value=0.1)
        assert harness.wait_for(s.Answered, after=n).turn == 2


def test_daemon_restarted_mid_recording(harness: Harness, endpoint: str) -> None:
    with daemon(endpoint):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.engine.command(Start(1, time.monotonic()))
        harness.wait_for_capture(1)
        harness.mic.emit(0.6, value=0.1)
        time.sleep(0.1)
    with daemon(endpoint):  # back at once: the audio sent so far is gone with the old one
        harness.mic.emit(0.3, value=0.1)
        harness.engine.command(Stop(1, time.monotonic()))
        harness.mic.emit(0.2, value=0.1)
        failed = harness.wait_for(s.TurnFailed, timeout=5)
        assert failed.code in ("daemon-restarted", "daemon-lost")
        assert "ask again" in failed.message or "lost" in failed.message
        assert not harness.of(s.Answered)
        n = len(harness.events)
        harness.wait_for(s.DaemonUp, after=n - 1, timeout=5)
        harness.turn(2, value=0.1)
        assert harness.wait_for(s.Answered, after=n).turn == 2


# The daemon's worker, still generating when its loop closes, reports that on its thread: not ours to judge here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_daemon_dies_while_answering(endpoint: str, harness: Harness) -> None:
    gate = threading.Event()  # the answer never comes
    server = daemon(endpoint, chat=FakeChat(gate=gate))
    server.__enter__()
    try:
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.turn(1, value=0.1)
        harness.wait_for(s.Heard)
    finally:
        server.__exit__()
        gate.set()
    died = time.monotonic()
    failed = harness.wait_for(s.TurnFailed, timeout=6)
    assert failed.code in ("daemon-lost", "daemon-restarted") and time.monotonic() - died < 5


def test_silent_microphone(harness: Harness, endpoint: str) -> None:
    with daemon(endpoint):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.turn(1, speech=1.5, value=0.0)
        failed = harness.wait_for(s.TurnFailed)
    assert failed.code == "silent-mic" and "Privacy & Security > Microphone" in failed.message
    assert "only silence" in harness.wait_for(s.MicProblem).message


def test_too_short(harness: Harness, endpoint: str) -> None:
    with daemon(endpoint):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.turn(1, speech=0.3, value=0.1)
        failed = harness.wait_for(s.TurnFailed)
    assert failed.code == "too-short" and "hold the key" in failed.message


def test_no_microphone(endpoint: str) -> None:
    h = Harness(endpoint)
    h.mic_fail = "no microphone found: PortAudio sees no input device"
    try:
        with daemon(endpoint):
            h.engine.start()
            assert "no microphone found" in h.wait_for(s.MicProblem).message
            h.wait_for(s.DaemonUp)
            h.engine.command(Start(1, time.monotonic()))
            failed = h.wait_for(s.TurnFailed)
            assert failed.code == "mic" and "no microphone found" in failed.message
            h.mic_fail = None  # plugged in: the retry opens it
            n = len(h.mics)
            deadline = time.monotonic() + 5
            while not (len(h.mics) > n and h.mic.is_open):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            h.mic.emit(0.2)
            h.wait_for(s.MicOk, after=len(h.events) - 1, timeout=5)
    finally:
        h.engine.shutdown()


def test_microphone_vanishes_mid_recording(harness: Harness, endpoint: str) -> None:
    with daemon(endpoint):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.engine.command(Start(1, time.monotonic()))
        harness.wait_for_capture(1)
        harness.mic.emit(0.5, value=0.1)
        harness.mic.stall = True
        failed = harness.wait_for(s.TurnFailed)
        assert failed.code == "mic" and "stopped delivering" in failed.message
        assert "stopped delivering" in harness.wait_for(s.MicProblem).message
        n = len(harness.events)
        deadline = time.monotonic() + 5
        while not (len(harness.mics) >= 2 and harness.mic.is_open):  # reopened
            assert time.monotonic() < deadline
            time.sleep(0.02)
        harness.mic.emit(0.2)
        harness.wait_for(s.MicOk, after=n, timeout=5)


def test_new_recording_cancels_the_answer_in_flight(endpoint: str, harness: Harness) -> None:
    gate = threading.Event()
    with daemon(endpoint, chat=FakeChat(gate=gate)):
        harness.engine.start()
        harness.wait_for(s.DaemonUp)
        harness.turn(1, value=0.1)
        harness.wait_for(s.Heard)
        harness.engine.command(Cancel(1))
        threading.Timer(0.3, gate.set).start()  # the old generation winds down a little later
        harness.turn(2, value=0.2)
        answered = harness.wait_for(s.Answered, timeout=10)
    # turn 2 hears its own 1.5 s (+ at most the 0.3 s pre-roll), none of turn 1's audio left on the daemon
    assert answered.turn == 2
    samples = int(answered.transcript.split()[1])
    assert 1.5 * SAMPLE_RATE <= samples <= 1.8 * SAMPLE_RATE
    assert not [e for e in harness.events if isinstance(e, s.Answered) and e.turn == 1]


def test_resamples_a_48k_microphone(endpoint: str) -> None:
    h = Harness(endpoint, mic_rate=48_000)
    try:
        with daemon(endpoint):
            h.engine.start()
            h.wait_for(s.DaemonUp)
            h.mic.emit(0.3)
            h.wait_for(s.MicOk)
            h.turn(1, speech=1.5, value=0.25)
            answered = h.wait_for(s.Answered)
        seconds = sum(c.size for c in h.sent) / SAMPLE_RATE
        assert seconds == pytest.approx(1.5 + 0.3, abs=0.1)  # speech and pre-roll, resampled to 16 kHz
        assert answered.transcript.startswith("heard")
    finally:
        h.engine.shutdown()


def test_mic_open_only_while_recording_without_preroll(endpoint: str) -> None:
    h = Harness(endpoint, preroll=0.0)
    try:
        with daemon(endpoint):
            h.engine.start()
            h.wait_for(s.DaemonUp)
            assert h.mics == []  # nothing open while idle
            h.turn(1, value=0.1)
            h.wait_for(s.Answered)
            assert h.mics[-1].opens == 1 and not h.mics[-1].is_open
    finally:
        h.engine.shutdown()
