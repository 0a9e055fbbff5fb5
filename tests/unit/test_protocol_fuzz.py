"""Property-based tests (hypothesis) of frame decoding and dispatch: any frame sequence yields either a valid reply or
a protocol error; never an exception escaping, a hang, a misrouted or lost reply, or unbounded state.

The oracle lives in ``tests/fuzz/harness.py`` and is shared with the coverage-guided fuzzer
(``tests/fuzz/fuzz_protocol.py``). Hypothesis explores structured inputs (valid messages with hostile field values,
sequences from several clients, clients vanishing); the fuzzer explores raw bytes guided by coverage.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import harness
from inproc import RunningServer  # type: ignore[import-not-found]

from sottovoce.client import protocol as p
from sottovoce.client.config import Settings

# ---- strategies ------------------------------------------------------------------------------------------------
# Text excludes lone surrogates (hypothesis' default alphabet): they trip bug R1 (docs/reliability.md), pinned by
# test_lone_surrogate_* below until protocol.decode refuses them.

FIELDS = ("id", "type", "text", "rate", "stream", "max_tokens", "temperature", "language", "system_prompt",
          "protocol", "client", "ref")  # fmt: skip
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "1.0", "2.0", "en", "hello", "x" * 300])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
types = st.sampled_from([*sorted(p.CLIENT_TYPES), "done", "error", "info", "sing", ""])


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A JSON object shaped like a header: a type, maybe an id, and a handful of known or unknown fields."""
    obj: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        obj["type"] = draw(types | json_scalars)
    if draw(st.integers(0, 9)):
        obj["id"] = draw(st.text(max_size=20) | json_scalars)
    for key in draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=5)):
        obj[key] = draw(json_values)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


pcm_payloads = st.one_of(
    st.integers(0, 24_000).map(
        lambda n: (0.2 * np.sin(np.arange(n) / 16_000 * 2 * np.pi * 330)).astype("<f4").tobytes()
    ),
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=64).map(
        lambda xs: np.array(xs, "<f4").tobytes()
    ),
    st.binary(max_size=64),
)


