"""Service files: generated systemd units pass `systemd-analyze verify`, plists round-trip through plistlib with the
keys launchd needs, the committed templates match the generator, and install/uninstall/status drive the service
managers with the right commands (a fake runner stands in for systemctl/launchctl) and fail clearly without one."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from sottovoce.client import cli, service
from sottovoce.client.service import Installation, Launchd, ServiceError, SystemdUser

ROOT = Path(__file__).resolve().parents[2]


def inst(tmp_path: Path, env: dict[str, str] | None = None, python: str | None = None) -> Installation:
    return Installation(
        python or sys.executable,
        tmp_path / "home",
        tmp_path / "home/Library/Logs/sottovoce",
        tuple((env or {}).items()),
    )


# ---- systemd units -----------------------------------------------------------------------------------------------


def verify(tmp_path: Path, units: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze --user verify` on the units; it exits 0 on mere warnings, so callers check stderr too."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`)")
    folder = tmp_path / "units"
    folder.mkdir(exist_ok=True)
    for name, text in units.items():
        (folder / name).write_text(text)
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"}
    return subprocess.run(
        ["systemd-analyze", "--user", "--man=no", "verify", *(str(folder / n) for n in units)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    problems = [line for line in result.stderr.splitlines() if "units/" in line or "sottovoce" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_generated_units_verify_cleanly(tmp_path: Path) -> None:
    installation = inst(tmp_path, {"SOTTOVOCE_MODELS_DIR": "/srv/models", "HF_HOME": "/tmp/hf cache"})
    units = {service.SYSTEMD_UNITS[r]: service.render_systemd(r, installation) for r in service.ROLES}
    assert_clean(verify(tmp_path, units))


def test_the_verifier_does_catch_mistakes(tmp_path: Path) -> None:
    text = service.render_systemd("daemon", inst(tmp_path)).replace("Restart=on-failure", "Restart=sometimes")
    result = verify(tmp_path, {"sottovoce-daemon.service": text + "[Service]\nBogusKey=1\n"})
    assert "restart specifier" in result.stderr and "BogusKey" in result.stderr
    with pytest.raises(AssertionError):
        assert_clean(result)  # exit status 0 on such warnings: assert_clean looks at what it printed
    missing = service.render_systemd("daemon", inst(tmp_path, python="/nonexistent/python3"))
    assert verify(tmp_path, {"sottovoce-daemon.service": missing}).returncode != 0


def test_interpreter_path_with_spaces_percent_and_dollar_is_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "my env 100% $HOME" / "bin"
    odd.mkdir(parents=True)
    (odd / "python").symlink_to(sys.executable)
    installation = inst(tmp_path, {"SOTTOVOCE_CONFIG": '/c/50% "x".toml'}, python=str(odd / "python"))
    text = service.render_systemd("daemon", installation)
    # systemd finds the executable only if it unescapes the path exactly
    assert_clean(verify(tmp_path, {"sottovoce-daemon.service": text}))
    assert SystemdUser().installed_python(text) == str(odd / "python")
    assert 'Environment="SOTTOVOCE_CONFIG=/c/50%% \\"x\\".toml"' in text


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_daemon_unit_contents(tmp_path: Path) -> None:
    lines = unit_lines(service.render_systemd("daemon", inst(tmp_path, {"XDG_DATA_HOME": "/d"})))
    assert f"ExecStart={sys.executable} -m sottovoce.client.cli daemon" in lines
    for expected in ("Restart=on-failure", "RestartPreventExitStatus=2", "WantedBy=default.target"):
        assert expected in lines
    assert lines.index("Environment=PYTHONUNBUFFERED=1") + 1 == lines.index("Environment=XDG_DATA_HOME=/d")
    assert not any("@" in line for line in lines)


def test_tray_unit_is_bound_to_the_graphical_session(tmp_path: Path) -> None:
    lines = unit_lines(service.render_systemd("tray", inst(tmp_path)))
    assert f"ExecStart={sys.executable} -m sottovoce.client.cli tray" in lines
    for expected in (
        "PartOf=graphical-session.target",
        "After=graphical-session.target sottovoce-daemon.service",
        "Wants=sottovoce-daemon.service",
        "WantedBy=graphical-session.target",
        "Restart=on-failure",
    ):
        assert expected in lines


# ---- launchd plists ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", service.ROLES)
def test_plist_round_trips_with_the_required_keys(tmp_path: Path, role: service.Role) -> None:
    installation = inst(tmp_path, {"SOTTOVOCE_MODELS_DIR": "/models & <more>"})
    text = service.render_launchd(role, installation)
    data = plistlib.loads(text.encode())
    assert plistlib.loads(plistlib.dumps(data)) == data
    assert data["Label"] == service.LAUNCHD_LABELS[role]
    assert data["ProgramArguments"] == [sys.executable, "-m", "sottovoce.client.cli", role]
    assert os.path.isabs(data["ProgramArguments"][0])
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}  # restart after a crash only
    log = str(installation.log_dir / f"{role}.log")
    assert data["StandardOutPath"] == data["StandardErrorPath"] == log
    assert data["WorkingDirectory"] == str(installation.home)
    assert data["EnvironmentVariables"] == {"PYTHONUNBUFFERED": "1", "SOTTOVOCE_MODELS_DIR": "/models & <more>"}
    assert "@" not in text.split("-->", 1)[1]
    if role == "tray":
        assert data["LimitLoadToSessionType"] == "Aqua"
        assert "NSMicrophoneUsageDescription" in text and "Privacy & Security > Microphone" in text


@pytest.mark.skipif(shutil.which("plutil") is None, reason="plutil exists only on macOS")
@pytest.mark.parametrize("role", service.ROLES)
def test_plist_passes_plutil_lint(tmp_path: Path, role: service.Role) -> None:
    path = tmp_path / "x.plist"
    path.write_text(service.render_launchd(role, inst(tmp_path)))
    subprocess.run(["plutil", "-lint", str(path)], check=True)


# ---- committed templates -----------------------------------------------------------------------------------------


def test_committed_templates_match_the_generator() -> None:
    for rel, text in service.TEMPLATES.items():
        path = ROOT / rel
        assert path.read_text(encoding="utf-8") == text, (
            f"{rel} is out of date: .venv/bin/python -c "
            "'from pathlib import Path; from sottovoce.client import service; service.write_templates(Path(\".\"))'"
        )


def test_committed_templates_are_usable_by_hand(tmp_path: Path) -> None:
    """What docs/service.md tells people to do: replace the placeholders (sed), then verify / load."""
    units = {
        name: (ROOT / "systemd" / name).read_text().replace("@PYTHON@", sys.executable)
        for name in service.SYSTEMD_UNITS.values()
    }
    assert_clean(verify(tmp_path, units))
    for label in service.LAUNCHD_LABELS.values():
        data = plistlib.loads((ROOT / "launchd" / f"{label}.plist").read_bytes())
        assert data["ProgramArguments"][0] == "@PYTHON@" and data["Label"] == label


# ---- installation -----------------------------------------------------------------------------------------------


def test_installation_copies_only_path_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"SOTTOVOCE_MODELS_DIR": "/m", "SOTTOVOCE_MAX_TOKENS": "5", "HF_HOME": "", "PATH": "/bin"}
    installation = Installation.current({"EXTRA": "1"}, environ=environ)
    assert dict(installation.environment) == {"SOTTOVOCE_MODELS_DIR": "/m", "EXTRA": "1"}
    assert installation.python == sys.executable  # not resolved: a venv's python is a symlink
    with pytest.raises(ServiceError, match="bad environment variable name"):
        Installation.current({"BAD NAME": "1"}, environ={})


def test_installation_check(tmp_path: Path) -> None:
    inst(tmp_path).check()  # this interpreter imports sottovoce
    with pytest.raises(ServiceError, match="is not an executable file"):
        inst(tmp_path, python=str(tmp_path / "nope")).check()
    with pytest.raises(ServiceError, match="cannot import sottovoce"):
        inst(tmp_path, python="/bin/sh").check()  # `sh -c "import ..."` fails


def test_no_service_manager_on_other_systems() -> None:
    with pytest.raises(ServiceError, match="no supported service manager on win32"):
        service.manager_for("win32")
    assert isinstance(service.manager_for("linux"), SystemdUser)
    assert isinstance(service.manager_for("darwin"), Launchd)


class FakeRunner:
    """Records commands; answers from a table of (argv prefix -> (returncode, stdout, stderr))."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        best = max((k for k in self.answers if tuple(argv[: len(k)]) == k), key=len, default=None)
        if best is not None:
            code, out, err = self.answers[best]
            return subprocess.CompletedProcess(argv, code, out, err)
        if argv[0] == sys.executable:  # Installation.check
            return subprocess.CompletedProcess(argv, 0, "", "")
        return subprocess.CompletedProcess(argv, 0, "", "")

    def ran(self, *prefix: str) -> bool:
        return any(tuple(c[: len(prefix)]) == prefix for c in self.calls)


