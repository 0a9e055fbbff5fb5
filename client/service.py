"""Per-user services for the daemon and the tray: systemd user units on Linux, LaunchAgents on macOS.

The unit and plist texts are generated here from the templates below; ``systemd/`` and ``launchd/`` in the
repository hold the same templates with their placeholders (a test keeps them equal), for people who install by hand.
Placeholders: ``@PYTHON@`` (absolute interpreter of the environment sottovoce is installed in), and in the plists
``@HOME@`` and ``@LOG_DIR@``. ``sottovoce service install`` fills them for this installation, adds the environment
variables that locate sottovoce's files (when set), writes the files and loads them with ``systemctl --user`` /
``launchctl bootstrap``.

Why ``<python> -m sottovoce.client.cli`` rather than the ``sottovoce`` console script: ``sys.executable`` is the
interpreter that is running this very code, so it can import sottovoce by construction, whatever PATH says (systemd
and launchd start services with a minimal PATH, and ``shutil.which("sottovoce")`` may find another installation).
A console script is just a shebang to the same interpreter, but it is absent from a source checkout run with
``python -m`` and lives in a different folder per installer (pip, pipx, uv). The interpreter path is kept as given,
not resolved: a virtual environment's ``bin/python`` is a symlink, and resolving it would leave the environment.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape as xml_escape

Role = Literal["daemon", "tray"]
ROLES: tuple[Role, ...] = ("daemon", "tray")

SYSTEMD_UNITS: dict[Role, str] = {"daemon": "sottovoce-daemon.service", "tray": "sottovoce-tray.service"}
LAUNCHD_LABELS: dict[Role, str] = {"daemon": "org.sottovoce.daemon", "tray": "org.sottovoce.tray"}

PASS_ENV = (
    "SOTTOVOCE_CONFIG",
    "SOTTOVOCE_MODELS_DIR",
    "SOTTOVOCE_RUNTIME_DIR",
    "SOTTOVOCE_OPENBLAS",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)
"""Variables that decide where sottovoce finds its config, models and socket: copied into the service when set at
install time, so the service sees the same files as the shell that installed it."""

CLI_MODULE = "sottovoce.client.cli"

# ---- templates (the files in systemd/ and launchd/ are these, verbatim) ---------------------------------------

_SYSTEMD_DAEMON = """\
# sottovoce daemon as a systemd user service.
# `sottovoce service install` writes this file to ~/.config/systemd/user/ with @PYTHON@ replaced by the absolute
# path of the Python that sottovoce is installed in, and starts it. By hand:
#   sed "s|@PYTHON@|$HOME/.venvs/sottovoce/bin/python|" sottovoce-daemon.service \\
#       > ~/.config/systemd/user/sottovoce-daemon.service
#   systemctl --user daemon-reload && systemctl --user enable --now sottovoce-daemon.service
# Settings come from the config file (`sottovoce config path`); logs: journalctl --user -u sottovoce-daemon
[Unit]
Description=sottovoce voice assistant daemon (local Whisper and chat model)
StartLimitIntervalSec=120
StartLimitBurst=5

[Service]
Type=simple
ExecStart=@PYTHON@ -m sottovoce.client.cli daemon
# Restart after a crash, not after `systemctl --user stop` or a clean exit.
Restart=on-failure
RestartSec=2
# Exit status 2 is a configuration error: restarting cannot fix it (see `sottovoce config show`).
RestartPreventExitStatus=2
TimeoutStopSec=30
WorkingDirectory=%h
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=default.target
"""

_SYSTEMD_TRAY = """\
# sottovoce tray (push-to-talk, microphone, menu) as a systemd user service bound to the graphical session.
# `sottovoce service install` writes this file to ~/.config/systemd/user/ with @PYTHON@ replaced by the absolute
# path of the Python that sottovoce is installed in. It starts with graphical-session.target, which GNOME, KDE and
# other systemd-aware desktops start at login; under a plain window manager run, from the session's startup:
#   systemctl --user import-environment DISPLAY XAUTHORITY WAYLAND_DISPLAY && systemctl --user start sottovoce-tray
# Logs: journalctl --user -u sottovoce-tray
[Unit]
Description=sottovoce tray (push-to-talk voice assistant)
PartOf=graphical-session.target
After=graphical-session.target sottovoce-daemon.service
Wants=sottovoce-daemon.service
StartLimitIntervalSec=120
StartLimitBurst=5

