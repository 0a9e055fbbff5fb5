"""`sottovoce doctor`: check the installation piece by piece, one line per check with the fix.

Each check is a small function returning a :class:`Check` ``(ok, line, fix)``: ``ok`` is True (fine), False
(something is wrong: ``fix`` says what to do) or None (not checked, or not applicable here; ``line`` says why).
The checks take their inputs as arguments (endpoint, environment, a sounddevice module...) so each can be tested
with both outcomes; :func:`run_checks` wires them to this machine. Nothing here imports MLX unless ``load_models``.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import config, paths
from . import protocol as p
from .errors import DaemonUnavailable, SottovoceError, Timeout, VersionMismatch


class Check(NamedTuple):
    ok: bool | None
    line: str
    fix: str = ""


MARK = {True: "ok", False: "FAIL", None: "--"}


def format_check(check: Check) -> str:
    text = f"[{MARK[check.ok]:>4}] {check.line}"
    return f"{text}  -> fix: {check.fix}" if check.fix and check.ok is not True else text


# ---- config --------------------------------------------------------------------------------------------------


def check_config(
    config_path: Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Check, config.Settings]:
    """The config file and SOTTOVOCE_* variables load; returns the settings the other checks use (defaults on
    error)."""
    path = config_path or paths.config_file()
    try:
        settings, sources = config.load(config_path=path, environ=environ)
    except config.ConfigError as exc:
        return Check(False, f"config: {exc}", f"edit {path} (`sottovoce config show` re-checks it)"), config.Settings()
    unknown = config.unknown_env_vars(environ)
    from_file = sum(1 for s in sources.values() if s == str(path))
    from_env = sum(1 for s in sources.values() if s.startswith("env "))
    where = f"{path} ({from_file} set)" if path.exists() else f"no file at {path}, defaults"
    line = f"config: {where}, {from_env} from the environment"
    if unknown:
        return Check(None, f"{line}; ignored unknown variables: {', '.join(unknown)}", "check their spelling"), settings
    return Check(True, line), settings


# ---- daemon --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    """What asking the daemon gave: its hello and status replies, or the error."""

    endpoint: str
    info: p.Info | None = None
    report: p.Report | None = None
    error: SottovoceError | None = None


def probe_daemon(endpoint: str, timeout: float = 3.0) -> Probe:
    from .client import Client

    probe = Probe(endpoint)
    try:
        with Client(endpoint, timeout=timeout, connect_timeout=timeout, name="sottovoce-doctor") as client:
            probe.info = client.hello()
            probe.report = client.status()
    except SottovoceError as exc:
        probe.error = exc
    return probe


def daemon_pid(endpoint: str) -> int | None:
    """The pid written in the daemon's lock file, when that process still exists (and on Linux, is sottovoce)."""
    from sottovoce.daemon.lock import EndpointLock

    try:
        lock = EndpointLock.for_endpoint(endpoint, paths.runtime_dir())
        pid = int(lock.path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        with contextlib.suppress(OSError):
            if b"sottovoce" not in cmdline.read_bytes():
                return None  # the pid was reused by something else
    return pid


START_FIX = "start it: `sottovoce daemon` (foreground) or `sottovoce service install` (at login)"


def check_daemon(probe: Probe, pid: int | None = None) -> Check:
    """The daemon answers `hello` with our protocol major version."""
    if probe.info is not None:
        info = probe.info
        return Check(
            True,
            f"daemon: sottovoce {info.version} at {probe.endpoint}, protocol {info.protocol} "
            f"(this client {p.PROTOCOL_VERSION})",
        )
    exc = probe.error
    if isinstance(exc, VersionMismatch):
        return Check(False, f"daemon: protocol mismatch at {probe.endpoint}: {exc}", "upgrade the older of the two")
    if pid is not None:
        return Check(
            False,
            f"daemon: process {pid} holds {probe.endpoint} but did not answer ({exc})",
            f"wait if it is still loading models, else restart it (`kill {pid}`, then start it again)",
        )
    ipc = paths.ipc_path(probe.endpoint)
    if isinstance(exc, DaemonUnavailable | Timeout) and ipc is not None and ipc.exists():
        return Check(False, f"daemon: not running (stale socket {ipc} left by a daemon that died)", START_FIX)
    return Check(False, f"daemon: not running at {probe.endpoint}", START_FIX)


def check_socket(endpoint: str, uid: int | None = None) -> Check:
    """The ipc socket and its directory are owner-only (others could otherwise connect or replace it)."""
    uid = os.getuid() if uid is None else uid
    if endpoint.startswith("tcp://"):
        host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "localhost", "::1"):
            return Check(None, f"socket: {endpoint} is TCP loopback: every local user can reach it, not just you")
        return Check(False, f"socket: {endpoint} is not loopback; the daemon refuses it", "use ipc:// (the default)")
    ipc = paths.ipc_path(endpoint)
    if ipc is None:
        return Check(False, f"socket: unsupported endpoint {endpoint!r}", "use ipc://PATH or tcp://127.0.0.1:PORT")
    folder = ipc.parent
    try:
        st = folder.stat()
    except FileNotFoundError:
        return Check(None, f"socket: {folder} does not exist yet (the daemon creates it, mode 700)")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != uid:
        return Check(
            False,
            f"socket: {folder} belongs to uid {st.st_uid}, not to you (uid {uid})",
            f"remove {folder} (another user made it) or set another endpoint",
        )
    if mode & 0o077:
        return Check(
            False, f"socket: {folder} is mode {mode:o}: other users can reach the socket", f"chmod 700 {folder}"
        )
    try:
        sst = ipc.lstat()
    except FileNotFoundError:
        return Check(True, f"socket: {folder} is private (mode {mode:o}); no socket yet")
    if not stat.S_ISSOCK(sst.st_mode):
        return Check(False, f"socket: {ipc} is not a socket", f"remove {ipc} and restart the daemon")
    if sst.st_uid != uid:
        return Check(False, f"socket: {ipc} belongs to uid {sst.st_uid}, not to you", f"remove {ipc}")
    return Check(True, f"socket: {ipc} (mode {stat.S_IMODE(sst.st_mode):o}) in a private directory (mode {mode:o})")


