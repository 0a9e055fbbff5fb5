"""A headless desktop for the tray's end-to-end tests: Xvfb, a private D-Bus session, a notification server,
a system-tray host (trayer) and PulseAudio with a virtual microphone.

The Python twin of ``/work/shared/recipes/desktop-env.sh`` (GUIDE section 4): nothing here touches the
environment of the process that starts it; every child gets ``Desktop.env``. PulseAudio has three devices:

- ``vspk``: a null sink the tests play speech into (``paplay -d vspk file.wav``);
- ``vmic``: the default source, a remap of ``vspk.monitor``: the tray's "microphone";
- ``vout``: the default sink, so nothing the app plays can leak into the mic.

Use as a context manager; ``Desktop.missing()`` names the binaries that are absent (the tests skip on those).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

BINARIES = (
    "Xvfb",
    "xdotool",
    "trayer",
    "xwininfo",
    "dbus-daemon",
    "pulseaudio",
    "pactl",
    "paplay",
    "espeak-ng",
    "xclip",
)
NOTIFICATION_DAEMON = "/usr/lib/notification-daemon/notification-daemon"
SCREEN = (1024, 768)


# xwininfo -tree:      0x600003 "sottovoce: Ready": ("sottovoce" "Sottovoce")  32x30+0+0  +991+737
_WINDOW_LINE = re.compile(
    r'^\s*0x[0-9a-f]+ (?:"(?P<name>.*)"|\(has no name\)):\s+\((?:"(?P<instance>[^"]*)" "(?P<cls>[^"]*)")?\)'
    r"\s+(?P<w>\d+)x(?P<h>\d+)[+-]-?\d+[+-]-?\d+\s+\+(?P<x>-?\d+)\+(?P<y>-?\d+)\s*$"
)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies, even by SIGKILL (Linux), so a
    killed test run leaves no X server or sound server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class DesktopError(RuntimeError):
    pass


class Desktop:
    def __init__(self, *, tray_host: bool = True, notifications: bool = True, pulse: bool = True) -> None:
        self.tray_host = tray_host
        self.notifications = notifications
        self.pulse = pulse
        self._pulse: subprocess.Popen[bytes] | None = None
        self.run_dir = Path(tempfile.mkdtemp(prefix="sv-desk-"))
        self.env: dict[str, str] = {}
        self._procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def missing() -> list[str]:
        return [b for b in BINARIES if shutil.which(b) is None]

    # ---- lifecycle ----
    def __enter__(self) -> Desktop:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> None:
        xdg = self.run_dir / "xdg"
        home = self.run_dir / "home"
        for d in (xdg, home):
            d.mkdir(mode=0o700)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "PULSE_SERVER")
        }
        env.update(XDG_RUNTIME_DIR=str(xdg), NO_AT_BRIDGE="1", GDK_BACKEND="x11")
        self.env = env

        # 1) X server on a free display number (-displayfd picks one and writes it to us).
        read_fd, write_fd = os.pipe()
        self._spawn(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
            "xvfb",
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            display = pipe.readline().strip()
        if not display:
            raise DesktopError(f"Xvfb did not start: {self._log('xvfb')}")
        env["DISPLAY"] = f":{display}"

        # 2) private D-Bus session bus (pystray's gtk backend and notifications need one).
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={self.run_dir / 'bus'}"
        self._spawn(
            ["dbus-daemon", "--session", f"--address={env['DBUS_SESSION_BUS_ADDRESS']}", "--nofork", "--nopidfile"],
            "dbus",
        )
        self._wait(lambda: (self.run_dir / "bus").exists(), "the D-Bus session bus", 5)

        # 3) a notification server, so icon.notify() shows a bubble.
        if self.notifications and os.access(NOTIFICATION_DAEMON, os.X_OK):
            self._spawn([NOTIFICATION_DAEMON], "notify")

        # 4) PulseAudio without hardware: vspk (tests play here) -> vmic (the mic); vout for the app's output.
        if self.pulse:
            self.start_pulse()

        # 5) the system-tray host (owns _NET_SYSTEM_TRAY_S0), docked bottom right (notification bubbles show top
        #    right, so they never cover the icon in a screenshot).
        if self.tray_host:
            self._spawn(
                ["trayer", "--edge", "bottom", "--align", "right", "--widthtype", "request", "--height", "32",
                 "--SetDockType", "true", "--transparent", "false", "--tint", "0x333333", "--expand", "true"],
                "trayer",
            )  # fmt: skip
            self._wait(lambda: self.tray_window() is not None, "the trayer tray host", 10)

    def start_pulse(self) -> None:
        env = self.env
        self._pulse = self._spawn(
            [
                "pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                f"--log-target=file:{self.run_dir / 'pulse-server.log'}",
                "-L", "module-native-protocol-unix",
                "-L", "module-null-sink sink_name=vspk rate=16000 channels=1 "
                "sink_properties=device.description=TestMicFeed",
                "-L", "module-remap-source master=vspk.monitor source_name=vmic "
                "source_properties=device.description=VirtualMic",
                "-L", "module-null-sink sink_name=vout sink_properties=device.description=AppOutput",
            ],
            "pulse",
            extra_env={"HOME": str(self.run_dir / "home")},
        )  # fmt: skip
        self._wait(lambda: self._ok(["pactl", "info"]), "PulseAudio", 10)
        subprocess.run(["pactl", "set-default-source", "vmic"], env=env, check=True, capture_output=True)
        subprocess.run(["pactl", "set-default-sink", "vout"], env=env, check=True, capture_output=True)

    def kill_pulse(self) -> None:
        """The sound server dies (every device vanishes at once)."""
        if self._pulse is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._pulse.pid, signal.SIGKILL)
            self._pulse.wait(5)
            self._procs.remove(self._pulse)
            self._pulse = None

    def down(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in reversed(self._procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._procs.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---- helpers for tests ----
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), env=self.env, check=check, capture_output=True, text=True, timeout=timeout)

    def windows(self, instance: str) -> list[tuple[int, int, int, int]]:
        """(x, y, width, height) on screen of every window whose WM_CLASS instance is ``instance``."""
        out = self.run("xwininfo", "-root", "-tree", check=False).stdout
        found = []
        for line in out.splitlines():
            m = _WINDOW_LINE.match(line)
            if m and m["instance"] == instance:
                found.append((int(m["x"]), int(m["y"]), int(m["w"]), int(m["h"])))
        return found

    def visible_windows(self, instance: str) -> list[tuple[int, int, int, int]]:
        """Like ``windows`` but only those mapped and viewable now (a closed menu stays in the tree, unmapped)."""
        ids = self.run("xdotool", "search", "--onlyvisible", "--classname", f"^{instance}$", check=False).stdout
        found = []
        for wid in ids.split():
            info = self.run("xwininfo", "-id", wid, check=False).stdout
            fields = dict(
                (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.splitlines()) if v
            )
            try:
                found.append(
                    (
                        int(fields["Absolute upper-left X"]),
                        int(fields["Absolute upper-left Y"]),
                        int(fields["Width"]),
                        int(fields["Height"]),
                    )
                )
            except (KeyError, ValueError):
                continue
        return found

    def tray_window(self) -> tuple[int, int, int, int] | None:
        """trayer's panel, or None."""
        panels = self.windows("panel")
        return panels[0] if panels else None

    def play(self, wav: Path) -> None:
        """Play ``wav`` into the virtual microphone; returns when PulseAudio has taken all of it."""
        self.run("paplay", "-d", "vspk", str(wav), timeout=120)

    # ---- plumbing ----
    def _spawn(
        self,
        cmd: list[str],
        name: str,
        *,
        pass_fds: tuple[int, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            cmd,
            env={**self.env, **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            start_new_session=True,  # its own process group, so down() can end it and its children
            preexec_fn=die_with_parent,
        )
        log.close()
        self._procs.append(proc)
        return proc

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def _wait(self, ready: object, what: str, timeout: float) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise DesktopError(f"{what} did not come up within {timeout:g} s")