[Service]
Type=simple
ExecStart=@PYTHON@ -m sottovoce.client.cli tray
Restart=on-failure
RestartSec=3
# Exit status 2 is a configuration error: restarting cannot fix it (see `sottovoce config show`).
RestartPreventExitStatus=2
WorkingDirectory=%h
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=graphical-session.target
"""

_PLIST_HEAD = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
"""

_LAUNCHD_DAEMON = (
    _PLIST_HEAD
    + """\
<!--
  sottovoce daemon as a per-user LaunchAgent. `sottovoce service install` writes it to
  ~/Library/LaunchAgents/org.sottovoce.daemon.plist with @PYTHON@ (absolute path of the Python that sottovoce is
  installed in), @HOME@ and @LOG_DIR@ (~/Library/Logs/sottovoce) filled in, then runs
  `launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/org.sottovoce.daemon.plist`.
  It starts at login (RunAtLoad) and again after a crash (KeepAlive: SuccessfulExit false), not after a clean exit.
-->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>org.sottovoce.daemon</string>
	<key>ProgramArguments</key>
	<array>
		<string>@PYTHON@</string>
		<string>-m</string>
		<string>sottovoce.client.cli</string>
		<string>daemon</string>
	</array>
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ThrottleInterval</key>
	<integer>10</integer>
	<key>ProcessType</key>
	<string>Interactive</string>
	<key>WorkingDirectory</key>
	<string>@HOME@</string>
	<key>StandardOutPath</key>
	<string>@LOG_DIR@/daemon.log</string>
	<key>StandardErrorPath</key>
	<string>@LOG_DIR@/daemon.log</string>
	<key>EnvironmentVariables</key>
	<dict>
		<key>PYTHONUNBUFFERED</key>
		<string>1</string>
	</dict>
</dict>
</plist>
"""
)

_LAUNCHD_TRAY = (
    _PLIST_HEAD
    + """\
<!--
  sottovoce tray as a per-user LaunchAgent for the GUI (Aqua) session. `sottovoce service install` writes it to
  ~/Library/LaunchAgents/org.sottovoce.tray.plist with @PYTHON@, @HOME@ and @LOG_DIR@ filled in.

  Microphone: macOS asks the user once before any process records. A LaunchAgent cannot carry the
  NSMicrophoneUsageDescription text (that key belongs in an app bundle's Info.plist; launchd ignores it), so the
  prompt names the Python interpreter above. Allow it in System Settings > Privacy & Security > Microphone; if it
  was denied once, macOS hands the tray silence (all zeros) without asking again: `sottovoce doctor` detects that,
  and `tccutil reset Microphone` asks again. The global hotkey likewise needs that interpreter under
  Privacy & Security > Accessibility (or Input Monitoring).
-->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>org.sottovoce.tray</string>
	<key>ProgramArguments</key>
	<array>
		<string>@PYTHON@</string>
		<string>-m</string>
		<string>sottovoce.client.cli</string>
		<string>tray</string>
	</array>
	<key>LimitLoadToSessionType</key>
	<string>Aqua</string>
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ThrottleInterval</key>
	<integer>10</integer>
	<key>ProcessType</key>
	<string>Interactive</string>
	<key>WorkingDirectory</key>
	<string>@HOME@</string>
	<key>StandardOutPath</key>
	<string>@LOG_DIR@/tray.log</string>
	<key>StandardErrorPath</key>
	<string>@LOG_DIR@/tray.log</string>
	<key>EnvironmentVariables</key>
	<dict>
		<key>PYTHONUNBUFFERED</key>
		<string>1</string>
	</dict>
</dict>
</plist>
"""
)

TEMPLATES: dict[str, str] = {
    f"systemd/{SYSTEMD_UNITS['daemon']}": _SYSTEMD_DAEMON,
    f"systemd/{SYSTEMD_UNITS['tray']}": _SYSTEMD_TRAY,
    f"launchd/{LAUNCHD_LABELS['daemon']}.plist": _LAUNCHD_DAEMON,
    f"launchd/{LAUNCHD_LABELS['tray']}.plist": _LAUNCHD_TRAY,
}
"""Template files by their path in the repository."""


