"""Privacy of the daemon's socket: owner-only ipc (tried as a second Unix user), refused unsafe directories, and
nothing from the wire ever unpickled or evaluated.
"""

from __future__ import annotations

import ast
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sottovoce.client import Client
from sottovoce.client import protocol as p

ROOT = Path(__file__).resolve().parents[2]
OTHER_USER = "sottovoce-other"
pytestmark = pytest.mark.timeout(300)


def exited_cleanly(code: int, log: str) -> bool:
    """0, or bug R5: MLX aborts in its C++ static destructors at interpreter exit when models were loaded on the model
    thread ("terminate called without an active exception", SIGABRT) even though shutdown itself went fine."""
    return code == 0 or (code == -6 and "terminate called without an active exception" in log)


# ---- a daemon on the default endpoint ------------------------------------------------------------------------


class DefaultDaemon:
    """``sottovoce daemon`` with no --endpoint: the socket goes to $SOTTOVOCE_RUNTIME_DIR/daemon.sock."""

    def __init__(self, runtime: Path, whisper: Path, llm: Path, *extra: str) -> None:
        self.runtime = runtime
        self.endpoint = f"ipc://{runtime}/daemon.sock"
        self.log_path = runtime.parent / f"{runtime.name}.log"
        self.args = [sys.executable, "-m", "sottovoce.client.cli", "daemon", "--whisper-model", str(whisper),
                     "--llm-model", str(llm), *extra]  # fmt: skip
        self.env = {**os.environ, "SOTTOVOCE_RUNTIME_DIR": str(runtime), "SOTTOVOCE_CONFIG": "/nonexistent.toml"}
        self.proc: subprocess.Popen[bytes] | None = None

    def run_to_exit(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> DefaultDaemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (self.runtime / "daemon.sock").exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "no socket after 120 s"
            time.sleep(0.1)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture
def shared_parent() -> Iterator[Path]:
    """A folder every user may traverse (0711), so the only barrier another user meets is ours (unlike pytest's
    tmp_path, whose /tmp/pytest-of-USER parent is 0700 already and would prove nothing)."""
    path = Path(tempfile.mkdtemp(prefix="sottovoce-privacy-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def default_daemon(shared_parent: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path) -> Iterator[DefaultDaemon]:
    daemon = DefaultDaemon(shared_parent / "run", tiny_whisper_dir, tiny_llm_dir).start()
    yield daemon
    assert exited_cleanly(daemon.stop(), daemon.log_path.read_text())


def test_default_socket_and_its_directory_are_owner_only(default_daemon: DefaultDaemon) -> None:
    runtime = default_daemon.runtime
    sock = runtime / "daemon.sock"
    st_dir, st_sock = runtime.stat(), sock.stat()
    assert st_dir.st_uid == os.getuid() and stat.S_IMODE(st_dir.st_mode) == 0o700
    assert stat.S_ISSOCK(st_sock.st_mode) and st_sock.st_uid == os.getuid()
    assert stat.S_IMODE(st_sock.st_mode) & 0o077 == 0, oct(st_sock.st_mode)  # created under umask 077
    for lock in runtime.glob("*.lock"):
        assert stat.S_IMODE(lock.stat().st_mode) & 0o077 == 0
    with Client(default_daemon.endpoint, timeout=30) as c:  # and its owner gets in
        assert c.hello().protocol == p.PROTOCOL_VERSION


# ---- a second Unix user --------------------------------------------------------------------------------------


def _other_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pass
    if os.geteuid() != 0:
        pytest.skip(f"needs root (to create and become the user {OTHER_USER!r}) or that user already existing")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd here to create a second user")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(OTHER_USER)


def _as_other_user(user: pwd.struct_passwd, endpoint: str) -> dict[str, str]:
    """Fork, drop to ``user`` (uid, gid, no supplementary groups), and try to reach the daemon twice: with the
    client library, and with a bare DEALER (which skips the library's socket-file check). Returns what happened.

    A fork rather than ``runuser -u USER -- python``: the interpreter lives under /root (0700), which the other user
    cannot execute; after setuid the child is that user in every way the kernel checks."""
    if os.geteuid() != 0:
        pytest.skip("becoming another user needs root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        result: dict[str, str] = {}
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result["uid"] = str(os.getuid())
            import zmq

            from sottovoce.client.errors import SottovoceError

            ctx = zmq.Context()
            try:
                with Client(endpoint, timeout=2, connect_timeout=2, context=ctx) as c:
                    c.hello()
                result["library"] = "CONNECTED"
            except (SottovoceError, OSError) as exc:
                result["library"] = f"{type(exc).__name__}: {exc}"
            raw = ctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(endpoint)
            raw.send_multipart(p.encode(p.Hello()), flags=zmq.DONTWAIT)
            result["raw"] = "CONNECTED" if raw.poll(2000) else "no reply in 2 s"
            raw.close(0)
            ctx.term()
        except BaseException as exc:  # report, never raise into a forked pytest
            result["child_error"] = repr(exc)
        finally:
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
    os.close(write_end)
    chunks = []
    while data := os.read(read_end, 65536):
        chunks.append(data)
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def test_a_second_unix_user_is_refused(default_daemon: DefaultDaemon, shared_parent: Path) -> None:
    user = _other_user()
    result = _as_other_user(user, default_daemon.endpoint)
    print(result)  # shown with -s; quoted in docs/reliability.md
    assert "child_error" not in result, result
    assert result["uid"] == str(user.pw_uid)
    # The library fails on the socket path (EACCES in the 0700 directory) with a clear error (bug R4, fixed).
    assert result["library"].startswith("DaemonUnavailable"), result
    assert result["raw"] == "no reply in 2 s", result  # libzmq's connect() gets EACCES and keeps retrying


def test_the_socket_file_alone_refuses_a_second_user(default_daemon: DefaultDaemon, shared_parent: Path) -> None:
    """Defence in depth: even reached through a hard link in a folder the other user may enter, the socket file's
    own mode (srwx------, from umask 077 at bind) refuses the connection."""
    user = _other_user()
    public = shared_parent / "public"
    public.mkdir(mode=0o755)
    public.chmod(0o755)
    link = public / "daemon.sock"
    os.link(default_daemon.runtime / "daemon.sock", link)
    result = _as_other_user(user, f"ipc://{link}")
    assert result.get("raw") == "no reply in 2 s", result
    with Client(f"ipc://{link}", timeout=30) as c:  # while its owner gets through the same link
        assert c.hello().protocol == p.PROTOCOL_VERSION


# ---- unsafe directories --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o755, 0o1777])
def test_the_daemon_refuses_a_runtime_dir_others_can_reach(
    shared_parent: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path, mode: int
) -> None:
    runtime = shared_parent / "run"
    runtime.mkdir()
    runtime.chmod(mode)
    done = DefaultDaemon(runtime, tiny_whisper_dir, tiny_llm_dir).run_to_exit()
    assert done.returncode == 1, done.stderr
    assert "open to other users" in done.stderr and "chmod 700" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (runtime / "daemon.sock").exists()


def test_the_daemon_refuses_an_ipc_endpoint_in_a_shared_folder(
    shared_parent: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path
) -> None:
    shared = shared_parent / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    daemon = DefaultDaemon(
        shared_parent / "run", tiny_whisper_dir, tiny_llm_dir, "--endpoint", f"ipc://{shared}/d.sock"
    )
    done = daemon.run_to_exit()
    assert done.returncode == 1 and "open to other users" in done.stderr, done.stderr
    assert "chmod" not in done.stderr and "folder only you can enter" in done.stderr  # never "chmod 700 /tmp"
    assert not (shared / "d.sock").exists()


def test_the_daemon_refuses_a_runtime_dir_of_another_user(
    shared_parent: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path
) -> None:
    user = _other_user()
    runtime = shared_parent / "run"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, user.pw_uid, user.pw_gid)
    done = DefaultDaemon(runtime, tiny_whisper_dir, tiny_llm_dir).run_to_exit()
    assert done.returncode == 1 and "belongs to uid" in done.stderr, done.stderr


# ---- nothing from the wire is unpickled or evaluated ---------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "yaml"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
"""Called by bare name (``mx.eval`` evaluates an MLX graph and ``re.compile`` a regex: those are fine)."""
FORBIDDEN_METHODS = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized"}


def _python_files() -> list[Path]:
    return sorted(f for d in ("client", "daemon") for f in (ROOT / d).rglob("*.py"))


def test_no_code_path_can_unpickle_or_evaluate() -> None:
    """The wire format is JSON headers + raw float32 PCM; the packages that read it import no deserializer that can
    run code, and call nothing that evaluates text."""
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = {str(n).split(".")[0] for n in names if n} & FORBIDDEN_MODULES
                if bad:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {sorted(bad)}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if (isinstance(func, ast.Name) and name in FORBIDDEN_BUILTINS) or name in FORBIDDEN_METHODS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {name}()")
                if name == "load" and any(k.arg == "allow_pickle" for k in node.keywords):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} loads with allow_pickle")
    assert not found, "\n".join(found)


def test_hostile_payloads_are_refused_and_never_run(tmp_path: Path) -> None:
    """A pickle that would create a file when unpickled, and Python text where a type goes, are just bad input."""
    import pickle  # only to build the hostile payload; the daemon never imports it

    canary = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    bomb = pickle.dumps(Boom())
    text_bomb = {"__reduce__": ["os.system", [f"touch {canary}"]]}
    refused = [
        [p.MARKER, bomb],
        [p.MARKER, json.dumps({"type": f"__import__('os').system('touch {canary}')", "id": "x"}).encode()],
        [p.MARKER, json.dumps({"type": "ask", "id": "x", "text": text_bomb}).encode()],
    ]
    for frames in refused:
        with pytest.raises(p.ProtocolError) as info:
            p.decode(frames, allowed=p.CLIENT_TYPES)
        assert info.value.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_TYPE)
    # As a chunk's payload a pickle is only bytes: refused, or taken as float32 samples, never unpickled.
    padded = bomb + b"\0" * (-len(bomb) % 4)
    for payload in (bomb, padded):
        try:
            chunk = p.decode([p.MARKER, b'{"type":"chunk","id":"x"}', payload], allowed=p.CLIENT_TYPES)
        except p.ProtocolError as exc:
            assert exc.code == p.ErrorCode.BAD_REQUEST
        else:
            assert isinstance(chunk, p.Chunk) and chunk.pcm.dtype == "float32"
    assert not canary.exists()
