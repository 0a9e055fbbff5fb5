"""TCP needs CURVE: `sottovoce keys`, an allow-list of client keys, unknown keys refused, --insecure-loopback only on
loopback. Runs the real daemon (tiny models) on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from daemon_proc import DaemonProcess  # type: ignore[import-not-found]

from sottovoce.client import Client
from sottovoce.client import protocol as p
from sottovoce.client import security as cs
from sottovoce.client.errors import DaemonUnavailable
from sottovoce.daemon import security

pytestmark = pytest.mark.timeout(300)
REFUSED_WITHIN = 3.0


def exited_cleanly(code: int, log: str) -> bool:
    """0, or bug R5: MLX aborts in its C++ static destructors at interpreter exit when models were loaded on the model
    thread ("terminate called without an active exception", SIGABRT) even though shutdown itself went fine."""
    return code == 0 or (code == -6 and "terminate called without an active exception" in log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keys(keys_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sottovoce.client.cli", "keys", *args],
        env={**os.environ, cs.KEYS_DIR_ENV: str(keys_dir), "SOTTOVOCE_CONFIG": "/nonexistent.toml"},
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def tcp_daemon(workdir: Path, whisper: Path, llm: Path, endpoint: str, *extra: str) -> DaemonProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = DaemonProcess(workdir, whisper_model=str(whisper), llm_model=str(llm), extra_args=list(extra))
    proc.args[proc.args.index("--endpoint") + 1] = endpoint
    proc.endpoint = endpoint
    return proc


@pytest.fixture
def server_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The daemon's keys folder (with its owner's client key authorized), also this test process's keys folder."""
    keys_dir = tmp_path / "keys"
    done = keys(keys_dir, "generate")
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv(cs.KEYS_DIR_ENV, str(keys_dir))
    return keys_dir


@pytest.fixture
def curve_daemon(
    tmp_path: Path, server_keys: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path
) -> Iterator[DaemonProcess]:
    proc = tcp_daemon(tmp_path / "d", tiny_whisper_dir, tiny_llm_dir, f"tcp://127.0.0.1:{free_port()}")
    proc.start()
    yield proc
    code = proc.stop(timeout=15)  # SIGTERM with the ZAP handler running: no hang (a hang ends in SIGKILL, -9)
    assert exited_cleanly(code, proc.log()), proc.log()[-2000:]


def other_client_keys(tmp_path: Path, server_keys: Path, name: str) -> Path:
    """Another machine's keys folder: its own keypair, plus a copy of the daemon's public key."""
    folder = tmp_path / name
    assert keys(folder, "generate").returncode == 0
    (folder / "server.key").write_bytes((server_keys / "server.key").read_bytes())
    return folder


def refused(endpoint: str) -> float:
    """Try a handshake; returns how long the refusal took (raises if it got in)."""
    started = time.monotonic()
    with (
        pytest.raises(DaemonUnavailable),
        Client(endpoint, timeout=REFUSED_WITHIN, connect_timeout=REFUSED_WITHIN) as c,
    ):
        c.hello()
    return time.monotonic() - started


# ---- keys ------------------------------------------------------------------------------------------------------


def test_keys_generate_makes_private_files_and_is_idempotent(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    first = keys(folder, "generate")
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "authorized").stat().st_mode) == 0o700
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600
    server_public, server_secret = zmq.auth.load_certificate(folder / "server.key_secret")  # pyzmq's format
    assert server_secret and zmq.curve_public(server_secret) == server_public
    assert server_secret.decode() not in first.stdout  # only public keys are ever printed
    again = keys(folder, "generate")
    assert again.returncode == 0 and "(new" not in again.stdout
    assert zmq.auth.load_certificate(folder / "server.key_secret") == (server_public, server_secret)
    shown = keys(folder, "show", "--json")
    import json

    info = json.loads(shown.stdout)
    assert info["server"] == server_public.decode() and len(info["authorized"]) == 1
    assert info["client"] in info["authorized"].values()  # this user's own client key is allowed