def write_templates(root: Path) -> list[Path]:
    """Write the templates into ``root/systemd`` and ``root/launchd`` (to refresh the committed copies)."""
    written = []
    for rel, text in TEMPLATES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# ---- errors, commands -----------------------------------------------------------------------------------------


class ServiceError(RuntimeError):
    """Installing, removing or querying a service failed; the message says why and what to do."""


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a service-manager command, capturing its output (a missing program reads as exit status 127)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{' '.join(argv)}: no answer in 60 s")


def _why(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or result.stdout or "").strip()
    return text.splitlines()[-1] if text else f"exit status {result.returncode}"


# ---- this installation -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Installation:
    """What the generated files point at."""

    python: str
    """Absolute interpreter path, unresolved (a venv's bin/python symlink must stay inside the venv)."""
    home: Path
    log_dir: Path
    """Where launchd writes the services' output (systemd uses the journal)."""
    environment: tuple[tuple[str, str], ...] = ()
    """Extra environment for the services, beyond PYTHONUNBUFFERED=1."""

    @classmethod
    def current(
        cls, extra_env: Mapping[str, str] | None = None, *, environ: Mapping[str, str] | None = None
    ) -> Installation:
        environ = os.environ if environ is None else environ
        python = sys.executable
        if not python or not os.path.isabs(python):
            raise ServiceError(f"cannot tell which Python runs sottovoce (sys.executable is {python!r})")
        home = Path.home()
        env = {name: environ[name] for name in PASS_ENV if environ.get(name)}
        env.update(extra_env or {})
        for name in env:
            if not name or "=" in name or not name.replace("_", "").isalnum():
                raise ServiceError(f"bad environment variable name {name!r} (use letters, digits and _)")
        return cls(python, home, home / "Library" / "Logs" / "sottovoce", tuple(sorted(env.items())))

    def check(self, runner: Runner | None = None) -> None:
        """The interpreter exists and can import sottovoce (so the service will not crash-loop on start)."""
        if not os.path.isfile(self.python) or not os.access(self.python, os.X_OK):
            raise ServiceError(f"the interpreter {self.python} is not an executable file")
        result = (runner or run_command)([self.python, "-c", f"import {CLI_MODULE}"])
        if result.returncode != 0:
            raise ServiceError(f"{self.python} cannot import sottovoce: {_why(result)}")


def _sd_escape(value: str) -> str:
    """Escape a value for a systemd unit line: specifiers (%) always, and quote when needed."""
    value = value.replace("%", "%%")
    if any(c in value for c in " \t\"\\'$;") or not value:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _sd_exec_path(value: str) -> str:
    # ExecStart expands $VAR in the arguments, but not in the program path: only specifiers need escaping there.
    return _sd_escape(value)


def render_systemd(role: Role, inst: Installation) -> str:
    template = _SYSTEMD_DAEMON if role == "daemon" else _SYSTEMD_TRAY
    # Fill placeholders outside comments only: the comments keep naming them for people reading the file.
    python = _sd_exec_path(inst.python)
    text = "".join(
        line if line.startswith("#") else line.replace("@PYTHON@", python) for line in template.splitlines(True)
    )
    env_lines = "".join(f"Environment={_sd_escape(f'{k}={v}')}\n" for k, v in inst.environment)
    marker = "Environment=PYTHONUNBUFFERED=1\n"
    return text.replace(marker, marker + env_lines)


def render_launchd(role: Role, inst: Installation) -> str:
    template = _LAUNCHD_DAEMON if role == "daemon" else _LAUNCHD_TRAY
    # Fill placeholders in the XML body only: the comment keeps naming them for people reading the file.
    head, sep, body = template.partition("-->\n")
    body = (
        body.replace("@PYTHON@", xml_escape(inst.python))
        .replace("@HOME@", xml_escape(str(inst.home)))
        .replace("@LOG_DIR@", xml_escape(str(inst.log_dir)))
    )
    marker = "\t\t<key>PYTHONUNBUFFERED</key>\n\t\t<string>1</string>\n"
    env = "".join(
        f"\t\t<key>{xml_escape(k)}</key>\n\t\t<string>{xml_escape(v)}</string>\n" for k, v in inst.environment
    )
    return head + sep + body.replace(marker, marker + env)


