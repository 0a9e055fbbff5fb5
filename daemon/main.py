"""`sottovoce daemon`: load settings, take the endpoint lock, bind the socket, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from importlib import metadata

from sottovoce.client import config, paths

from . import security
from .backends.openmp import wait_passively
from .blas import preload_openblas
from .lock import AlreadyRunningError, EndpointLock

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("daemon", help="run the daemon (owns the models, serves the socket)")
    parser.add_argument("--endpoint", help="ZeroMQ endpoint (default: ipc socket in a private runtime dir)")
    parser.add_argument("--whisper-model", help="Whisper model: store name, folder or hub id")
    parser.add_argument("--llm-model", help="chat model: store name, GGUF file, folder or hub id (openai: served name)")
    parser.add_argument(
        "--stt-engine",
        choices=config.STT_ENGINES,
        help="speech-to-text engine (default auto: MLX on Apple Silicon, faster-whisper elsewhere)",
    )
    parser.add_argument(
        "--llm-engine",
        choices=config.LLM_ENGINES,
        help="chat engine (default auto: MLX on Apple Silicon, llama.cpp elsewhere; openai: a server at --llm-url)",
    )
    parser.add_argument(
        "--whisper-compute-type",
        help="faster-whisper's CTranslate2 compute type (default int8; float32, int8_float32, ...)",
    )
    parser.add_argument(
        "--llm-url",
        help="OpenAI-compatible server for --llm-engine openai (its key: llm_api_key in the config file or "
        "SOTTOVOCE_LLM_API_KEY, never a flag)",
    )
    parser.add_argument("--system-prompt", help="system prompt for the chat model")
    parser.add_argument("--max-tokens", type=int, help="default cap on answer tokens")
    parser.add_argument("--buffer-seconds", type=float, help="cap on one client's buffered audio")
    parser.add_argument("--queue-depth", type=int, help="asks that may wait before `busy`")
    parser.add_argument("--log-text", action="store_true", default=None, help="log transcripts and answers")
    parser.add_argument(
        "--languages", help="languages detection may pick, comma-separated Whisper codes (e.g. en,de; default: any)"
    )
    parser.add_argument(
        "--incremental",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="transcribe stretches of speech while the person talks (--no-incremental: the seed design)",
    )
    parser.add_argument("--history-turns", type=int, help="conversation turns remembered per client (0 = none)")
    parser.add_argument(
        "--prompt-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of the system prompt and of earlier turns",
    )
    parser.add_argument("--whisper-keep-alive", type=float, help="unload Whisper after this many idle seconds")
    parser.add_argument("--llm-keep-alive", type=float, help="unload the chat model after this many idle seconds")
    parser.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="TCP on a loopback host without CURVE keys: any local user can connect (default: CURVE required)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(func=run)


FLAG_KEYS = (
    "endpoint",
    "whisper_model",
    "llm_model",
    "stt_engine",
    "llm_engine",
    "llm_url",
    "whisper_compute_type",
    "system_prompt",
    "max_tokens",
    "buffer_seconds",
    "queue_depth",
    "log_text",
    "languages",
    "incremental",
    "history_turns",
    "prompt_cache",
    "whisper_keep_alive",
    "llm_keep_alive",
)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Before anything imports mlx.core: the CPU wheel's bundled BLAS is ~30x slower than OpenBLAS.
    preload_openblas()
    # Before CTranslate2 and llama.cpp start their OpenMP pools: spinning idle threads starve the other engine.
    wait_passively()
    try:
        settings, _ = config.load({k: getattr(args, k, None) for k in FLAG_KEYS})
    except config.ConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        code = asyncio.run(serve(settings, insecure_loopback=args.insecure_loopback))
    except (
        AlreadyRunningError,
        paths.UnsafeDirectoryError,
        EndpointError,
        security.EndpointSecurityError,
    ) as exc:
        log.error("%s", exc)
        code = 1
    except OSError as exc:  # e.g. a full or unwritable runtime dir: say which, and let the service restart us
        log.error("cannot start: %s%s", exc.strerror or exc, f": {exc.filename}" if exc.filename else "")
        code = 1
    # MLX's C++ teardown at interpreter exit sometimes aborts (SIGABRT) when models ran on a worker thread; all is
    # closed and flushed by now, so skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SHUTDOWN_LINGER_MS = 500


class EndpointError(RuntimeError):
    pass


async def serve(settings: config.Settings, *, insecure_loopback: bool = False) -> int:
    import zmq
    import zmq.asyncio

    from .backends.factory import build_backends
    from .server import Server
    from .worker import ModelWorker

    endpoint = settings.endpoint
    security.check_endpoint(endpoint, insecure_loopback=insecure_loopback)
    runtime = paths.ensure_private_dir(paths.runtime_dir())
    ipc = paths.ipc_path(endpoint)
    if ipc is not None and ipc.parent != runtime:
        # A folder the user named, often a shared one like /tmp: advise another folder, never to chmod this one.
        paths.ensure_private_dir(
            ipc.parent,
            fix=f"put the socket in a folder only you can enter (the default is {runtime}/daemon.sock), "
            "and leave the permissions of shared folders alone",
        )
    lock = EndpointLock.for_endpoint(endpoint, runtime)
    lock.acquire()

    transcriber, chat_model = build_backends(settings)
    server = Server(
        settings,
        lambda emit: ModelWorker(
            transcriber,
            chat_model,
            emit,
            log_text=settings.log_text,
            history_turns=settings.history_turns,
            whisper_keep_alive=settings.whisper_keep_alive,
            llm_keep_alive=settings.llm_keep_alive,
            language=settings.language,
        ),
        version=_version(),
    )
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished client raises instead of vanishing silently
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
    # ZMTP heartbeats: a client that stops answering pings (its machine froze, the network went) is disconnected,
    # and the socket monitor then frees its session (see server). Clients ping the daemon the same way.
    heartbeat_ms = int(settings.heartbeat_seconds * 1000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * heartbeat_ms)
    authenticator = security.secure_server_socket(sock, ctx, endpoint, insecure_loopback=insecure_loopback)
    try:
        if ipc is not None:
            with contextlib.suppress(FileNotFoundError):
                ipc.unlink()  # stale socket of a dead daemon; the lock proves no live one owns it
            old_umask = os.umask(0o077)  # the socket file is created owner-only
            try:
                sock.bind(endpoint)
            finally:
                os.umask(old_umask)
        else:
            sock.bind(endpoint)
    except zmq.ZMQError as exc:
        lock.release()
        sock.close()
        if authenticator is not None:
            authenticator.stop()  # before term(): its open ZAP socket would block term() forever
        ctx.term()
        raise EndpointError(f"cannot listen on {endpoint}: {exc}") from None

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    log.info("sottovoce %s listening on %s (pid %d)", _version(), endpoint, os.getpid())
    try:
        await server.serve(sock)
    finally:
        sock.close(linger=SHUTDOWN_LINGER_MS)  # long enough for the last `shutting-down` replies to leave
        if authenticator is not None:
            authenticator.stop()  # before term(): its open ZAP socket would block term() forever
        ctx.term()
        if ipc is not None:
            with contextlib.suppress(FileNotFoundError):
                ipc.unlink()
        lock.release()
        log.info("sottovoce daemon stopped")
    return 0


def _version() -> str:
    try:
        return metadata.version("sottovoce")
    except metadata.PackageNotFoundError:
        return "0+unknown"
