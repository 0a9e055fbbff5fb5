"""The `sottovoce` command. Subcommands that need the daemon's or tray's packages import them only when run.

Exit codes: 0 ok, 1 the daemon answered with an error, 2 bad usage or input file, 3 daemon not reachable or
protocol mismatch, 4 timeout, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import protocol as p
from .errors import SottovoceError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sottovoce", description="A private, always-on voice assistant.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()} (protocol {p.PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ask = sub.add_parser("ask", help="ask a typed question, or a spoken one from an audio file")
    ask.add_argument("question", nargs="*", help="the question (omit with --audio)")
    ask.add_argument("--audio", metavar="FILE", help="ask with the speech in FILE (WAV/FLAC/OGG, any rate)")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--language", help="spoken language code (e.g. en); default: detect")
    ask.add_argument("--system-prompt")
    ask.add_argument("--json", action="store_true", help="print one JSON object with the whole result")
    _add_connection_args(ask)
    ask.set_defaults(func=_cmd_ask)

    status = sub.add_parser("status", help="show the daemon's models, sessions and queue")
    status.add_argument("--json", action="store_true")
    _add_connection_args(status)
    status.set_defaults(func=_cmd_status)

    # The daemon's and tray's subcommands: these modules import nothing heavy (no MLX, GUI or audio) at import.
    from sottovoce.daemon import keys_cli
    from sottovoce.daemon import main as daemon_main
    from sottovoce.daemon.models import cli as models_cli
    from sottovoce.tray import cli as tray_cli

    from . import config_cli

    daemon_main.add_parser(sub)
    tray_cli.add_parser(sub)
    models_cli.add_parser(sub)
    keys_cli.add_parser(sub)
    config_cli.add_parser(sub)
    return parser


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", help="daemon endpoint (default: from config / SOTTOVOCE_ENDPOINT)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the daemon (default 120)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except SottovoceError as exc:
        print(f"sottovoce: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:
        print(f"sottovoce: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    logging.basicConfig(level=logging.WARNING)
    return Client(args.endpoint, timeout=args.timeout, name="sottovoce-cli")


def _cmd_ask(args: argparse.Namespace) -> int:
    from .audio import load_audio

    question = " ".join(args.question).strip() or None
    if (question is None) == (args.audio is None):
        print("sottovoce ask: give a question or --audio FILE (not both)", file=sys.stderr)
        return EXIT_USAGE
    audio = load_audio(args.audio) if args.audio else None
    options = {
        k: v for k in ("max_tokens", "temperature", "language", "system_prompt") if (v := getattr(args, k)) is not None
    }
    out = sys.stdout
    streamed = False

    def show(event: p.Message) -> None:
        nonlocal streamed
        if args.json:
            return
        if isinstance(event, p.Transcript):
            heard = event.text if not event.no_speech else "(no speech detected)"
            print(f"» {heard}", file=out, flush=True)
        elif isinstance(event, p.AnswerChunk):
            out.write(event.text)
            out.flush()
            streamed = True

    with _client(args) as client:
        answer = client.ask(question, audio=audio, on_event=show, **options)
    if args.json:
        print(json.dumps({**answer.__dict__, "warnings": list(answer.warnings)}, ensure_ascii=False))
        return 0
    if streamed:
        out.write("\n")
    for warning in answer.warnings:
        print(f"sottovoce: warning: {warning}", file=sys.stderr)
    timings = " ".join(f"{k}={v:.2f}s" for k, v in answer.seconds.items())
    print(f"[{answer.prompt_tokens} prompt + {answer.tokens} answer tokens; {timings}]", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.hello()
        report = client.status()
    if args.json:
        print(json.dumps({"info": info.header(), "status": report.header()}, ensure_ascii=False))
        return 0
    print(f"sottovoce daemon {info.version} at {client.endpoint} (protocol {info.protocol}), up {report.uptime:.0f} s")
    for role in ("whisper", "llm"):
        model = report.models.get(role, {})
        state = "loaded" if model.get("loaded") else f"NOT LOADED: {model.get('error') or 'loading'}"
        engine = f" on {model['engine']} ({model.get('engine_reason') or '?'})" if "engine" in model else ""
        print(f"  {role:8} {model.get('name')}{engine}: {state}")
    memory = f", {report.memory_bytes / 2**20:.0f} MiB resident" if report.memory_bytes else ""
    print(f"  sessions {report.sessions}, queued asks {report.queue}, asks served {report.asks_served}{memory}")
    return 0 if all(report.models.get(r, {}).get("loaded") for r in ("whisper", "llm")) else 1


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sottovoce")
    except metadata.PackageNotFoundError:
        return "0+unknown"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
