"""Frames a careless or hostile client might send, with the error code the daemon must answer (max chunk: 2 s)."""

from __future__ import annotations

import numpy as np

from sottovoce.client import protocol as p

BAD_FRAMES: list[tuple[list[bytes], str]] = [
    ([b"sottovoce/1"], p.ErrorCode.BAD_REQUEST),
    ([b"hello", b"{}"], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/2", b'{"type":"hello","id":"x"}'], p.ErrorCode.VERSION),
    ([b"sottovoce/1", b"{not json"], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/1", b"[1,2]"], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/1", b'{"type":"sing","id":"x"}'], p.ErrorCode.UNKNOWN_TYPE),
    ([b"sottovoce/1", b'{"type":"done","id":"x"}'], p.ErrorCode.UNKNOWN_TYPE),
    ([b"sottovoce/1", b'{"type":"chunk","id":"x"}'], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/1", b'{"type":"chunk","id":"x"}', b"\x00\x00\x80"], p.ErrorCode.BAD_REQUEST),
    (
        [b"sottovoce/1", b'{"type":"chunk","id":"x"}', np.array([np.nan], "<f4").tobytes()],
        p.ErrorCode.BAD_REQUEST,
    ),
    (
        [b"sottovoce/1", b'{"type":"chunk","id":"x"}', np.zeros(40_000, "<f4").tobytes()],
        p.ErrorCode.TOO_LARGE,
    ),
    ([b"sottovoce/1", b'{"type":"chunk","id":"x","rate":"fast"}', b"\0" * 8], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/1", b'{"type":"ask","id":"x","max_tokens":-3}'], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/1", b'{"type":"ask","id":"x","temperature":NaN}'], p.ErrorCode.BAD_REQUEST),
    ([b"sottovoce/1", b'{"type":"ask","id":"x"}'], p.ErrorCode.NO_AUDIO),
    ([b"sottovoce/1", b'{"type":"cancel","id":"x"}'], p.ErrorCode.NOTHING_TO_CANCEL),
    ([b"sottovoce/1", b'{"type":"status","id":"x"}', b"extra"], p.ErrorCode.BAD_REQUEST),
]