def test_keys_authorize_and_revoke(tmp_path: Path) -> None:
    folder, laptop = tmp_path / "keys", tmp_path / "laptop"
    keys(folder, "generate")
    keys(laptop, "generate")
    added = keys(folder, "authorize", str(laptop / "client.key"), "--name", "laptop")
    assert added.returncode == 0, added.stderr
    assert (folder / "authorized" / "laptop.key").exists()
    assert "already authorized" in keys(folder, "authorize", str(laptop / "client.key")).stdout
    bare = zmq.curve_keypair()[0].decode()
    assert keys(folder, "authorize", bare, "--name", "phone").returncode == 0  # a bare key pasted from `show`
    from_secret = keys(folder, "authorize", str(laptop / "client.key_secret"), "--name", "x")
    assert "already authorized" in from_secret.stdout  # a secret file: only its public key is ever used
    bad = keys(folder, "authorize", "not-a-key")
    assert bad.returncode == 2 and "public-key" in bad.stderr, bad.stderr
    assert keys(folder, "revoke", "laptop").returncode == 0
    assert not (folder / "authorized" / "laptop.key").exists()
    assert keys(folder, "revoke", "laptop").returncode == 1


# ---- refusing to start ---------------------------------------------------------------------------------------


def test_tcp_without_keys_refuses_to_start(tmp_path: Path, monkeypatch, tiny_whisper_dir, tiny_llm_dir) -> None:
    monkeypatch.setenv(cs.KEYS_DIR_ENV, str(tmp_path / "no-keys"))
    proc = tcp_daemon(tmp_path / "d", tiny_whisper_dir, tiny_llm_dir, f"tcp://127.0.0.1:{free_port()}")
    done = subprocess.run(proc.args, env=proc.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert (
        "without CURVE" in done.stderr
        and "sottovoce keys generate" in done.stderr
        and "--insecure-loopback" in done.stderr
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "[::]", "*", "example.org"])
def test_insecure_loopback_is_refused_off_loopback(tmp_path: Path, tiny_whisper_dir, tiny_llm_dir, host: str) -> None:
    proc = tcp_daemon(
        tmp_path / "d", tiny_whisper_dir, tiny_llm_dir, f"tcp://{host}:{free_port()}", "--insecure-loopback"
    )
    done = subprocess.run(proc.args, env=proc.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "allowed only on a loopback host" in done.stderr, done.stderr


def test_a_secret_key_others_can_read_is_refused(server_keys: Path) -> None:
    (server_keys / "server.key_secret").chmod(0o644)
    with pytest.raises(security.EndpointSecurityError, match="chmod 600"):
        security.check_endpoint("tcp://127.0.0.1:5555")


def test_an_allow_list_others_can_write_is_refused(server_keys: Path) -> None:
    (server_keys / "authorized").chmod(0o777)
    with pytest.raises(security.EndpointSecurityError, match="writable by other users"):
        security.check_endpoint("tcp://127.0.0.1:5555")


@pytest.mark.parametrize(
    ("endpoint", "host", "loopback"),
    [
        ("tcp://127.0.0.1:5555", "127.0.0.1", True),
        ("tcp://127.8.9.10:1", "127.8.9.10", True),
        ("tcp://[::1]:5555", "::1", True),
        ("tcp://localhost:5555", "localhost", True),
        ("tcp://0.0.0.0:5555", "0.0.0.0", False),
        ("tcp://*:5555", "*", False),
        ("tcp://eth0;127.0.0.1:5555", "eth0;127.0.0.1", False),
        ("tcp://127.0.0.1.evil.org:5555", "127.0.0.1.evil.org", False),
    ],
)
def test_loopback_detection(endpoint: str, host: str, loopback: bool) -> None:
    assert cs.tcp_host(endpoint) == host
    assert cs.is_loopback_host(host) is loopback


# ---- who gets in ---------------------------------------------------------------------------------------------


def test_an_authorized_client_gets_in_over_curve(curve_daemon: DaemonProcess) -> None:
    with Client(curve_daemon.endpoint, timeout=30) as c:
        assert c.hello().protocol == p.PROTOCOL_VERSION
        assert c.ask("hello over CURVE", max_tokens=4).tokens == 4


def test_an_unknown_key_is_refused(curve_daemon: DaemonProcess, tmp_path: Path, server_keys: Path, monkeypatch) -> None:
    stranger = other_client_keys(tmp_path, server_keys, "stranger")
    monkeypatch.setenv(cs.KEYS_DIR_ENV, str(stranger))
    took = refused(curve_daemon.endpoint)
    assert took <= REFUSED_WITHIN + 1
    print(f"MEASURED unknown CURVE key: DaemonUnavailable after {took:.2f} s")
    assert "refused a CURVE client with an unknown key" in curve_daemon.log()


def test_a_plain_client_without_curve_is_refused(curve_daemon: DaemonProcess) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(curve_daemon.endpoint)
    sock.send_multipart(p.encode(p.Hello()), flags=zmq.DONTWAIT)
    assert not sock.poll(int(REFUSED_WITHIN * 1000))
    sock.close(0)


def test_a_client_with_the_wrong_server_key_is_refused(curve_daemon: DaemonProcess, server_keys: Path) -> None:
    """A man in the middle (another server key) cannot complete the handshake: the client authenticates the server."""
    (server_keys / "server.key").write_bytes(cs.format_key_file(zmq.curve_keypair()[0]))
    refused(curve_daemon.endpoint)


def test_authorize_and_revoke_take_effect_without_a_restart(
    curve_daemon: DaemonProcess, tmp_path: Path, server_keys: Path, monkeypatch
) -> None:
    laptop = other_client_keys(tmp_path, server_keys, "laptop")
    monkeypatch.setenv(cs.KEYS_DIR_ENV, str(laptop))
    refused(curve_daemon.endpoint)
    assert keys(server_keys, "authorize", str(laptop / "client.key"), "--name", "laptop").returncode == 0
    with Client(curve_daemon.endpoint, timeout=30) as c:
        assert c.hello()
    assert keys(server_keys, "revoke", "laptop").returncode == 0
    refused(curve_daemon.endpoint)  # new connections only: an open one keeps its session (as with ssh)


def test_a_tcp_client_without_keys_is_told_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(cs.KEYS_DIR_ENV, str(tmp_path / "none"))
    with pytest.raises(cs.KeyFileError, match="sottovoce keys generate"):
        Client("tcp://127.0.0.1:5555")


def test_insecure_loopback_serves_plain_tcp_on_loopback_only_by_explicit_choice(
    tmp_path: Path, monkeypatch, tiny_whisper_dir: Path, tiny_llm_dir: Path
) -> None:
    monkeypatch.setenv(cs.KEYS_DIR_ENV, str(tmp_path / "no-keys"))
    monkeypatch.setenv(cs.INSECURE_ENV, "1")
    proc = tcp_daemon(
        tmp_path / "d", tiny_whisper_dir, tiny_llm_dir, f"tcp://127.0.0.1:{free_port()}", "--insecure-loopback"
    )
    proc.start()
    try:
        with Client(proc.endpoint, timeout=30) as c:
            assert c.hello().protocol == p.PROTOCOL_VERSION
        assert "WITHOUT CURVE" in proc.log()
    finally:
        assert exited_cleanly(proc.stop(), proc.log())


# ---- isolation: a routing id never reaches another key's session (issue 11) ------------------------------------


def curve_dealer(endpoint: str, keys_folder: Path, routing_id: bytes) -> zmq.Socket:
    """A client written from PROTOCOL.md alone, that picks its own routing id."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    public, secret = cs.read_keypair(cs.CLIENT, keys_folder)
    sock.curve_serverkey = cs.read_public_key(cs.public_path(cs.SERVER, keys_folder))
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.connect(endpoint)
    return sock


def ask_and_wait(sock: zmq.Socket, text: str) -> p.Message:
    ask = p.Ask(text=text, max_tokens=2)
    sock.send_multipart(p.encode(ask))
    while True:
        assert sock.poll(60_000), "no reply"
        msg = p.decode(sock.recv_multipart())
        if isinstance(msg, p.Done | p.Error) and msg.ref == ask.id:
            return msg


def test_another_key_with_the_same_routing_id_gets_a_fresh_session(
    curve_daemon: DaemonProcess, tmp_path: Path, server_keys: Path
) -> None:
    laptop = other_client_keys(tmp_path, server_keys, "laptop")
    assert keys(server_keys, "authorize", str(laptop / "client.key"), "--name", "laptop").returncode == 0
    question = "What is my bank PIN?"
    fresh = curve_dealer(curve_daemon.endpoint, laptop, b"fresh")
    baseline = ask_and_wait(fresh, question)
    fresh.close()

    a = curve_dealer(curve_daemon.endpoint, server_keys, b"phone")
    assert isinstance(ask_and_wait(a, "Remember this: my bank PIN is 4921."), p.Done)
    a.close()
    b = curve_dealer(curve_daemon.endpoint, laptop, b"phone")  # another authorised key, the same routing id
    answer = ask_and_wait(b, question)
    b.close()
    # B's prompt is a newcomer's: A's turn is not in it (the old daemon answered "Your bank PIN is 4921.").
    assert isinstance(baseline, p.Done) and isinstance(answer, p.Done)
    assert answer.prompt_tokens == baseline.prompt_tokens