# ---- service managers ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServiceFile:
    role: Role
    name: str
    """The unit name (systemd) or label (launchd)."""
    path: Path
    text: str


@dataclasses.dataclass(frozen=True)
class ServiceState:
    role: Role
    name: str
    path: Path
    installed: bool
    current: bool
    """The file on disk is what `service install` would write now."""
    loaded: bool
    running: bool
    pid: int | None = None
    detail: str = ""
    """The manager's own words (e.g. "active (running)", "failed", "not loaded")."""
    python: str | None = None
    """The interpreter the installed file runs (None when not installed or unreadable)."""


class Manager:
    kind = "none"
    logs_hint = ""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner: Runner = runner or run_command

    # overridden
    def directory(self) -> Path:
        raise NotImplementedError

    def file_name(self, role: Role) -> str:
        raise NotImplementedError

    def name(self, role: Role) -> str:
        raise NotImplementedError

    def render(self, role: Role, inst: Installation) -> str:
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why this manager cannot be used here (None when it can)."""
        raise NotImplementedError

    def activate(self, files: Sequence[ServiceFile], start: bool) -> list[str]:
        raise NotImplementedError

    def deactivate(self, files: Sequence[ServiceFile]) -> list[str]:
        raise NotImplementedError

    def query(self, role: Role) -> tuple[bool, bool, int | None, str]:
        """(loaded, running, pid, detail) as the manager sees it."""
        raise NotImplementedError

    def installed_python(self, text: str) -> str | None:
        raise NotImplementedError

    def after_removal(self) -> None:
        """Called once the files are gone (systemd: daemon-reload)."""

    # shared
    def path(self, role: Role) -> Path:
        return self.directory() / self.file_name(role)

    def files(self, inst: Installation, roles: Iterable[Role]) -> list[ServiceFile]:
        return [ServiceFile(r, self.name(r), self.path(r), self.render(r, inst)) for r in roles]

    def logs(self, role: Role) -> str:
        return self.logs_hint.format(name=self.name(role), role=role)


class SystemdUser(Manager):
    kind = "systemd"
    logs_hint = "journalctl --user -u {name}"
    settle_seconds = 2.0
    """How long `install` watches a started service for an immediate exit."""

    def __init__(self, runner: Runner | None = None, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(runner)
        self.environ = os.environ if environ is None else environ

    def directory(self) -> Path:
        base = self.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"

    def file_name(self, role: Role) -> str:
        return SYSTEMD_UNITS[role]

    def name(self, role: Role) -> str:
        return SYSTEMD_UNITS[role]

    def render(self, role: Role, inst: Installation) -> str:
        return render_systemd(role, inst)

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.runner(["systemctl", "--user", *args])

    def unavailable(self) -> str | None:
        result = self._ctl("show-environment")
        if result.returncode == 127:
            return "systemd's `systemctl` is not installed: this system does not use systemd"
        if result.returncode != 0:
            return (
                f"no systemd user instance is reachable ({_why(result)}); services need a login session that "
                "runs `systemd --user` (or `loginctl enable-linger $USER`)"
            )
        return None

    def _must(self, *args: str) -> None:
        result = self._ctl(*args)
        if result.returncode != 0:
            raise ServiceError(f"`systemctl --user {' '.join(args)}` failed: {_why(result)}")

    def activate(self, files: Sequence[ServiceFile], start: bool) -> list[str]:
        notes = []
        self._must("daemon-reload")
        for f in files:
            self._must("enable", f.name)
            if not start:
                notes.append(f"enabled {f.name} (not started: --no-start)")
                continue
            if f.role == "tray" and self._ctl("is-active", "graphical-session.target").returncode != 0:
                notes.append(
                    f"enabled {f.name}: it starts with your next graphical session (graphical-session.target is "
                    f"not active now; to start it now: systemctl --user import-environment DISPLAY XAUTHORITY "
                    f"WAYLAND_DISPLAY && systemctl --user start {f.name})"
                )
                continue
            self._must("restart", f.name)  # restart, not start: a reinstall must pick up the new file
            self._wait_started(f)
            notes.append(f"started {f.name} (enabled: starts at login)")
        return notes

    def _wait_started(self, f: ServiceFile) -> None:
        """A configuration error makes the process exit at once: catch that here rather than report success."""
        deadline = time.monotonic() + self.settle_seconds
        while True:
            _, running, _, detail = self.query(f.role)
            if not running or "auto-restart" in detail:
                raise ServiceError(f"{f.name} stopped right after starting ({detail}); see `{self.logs(f.role)} -n 50`")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.25)

    def deactivate(self, files: Sequence[ServiceFile]) -> list[str]:
        notes = []
        for f in files:
            result = self._ctl("disable", "--now", f.name)
            if result.returncode == 0:
                notes.append(f"stopped and disabled {f.name}")
            self._ctl("reset-failed", f.name)
        return notes

    def after_removal(self) -> None:
        self._ctl("daemon-reload")

    def query(self, role: Role) -> tuple[bool, bool, int | None, str]:
        props = "LoadState,ActiveState,SubState,MainPID"
        result = self._ctl("show", "--property", props, self.name(role))
        if result.returncode != 0:
            return False, False, None, f"unknown ({_why(result)})"
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        loaded = values.get("LoadState") == "loaded"
        active, sub = values.get("ActiveState", "?"), values.get("SubState", "?")
        pid = int(values["MainPID"]) if values.get("MainPID", "0").isdigit() and values["MainPID"] != "0" else None
        detail = f"{active} ({sub})" if loaded else values.get("LoadState", "not loaded")
        return loaded, active == "active", pid, detail

    def installed_python(self, text: str) -> str | None:
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                first = line.removeprefix("ExecStart=").strip()
                if first.startswith('"'):
                    end = first.find('"', 1)
                    while end > 0 and first[end - 1] == "\\":
                        end = first.find('"', end + 1)
                    first = first[1:end].replace('\\"', '"').replace("\\\\", "\\")
                else:
                    first = first.split()[0] if first else ""
                return first.replace("%%", "%")
        return None


class Launchd(Manager):
    kind = "launchd"
    logs_hint = "~/Library/Logs/sottovoce/{role}.log"

    def __init__(self, runner: Runner | None = None, uid: int | None = None) -> None:
        super().__init__(runner)
        self.uid = os.getuid() if uid is None else uid

    def directory(self) -> Path:
        return Path.home() / "Library" / "LaunchAgents"

    def file_name(self, role: Role) -> str:
        return f"{LAUNCHD_LABELS[role]}.plist"

    def name(self, role: Role) -> str:
        return LAUNCHD_LABELS[role]

    def render(self, role: Role, inst: Installation) -> str:
        return render_launchd(role, inst)

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    def unavailable(self) -> str | None:
        result = self.runner(["launchctl", "print", self.domain])
        if result.returncode == 127:
            return "`launchctl` is not installed: launchd exists only on macOS"
        if result.returncode != 0:
            return (
                f"no GUI login session for uid {self.uid} ({_why(result)}); LaunchAgents run in the "
                f"{self.domain} domain: log in at the Mac's screen first"
            )
        return None

    def activate(self, files: Sequence[ServiceFile], start: bool) -> list[str]:
        notes = []
        for f in files:
            if not start:
                notes.append(f"wrote {f.name} (not loaded: --no-start; it loads at your next login)")
                continue
            # Unload an older copy first: bootstrap refuses a label that is already loaded.
            self.runner(["launchctl", "bootout", f"{self.domain}/{f.name}"])
            self.runner(["launchctl", "enable", f"{self.domain}/{f.name}"])
            result = self.runner(["launchctl", "bootstrap", self.domain, str(f.path)])
            if result.returncode != 0:
                raise ServiceError(f"`launchctl bootstrap {self.domain} {f.path}` failed: {_why(result)}")
            notes.append(f"loaded {f.name} (runs now and at every login)")
        return notes

    def deactivate(self, files: Sequence[ServiceFile]) -> list[str]:
        notes = []
        for f in files:
            result = self.runner(["launchctl", "bootout", f"{self.domain}/{f.name}"])
            if result.returncode == 0:
                notes.append(f"unloaded {f.name}")
        return notes

    def query(self, role: Role) -> tuple[bool, bool, int | None, str]:
        result = self.runner(["launchctl", "print", f"{self.domain}/{self.name(role)}"])
        if result.returncode != 0:
            return False, False, None, "not loaded"
        state, pid = "?", None
        for line in result.stdout.splitlines():
            key, sep, value = line.strip().partition(" = ")
            if not sep:
                continue
            if key == "state" and state == "?":
                state = value.strip()
            elif key == "pid" and pid is None and value.strip().isdigit():
                pid = int(value)
        return True, state == "running", pid, state

    def installed_python(self, text: str) -> str | None:
        import plistlib

        try:
            data = plistlib.loads(text.encode("utf-8"))
            return str(data["ProgramArguments"][0])
        except Exception:
            return None


def manager_for(platform: str | None = None, runner: Runner | None = None) -> Manager:
    """The service manager of this kind of system; ServiceError where there is none."""
    platform = platform or sys.platform
    if platform == "darwin":
        return Launchd(runner)
    if platform.startswith("linux"):
        return SystemdUser(runner)
    raise ServiceError(
        f"no supported service manager on {platform}: sottovoce installs systemd user units (Linux) or "
        "LaunchAgents (macOS); start `sottovoce daemon` from your session's startup instead"
    )


# ---- the three operations --------------------------------------------------------------------------------------


def default_roles() -> list[Role]:
    """The daemon, plus the tray when the tray extra is installed (else its service would crash-loop)."""
    import importlib.util

    roles: list[Role] = ["daemon"]
    if all(importlib.util.find_spec(m) is not None for m in ("pystray", "sounddevice")):
        roles.append("tray")
    return roles


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(
    manager: Manager,
    inst: Installation,
    roles: Sequence[Role],
    *,
    start: bool = True,
    check_config: Callable[[], None] | None = None,
) -> list[str]:
    """Write the files and load them. Checks everything it can before writing anything.

    Raises ServiceError where the manager is missing or unreachable, the interpreter cannot import sottovoce, or
    the config is invalid (``check_config`` raises): a service that would crash-loop is never installed.
    """
    if (reason := manager.unavailable()) is not None:
        raise ServiceError(f"cannot install the services: {reason}")
    inst.check(manager.runner)
    if check_config is not None:
        check_config()
    files = manager.files(inst, roles)
    if isinstance(manager, Launchd):
        inst.log_dir.mkdir(parents=True, exist_ok=True)
    notes = []
    for f in files:
        _write_atomic(f.path, f.text)
        notes.append(f"wrote {f.path}")
    notes += manager.activate(files, start)
    notes += [f"logs: {manager.logs(f.role)}" for f in files]
    return notes


def uninstall(manager: Manager, roles: Sequence[Role]) -> list[str]:
    """Stop, disable and remove the files (those present); unreachable managers still get their files removed."""
    present = [ServiceFile(r, manager.name(r), manager.path(r), "") for r in roles if manager.path(r).exists()]
    if not present:
        return ["nothing to remove: no sottovoce service files in " + str(manager.directory())]
    reason = manager.unavailable()
    notes = manager.deactivate(present) if reason is None else [f"could not stop the services: {reason}"]
    for f in present:
        f.path.unlink()
        notes.append(f"removed {f.path}")
    if reason is None:
        manager.after_removal()
    return notes


def status(manager: Manager, inst: Installation | None, roles: Sequence[Role]) -> list[ServiceState]:
    reachable = manager.unavailable() is None
    states = []
    for role in roles:
        path = manager.path(role)
        try:
            text: str | None = path.read_text(encoding="utf-8")
        except OSError:
            text = None
        current = text is not None and inst is not None and text == manager.render(role, inst)
        if reachable:
            loaded, running, pid, detail = manager.query(role)
        else:
            loaded, running, pid, detail = False, False, None, "service manager not reachable"
        python = manager.installed_python(text) if text is not None else None
        states.append(
            ServiceState(
                role, manager.name(role), path, text is not None, current, loaded, running, pid, detail, python
            )
        )
    return states