@st.composite
def frame_lists(draw: st.DrawFn) -> list[bytes]:
    """Mostly well-framed messages with odd contents; sometimes any bytes at all."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(st.lists(st.binary(max_size=64), max_size=5))
    marker = p.MARKER if shape > 1 else draw(st.sampled_from([b"sottovoce/2", b"sottovoce/", b"SOTTOVOCE/1", b""]))
    frames = [marker, draw(headers()) if shape > 2 else draw(st.binary(max_size=200))]
    if draw(st.integers(0, 3)) == 0 or b'"chunk"' in frames[1]:
        frames.append(draw(pcm_payloads))
    if draw(st.integers(0, 20)) == 0:
        frames.append(b"extra")
    return frames


valid_client_messages = st.one_of(
    st.builds(p.Hello, id=st.text(max_size=20), client=st.none() | st.text(max_size=30)),
    st.builds(
        p.Chunk,
        id=st.text(max_size=20),
        rate=st.sampled_from([8_000, 16_000, 22_050, 44_100, 48_000]),
        pcm=st.integers(1, 8192).map(lambda n: np.linspace(-0.5, 0.5, n, dtype=np.float32)),
    ),
    st.builds(
        p.Ask,
        id=st.text(max_size=20),
        text=st.none() | st.text(min_size=1, max_size=60).filter(str.strip),
        max_tokens=st.none() | st.integers(1, 32),
        temperature=st.none() | st.floats(0.0, 2.0),
        language=st.none() | st.sampled_from(["en", "de"]),
        stream=st.booleans(),
        system_prompt=st.none() | st.text(max_size=40),
    ),
    st.builds(p.Cancel, id=st.text(max_size=20)),
    st.builds(p.Reset, id=st.text(max_size=20)),
    st.builds(p.Status, id=st.text(max_size=20)),
)


@st.composite
def steps(draw: st.DrawFn) -> list[harness.Step]:
    """A session of up to 24 messages from four clients: valid ones (so asks get accepted and served) mixed with
    hostile ones; the model thread runs now and then; clients sometimes vanish."""
    out = []
    for _ in range(draw(st.integers(1, 24))):
        frames = p.encode(draw(valid_client_messages)) if draw(st.integers(0, 2)) else draw(frame_lists())
        out.append(
            harness.Step(
                identity=draw(st.integers(0, 3)),
                frames=frames,
                run_worker=draw(st.integers(0, 3)) == 0,
                vanish=draw(st.integers(0, 15)) == 0,
            )
        )
    return out


# ---- decoding --------------------------------------------------------------------------------------------------


def _check_decoded(frames: list[bytes]) -> p.Message | p.ProtocolError:
    try:
        msg = p.decode(frames, allowed=p.CLIENT_TYPES)
    except p.ProtocolError as exc:
        assert exc.code in p.ErrorCode.ALL and exc.code != p.ErrorCode.INTERNAL
        assert exc.text
        assert exc.ref is None or isinstance(exc.ref, str)
        return exc
    assert msg.TYPE in p.CLIENT_TYPES and isinstance(msg.id, str)
    return msg


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_lists())
@example(frames=[p.MARKER, b"[" * 20_000 + b"]" * 20_000])
@example(frames=[p.MARKER, b'{"type":"ask","id":"x","max_tokens":1' + b"0" * 5000 + b"}"])
@example(frames=[p.MARKER, b'{"type":"ask","id":"x","temperature":1e400}'])
@example(frames=[p.MARKER, b'{"type":"chunk","id":"x","rate":16000}', b"\x00\x00\xc0\x7f"])
@example(frames=[p.MARKER, b"\xff\xfe{}"])
@example(frames=[p.MARKER, b'{"type":"hello","id":"x","protocol":1}'])
def test_decode_returns_a_message_or_a_protocol_error(frames: list[bytes]) -> None:
    _check_decoded(frames)


@settings(max_examples=500, deadline=None)
@given(msg=valid_client_messages)
def test_valid_messages_round_trip(msg: p.Message) -> None:
    decoded = p.decode(p.encode(msg), allowed=p.CLIENT_TYPES)
    assert decoded == msg


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    kind=st.sampled_from(sorted(p.CLIENT_TYPES)),
)
def test_decoded_fields_have_the_documented_types(header: dict[str, Any], kind: str) -> None:
    """Whatever a header holds, a message that decodes has fields of the types the daemon relies on."""
    header = {**header, "type": kind}
    payload = [np.zeros(16, "<f4").tobytes()] if kind == "chunk" else []
    result = _check_decoded([p.MARKER, json.dumps(header).encode(), *payload])
    if isinstance(result, p.ProtocolError):
        return
    if isinstance(result, p.Ask):
        assert result.text is None or (isinstance(result.text, str) and result.text.strip())
        assert result.max_tokens is None or (type(result.max_tokens) is int and 1 <= result.max_tokens <= 32_768)
        assert result.temperature is None or (
            not isinstance(result.temperature, bool) and math.isfinite(result.temperature)
        )
        assert isinstance(result.stream, bool)
        for name in ("language", "system_prompt"):
            assert getattr(result, name) is None or isinstance(getattr(result, name), str)
    if isinstance(result, p.Chunk):
        assert type(result.rate) is int and result.rate > 0 and result.pcm.dtype == np.float32
        assert result.pcm.size and float(np.abs(result.pcm).max()) <= p.MAX_SAMPLE_MAGNITUDE
    if isinstance(result, p.Hello):
        assert isinstance(result.protocol, str)


# ---- dispatch (the harness: real Server + ModelWorker code, one thread) ---------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(session=steps())
def test_any_frame_sequence_gets_valid_replies_and_leaves_nothing_behind(session: list[harness.Step]) -> None:
    harness.DispatchHarness().run(session)


@pytest.mark.parametrize("name", sorted(harness.seed_inputs()))
def test_fuzz_seed_inputs_pass_the_oracle(name: str) -> None:
    """The fuzzer's seeds are the first regression corpus: each must pass as it is."""
    harness.check_bytes(harness.seed_inputs()[name])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_arbitrary_fuzzer_inputs_pass_the_oracle(data: bytes) -> None:
    harness.check_bytes(data)