# ---- models --------------------------------------------------------------------------------------------------

ROLE_LABEL = {"whisper": "whisper model", "llm": "chat model"}
MODELS_FIX = "`sottovoce models fetch-defaults`, `sottovoce models import PATH`, or set {key} in the config"


def check_model(role: str, settings: config.Settings, report: p.Report | None = None) -> Check:
    """The model can be found for its engine (store name, file or folder with the right files, or a cached hub id)
    and, when the daemon is up, the daemon loaded it. A model that vanished while the daemon had it unloaded shows up
    here. Says which engine runs it and why."""
    from sottovoce.daemon import engines
    from sottovoce.daemon.models.errors import ModelLoadError

    label, key = ROLE_LABEL[role], f"{role}_model"
    fix = MODELS_FIX.format(key=key)
    state = (report.models.get(role) if report is not None else None) or {}
    if state.get("error"):
        return Check(False, f"{label}: the daemon could not load {state.get('name', '?')}: {state['error']}", fix)
    if state.get("loaded"):  # what the running daemon has is the truth, whatever this shell's settings say
        engine = f"{state.get('engine', '?')} ({state.get('engine_reason', '')})"
        return Check(True, f"{label}: {state.get('name', '?')} on {engine}, loaded in the daemon")
    try:
        plan = engines.plan_stt(settings) if role == "whisper" else engines.plan_llm(settings)
    except ModelLoadError as exc:
        return Check(False, f"{label}: {exc}", fix)
    where = plan.describe()
    model = Path(plan.model)
    if plan.engine == "openai":
        return Check(True, f"{label}: {where} (the daemon checks the server when it loads)")
    if not model.exists() and plan.convert is None:
        if not engines.hub_cached(plan.model):
            return Check(
                False,
                f"{label}: {plan.model} is a hub id that is not downloaded; the daemon would need the internet",
                f"download it (`huggingface-cli download {plan.model}`) or {fix}",
            )
        where += " (hub cache)"
    elif (problem := _weights_problem(plan, role)) is not None:
        return Check(False, f"{label}: {plan.model}: {problem}", f"re-import it: {fix}")
    running = ", present (not loaded in the daemon right now)" if report is not None else ", present"
    return Check(True, f"{label}: {where}{running}")