RUNNING = (0, "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=4242\n", "")
FAILED = (0, "LoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\n", "")
NO_SESSION = (1, "", "")


@pytest.fixture
def systemd(tmp_path: Path) -> tuple[SystemdUser, FakeRunner]:
    runner = FakeRunner(
        {
            ("systemctl", "--user", "show", "--property"): RUNNING,
            ("systemctl", "--user", "is-active", "graphical-session.target"): (3, "inactive\n", ""),
        }
    )
    manager = SystemdUser(runner, environ={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    manager.settle_seconds = 0.0
    return manager, runner


def test_systemd_install_writes_enables_and_restarts(tmp_path: Path, systemd) -> None:
    manager, runner = systemd
    notes = service.install(manager, inst(tmp_path), ["daemon", "tray"])
    unit_dir = tmp_path / "cfg/systemd/user"
    assert (unit_dir / "sottovoce-daemon.service").read_text() == service.render_systemd("daemon", inst(tmp_path))
    assert (unit_dir / "sottovoce-tray.service").exists()
    assert runner.ran("systemctl", "--user", "daemon-reload")
    assert runner.ran("systemctl", "--user", "enable", "sottovoce-daemon.service")
    assert runner.ran("systemctl", "--user", "restart", "sottovoce-daemon.service")
    assert runner.ran("systemctl", "--user", "enable", "sottovoce-tray.service")
    assert not runner.ran("systemctl", "--user", "restart", "sottovoce-tray.service")  # no graphical session
    assert "started sottovoce-daemon.service (enabled: starts at login)" in notes
    assert any("starts with your next graphical session" in n for n in notes)
    assert "logs: journalctl --user -u sottovoce-daemon.service" in notes


def test_systemd_install_no_start(tmp_path: Path, systemd) -> None:
    manager, runner = systemd
    service.install(manager, inst(tmp_path), ["daemon"], start=False)
    assert runner.ran("systemctl", "--user", "enable", "sottovoce-daemon.service")
    assert not runner.ran("systemctl", "--user", "restart")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((127, "", "systemctl: command not found"), "systemd's `systemctl` is not installed"),
        ((1, "", "Failed to connect to bus: No medium found"), "no systemd user instance is reachable"),
    ],
)
def test_systemd_install_without_a_user_manager_writes_nothing(tmp_path: Path, answer, expected: str) -> None:
    runner = FakeRunner({("systemctl", "--user", "show-environment"): answer})
    manager = SystemdUser(runner, environ={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    with pytest.raises(ServiceError, match=f"cannot install the services: {expected}"):
        service.install(manager, inst(tmp_path), ["daemon"])
    assert not (tmp_path / "cfg").exists()


def test_install_refuses_a_bad_config_before_writing(tmp_path: Path, systemd) -> None:
    manager, runner = systemd

    def bad_config() -> None:
        raise service.ServiceError("config: max_tokens must be an integer")

    with pytest.raises(ServiceError, match="max_tokens"):
        service.install(manager, inst(tmp_path), ["daemon"], check_config=bad_config)
    assert not manager.path("daemon").exists()
    assert not runner.ran("systemctl", "--user", "enable")


def test_install_reports_a_daemon_that_dies_at_once(tmp_path: Path, systemd) -> None:
    manager, runner = systemd
    runner.answers[("systemctl", "--user", "show", "--property")] = FAILED
    with pytest.raises(ServiceError, match=r"stopped right after starting \(failed \(failed\)\).*journalctl --user"):
        service.install(manager, inst(tmp_path), ["daemon"])


def test_install_reports_a_failing_systemctl(tmp_path: Path, systemd) -> None:
    manager, runner = systemd
    runner.answers[("systemctl", "--user", "enable")] = (1, "", "Failed to enable unit: Unit file is masked.")
    with pytest.raises(ServiceError, match=r"`systemctl --user enable sottovoce-daemon\.service` failed: .*masked"):
        service.install(manager, inst(tmp_path), ["daemon"])


def test_systemd_status_and_uninstall(tmp_path: Path, systemd) -> None:
    manager, runner = systemd
    installation = inst(tmp_path)
    states = service.status(manager, installation, ["daemon"])
    assert not states[0].installed
    service.install(manager, installation, ["daemon"])
    (state,) = service.status(manager, installation, ["daemon"])
    assert state.installed and state.current and state.running and state.pid == 4242
    assert state.detail == "active (running)" and state.python == sys.executable
    (state,) = service.status(manager, inst(tmp_path, {"X": "1"}), ["daemon"])
    assert not state.current  # the file differs from what install would write now

    notes = service.uninstall(manager, ["daemon", "tray"])
    assert runner.ran("systemctl", "--user", "disable", "--now", "sottovoce-daemon.service")
    assert not runner.ran("systemctl", "--user", "disable", "--now", "sottovoce-tray.service")  # was not there
    assert runner.calls[-1] == ["systemctl", "--user", "daemon-reload"]
    assert f"removed {manager.path('daemon')}" in notes
    assert not manager.path("daemon").exists()
    assert service.uninstall(manager, ["daemon"])[0].startswith("nothing to remove")


def test_uninstall_removes_files_even_without_a_user_manager(tmp_path: Path, systemd) -> None:
    manager, _ = systemd
    service.install(manager, inst(tmp_path), ["daemon"])
    manager.runner = FakeRunner({("systemctl",): NO_SESSION})
    notes = service.uninstall(manager, ["daemon"])
    assert notes[0].startswith("could not stop the services: no systemd user instance")
    assert not manager.path("daemon").exists()


# ---- launchd with a fake launchctl ------------------------------------------------------------------------------

LAUNCHCTL_PRINT = """gui/501/org.sottovoce.daemon = {
	active count = 1
	path = /Users/me/Library/LaunchAgents/org.sottovoce.daemon.plist
	state = running
	program = /usr/bin/python3
	pid = 777
	last exit code = (never exited)
}
"""


@pytest.fixture
def launchd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Launchd, FakeRunner]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    runner = FakeRunner({("launchctl", "print", "gui/501/org.sottovoce.daemon"): (0, LAUNCHCTL_PRINT, "")})
    return Launchd(runner, uid=501), runner


def test_launchd_install_bootstraps_into_the_gui_domain(tmp_path: Path, launchd) -> None:
    manager, runner = launchd
    installation = inst(tmp_path)
    notes = service.install(manager, installation, ["daemon", "tray"])
    plist = tmp_path / "home/Library/LaunchAgents/org.sottovoce.daemon.plist"
    assert plistlib.loads(plist.read_bytes())["Label"] == "org.sottovoce.daemon"
    assert installation.log_dir.is_dir()  # launchd does not create the log folder
    assert runner.ran("launchctl", "bootout", "gui/501/org.sottovoce.daemon")
    assert runner.ran("launchctl", "bootstrap", "gui/501", str(plist))
    assert runner.ran("launchctl", "enable", "gui/501/org.sottovoce.tray")
    assert "loaded org.sottovoce.daemon (runs now and at every login)" in notes
    (daemon, tray) = service.status(manager, installation, ["daemon", "tray"])
    assert daemon.running and daemon.pid == 777 and daemon.current and daemon.python == sys.executable
    runner.answers[("launchctl", "print", "gui/501/org.sottovoce.tray")] = (113, "", "Could not find service")
    (tray,) = service.status(manager, installation, ["tray"])
    assert tray.installed and not tray.loaded and tray.detail == "not loaded"
    service.uninstall(manager, ["daemon", "tray"])
    assert runner.ran("launchctl", "bootout", "gui/501/org.sottovoce.tray")
    assert not plist.exists()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((127, "", "launchctl: command not found"), "launchd exists only on macOS"),
        ((113, "", "Could not find domain for port identifier"), "no GUI login session for uid 501"),
    ],
)
def test_launchd_unavailable(tmp_path: Path, launchd, answer, expected: str) -> None:
    manager, runner = launchd
    runner.answers[("launchctl", "print", "gui/501")] = answer
    with pytest.raises(ServiceError, match=expected):
        service.install(manager, inst(tmp_path), ["daemon"])


