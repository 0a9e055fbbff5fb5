"""The sottovoce wire protocol: message classes and frame encoding.

Specified in ``PROTOCOL.md`` beside this file; a test keeps the two versions equal.

A message travels as ZeroMQ frames ``[MARKER] [header JSON] [payload?]`` (the daemon's ROUTER socket sees the
client's routing identity in front). The header is a JSON object with ``type`` and ``id``; replies carry ``ref``,
the ``id`` of the request they answer. PCM audio travels raw (little-endian float32) in the payload frame, never
inside JSON, and nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from .config import WHISPER_LANGUAGES

PROTOCOL_VERSION = "1.1"
PROTOCOL_MAJOR = int(PROTOCOL_VERSION.split(".")[0])
MARKER = f"sottovoce/{PROTOCOL_MAJOR}".encode()
MARKER_PREFIX = b"sottovoce/"

SAMPLE_RATE = 16_000
"""Rate the models work at; chunks at other rates are resampled by the daemon."""
CHUNK_SAMPLES = 4096
"""Samples per chunk that the tray sends (any size up to the daemon's cap is accepted)."""
MIN_ASK_SAMPLES = CHUNK_SAMPLES * 4
"""Below this many samples (at 16 kHz) a voice ask is answered with ``not-enough-audio``, as in the seed app."""
MAX_HEADER_BYTES = 64 * 1024
PCM_DTYPE = np.dtype("<f4")
MAX_SAMPLE_MAGNITUDE = 2.0
"""Samples belong in [-1, 1]; float audio may overshoot a little, but beyond this it is integer PCM that was never
divided by 32768 (and would be heard as silence or noise), so it is refused."""


class ErrorCode:
    """Stable error codes; clients branch on these, never on the text."""

    BAD_REQUEST = "bad-request"  # malformed frames, JSON, fields or audio
    UNKNOWN_TYPE = "unknown-type"  # a `type` this daemon does not know
    VERSION = "version"  # protocol major version differs
    TOO_LARGE = "too-large"  # a chunk over the size cap, or a buffer that would pass its cap
    NOT_ENOUGH_AUDIO = "not-enough-audio"  # voice ask with less than MIN_ASK_SAMPLES
    NO_AUDIO = "no-audio"  # voice ask with nothing buffered
    BUSY = "busy"  # queue full, or this client already has an ask running
    NOTHING_TO_CANCEL = "nothing-to-cancel"  # cancel with no ask running
    MODEL_ERROR = "model-error"  # a model failed to load or to run
    CANCELLED = "cancelled"  # the ask was cancelled (by `cancel`, `reset` or the client vanishing)
    OVERLOADED = "overloaded"  # a daemon-wide bound: too many clients, or too much audio buffered by all of them
    SHUTTING_DOWN = "shutting-down"  # the daemon is stopping: the ask was not finished
    INTERNAL = "internal"  # a bug in the daemon; it keeps serving

    ALL: ClassVar[frozenset[str]] = frozenset(
        {
            BAD_REQUEST,
            UNKNOWN_TYPE,
            VERSION,
            TOO_LARGE,
            NOT_ENOUGH_AUDIO,
            NO_AUDIO,
            BUSY,
            NOTHING_TO_CANCEL,
            MODEL_ERROR,
            CANCELLED,
            OVERLOADED,
            SHUTTING_DOWN,
            INTERNAL,
        }
    )


class ProtocolError(ValueError):
    """A message that cannot be decoded or is invalid; carries the error code to answer with."""

    def __init__(self, code: str, text: str, ref: str | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.ref = ref


def new_id() -> str:
    return uuid.uuid4().hex[:16]


# --------------------------------------------------------------------------------------------------------------
# Message classes. One frozen dataclass per type; `Message.__init_subclass__` registers each one by its TYPE.
# --------------------------------------------------------------------------------------------------------------

M = TypeVar("M", bound="Message")
REGISTRY: dict[str, type[Message]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message:
    TYPE: ClassVar[str] = ""
    HAS_PAYLOAD: ClassVar[bool] = False
    """True where the message carries PCM in the payload frame."""

    id: str = dataclasses.field(default_factory=new_id)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in REGISTRY:
                raise TypeError(f"duplicate message type {cls.TYPE!r}")
            REGISTRY[cls.TYPE] = cls

    def header(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pcm"}
        return {"type": self.TYPE, **fields}

    def payload(self) -> bytes | None:
        return None

    @classmethod
    def from_header(cls: type[M], header: Mapping[str, Any], payload: bytes | None) -> M:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in header.items():
            if key == "type":
                continue
            if key not in known or key == "pcm":
                # Unknown fields are ignored so that minor versions can add fields (see PROTOCOL.md).
                continue
            kwargs[key] = value
        try:
            msg = cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{cls.TYPE}: {exc}", _ref_of(header)) from None
        msg.validate()
        return msg

    def validate(self) -> None:
        """Check field types and ranges; raise ProtocolError(bad-request) naming the field."""
        _check_str(self, "id", allow_none=False)


def _ref_of(header: Mapping[str, Any]) -> str | None:
    value = header.get("id")
    return value if isinstance(value, str) else None


def _fail(msg: Message, text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{msg.TYPE}: {text}", msg.id if isinstance(msg.id, str) else None)


def _check_str(msg: Message, name: str, *, allow_none: bool = True, max_len: int = 1_000_000) -> None:
    value = getattr(msg, name)
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise _fail(msg, f"field {name!r} must be a string")
    if len(value) > max_len:
        raise _fail(msg, f"field {name!r} is longer than {max_len} characters")


def _check_number(
    msg: Message,
    name: str,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    allow_none: bool = True,
) -> None:
    value = getattr(msg, name)
    if value is None and allow_none:
        return
    number_ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not number_ok or not math.isfinite(value):
        raise _fail(msg, f"field {name!r} must be {'an integer' if integer else 'a number'}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(msg, f"field {name!r} must be between {lo} and {hi}, got {value}")


def _check_bool(msg: Message, name: str) -> None:
    if not isinstance(getattr(msg, name), bool):
        raise _fail(msg, f"field {name!r} must be true or false")


def _check_str_list(msg: Message, name: str) -> None:
    value = getattr(msg, name)
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(msg, f"field {name!r} must be a list of strings")


def _check_dict(msg: Message, name: str) -> None:
    if not isinstance(getattr(msg, name), dict):
        raise _fail(msg, f"field {name!r} must be an object")


# ---- client -> daemon ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """Ask the daemon who it is. Answered with `info`."""

    TYPE: ClassVar[str] = "hello"
    protocol: str = PROTOCOL_VERSION
    client: str | None = None

    def validate(self) -> None:
        super().validate()
        _check_str(self, "protocol", allow_none=False, max_len=32)
        _check_str(self, "client", max_len=200)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chunk(Message):
    """A block of mono PCM appended to this client's audio buffer. No reply unless it is refused."""

    TYPE: ClassVar[str] = "chunk"
    HAS_PAYLOAD: ClassVar[bool] = True
    rate: int = SAMPLE_RATE
    pcm: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, PCM_DTYPE), compare=False)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Chunk)
            and (self.id, self.rate) == (other.id, other.rate)
            and np.array_equal(self.pcm, other.pcm)
        )

    __hash__ = None  # type: ignore[assignment]

    def payload(self) -> bytes:
        return np.ascontiguousarray(self.pcm, dtype=PCM_DTYPE).tobytes()

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payload: bytes | None) -> Chunk:
        msg = super().from_header(header, None)
        pcm = decode_pcm(payload, ref=msg.id)
        return dataclasses.replace(msg, pcm=pcm)

    def validate(self) -> None:
        super().validate()
        _check_number(self, "rate", integer=True, lo=4_000, hi=384_000, allow_none=False)


def decode_pcm(payload: bytes | None, ref: str | None = None) -> np.ndarray:
    """Raw little-endian float32 bytes -> a read-only float32 array; refuses partial samples and NaN/Inf."""
    if payload is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "chunk: missing the PCM payload frame", ref)
    if not payload:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "chunk: the PCM payload frame is empty", ref)
    if len(payload) % PCM_DTYPE.itemsize:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"chunk: payload of {len(payload)} bytes is not whole float32 samples (4 bytes each)",
            ref,
        )
    pcm = np.frombuffer(payload, dtype=PCM_DTYPE)
    if not np.isfinite(pcm).all():
        raise ProtocolError(ErrorCode.BAD_REQUEST, "chunk: PCM contains NaN or infinite samples", ref)
    peak = float(np.abs(pcm).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"chunk: samples must lie in [-1, 1], got a peak of {peak:g}; integer PCM must be divided by its full "
            "scale (32768 for int16) before it is sent as float32",
            ref,
        )
    return pcm.astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ask(Message):
    """Ask a question: typed (`text`) or spoken (the audio buffered by earlier chunks, when `text` is null).

    Answered by `transcript` (voice only), `answer-chunk`s (when `stream`), then `done`; or by `error`.
    """

    TYPE: ClassVar[str] = "ask"
    text: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    language: str | None = None
    stream: bool = True
    system_prompt: str | None = None

    def validate(self) -> None:
        super().validate()
        _check_str(self, "text", max_len=100_000)
        _check_number(self, "max_tokens", integer=True, lo=1, hi=32_768)
        _check_number(self, "temperature", lo=0.0, hi=2.0)
        _check_str(self, "language", max_len=16)
        if self.language is not None and self.language.lower() not in WHISPER_LANGUAGES:
            raise _fail(
                self, f"field 'language' must be a Whisper language code such as 'en' or 'de', got {self.language!r}"
            )
        _check_bool(self, "stream")
        _check_str(self, "system_prompt", max_len=100_000)
        if self.text is not None and not self.text.strip():
            raise _fail(self, "field 'text' is empty; send null to ask with the buffered audio")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    """Cancel this client's running ask. Answered with `ok`; the ask ends with error `cancelled`."""

    TYPE: ClassVar[str] = "cancel"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reset(Message):
    """Drop this client's buffered audio (and cancel its running ask), and with ``conversation`` also the
    remembered conversation. Answered with `ok`."""

    TYPE: ClassVar[str] = "reset"
    conversation: bool = True

    def validate(self) -> None:
        super().validate()
        _check_bool(self, "conversation")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Warm(Message):
    """Load the models now if keep-alive unloaded them (sent when recording starts). Answered with `ok`."""

    TYPE: ClassVar[str] = "warm"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Status(Message):
    """Ask for the daemon's state. Answered with `report`."""

    TYPE: ClassVar[str] = "status"