def _weights_problem(plan: Any, role: str) -> str | None:
    """Why the engine could not load the planned files (truncated, missing), or None."""
    from sottovoce.daemon.models import gguf_header
    from sottovoce.daemon.models.errors import ModelImportError
    from sottovoce.daemon.models.store import safetensors_dtype

    if plan.convert is not None:
        return None  # converted for MLX on first load, from a store entry checked when it was imported
    folder = Path(plan.model)
    if plan.engine == "faster-whisper":
        return None if (folder / "model.bin").is_file() else "no model.bin in the folder"
    if plan.engine == "llama.cpp":
        try:
            gguf_header.read_scalars(folder)
        except ModelImportError as exc:
            return str(exc)
        return None
    pattern = "weights.safetensors" if role == "whisper" else "model*.safetensors"
    files = sorted(folder.glob(pattern))
    if not files and role == "whisper" and (folder / "weights.npz").is_file():
        return None
    if not files:
        return f"no {pattern} in the folder"
    for f in files:
        if safetensors_dtype(f) == "unknown":
            return f"{f.name} is unreadable or truncated"
    return None


def check_model_loads(role: str, settings: config.Settings) -> Check:
    """Load the model for real in this process (slow; `doctor --load`, when no daemon is running)."""
    from sottovoce.daemon.backends.factory import build_backends
    from sottovoce.daemon.blas import preload_openblas

    label = ROLE_LABEL[role]
    preload_openblas()
    transcriber, chat = build_backends(settings)
    model: Any = transcriber if role == "whisper" else chat
    try:
        model.load()
    except Exception as exc:
        return Check(False, f"{label}: {model.name} does not load: {exc}", MODELS_FIX.format(key=f"{role}_model"))
    return Check(True, f"{label}: {model.name} loads")


# ---- OpenBLAS ------------------------------------------------------------------------------------------------

OPENBLAS_FIX = "install OpenBLAS (Debian/Ubuntu: `sudo apt install libopenblas0-pthread`), then restart the daemon"


def _uses_mlx(settings: config.Settings) -> bool:
    from sottovoce.daemon import engines

    return "mlx" in (
        engines.choose_engine("stt", settings.stt_engine)[0],
        engines.choose_engine("llm", settings.llm_engine)[0],
    )


