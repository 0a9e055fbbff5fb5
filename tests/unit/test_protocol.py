"""Every message type round-trips through frames; the spec's version is the code's; decoding refuses bad frames."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sottovoce.client import protocol as p

ROOT = Path(__file__).resolve().parents[2]

# A non-default value for every field type, so a field that is dropped or renamed in transit shows up.
SAMPLES: dict[str, object] = {
    "str": "x-value",
    "str | None": "maybe",
    "int": 7,
    "int | None": 9,
    "float": 1.5,
    "float | None": 0.25,
    "bool": True,
    "dict[str, Any]": {"k": [1, "two"]},
    "dict[str, float]": {"total": 1.25},
    "list[str]": ["a", "b"],
}


def _sample(cls: type[p.Message]) -> p.Message:
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name == "id":
            kwargs["id"] = "id-123"
        elif field.name == "pcm":
            kwargs["pcm"] = np.linspace(-1, 1, 37, dtype=np.float32)
        elif field.name == "rate":
            kwargs["rate"] = 44_100
        elif field.name == "protocol":
            kwargs["protocol"] = "1.3"
        elif field.name == "temperature":
            kwargs["temperature"] = 0.5
        elif field.name == "language":
            kwargs["language"] = "de"
        else:
            kwargs[field.name] = SAMPLES[str(field.type)]
    return cls(**kwargs)


@pytest.mark.parametrize("cls", sorted(p.REGISTRY.values(), key=lambda c: c.TYPE), ids=lambda c: c.TYPE)
def test_every_message_type_round_trips(cls: type[p.Message]) -> None:
    msg = _sample(cls)
    frames = p.encode(msg)
    assert frames[0] == b"sottovoce/1"
    assert (len(frames) == 3) == cls.HAS_PAYLOAD
    assert p.decode(frames) == msg


def test_registry_holds_every_message_class() -> None:
    def subclasses(c: type) -> set[type]:
        return set(c.__subclasses__()).union(*(subclasses(s) for s in c.__subclasses__()))

    assert set(p.REGISTRY.values()) == subclasses(p.Message)
    assert set(p.REGISTRY) > p.CLIENT_TYPES


def test_protocol_md_version_matches_code() -> None:
    text = (ROOT / "client" / "PROTOCOL.md").read_text()
    match = re.search(r"Protocol version: \*\*(\d+\.\d+)\*\*", text)
    assert match and match.group(1) == p.PROTOCOL_VERSION
    assert f"`sottovoce/{p.PROTOCOL_MAJOR}`" in text


def test_protocol_md_documents_every_type_and_error_code() -> None:
    text = (ROOT / "client" / "PROTOCOL.md").read_text()
    for kind in p.REGISTRY:
        assert f"| `{kind}` |" in text, kind
    for code in p.ErrorCode.ALL:
        assert f"| `{code}` |" in text, code


def test_protocol_md_example_client_is_the_tested_file() -> None:
    text = (ROOT / "client" / "PROTOCOL.md").read_text()
    block = text.split("```python\n")[1].split("```")[0]
    assert block in (ROOT / "docs" / "examples" / "raw_client.py").read_text()


def test_chunk_payload_is_little_endian_float32() -> None:
    msg = p.Chunk(pcm=np.array([0.5, -1.0], np.float32))
    assert p.encode(msg)[2] == b"\x00\x00\x00\x3f\x00\x00\x80\xbf"


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1"], p.ErrorCode.BAD_REQUEST),
        ([b"other", b"{}"], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/9", b"{}"], p.ErrorCode.VERSION),
        ([b"sottovoce/1", b"\xff\xfe"], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"hello"}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"hello","id":5}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":7,"id":"a"}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"nope","id":"a"}'], p.ErrorCode.UNKNOWN_TYPE),
        ([b"sottovoce/1", b'{"type":"ask","id":"a","stream":"yes"}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"ask","id":"a","text":"  "}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"ask","id":"a","max_tokens":true}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"ask","id":"a","temperature":Infinity}'], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"chunk","id":"a","rate":8000.5}', b"\0" * 4], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"chunk","id":"a"}', b"\0" * 6], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b'{"type":"ask","id":"a"}', b"\0" * 4], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b"{}", b"", b""], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b"[" * 100_000], p.ErrorCode.BAD_REQUEST),
        ([b"sottovoce/1", b" " * (p.MAX_HEADER_BYTES + 1)], p.ErrorCode.BAD_REQUEST),
    ],
)
def test_decode_refuses_bad_frames_with_the_right_code(frames: list[bytes], code: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frames, allowed=p.CLIENT_TYPES)
    assert info.value.code == code
    assert info.value.text


def test_error_keeps_the_ref_of_a_readable_id() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode([b"sottovoce/1", b'{"type":"ask","id":"q7","max_tokens":0}'])
    assert info.value.ref == "q7" and "max_tokens" in info.value.text


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    header = {"type": "ask", "id": "a", "text": "hi", "future_field": {"x": 1}}
    msg = p.decode([p.MARKER, json.dumps(header).encode()])
    assert isinstance(msg, p.Ask) and msg.text == "hi"


def test_every_error_code_is_listed() -> None:
    codes = {v for k, v in vars(p.ErrorCode).items() if k.isupper() and isinstance(v, str)}
    assert codes == p.ErrorCode.ALL