# ---- daemon -> client ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Info(Message):
    """Reply to `hello`."""

    TYPE: ClassVar[str] = "info"
    ref: str | None = None
    protocol: str = PROTOCOL_VERSION
    version: str = ""
    models: dict[str, Any] = dataclasses.field(default_factory=dict)
    capabilities: list[str] = dataclasses.field(default_factory=list)
    limits: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        _check_str(self, "protocol", allow_none=False, max_len=32)
        _check_dict(self, "models")
        _check_str_list(self, "capabilities")
        _check_dict(self, "limits")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report(Message):
    """Reply to `status`."""

    TYPE: ClassVar[str] = "report"
    ref: str | None = None
    uptime: float = 0.0
    models: dict[str, Any] = dataclasses.field(default_factory=dict)
    sessions: int = 0
    queue: int = 0
    buffered_seconds: float = 0.0
    asks_served: int = 0
    memory_bytes: int = 0
    """Resident memory of the daemon process."""
    buffered_seconds_total: float = 0.0
    """Audio buffered by all clients together."""
    listening_seconds: float = 0.0
    """Audio of all clients still waiting for voice activity detection."""

    def validate(self) -> None:
        super().validate()
        _check_dict(self, "models")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ok(Message):
    """Reply to `cancel` and `reset`."""

    TYPE: ClassVar[str] = "ok"
    ref: str | None = None
    dropped_seconds: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transcript(Message):
    """What Whisper heard, sent before the answer (Wyoming's `transcript`)."""

    TYPE: ClassVar[str] = "transcript"
    ref: str | None = None
    text: str = ""
    language: str | None = None
    no_speech: bool = False
    audio_seconds: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranscriptChunk(Message):
    """A stretch of the current recording that is already transcribed, sent while the person is still talking
    (Wyoming's `transcript-chunk`). Unsolicited: ``ref`` is null; the ask's `transcript` has the final text."""

    TYPE: ClassVar[str] = "transcript-chunk"
    ref: str | None = None
    text: str = ""
    start: float = 0.0
    """Seconds from the start of the recording (since the last `ask` or `reset`)."""
    end: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnswerChunk(Message):
    """A piece of the answer as the model produces it (when the ask has `stream: true`)."""

    TYPE: ClassVar[str] = "answer-chunk"
    ref: str | None = None
    text: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Done(Message):
    """The last reply to an ask: the seed's Response (transcript, answer, token counts, seconds per stage)."""

    TYPE: ClassVar[str] = "done"
    ref: str | None = None
    transcript: str | None = None
    answer: str = ""
    no_speech: bool = False
    language: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from the KV cache (system prompt, earlier turns) instead of being computed."""
    tokens: int = 0
    finish_reason: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Error(Message):
    """Something went wrong with the request `ref` (null when the request had no readable id)."""

    TYPE: ClassVar[str] = "error"
    ref: str | None = None
    code: str = ErrorCode.INTERNAL
    text: str = ""

    def validate(self) -> None:
        super().validate()
        _check_str(self, "code", allow_none=False, max_len=64)
        _check_str(self, "text", allow_none=False)


CLIENT_TYPES = frozenset({"hello", "chunk", "ask", "cancel", "reset", "status", "warm"})
"""Types a client may send; the daemon answers anything else with `unknown-type`."""


# --------------------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------------------


def encode(msg: Message) -> list[bytes]:
    """Message -> frames (without the routing identity)."""
    header = json.dumps(msg.header(), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    frames = [MARKER, header]
    payload = msg.payload()
    if payload is not None:
        frames.append(payload)
    return frames


def decode(frames: Sequence[bytes], *, allowed: frozenset[str] | None = None) -> Message:
    """Frames (without the routing identity) -> a validated Message, or ProtocolError with the code to answer."""
    if len(frames) < 2:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected [marker, header, payload?], got {len(frames)} frame(s)")
    marker, raw_header, *rest = frames
    if not bytes(marker).startswith(MARKER_PREFIX):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"first frame must be {MARKER!r}, got {bytes(marker)[:32]!r}",
            _readable_id(raw_header),
        )
    if bytes(marker) != MARKER:
        raise ProtocolError(
            ErrorCode.VERSION,
            f"protocol {bytes(marker)[len(MARKER_PREFIX) : 32].decode(errors='replace')} is not supported; "
            f"this side speaks {PROTOCOL_VERSION}",
            _readable_id(raw_header),
        )
    if len(rest) > 1:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"expected at most 3 frames, got {len(frames)}", _readable_id(raw_header)
        )
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"header is larger than {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(bytes(raw_header), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "header must be a JSON object")
    try:
        # JSON may spell lone UTF-16 surrogates ("\ud800") that no UTF-8 reply could carry back.
        json.dumps(header, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "header holds a lone UTF-16 surrogate or nests too deeply") from None
    ref = _ref_of(header)
    kind = header.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "header needs a string field 'type'", ref)
    if "id" not in header:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}: header needs a string field 'id'")
    cls = REGISTRY.get(kind)
    if cls is None or (allowed is not None and kind not in allowed):
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}", ref)
    payload = bytes(rest[0]) if rest else None
    if payload is not None and not cls.HAS_PAYLOAD:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}: takes no payload frame", ref)
    return cls.from_header(header, payload)


def _readable_id(raw_header: bytes) -> str | None:
    """The header's ``id`` when it can be read at all, so that even an error about the frames can be matched to
    the request (a client waiting for that id need not time out)."""
    if len(raw_header) > MAX_HEADER_BYTES:
        return None
    try:
        header = json.loads(bytes(raw_header), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    ref = _ref_of(header) if isinstance(header, dict) else None
    try:
        json.dumps(ref, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: no reply could carry it back
        return None
    return ref


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def error_reply(exc: ProtocolError) -> Error:
    return Error(ref=exc.ref, code=exc.code, text=exc.text)
