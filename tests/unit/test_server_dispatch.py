"""The daemon's dispatch over a real ROUTER socket with fake models: ordering, sessions, and every bad input."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bad_frames import BAD_FRAMES  # type: ignore[import-not-found]
from fakes import FakeChat, FakeTranscriber  # type: ignore[import-not-found]
from inproc import RawClient, RunningServer  # type: ignore[import-not-found]

from sottovoce.client import protocol as p
from sottovoce.client.config import Settings


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/d.sock"


@pytest.fixture
def models() -> tuple[FakeTranscriber, FakeChat]:
    return FakeTranscriber(), FakeChat()


@pytest.fixture
def daemon(endpoint: str, models: tuple[FakeTranscriber, FakeChat]):
    # The seed design's whole-recording path (the fake Whisper hears tones; the incremental path is tested
    # with real speech in test_incremental.py).
    settings = Settings(endpoint=endpoint, buffer_seconds=5.0, max_chunk_seconds=2.0, queue_depth=2, incremental=False)
    with RunningServer(endpoint, settings, *models) as running:
        yield running


@pytest.fixture
def client(daemon: RunningServer):
    c = RawClient(daemon.endpoint)
    yield c
    c.close()


def speech(seconds: float, level: float = 0.1, rate: int = p.SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_text_ask_streams_chunks_then_done(client: RawClient) -> None:
    ask_id = client.send(p.Ask(text="what time is it"))
    replies = client.until_done()
    assert all(getattr(r, "ref", None) == ask_id for r in replies)
    chunks = [r for r in replies if isinstance(r, p.AnswerChunk)]
    done = replies[-1]
    assert isinstance(done, p.Done)
    assert "".join(c.text for c in chunks) == done.answer == "you said: what time is it"
    assert done.transcript is None and done.tokens == 6 and done.finish_reason == "stop"
    assert {"queued", "generate", "total"} <= set(done.seconds)


def test_voice_ask_uses_exactly_the_chunks_sent_before_it(client: RawClient, models) -> None:
    transcriber, chat = models
    for _ in range(5):
        client.send(p.Chunk(pcm=speech(4096 / p.SAMPLE_RATE)))
    ask_id = client.send(p.Ask())
    replies = client.until_done()
    assert isinstance(replies[0], p.Transcript) and replies[0].ref == ask_id
    assert transcriber.calls == [5 * 4096]
    assert replies[-1].transcript.startswith("heard 20480 samples")
    assert chat.prompts[-1][-1].content == replies[-1].transcript
    # the buffer was consumed: a second voice ask has nothing
    client.send(p.Ask())
    err = client.recv()
    assert isinstance(err, p.Error) and err.code == p.ErrorCode.NO_AUDIO


def test_sessions_keep_each_clients_audio_apart(daemon: RunningServer) -> None:
    a, b = RawClient(daemon.endpoint), RawClient(daemon.endpoint)
    try:
        a.send(p.Chunk(pcm=speech(1.5, level=0.1)))
        b.send(p.Chunk(pcm=speech(2.0, level=0.3)))
        a.send(p.Ask())
        b.send(p.Ask())
        done_a, done_b = a.until_done()[-1], b.until_done()[-1]
        assert done_a.transcript.startswith("heard 24000 samples at 0.071")
        assert done_b.transcript.startswith("heard 32000 samples at 0.212")
    finally:
        a.close()
        b.close()


def test_silence_gives_no_speech_and_skips_the_llm(client: RawClient, models) -> None:
    _, chat = models
    client.send(p.Chunk(pcm=np.zeros(p.SAMPLE_RATE * 2, np.float32)))
    client.send(p.Ask())
    replies = client.until_done()
    assert isinstance(replies[0], p.Transcript) and replies[0].no_speech
    assert isinstance(replies[-1], p.Done) and replies[-1].no_speech and replies[-1].answer == ""
    assert chat.prompts == []


def test_not_enough_audio_keeps_the_audio(client: RawClient) -> None:
    client.send(p.Chunk(pcm=speech(0.5)))
    client.send(p.Ask())
    err = client.recv()
    assert isinstance(err, p.Error) and err.code == p.ErrorCode.NOT_ENOUGH_AUDIO
    client.send(p.Chunk(pcm=speech(0.6)))
    client.send(p.Ask())
    assert client.until_done()[-1].transcript.startswith(f"heard {int(1.1 * p.SAMPLE_RATE)} samples")


def test_other_rates_are_resampled(client: RawClient, models) -> None:
    transcriber, _ = models
    pcm = speech(2.0, rate=44_100)
    for start in range(0, pcm.size, 4096):
        client.send(p.Chunk(pcm=pcm[start : start + 4096], rate=44_100))
    client.send(p.Ask())
    client.until_done()
    assert abs(transcriber.calls[-1] - 2 * p.SAMPLE_RATE) <= 2


def test_buffer_cap_refuses_the_extra_chunk_and_keeps_the_rest(client: RawClient, models) -> None:
    transcriber, _ = models
    ids = [client.send(p.Chunk(pcm=speech(1.9))) for _ in range(3)]  # 5.7 s against a 5 s cap
    err = client.recv()
    assert isinstance(err, p.Error) and err.code == p.ErrorCode.TOO_LARGE and err.ref == ids[2]
    client.send(p.Ask())
    client.until_done()
    assert transcriber.calls == [int(1.9 * p.SAMPLE_RATE) * 2]


@pytest.mark.parametrize(("frames", "code"), BAD_FRAMES)
def test_bad_input_gets_a_clear_error_and_the_daemon_keeps_serving(client: RawClient, frames, code) -> None:
    client.send_raw(*frames)
    err = client.recv()
    assert isinstance(err, p.Error), err
    assert err.code == code, err.text
    assert err.text
    client.send(p.Ask(text="still there"))
    assert client.until_done()[-1].answer == "you said: still there"


def test_second_ask_while_one_runs_is_busy_and_the_first_completes(endpoint: str) -> None:
    gate = threading.Event()
    settings = Settings(endpoint=endpoint, queue_depth=2)
    with RunningServer(endpoint, settings, FakeTranscriber(), FakeChat(gate=gate)):
        c = RawClient(endpoint)
        first = c.send(p.Ask(text="one two"))
        second = c.send(p.Ask(text="three"))
        err = c.recv()
        assert isinstance(err, p.Error) and err.code == p.ErrorCode.BUSY and err.ref == second
        gate.set()
        replies = c.until_done()
        assert replies[-1].ref == first and replies[-1].answer == "you said: one two"
        c.close()


def test_full_queue_answers_busy(endpoint: str) -> None:
    gate = threading.Event()
    settings = Settings(endpoint=endpoint, queue_depth=1)
    chat = FakeChat(gate=gate)
    with RunningServer(endpoint, settings, FakeTranscriber(), chat):
        clients = [RawClient(endpoint) for _ in range(4)]
        clients[0].send(p.Ask(text="hi"))
        deadline = time.monotonic() + 5
        while not chat.prompts and time.monotonic() < deadline:  # the first ask is running
            time.sleep(0.01)
        for c in clients[1:]:
            c.send(p.Ask(text="hi"))
        time.sleep(0.3)
        busy = []
        for c in clients:
            if c.sock.poll(200):
                busy.append(c.recv())
        # one running + one queued; the other two are told busy at once
        assert len(busy) == 2 and all(isinstance(m, p.Error) and m.code == p.ErrorCode.BUSY for m in busy)
        gate.set()
        for c in clients:
            c.close()


def test_cancel_stops_the_running_ask(endpoint: str) -> None:
    settings = Settings(endpoint=endpoint)
    with RunningServer(endpoint, settings, FakeTranscriber(), FakeChat(token_delay=0.05)):
        c = RawClient(endpoint)
        ask_id = c.send(p.Ask(text=" ".join(["word"] * 200)))
        assert isinstance(c.recv(), p.AnswerChunk)
        cancel_id = c.send(p.Cancel())
        replies = [c.recv()]
        while not (isinstance(replies[-1], p.Error) and replies[-1].ref == ask_id):
            replies.append(c.recv())
        assert any(isinstance(r, p.Ok) and r.ref == cancel_id for r in replies)
        assert replies[-1].code == p.ErrorCode.CANCELLED
        assert len([r for r in replies if isinstance(r, p.AnswerChunk)]) < 50
        c.send(p.Ask(text="again"))
        assert c.until_done()[-1].answer == "you said: again"
        c.close()


def test_reset_drops_buffered_audio(client: RawClient) -> None:
    client.send(p.Chunk(pcm=speech(1.0)))
    reset_id = client.send(p.Reset())
    ok = client.recv()
    assert isinstance(ok, p.Ok) and ok.ref == reset_id and ok.dropped_seconds == pytest.approx(1.0)
    client.send(p.Ask())
    assert client.recv().code == p.ErrorCode.NO_AUDIO


def test_hello_and_status(client: RawClient) -> None:
    hello_id = client.send(p.Hello(client="test"))
    info = client.recv()
    assert isinstance(info, p.Info) and info.ref == hello_id and info.protocol == p.PROTOCOL_VERSION
    assert info.models == {"whisper": "fake-whisper", "llm": "fake-llm"}
    assert "voice-ask" in info.capabilities and info.limits["sample_rate"] == 16000
    client.send(p.Hello(protocol="2.0"))
    assert client.recv().code == p.ErrorCode.VERSION
    client.send(p.Chunk(pcm=speech(0.25)))
    client.send(p.Status())
    report = client.recv()
    assert isinstance(report, p.Report)
    assert report.models["whisper"]["loaded"] and report.buffered_seconds == pytest.approx(0.25)


def test_client_that_vanishes_mid_answer_is_cancelled_and_forgotten(endpoint: str) -> None:
    chat = FakeChat(token_delay=0.02)
    with RunningServer(endpoint, Settings(endpoint=endpoint), FakeTranscriber(), chat) as running:
        c = RawClient(endpoint)
        c.send(p.Ask(text=" ".join(["word"] * 300)))
        assert isinstance(c.recv(), p.AnswerChunk)
        c.close()
        deadline = time.monotonic() + 5
        while len(running.server.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(running.server.sessions) == 0
        # the model thread is free again for others
        other = RawClient(endpoint)
        other.send(p.Ask(text="next"))
        assert other.until_done()[-1].answer == "you said: next"
        other.close()


def test_model_that_fails_to_load_is_reported_and_daemon_stays_up(endpoint: str) -> None:
    broken = FakeTranscriber(fail_load="no whisper model 'x'; run `sottovoce models fetch-defaults`")
    with RunningServer(endpoint, Settings(endpoint=endpoint), broken, FakeChat()):
        c = RawClient(endpoint)
        c.send(p.Chunk(pcm=speech(2.0)))
        c.send(p.Ask())
        err = c.recv()
        assert err.code == p.ErrorCode.MODEL_ERROR and "fetch-defaults" in err.text
        c.send(p.Ask(text="typed still works"))
        assert c.until_done()[-1].answer == "you said: typed still works"
        c.send(p.Status())
        assert c.recv().models["whisper"]["error"].startswith("no whisper model")
        c.close()


def test_follow_up_questions_see_the_last_turns(endpoint: str) -> None:
    chat = FakeChat()
    settings = Settings(endpoint=endpoint, history_turns=2)
    with RunningServer(endpoint, settings, FakeTranscriber(), chat):
        c = RawClient(endpoint)
        for question in ("first", "second", "third"):
            c.send(p.Ask(text=question))
            c.until_done()
        roles = [(m.role, m.content) for m in chat.prompts[-1][1:]]
        assert roles == [
            ("user", "first"),
            ("assistant", "you said: first"),
            ("user", "second"),
            ("assistant", "you said: second"),
            ("user", "third"),
        ]
        c.send(p.Ask(text="fourth"))
        c.until_done()
        # the oldest turn fell out of the 2-turn window
        assert [m.content for m in chat.prompts[-1][1:]] == [
            "second",
            "you said: second",
            "third",
            "you said: third",
            "fourth",
        ]
        assert chat.cache_keys[-1] is not None and len(set(chat.cache_keys)) == 1
        c.close()


def test_reset_forgets_the_conversation_unless_asked_to_keep_it(endpoint: str) -> None:
    chat = FakeChat()
    with RunningServer(endpoint, Settings(endpoint=endpoint, history_turns=3), FakeTranscriber(), chat):
        c = RawClient(endpoint)
        c.send(p.Ask(text="remember me"))
        c.until_done()
        c.send(p.Reset(conversation=False))
        assert isinstance(c.recv(), p.Ok)
        c.send(p.Ask(text="still there?"))
        c.until_done()
        assert [m.content for m in chat.prompts[-1][1:]] == ["remember me", "you said: remember me", "still there?"]
        c.send(p.Reset())
        assert isinstance(c.recv(), p.Ok)
        c.send(p.Ask(text="fresh"))
        c.until_done()
        assert [m.content for m in chat.prompts[-1][1:]] == ["fresh"]
        assert chat.forgotten == [chat.cache_keys[0]]
        c.close()


def test_clients_do_not_share_a_conversation(endpoint: str) -> None:
    chat = FakeChat()
    with RunningServer(endpoint, Settings(endpoint=endpoint, history_turns=3), FakeTranscriber(), chat):
        a, b = RawClient(endpoint), RawClient(endpoint)
        a.send(p.Ask(text="secret of a"))
        a.until_done()
        b.send(p.Ask(text="question of b"))
        b.until_done()
        assert [m.content for m in chat.prompts[-1][1:]] == ["question of b"]
        assert chat.cache_keys[0] != chat.cache_keys[1]
        a.close()
        b.close()


def test_keep_alive_unloads_idle_models_and_the_next_ask_reloads_them(endpoint: str) -> None:
    transcriber, chat = FakeTranscriber(), FakeChat()
    settings = Settings(endpoint=endpoint, whisper_keep_alive=0.3, llm_keep_alive=0.6, incremental=False)
    with RunningServer(endpoint, settings, transcriber, chat):
        c = RawClient(endpoint)
        time.sleep(1.0)
        assert (transcriber.unloads, chat.unloads) == (1, 1)
        c.send(p.Status())
        report = c.recv()
        assert not report.models["whisper"]["loaded"] and not report.models["llm"]["loaded"]
        assert report.memory_bytes > 10_000_000
        c.send(p.Chunk(pcm=speech(1.5)))
        c.send(p.Ask())
        done = c.until_done()[-1]
        assert isinstance(done, p.Done) and done.transcript.startswith("heard")
        assert (transcriber.loads, chat.loads) == (2, 2)
        c.close()


def test_warm_loads_unloaded_models_before_the_ask(endpoint: str) -> None:
    transcriber, chat = FakeTranscriber(), FakeChat()
    settings = Settings(endpoint=endpoint, whisper_keep_alive=0.2, llm_keep_alive=0.2)
    with RunningServer(endpoint, settings, transcriber, chat):
        c = RawClient(endpoint)
        time.sleep(0.6)
        assert transcriber.unloads == 1
        warm_id = c.send(p.Warm())
        ok = c.recv()
        assert isinstance(ok, p.Ok) and ok.ref == warm_id
        deadline = time.monotonic() + 2
        while transcriber.loads < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (transcriber.loads, chat.loads) == (2, 2)
        c.close()


def test_a_model_that_comes_back_is_loaded_on_the_next_ask(endpoint: str) -> None:
    transcriber = FakeTranscriber(fail_load="no whisper model here")
    with RunningServer(endpoint, Settings(endpoint=endpoint, incremental=False), transcriber, FakeChat()):
        c = RawClient(endpoint)
        c.send(p.Chunk(pcm=speech(1.5)))
        c.send(p.Ask())
        assert c.recv().code == p.ErrorCode.MODEL_ERROR
        transcriber.fail_load = None  # the user fixed it
        c.send(p.Chunk(pcm=speech(1.5)))
        c.send(p.Ask())
        assert c.until_done()[-1].transcript.startswith("heard")
        c.close()
