"""Typed errors raised by the client library; each maps to a CLI exit code."""

from __future__ import annotations

from .protocol import ErrorCode


class SottovoceError(Exception):
    exit_code = 1


class DaemonUnavailable(SottovoceError):
    """Nothing answers at the endpoint (not running, wrong endpoint, or it died mid-request)."""

    exit_code = 3


class VersionMismatch(SottovoceError):
    """The daemon speaks another protocol major version."""

    exit_code = 3


class Timeout(SottovoceError):
    """The daemon is there but sent nothing for longer than the timeout."""

    exit_code = 4


class RemoteError(SottovoceError):
    """The daemon answered with an `error`; ``code`` is one of protocol.ErrorCode."""

    def __init__(self, code: str, text: str, ref: str | None = None) -> None:
        super().__init__(f"{text} [{code}]")
        self.code = code
        self.text = text
        self.ref = ref


class NotEnoughAudio(RemoteError):
    pass


class Busy(RemoteError):
    pass


class Cancelled(RemoteError):
    pass


class ModelError(RemoteError):
    pass


_BY_CODE: dict[str, type[RemoteError]] = {
    ErrorCode.NOT_ENOUGH_AUDIO: NotEnoughAudio,
    ErrorCode.NO_AUDIO: NotEnoughAudio,
    ErrorCode.BUSY: Busy,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.MODEL_ERROR: ModelError,
}


def remote_error(code: str, text: str, ref: str | None = None) -> RemoteError:
    return _BY_CODE.get(code, RemoteError)(code, text, ref)
