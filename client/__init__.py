"""sottovoce wire protocol, client library and CLI.

from sottovoce.client import Client
with Client() as c:
    print(c.ask("What is the capital of France?").answer)
"""

from .client import Answer, Client
from .errors import (
    Busy,
    Cancelled,
    DaemonUnavailable,
    ModelError,
    NotEnoughAudio,
    RemoteError,
    SottovoceError,
    Timeout,
    VersionMismatch,
)
from .protocol import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "Answer",
    "Busy",
    "Cancelled",
    "Client",
    "DaemonUnavailable",
    "ModelError",
    "NotEnoughAudio",
    "RemoteError",
    "SottovoceError",
    "Timeout",
    "VersionMismatch",
]
