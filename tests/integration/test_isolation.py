"""Isolation and bounded resources against the real daemon (tiny MLX models): one client can neither stall, read nor
exhaust another (issue 11). Raw DEALER sockets stand in for clients written from PROTOCOL.md alone.

Nothing here asserts a duration: each test waits for a condition (with a generous deadline) and asserts an order
or a state that the old daemon could not reach. The timings live in bench/soak.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from daemon_proc import DaemonProcess  # type: ignore[import-not-found]

from sottovoce.client import Client
from sottovoce.client import protocol as p
from sottovoce.client.errors import DaemonUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def tone(seconds: float, level: float = 0.3, rate: int = p.SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * (220 + 60 * np.sin(2 * np.pi * 3 * t)) * t)).astype(np.float32)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class Raw:
    """A client written from PROTOCOL.md alone: a bare DEALER, optionally with a routing id of its own choosing."""

    def __init__(self, endpoint: str, routing_id: bytes | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)

    def send(self, msg: p.Message) -> str:
        self.sock.send_multipart(p.encode(msg))
        return msg.id

    def send_frames(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 60.0) -> p.Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply from the daemon"
        return p.decode(self.sock.recv_multipart())

    def reply_to(self, ref: str, timeout: float = 60.0) -> p.Message:
        """The next reply to ``ref`` (skipping early transcripts and the like)."""
        while True:
            msg = self.recv(timeout)
            if getattr(msg, "ref", None) == ref:
                return msg

    def final(self, ref: str, timeout: float = 60.0) -> p.Message:
        while True:
            msg = self.reply_to(ref, timeout)
            if isinstance(msg, p.Done | p.Error):
                return msg

    def chunks(self, pcm: np.ndarray, size: int = p.CHUNK_SAMPLES, rate: int = p.SAMPLE_RATE) -> None:
        for start in range(0, pcm.size, size):
            self.send(p.Chunk(pcm=pcm[start : start + size], rate=rate))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def daemon_factory(
    tmp_path: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path
) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(**env: str) -> DaemonProcess:
        proc = DaemonProcess(
            tmp_path / f"d{len(started)}",
            whisper_model=str(tiny_whisper_dir),
            llm_model=str(tiny_llm_dir),
            env={f"SOTTOVOCE_{k.upper()}": v for k, v in env.items()},
        )
        proc.workdir.mkdir(parents=True, exist_ok=True)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory()


def status(daemon: DaemonProcess) -> p.Report:
    with Client(daemon.endpoint, timeout=30, connect_timeout=10) as c:
        return c.status()


def sessions_at_most(daemon: DaemonProcess, n: int) -> Callable[[], bool]:
    # The observer's own `status` holds no session.
    return lambda: status(daemon).sessions <= n


# ---- 2. sessions belong to a connection --------------------------------------------------------------------------


def test_a_reused_routing_id_after_disconnect_gets_neither_conversation_nor_audio(daemon: DaemonProcess) -> None:
    question = "What is my bank PIN?"
    fresh = Raw(daemon.endpoint)
    baseline = fresh.final(fresh.send(p.Ask(text=question, max_tokens=2)))
    fresh.close()
    assert isinstance(baseline, p.Done)

    a = Raw(daemon.endpoint, routing_id=b"phone")
    told = a.final(a.send(p.Ask(text="Remember this: my bank PIN is 4921.", max_tokens=4)))
    assert isinstance(told, p.Done)
    a.chunks(tone(2.0))  # audio left buffered
    assert a.reply_to(a.send(p.Status())).buffered_seconds > 1.9  # type: ignore[attr-defined]
    a.close()
    wait_for(sessions_at_most(daemon, 0), "the closed connection's session being released")

    b = Raw(daemon.endpoint, routing_id=b"phone")
    assert b.reply_to(b.send(p.Status())).buffered_seconds == 0.0  # type: ignore[attr-defined]
    no_audio = b.final(b.send(p.Ask()))
    assert isinstance(no_audio, p.Error) and no_audio.code == p.ErrorCode.NO_AUDIO
    answer = b.final(b.send(p.Ask(text=question, max_tokens=2)))
    # The same prompt as a client with no past: A's turn is not in B's conversation.
    assert isinstance(answer, p.Done) and answer.prompt_tokens == baseline.prompt_tokens
    b.close()


def test_a_reused_routing_id_never_receives_the_gone_clients_answer(daemon: DaemonProcess) -> None:
    a = Raw(daemon.endpoint, routing_id=b"tablet")
    ask = a.send(p.Ask(text="Tell me a very long story", max_tokens=20_000))
    assert isinstance(a.reply_to(ask), p.AnswerChunk)  # streaming
    a.close()
    b = Raw(daemon.endpoint, routing_id=b"tablet")
    mine = b.send(p.Ask(text="hello", max_tokens=3))
    seen = []
    while True:
        msg = b.recv()
        seen.append(msg)
        if isinstance(msg, p.Done | p.Error) and msg.ref == mine:
            break
    assert all(getattr(m, "ref", None) == mine for m in seen), [m for m in seen if m.ref != mine]  # type: ignore[attr-defined]
    assert isinstance(seen[-1], p.Done) and seen[-1].tokens == 3
    b.close()


# ---- 1. voice activity detection is fair -------------------------------------------------------------------------


def test_a_600_s_dump_is_not_listened_to_and_is_dropped_when_its_client_leaves(daemon: DaemonProcess) -> None:
    lead = 10.0  # vad_lead_seconds default
    dumper = Raw(daemon.endpoint)
    dumper.chunks(tone(30.0), size=30 * p.SAMPLE_RATE)  # one 30 s chunk...
    pcm = tone(30.0)
    for _ in range(19):  # ...and 19 more: 600 s, as fast as the socket takes them
        dumper.send(p.Chunk(pcm=pcm))
    wait_for(lambda: dumper.reply_to(dumper.send(p.Status())).buffered_seconds >= 599.9, "the dump buffered")  # type: ignore[attr-defined]
    report = status(daemon)
    # Only what fits in the lead ahead of real time waits to be listened to; the old daemon queued all 600 s.
    assert report.listening_seconds <= lead, report

    speaker = Raw(daemon.endpoint)  # a person: 2 s of speech in real time, then the key goes up
    speech = tone(2.0)
    for start in range(0, speech.size, p.CHUNK_SAMPLES):
        speaker.send(p.Chunk(pcm=speech[start : start + p.CHUNK_SAMPLES]))
        time.sleep(p.CHUNK_SAMPLES / p.SAMPLE_RATE)
    ask = speaker.send(p.Ask(max_tokens=2))
    transcript = speaker.reply_to(ask)
    assert isinstance(transcript, p.Transcript) and transcript.audio_seconds == pytest.approx(2.0, abs=0.01)
    assert isinstance(speaker.final(ask), p.Done)

    dumper.close()
    wait_for(sessions_at_most(daemon, 1), "the dumper's session being released")
    report = status(daemon)
    assert report.listening_seconds == 0.0 and report.buffered_seconds_total == 0.0, report
    speaker.close()


# ---- 5. cancelling a queued ask ----------------------------------------------------------------------------------


def test_cancelling_a_queued_ask_ends_it_at_once_and_frees_the_client(daemon: DaemonProcess) -> None:
    talker = Raw(daemon.endpoint)
    long_ask = talker.send(p.Ask(text="Tell me a very long story", max_tokens=20_000))
    assert isinstance(talker.reply_to(long_ask), p.AnswerChunk)  # the model thread is busy with it

    waiting = Raw(daemon.endpoint)
    queued = waiting.send(p.Ask(text="and me?", max_tokens=2))
    cancel = waiting.send(p.Cancel())
    again = waiting.send(p.Ask(text="now?", max_tokens=2))  # sent before reading anything: the old daemon said `busy`
    assert isinstance(waiting.reply_to(cancel), p.Ok)
    ended = waiting.final(queued)
    assert isinstance(ended, p.Error) and ended.code == p.ErrorCode.CANCELLED
    talker.send(p.Cancel())  # let the long answer end, so that the new ask runs
    assert isinstance(waiting.final(again), p.Done)
    ended_long = talker.final(long_ask)
    assert isinstance(ended_long, p.Error) and ended_long.code == p.ErrorCode.CANCELLED
    talker.close()
    waiting.close()


# ---- 3. bounds ---------------------------------------------------------------------------------------------------


def test_sessions_are_bounded_and_released_when_their_clients_leave(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(max_sessions="3")
    for _ in range(50):  # short-lived `status` calls leave nothing behind
        with Client(daemon.endpoint, timeout=30) as c:
            c.status()
    wait_for(sessions_at_most(daemon, 0), "short-lived clients' sessions being released")

    holders = [Raw(daemon.endpoint) for _ in range(3)]
    for holder in holders:
        holder.send(p.Chunk(pcm=tone(0.5)))
    wait_for(lambda: status(daemon).sessions == 3, "three sessions")
    newcomer = Raw(daemon.endpoint)
    refused = newcomer.reply_to(newcomer.send(p.Chunk(pcm=tone(0.5))))
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.OVERLOADED, refused
    assert isinstance(newcomer.reply_to(newcomer.send(p.Status())), p.Report)  # status still answers
    for holder in holders:
        holder.close()
    wait_for(sessions_at_most(daemon, 0), "the holders' sessions being released")
    newcomer.send(p.Chunk(pcm=tone(0.5)))
    assert newcomer.reply_to(newcomer.send(p.Status())).buffered_seconds == 0.5  # type: ignore[attr-defined]
    newcomer.close()


def test_total_buffered_audio_is_bounded_and_each_client_keeps_its_reserve(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(max_sessions="4", max_buffered_seconds="40")  # a 10 s reserve each
    hog = Raw(daemon.endpoint)
    for _ in range(40):
        hog.send(p.Chunk(pcm=tone(1.0)))
    over = hog.reply_to(hog.send(p.Chunk(pcm=tone(1.0))))
    assert isinstance(over, p.Error) and over.code == p.ErrorCode.OVERLOADED, over
    assert hog.reply_to(hog.send(p.Status())).buffered_seconds == 40.0  # type: ignore[attr-defined]

    other = Raw(daemon.endpoint)
    for _ in range(10):
        other.send(p.Chunk(pcm=tone(1.0)))  # within its reserve: accepted although the daemon is "full"
    assert other.reply_to(other.send(p.Status())).buffered_seconds == 10.0  # type: ignore[attr-defined]
    refused = other.reply_to(other.send(p.Chunk(pcm=tone(1.0))))
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.OVERLOADED
    hog.close()
    other.close()


def test_audio_far_ahead_of_real_time_is_budgeted_and_live_audio_never_refused(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(bulk_audio_rate="1", max_buffered_seconds="20")  # a burst of 20 s, then 1 s/s
    dumper = Raw(daemon.endpoint)
    for _ in range(2):  # 10 s live (within the lead), then 10 s of the 20 s burst
        dumper.send(p.Chunk(pcm=tone(10.0), id="ok"))
    dumper.reply_to(dumper.send(p.Reset()))
    refused = dumper.reply_to(dumper.send(p.Chunk(pcm=tone(15.0))))  # 10 s (+1 s per second) left: too soon
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.OVERLOADED, refused
    speaker = Raw(daemon.endpoint)  # live: paced at real time, never counted against the allowance
    speech = tone(1.5)
    for start in range(0, speech.size, p.CHUNK_SAMPLES):
        speaker.send(p.Chunk(pcm=speech[start : start + p.CHUNK_SAMPLES]))
        time.sleep(p.CHUNK_SAMPLES / p.SAMPLE_RATE)
    assert speaker.reply_to(speaker.send(p.Status())).buffered_seconds == 1.5  # type: ignore[attr-defined]
    dumper.close()
    speaker.close()


# ---- 4. a dead daemon is noticed ---------------------------------------------------------------------------------


def test_cli_reports_a_killed_daemon_instead_of_waiting_its_timeout(daemon: DaemonProcess) -> None:
    cli = subprocess.Popen(
        [
            *(sys.executable, "-m", "sottovoce.client.cli", "ask", "--endpoint", daemon.endpoint),
            *("--max-tokens", "20000", "Tell me a very long story"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SOTTOVOCE_CONFIG": str(daemon.workdir / "no-config.toml")},
    )
    assert cli.stdout is not None
    cli.stdout.read(20)  # the answer is streaming
    daemon.kill()
    _, err = cli.communicate(timeout=60)  # the CLI's own timeout is 120 s
    assert cli.returncode not in (0, None)
    assert "closed the connection" in err, err


def test_a_frozen_daemon_is_noticed_by_the_heartbeat(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    client = Client(daemon.endpoint, timeout=120)
    events = client.stream("Tell me a very long story", max_tokens=20_000)
    assert isinstance(next(events), p.AnswerChunk)
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # alive, socket open, but silent: only heartbeats can tell
    try:
        with pytest.raises(DaemonUnavailable, match="closed the connection"):
            for _ in events:
                pass
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        client.close()


def test_shutdown_is_reported_with_its_own_code(daemon: DaemonProcess) -> None:
    talker = Raw(daemon.endpoint)
    running = talker.send(p.Ask(text="Tell me a very long story", max_tokens=20_000))
    assert isinstance(talker.reply_to(running), p.AnswerChunk)
    waiting = Raw(daemon.endpoint)
    queued = waiting.send(p.Ask(text="and me?", max_tokens=2))
    assert isinstance(waiting.reply_to(waiting.send(p.Status())), p.Report)  # the ask is in the queue by now
    daemon.stop()
    for client, ref in ((talker, running), (waiting, queued)):
        ended = client.final(ref, timeout=30)
        assert isinstance(ended, p.Error) and ended.code == p.ErrorCode.SHUTTING_DOWN, ended
        client.close()


# ---- 6. smaller: bad audio and fields get clear errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("int16-not-normalised", p.ErrorCode.BAD_REQUEST),
        ("empty-payload", p.ErrorCode.BAD_REQUEST),
        ("48k-one-sample-over-the-cap", p.ErrorCode.TOO_LARGE),
        ("unknown-language", p.ErrorCode.BAD_REQUEST),
        ("other-major-version", p.ErrorCode.VERSION),
    ],
)
def test_bad_audio_and_fields_are_refused_with_a_matchable_error(daemon: DaemonProcess, case: str, code: str) -> None:
    raw = Raw(daemon.endpoint)
    info = raw.reply_to(raw.send(p.Hello()))
    assert isinstance(info, p.Info)
    max_samples = int(info.limits["max_chunk_samples"])
    header = {"type": "chunk", "id": case, "rate": 16_000}
    payload = b""
    marker = p.MARKER
    if case == "int16-not-normalised":
        payload = (tone(0.5) * 1000).astype("<f4").tobytes()
    elif case == "48k-one-sample-over-the-cap":
        header["rate"] = 48_000
        payload = np.zeros(max_samples + 1, "<f4").tobytes()
    elif case == "unknown-language":
        header = {"type": "ask", "id": case, "text": "hi", "language": "klingon"}
    elif case == "other-major-version":
        header = {"type": "hello", "id": case}
        marker = b"sottovoce/2"
    frames = [marker, json.dumps(header).encode()]
    if header["type"] == "chunk":
        frames.append(payload)
    raw.send_frames(*frames)
    reply = raw.reply_to(case)  # every error names the request it answers: nobody waits out a timeout
    assert isinstance(reply, p.Error) and reply.code == code, reply
    assert isinstance(raw.reply_to(raw.send(p.Status())), p.Report)  # and the daemon goes on
    raw.close()
