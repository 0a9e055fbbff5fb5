"""The daemon's Server in a thread of the test process, on a real ipc socket, with any model backends; and a raw
DEALER client that can send what the client library never would."""

from __future__ import annotations

import asyncio
import threading

import zmq
import zmq.asyncio

from sottovoce.client import protocol as p
from sottovoce.client.config import Settings
from sottovoce.daemon.backends.base import ChatModel, Transcriber
from sottovoce.daemon.server import Server
from sottovoce.daemon.worker import ModelWorker


class RunningServer:
    def __init__(self, endpoint: str, settings: Settings, transcriber: Transcriber, chat: ChatModel) -> None:
        self.endpoint = endpoint
        self.server = Server(
            settings,
            lambda emit: ModelWorker(
                transcriber,
                chat,
                emit,
                history_turns=settings.history_turns,
                whisper_keep_alive=settings.whisper_keep_alive,
                llm_keep_alive=settings.llm_keep_alive,
            ),
            version="test",
        )
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._bound = threading.Event()

    async def _main(self) -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._loop = asyncio.get_running_loop()
        self._bound.set()
        try:
            await self.server.serve(sock)
        finally:
            sock.close()
            ctx.term()

    def __enter__(self) -> RunningServer:
        self._thread.start()
        assert self._bound.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self.server.stop)
        self._thread.join(10)


class RawClient:
    """A bare DEALER speaking frames, to send what the client library never would."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg: p.Message) -> str:
        self.sock.send_multipart(p.encode(msg))
        return msg.id

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> p.Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply from the daemon"
        return p.decode(self.sock.recv_multipart())

    def until_done(self, timeout: float = 5.0) -> list[p.Message]:
        replies = [self.recv(timeout)]
        while not isinstance(replies[-1], p.Done | p.Error):
            replies.append(self.recv(timeout))
        return replies

    def close(self) -> None:
        self.sock.close()
