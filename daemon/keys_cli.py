"""`sottovoce keys generate|show|authorize|revoke`: CURVE keys for a daemon listening on TCP.

    sottovoce keys generate              # server + client keypairs; this user's client key is authorized
    sottovoce keys show                  # public keys and the allow-list
    sottovoce keys authorize laptop.key  # let another client in (its public client.key file, or a bare key)
    sottovoce keys revoke laptop         # and out again

A client on another machine needs the daemon's ``server.key`` in its own keys folder and its own keypair
(``sottovoce keys generate`` there makes one; authorize its ``client.key`` on the daemon's machine).
Only public keys are ever printed; secret keys are written 0600 in a 0700 folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from pathlib import Path

from sottovoce.client import security as cs
from sottovoce.client.paths import UnsafeDirectoryError, ensure_private_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="CURVE keys for a TCP endpoint (generate, show, authorize, revoke)",
        description=f"Keys live in $SOTTOVOCE_KEYS_DIR, else {cs.keys_dir()}.",
    )
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    gen = sub.add_parser("generate", help="make the server and client keypairs (kept if they exist)")
    gen.add_argument("--force", action="store_true", help="replace existing keypairs (clients must get the new key)")
    gen.set_defaults(func=_cmd_generate)

    show = sub.add_parser("show", help="print the public keys and the allow-list")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_show)

    auth = sub.add_parser("authorize", help="allow a client public key (a .key file, a bare key, or - for stdin)")
    auth.add_argument("pubkeyfile", metavar="PUBKEYFILE")
    auth.add_argument("--name", help="name in the allow-list (default: the file's name)")
    auth.set_defaults(func=_cmd_authorize)

    revoke = sub.add_parser("revoke", help="remove a client key from the allow-list")
    revoke.add_argument("name", help="its name in `sottovoce keys show`")
    revoke.set_defaults(func=_cmd_revoke)


def _private_dirs() -> tuple[Path, Path]:
    directory = cs.keys_dir()
    try:
        ensure_private_dir(directory)
        authorized = ensure_private_dir(directory / cs.AUTHORIZED)
    except UnsafeDirectoryError as exc:
        raise cs.KeyFileError(str(exc)) from None
    return directory, authorized


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically (write, fsync, rename) with ``mode`` from the start: a secret is never briefly readable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # in case the umask took bits away
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_keypair(name: str, directory: Path, *, force: bool = False) -> tuple[bytes, bool]:
    """Create ``NAME.key`` + ``NAME.key_secret`` unless they exist; returns (public key, created)."""
    import zmq

    secret_file = cs.secret_path(name, directory)
    if secret_file.exists() and not force:
        public, _ = cs.read_keypair(name, directory)
        return public, False
    public, secret = zmq.curve_keypair()
    comment = f"sottovoce {name} key of {os.environ.get('USER', str(os.getuid()))}@{socket.gethostname()}"
    _write(secret_file, cs.format_key_file(public, secret, comment=comment), 0o600)
    _write(cs.public_path(name, directory), cs.format_key_file(public, comment=comment), 0o644)
    return public, True


def _cmd_generate(args: argparse.Namespace) -> int:
    directory, authorized = _private_dirs()
    server, made_server = generate_keypair(cs.SERVER, directory, force=args.force)
    client, made_client = generate_keypair(cs.CLIENT, directory, force=args.force)
    own = authorized / f"{cs.CLIENT}-{_safe(socket.gethostname())}{cs.PUBLIC_SUFFIX}"
    if made_client or not own.exists():
        _write(own, cs.format_key_file(client, comment="this user's own client key"), 0o644)
    print(f"keys in {directory}")
    print(f"  server public key: {server.decode()}{'  (new)' if made_server else ''}")
    print(f"  client public key: {client.decode()}{'  (new, authorized)' if made_client else ''}")
    if made_server and args.force:
        print("  the server key changed: copy the new server.key to every client machine")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    directory = cs.keys_dir()
    result: dict[str, object] = {"keys_dir": str(directory)}
    for name in (cs.SERVER, cs.CLIENT):
        path = cs.public_path(name, directory)
        result[name] = cs.read_public_key(path).decode() if path.exists() else None
    authorized = directory / cs.AUTHORIZED
    allowed: dict[str, str] = {}
    if authorized.is_dir():
        for path in sorted(authorized.glob("*" + cs.PUBLIC_SUFFIX)):
            try:
                allowed[path.name.removesuffix(cs.PUBLIC_SUFFIX)] = cs.read_public_key(path).decode()
            except cs.KeyFileError as exc:
                allowed[path.name] = f"UNREADABLE: {exc}"
    result["authorized"] = allowed
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"keys in {directory}")
    for name in (cs.SERVER, cs.CLIENT):
        print(f"  {name} public key: {result[name] or '(none; run `sottovoce keys generate`)'}")
    print(f"  authorized client keys ({len(allowed)}):")
    for name, key in allowed.items():
        print(f"    {name}: {key}")
    return 0 if result[cs.SERVER] else 1


def _cmd_authorize(args: argparse.Namespace) -> int:
    _, authorized = _private_dirs()
    if args.pubkeyfile == "-":
        text, origin, stem = sys.stdin.buffer.read(), "stdin", "client"
    else:
        source = Path(args.pubkeyfile)
        if source.exists():
            try:
                text = source.read_bytes()
            except OSError as exc:
                raise cs.KeyFileError(f"cannot read {source}: {exc.strerror or exc}") from None
            origin, stem = str(source), source.name.split(".")[0]
        else:  # a bare key on the command line
            text, origin, stem = args.pubkeyfile.encode(), "the command line", "client"
    public, secret = cs.parse_key_text(text, origin)
    name = _safe(args.name or stem)
    if not _NAME_RE.match(name):
        raise cs.KeyFileError(f"bad name {name!r}: use letters, digits, '.', '_' or '-'")
    target = authorized / f"{name}{cs.PUBLIC_SUFFIX}"
    existing = {cs.read_public_key(p): p.name for p in authorized.glob("*" + cs.PUBLIC_SUFFIX) if _readable(p)}
    if public in existing:
        print(f"already authorized as {existing[public]}")
        return 0
    if target.exists():
        raise cs.KeyFileError(f"{target} exists with another key; choose another --name or revoke it first")
    _write(target, cs.format_key_file(public, comment=f"authorized from {origin}"), 0o644)
    if secret is not None:
        print("warning: that file holds a SECRET key too; only its public key was copied", file=sys.stderr)
    print(f"authorized {public.decode()} as {target.name}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    _, authorized = _private_dirs()
    name = args.name.removesuffix(cs.PUBLIC_SUFFIX)
    target = authorized / f"{name}{cs.PUBLIC_SUFFIX}"
    if not _NAME_RE.match(name) or not target.exists():
        print(f"sottovoce keys revoke: no authorized key named {args.name!r}", file=sys.stderr)
        return 1
    target.unlink()
    print(f"revoked {name}; new connections with that key are refused")
    return 0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip(".-") or "client"


def _readable(path: Path) -> bool:
    try:
        cs.read_public_key(path)
    except cs.KeyFileError:
        return False
    return True
