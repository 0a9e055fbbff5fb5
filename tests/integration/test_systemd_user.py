"""The daemon as a real systemd user service: `sottovoce service install` into a temporary XDG config home, a
private `systemd --user` starts it, the CLI asks it a question, a crash is restarted, a bad config is not
restart-looped, and `service uninstall` stops and removes it.

A user manager needs ``/run/systemd/system`` to exist (systemd's "booted with systemd" test). Containers without
systemd as PID 1 lack it, so the manager runs in a private mount namespace (``unshare -m``, needs root) with a
tmpfs over ``/run/systemd`` that has it: nothing outside that namespace changes. ``systemctl --user`` reaches the
manager through ``$XDG_RUNTIME_DIR/systemd/private``, so the test process itself stays outside the namespace. Where
this cannot be done the test skips and says why. Journald is absent there: a drop-in sends the daemon's output to a
file (the shipped unit logs to the journal).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

UNIT = "sottovoce-daemon.service"

MANAGER_SCRIPT = """
set -e
if [ ! -d /run/systemd/system ]; then
    mount -t tmpfs -o mode=755 tmpfs /run/systemd
    mkdir /run/systemd/system
fi
exec systemd --user
"""


def why_no_user_manager() -> str | None:
    for tool in ("systemd", "systemctl", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not sys.platform.startswith("linux"):
        return "systemd user units are Linux only"
    if os.path.isdir("/run/systemd/system") and os.geteuid() != 0:
        return (
            "this machine runs systemd: the test starts its own private user manager only as root "
            "(a second `systemd --user` beside the real one cannot get a cgroup of its own)"
        )
    if os.geteuid() != 0:
        return "starting a private `systemd --user` without systemd as PID 1 needs root (unshare -m, mount)"
    return None


class UserManager:
    """A private `systemd --user` with its own XDG runtime, config and data homes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runtime = root / "runtime"
        self.config_home = root / "config"
        self.data_home = root / "data"
        for d in (self.runtime, self.config_home, self.data_home):
            d.mkdir(mode=0o700)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SOTTOVOCE_", "XDG_", "DBUS_")) and k not in ("DISPLAY", "WAYLAND_DISPLAY")
        }
        self.env.update(
            XDG_RUNTIME_DIR=str(self.runtime),
            XDG_CONFIG_HOME=str(self.config_home),
            XDG_DATA_HOME=str(self.data_home),
            HF_HUB_OFFLINE="1",
        )
        self.log = root / "manager.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", MANAGER_SCRIPT],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.skip(f"`systemd --user` did not start here: {self.log.read_text(errors='replace')[-600:]}")
            if self.systemctl("show-environment").returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        pytest.skip(f"`systemd --user` did not answer within 20 s: {self.log.read_text(errors='replace')[-600:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.systemctl("exit")
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", "--user", *args], env=self.env, capture_output=True, text=True, timeout=60)

    def prop(self, name: str) -> str:
        return self.systemctl("show", "--property", name, "--value", UNIT).stdout.strip()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sottovoce.client.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_status(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Until `sottovoce status` says both models are loaded."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.cli("status", "--timeout", "10")
            if result.returncode == 0 or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[UserManager]:
    reason = why_no_user_manager()
    if reason is not None:
        pytest.skip(reason)
    m = UserManager(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def test_daemon_runs_as_a_user_service(manager: UserManager, tiny_whisper_dir: Path, tiny_llm_dir: Path) -> None:
    config = manager.config_home / "sottovoce" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'whisper_model = "{tiny_whisper_dir}"\nllm_model = "{tiny_llm_dir}"\nmax_tokens = 8\n')
    daemon_log = manager.root / "daemon.log"
    dropin = manager.config_home / "systemd" / "user" / f"{UNIT}.d"
    dropin.mkdir(parents=True)
    (dropin / "log.conf").write_text(f"[Service]\nStandardOutput=append:{daemon_log}\nStandardError=inherit\n")

    def logs() -> str:
        return daemon_log.read_text(errors="replace")[-3000:] if daemon_log.exists() else "(no daemon log)"

    # install: writes the unit for this interpreter, enables and starts it
    result = manager.cli("service", "install", "--only", "daemon")
    assert result.returncode == 0, result.stderr + logs()
    unit = manager.config_home / "systemd" / "user" / UNIT
    assert unit.exists() and f"ExecStart={sys.executable} -m sottovoce.client.cli daemon" in unit.read_text()
    assert f"started {UNIT}" in result.stdout
    assert manager.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"

    # ask it a question through the CLI
    status = manager.wait_status()
    assert status.returncode == 0, status.stdout + status.stderr + logs()
    assert f"at ipc://{manager.runtime}/sottovoce/daemon.sock" in status.stdout
    answer = manager.cli("ask", "What is the capital of France?")
    assert answer.returncode == 0, answer.stderr + logs()
    assert "8 answer tokens" in answer.stderr

    listed = manager.cli("service", "status", "--only", "daemon")
    assert listed.returncode == 0 and "active (running)" in listed.stdout, listed.stdout
    doctor = manager.cli("doctor", "--no-mic", "--json")
    assert '"service daemon: sottovoce-daemon.service active (running)' in doctor.stdout, doctor.stdout

    # a crash is restarted (Restart=on-failure)
    pid = int(manager.prop("MainPID"))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and manager.prop("MainPID") in ("0", str(pid)):
        time.sleep(0.2)
    assert manager.prop("MainPID") not in ("0", str(pid)), manager.systemctl("status", UNIT).stdout
    assert manager.wait_status().returncode == 0, logs()
    assert manager.prop("NRestarts") == "1"

    # a broken config: the daemon exits 2 at start and is not restarted in a loop
    config.write_text(config.read_text() + "queue_depth = 0\n")
    assert manager.systemctl("restart", UNIT).returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and manager.prop("ActiveState") != "failed":
        time.sleep(0.2)
    assert manager.prop("ActiveState") == "failed" and manager.prop("ExecMainStatus") == "2"
    assert "queue_depth must be between 1 and 1024" in logs()
    time.sleep(3)  # longer than RestartSec
    assert manager.prop("ActiveState") == "failed" and manager.prop("NRestarts") == "0"
    refused = manager.cli("service", "install", "--only", "daemon")
    assert refused.returncode == 2 and "the config is invalid" in refused.stderr

    # uninstall: stopped, disabled, file gone
    removed = manager.cli("service", "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {unit}" in removed.stdout and not unit.exists()
    assert manager.prop("LoadState") in ("not-found", "")
    assert not (manager.runtime / "sottovoce" / "daemon.sock").exists()
    assert manager.cli("service", "status").returncode == 3