def check_openblas(
    pid: int | None,
    platform: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    uses_mlx: bool = True,
) -> Check:
    """On Linux CPU, MLX should run on OpenBLAS, not its bundled reference BLAS (~30x slower on matmuls)."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    if not uses_mlx:
        return Check(None, "OpenBLAS: not needed (no stage runs on MLX)")
    if not platform.startswith("linux"):
        return Check(None, "OpenBLAS: not needed here (MLX uses Accelerate and Metal on macOS)")
    if environ.get("SOTTOVOCE_OPENBLAS", "1").strip() == "0":
        return Check(None, "OpenBLAS: disabled by SOTTOVOCE_OPENBLAS=0 (MLX uses its slow bundled BLAS)")
    if pid is not None:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return Check(None, f"OpenBLAS: cannot read the daemon's memory map ({exc.strerror})")
        libs = {line.split()[-1] for line in maps.splitlines() if line.count(" ") >= 5}
        if any("libcublas" in os.path.basename(lib) for lib in libs):
            return Check(None, f"OpenBLAS: not needed, the daemon (pid {pid}) runs MLX on CUDA")
        blas = sorted(lib for lib in libs if "libopenblas" in os.path.basename(lib))
        if blas:
            return Check(True, f"OpenBLAS: the daemon (pid {pid}) uses {blas[0]}")
        return Check(False, f"OpenBLAS: the daemon (pid {pid}) runs MLX on its slow bundled BLAS", OPENBLAS_FIX)
    found = find_openblas()
    if found is None:
        return Check(False, "OpenBLAS: not installed; MLX would use its slow bundled BLAS", OPENBLAS_FIX)
    return Check(True, f"OpenBLAS: {found} (the daemon loads it at start)")


def find_openblas() -> str | None:
    from sottovoce.daemon.blas import _CANDIDATES

    for candidate in _CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return ctypes.util.find_library("openblas")


# ---- microphone ----------------------------------------------------------------------------------------------


def _mic_fix(platform: str) -> str:
    if platform == "darwin":
        return (
            f"allow {sys.executable} in System Settings > Privacy & Security > Microphone "
            "(`tccutil reset Microphone` asks again), and check that the input is not muted"
        )
    return "unmute it and pick the right input (`pactl set-source-mute @DEFAULT_SOURCE@ 0`, or pavucontrol)"


def check_microphone(
    device: str | None = None,
    *,
    seconds: float = 0.5,
    timeout: float = 5.0,
    sd: Any = None,
    platform: str | None = None,
) -> Check:
    """Record ``seconds`` from the configured (or default) input; fail when there is none or it gives only zeros.

    The stream is aborted, never stopped: ``stop()`` can block forever when the source stops delivering.
    """
    platform = platform or sys.platform
    if sd is None:
        try:
            import sounddevice

            sd = sounddevice
        except ImportError:
            return Check(
                None,
                "microphone: not checked: sounddevice is not installed (the tray extra)",
                "pip install 'sottovoce[tray]' where the tray runs",
            )
        except OSError as exc:
            return Check(False, f"microphone: the PortAudio library is missing ({exc})", "install libportaudio2")
    try:
        info = sd.query_devices(device, "input")
    except (ValueError, sd.PortAudioError) as exc:
        try:
            inputs = [d["name"] for d in sd.query_devices() if d.get("max_input_channels", 0) > 0]
        except sd.PortAudioError:
            inputs = []
        if not inputs:
            return Check(
                False,
                "microphone: no input device (no microphone, or no sound server running)",
                "plug in a microphone, or start PulseAudio/PipeWire",
            )
        if device:
            return Check(
                False,
                f"microphone: {device!r} is not an input device here ({exc}); inputs: {', '.join(inputs)}",
                "set `microphone` in the config to one of those names, or leave it unset for the default",
            )
        return Check(False, f"microphone: no default input ({exc}); inputs: {', '.join(inputs)}", _mic_fix(platform))
    name = info.get("name", "?") if isinstance(info, Mapping) else str(info)
    rate = 16000
    need = int(seconds * rate)
    blocks: list[Any] = []
    got = 0
    done = threading.Event()

    def callback(indata: Any, frames: int, time_info: Any, status: Any) -> None:
        nonlocal got
        if done.is_set():
            return
        blocks.append(indata[:, 0].copy())
        got += frames
        if got >= need:
            done.set()

    try:
        stream = sd.InputStream(
            samplerate=rate, channels=1, dtype="float32", device=device, blocksize=1600, callback=callback
        )
    except (sd.PortAudioError, ValueError) as exc:
        return Check(False, f"microphone: cannot open {name!r}: {exc}", _mic_fix(platform))
    try:
        stream.start()
        arrived = done.wait(timeout)
    except sd.PortAudioError as exc:
        return Check(False, f"microphone: {name!r} fails to record: {exc}", _mic_fix(platform))
    finally:
        with contextlib.suppress(Exception):
            stream.abort()
        with contextlib.suppress(Exception):
            stream.close()
    if not arrived:
        return Check(
            False, f"microphone: {name!r} delivered {got / rate:.2f} s of audio in {timeout:g} s", _mic_fix(platform)
        )
    peak = max((float(abs(b).max()) for b in blocks if len(b)), default=0.0)
    if peak == 0.0:
        return Check(False, f"microphone: {name!r} delivers only zeros (muted, or access denied)", _mic_fix(platform))
    return Check(True, f"microphone: {name!r} records (peak {peak:.4f} over {got / rate:.2f} s)")


# ---- desktop: tray host, D-Bus, hotkeys -------------------------------------------------------------------------


def session_bus_path(environ: Mapping[str, str]) -> str | None:
    """The session bus socket (``\\0name`` if abstract), from DBUS_SESSION_BUS_ADDRESS or $XDG_RUNTIME_DIR/bus."""
    address = environ.get("DBUS_SESSION_BUS_ADDRESS", "")
    for part in address.split(";"):
        kind, _, params = part.partition(":")
        if kind != "unix":
            continue
        fields = dict(kv.split("=", 1) for kv in params.split(",") if "=" in kv)
        if "path" in fields:
            return fields["path"]
        if "abstract" in fields:
            return "\0" + fields["abstract"]
    runtime = environ.get("XDG_RUNTIME_DIR")
    if not address and runtime and Path(runtime, "bus").exists():
        return str(Path(runtime, "bus"))
    return None


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def xembed_tray_owner(display_name: str) -> bool | None:
    """Whether an XEmbed system tray (``_NET_SYSTEM_TRAY_S<screen>``) runs on the display; None if unknown."""
    try:
        from Xlib import X
        from Xlib.display import Display
    except ImportError:
        return None
    try:
        display = Display(display_name)
    except Exception:
        return None
    try:
        atom = display.intern_atom(f"_NET_SYSTEM_TRAY_S{display.get_default_screen()}")
        return bool(display.get_selection_owner(atom) != X.NONE)
    finally:
        display.close()


def sni_watcher(environ: Mapping[str, str]) -> bool | None:
    """Whether a StatusNotifierItem host (org.kde.StatusNotifierWatcher) is on the session bus; None if unknown."""
    argv = [
        "dbus-send",
        "--session",
        "--print-reply",
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.NameHasOwner",
        "string:org.kde.StatusNotifierWatcher",
    ]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, env=dict(environ), check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return "boolean true" in out.stdout


TRAY_FIX = (
    "run a desktop with a system tray (GNOME needs the AppIndicator extension; under a bare window manager start "
    "a tray such as trayer or stalonetray)"
)


def check_tray_host(
    environ: Mapping[str, str] | None = None,
    platform: str | None = None,
    *,
    xembed: Callable[[str], bool | None] = xembed_tray_owner,
    sni: Callable[[Mapping[str, str]], bool | None] = sni_watcher,
) -> Check:
    """A session D-Bus and a system tray host (XEmbed or StatusNotifierItem) for the tray icon."""
    environ = os.environ if environ is None else environ
    platform = platform or sys.platform
    if platform == "darwin":
        return Check(True, "tray host: the macOS menu bar")
    display, wayland = environ.get("DISPLAY"), environ.get("WAYLAND_DISPLAY")
    if not display and not wayland:
        return Check(
            False,
            "tray host: no graphical session (DISPLAY and WAYLAND_DISPLAY unset)",
            "run the tray inside your desktop session",
        )
    bus = session_bus_path(environ)
    bus_ok = bus is not None and _can_connect(bus)
    bus_text = "D-Bus session bus reachable" if bus_ok else "no D-Bus session bus"
    hosts = []
    if display and xembed(display):
        hosts.append(f"XEmbed tray on {display}")
    if bus_ok and sni(environ):
        hosts.append("StatusNotifierItem watcher")
    if hosts:
        return Check(True, f"tray host: {' and '.join(hosts)}; {bus_text}")
    if not bus_ok:
        return Check(
            False,
            f"tray host: {bus_text} (DBUS_SESSION_BUS_ADDRESS) and no XEmbed tray found",
            "start the tray from your desktop session (it provides the bus), or `dbus-run-session`",
        )
    return Check(False, f"tray host: {bus_text}, but no system tray host is running", TRAY_FIX)


def x_display_record(display_name: str) -> bool | None:
    """Whether the X server can be opened and has the RECORD extension (pynput's listener needs it)."""
    try:
        from Xlib.display import Display
    except ImportError:
        return None
    try:
        display = Display(display_name)
    except Exception:
        return False
    try:
        return bool(display.has_extension("RECORD"))
    finally:
        display.close()


def macos_accessibility_trusted() -> bool | None:
    try:
        lib = ctypes.cdll.LoadLibrary("/System/Library/Frameworks/ApplicationServices.framework/ApplicationServices")
        return bool(lib.AXIsProcessTrusted())
    except (OSError, AttributeError):
        return None


def check_hotkey(
    environ: Mapping[str, str] | None = None,
    platform: str | None = None,
    *,
    have_pynput: bool | None = None,
    x_record: Callable[[str], bool | None] = x_display_record,
    ax_trusted: Callable[[], bool | None] = macos_accessibility_trusted,
) -> Check:
    """The global hotkey backend (pynput) can see key presses: X11 yes, Wayland no, macOS with Accessibility."""
    import importlib.util

    environ = os.environ if environ is None else environ
    platform = platform or sys.platform
    if have_pynput is None:
        have_pynput = importlib.util.find_spec("pynput") is not None
    if not have_pynput:
        return Check(
            None, "hotkey: not checked: pynput is not installed (the tray extra)", "pip install 'sottovoce[tray]'"
        )
    if platform == "darwin":
        trusted = ax_trusted()
        if trusted is False:
            return Check(
                False,
                f"hotkey: {sys.executable} may not watch the keyboard",
                "allow it in System Settings > Privacy & Security > Accessibility (and Input Monitoring)",
            )
        return Check(True if trusted else None, "hotkey: pynput on macOS" + ("" if trusted else " (access unknown)"))
    session = environ.get("XDG_SESSION_TYPE", "")
    display, wayland = environ.get("DISPLAY"), environ.get("WAYLAND_DISPLAY")
    if session == "wayland" or (wayland and not display):
        return Check(
            False,
            "hotkey: Wayland session: global hotkeys via pynput see only keys typed into X11 (XWayland) windows",
            "bind a desktop keyboard shortcut to `sottovoce record --toggle`, or log in to an X11 session",
        )
    if not display:
        return Check(False, "hotkey: no X display (DISPLAY unset)", "run the tray inside your X11 desktop session")
    record = x_record(display)
    if record is None:
        return Check(None, f"hotkey: X11 on {display} (python-xlib missing, not probed)")
    if not record:
        return Check(
            False,
            f"hotkey: cannot use the X display {display} (unreachable, or no RECORD extension)",
            "check DISPLAY/XAUTHORITY, and that the X server enables the RECORD extension",
        )
    return Check(True, f"hotkey: X11 on {display} with the RECORD extension (pynput works)")


# ---- services ------------------------------------------------------------------------------------------------


def check_service(state: Any, manager_kind: str, logs: str = "") -> Check:
    """One service (a service.ServiceState): not installed is fine; installed must point at a Python that exists
    and be running."""
    label = f"service {state.role}"
    if not state.installed:
        return Check(None, f"{label}: not installed ({state.path})", "optional: `sottovoce service install`")
    if state.python and not os.access(state.python, os.X_OK):
        return Check(
            False,
            f"{label}: {state.path} runs {state.python}, which no longer exists",
            "reinstall from the current environment: `sottovoce service install`",
        )
    if state.running:
        pid = f", pid {state.pid}" if state.pid else ""
        stale = "" if state.current else " (file differs from what `service install` writes now)"
        return Check(True, f"{label}: {state.name} {state.detail}{pid}{stale}")
    restart = f"systemctl --user restart {state.name}" if manager_kind == "systemd" else "`sottovoce service install`"
    if state.role == "tray" and manager_kind == "systemd" and "inactive" in state.detail:
        return Check(
            None,
            f"{label}: {state.name} installed, not running ({state.detail}); it starts with the graphical session",
        )
    see = f"; logs: {logs}" if logs else ""
    return Check(False, f"{label}: {state.name} installed but not running ({state.detail})", f"{restart}{see}")


def service_checks() -> list[Check]:
    from . import service

    try:
        manager = service.manager_for()
    except service.ServiceError as exc:
        return [Check(None, f"services: {exc}")]
    reason = manager.unavailable()
    try:
        inst: service.Installation | None = service.Installation.current()
    except service.ServiceError:
        inst = None
    states = service.status(manager, inst, service.ROLES)
    if reason is not None and not any(s.installed for s in states):
        return [Check(None, f"services: not installed ({reason})")]
    return [check_service(s, manager.kind, manager.logs(s.role)) for s in states]


# ---- everything ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    endpoint: str | None = None
    timeout: float = 3.0
    microphone: bool = True
    load_models: bool = False


def run_checks(opts: Options) -> list[Check]:
    checks: list[Check] = []
    config_check, settings = check_config()
    checks.append(config_check)
    endpoint = opts.endpoint or settings.endpoint
    probe = probe_daemon(endpoint, opts.timeout)
    pid = daemon_pid(endpoint)
    checks.append(check_daemon(probe, pid))
    checks.append(check_socket(endpoint))
    for role in ("whisper", "llm"):
        check = check_model(role, settings, probe.report)
        if check.ok and opts.load_models and probe.info is None:
            check = check_model_loads(role, settings)
        checks.append(check)
    checks.append(check_openblas(pid, uses_mlx=_uses_mlx(settings)))
    if opts.microphone:
        checks.append(check_microphone(settings.microphone))
    else:
        checks.append(Check(None, "microphone: not checked (--no-mic)"))
    checks.append(check_tray_host())
    checks.append(check_hotkey())
    checks.extend(service_checks())
    return checks


def report(checks: Sequence[Check], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([c._asdict() for c in checks], ensure_ascii=False, indent=1)
    return "\n".join(format_check(c) for c in checks)


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.ok is False for c in checks) else 0