# ---- regressions found by fuzzing (docs/reliability.md, "Bugs found") ------------------------------------------

@pytest.mark.parametrize(
    "header",
    [
        b'{"type":"status","id":"\\ud800"}',
        b'{"type":"ask","id":"\\udfff","max_tokens":0}',
        b'{"type":"hello","id":"x","client":"\\ud800","protocol":"9.\\ud800"}',
    ],
)
def test_lone_surrogate_in_a_header_is_a_bad_request_not_an_internal_error(header: bytes) -> None:
    h = harness.DispatchHarness()
    replies = h.feed(harness.IDENTITIES[0], [p.MARKER, header])
    assert [m.code for _, m in replies] == [p.ErrorCode.BAD_REQUEST]  # type: ignore[attr-defined]


def test_lone_surrogate_in_ask_text_never_loses_the_final_reply() -> None:
    """The echo model answers with the question: a lone surrogate in it made every reply unsendable, so the ask's
    `done` vanished and the client waited for its whole timeout."""
    h = harness.DispatchHarness()
    h.run([harness.Step(0, [p.MARKER, b'{"type":"ask","id":"a","text":"hi \\ud83d"}'], run_worker=True)])


CRASHES = Path(__file__).resolve().parents[1] / "fuzz" / "crashes"
KNOWN_OPEN: dict[str, pytest.MarkDecorator] = {}  # crashes found and not fixed yet (none: R1 is fixed)
"""Saved fuzzer crash inputs whose bug is not fixed yet (delete the entry when it is; the file stays)."""


@pytest.mark.parametrize(
    "name",
    [pytest.param(f.name, marks=KNOWN_OPEN.get(f.name, ())) for f in sorted(CRASHES.glob("*")) if f.is_file()],
)
def test_saved_fuzzer_crash_inputs_pass_the_oracle(name: str) -> None:
    """Every input the fuzzer ever crashed on (tests/fuzz/crashes/) replays as a regression test."""
    harness.check_bytes((CRASHES / name).read_bytes())


# ---- the same over a real ROUTER socket ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_daemon(tmp_path_factory: pytest.TempPathFactory):
    """Server + worker threads on a real ipc ROUTER (as daemon.main wires them), with the fuzzer's fake models."""
    endpoint = f"ipc://{tmp_path_factory.mktemp('fuzzsock')}/d.sock"
    cfg = Settings(endpoint=endpoint, queue_depth=2, buffer_seconds=3.0, max_chunk_seconds=1.0, max_tokens=8)
    with RunningServer(endpoint, cfg, harness.EchoTranscriber(), harness.EchoChat()) as d:
        yield d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frame_lists(), min_size=1, max_size=12))
def test_real_socket_answers_every_bad_message_and_keeps_serving(socket_daemon: RunningServer, batch) -> None:
    """Bytes through libzmq, the asyncio receive loop and the thread hops: every reply decodes, none is `internal`,
    and a status sent after the batch is answered (the daemon neither died nor hung)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(socket_daemon.endpoint)
    try:
        for frames in batch:
            sock.send_multipart(frames or [b""])
        probe = p.Status()
        sock.send_multipart(p.encode(probe))
        while True:
            assert sock.poll(10_000), "the daemon stopped answering"
            reply = p.decode(sock.recv_multipart())
            assert reply.TYPE in harness.DAEMON_TYPES
            if isinstance(reply, p.Error):
                assert reply.code in p.ErrorCode.ALL and reply.code != p.ErrorCode.INTERNAL, reply.text
            if isinstance(reply, p.Report) and reply.ref == probe.id:
                break
    finally:
        sock.close(linger=0)
    assert len(socket_daemon.server.sessions) <= 1024