def test_launchd_bootstrap_failure(tmp_path: Path, launchd) -> None:
    manager, runner = launchd
    runner.answers[("launchctl", "bootstrap")] = (5, "", "Bootstrap failed: 5: Input/output error")
    with pytest.raises(ServiceError, match=r"launchctl bootstrap gui/501 .* failed: Bootstrap failed"):
        service.install(manager, inst(tmp_path), ["daemon"])


# ---- the commands ------------------------------------------------------------------------------------------------


def test_service_install_print(capsys) -> None:
    assert cli.main(["service", "install", "--print", "--manager", "launchd", "--only", "daemon"]) == 0
    out = capsys.readouterr().out
    assert "org.sottovoce.daemon.plist <==" in out and f"<string>{sys.executable}</string>" in out
    assert cli.main(["service", "install", "--print", "--manager", "systemd"]) == 0
    out = capsys.readouterr().out
    assert f"ExecStart={sys.executable} -m sottovoce.client.cli daemon" in out


def test_service_commands_on_an_unsupported_system(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert cli.main(["service", "install"]) == 1
    assert "no supported service manager on win32" in capsys.readouterr().err
    assert cli.main(["service", "status"]) == 1


def test_service_install_bad_env_is_usage_error(capsys) -> None:
    assert cli.main(["service", "install", "--env", "NOVALUE"]) == 2
    assert "--env wants KEY=VALUE" in capsys.readouterr().err


def test_service_install_refuses_a_broken_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("queue_depth = 0\n")
    monkeypatch.setenv("SOTTOVOCE_CONFIG", str(cfg))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    fake = FakeRunner()
    monkeypatch.setattr(service, "run_command", fake)
    monkeypatch.setattr(sys, "platform", "linux")
    assert cli.main(["service", "install", "--only", "daemon"]) == 2
    err = capsys.readouterr().err
    assert "not installing: the config is invalid" in err and "queue_depth must be between 1 and 1024" in err
    assert not (tmp_path / "xdg/systemd/user/sottovoce-daemon.service").exists()
    assert not fake.ran("systemctl", "--user", "enable")
