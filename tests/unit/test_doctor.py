"""`sottovoce doctor`: every check with both outcomes (fine and broken), plus the command's output and exit status.

The daemon checks run against the real Server on an ipc socket with the fake models; the desktop checks at the end
run against the headless desktop (Xvfb, trayer, D-Bus, PulseAudio's virtual microphone) when it is installed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeChat, FakeTranscriber  # type: ignore[import-not-found]
from inproc import RunningServer  # type: ignore[import-not-found]

from sottovoce.client import cli, doctor
from sottovoce.client import protocol as p
from sottovoce.client.config import Settings
from sottovoce.client.doctor import Check, Probe
from sottovoce.client.errors import DaemonUnavailable, VersionMismatch

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("SOTTOVOCE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SOTTOVOCE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("SOTTOVOCE_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- config ----------------------------------------------------------------------------------------------------


def test_config_ok_and_broken(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    check, settings = doctor.check_config(cfg, environ={})
    assert check.ok is True and "defaults" in check.line and settings == Settings(endpoint=settings.endpoint)
    cfg.write_text("max_tokens = 12\n")
    check, settings = doctor.check_config(cfg, environ={"SOTTOVOCE_LANGUAGE": "en"})
    assert check.ok is True and "(1 set), 1 from the environment" in check.line and settings.max_tokens == 12
    cfg.write_text("max_tokens = 0\n")
    check, settings = doctor.check_config(cfg, environ={})
    assert check.ok is False and "max_tokens must be between" in check.line and str(cfg) in check.fix
    assert settings.max_tokens == 256  # the other checks go on with the defaults
    check, _ = doctor.check_config(tmp_path / "none.toml", environ={"SOTTOVOCE_LANGUGE": "en"})
    assert check.ok is None and "SOTTOVOCE_LANGUGE" in check.line


# ---- daemon and socket ------------------------------------------------------------------------------------------


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    return f"ipc://{folder}/d.sock"


def wait_ready(endpoint: str) -> Probe:
    deadline = time.monotonic() + 10
    while True:
        probe = doctor.probe_daemon(endpoint, timeout=2)
        if (probe.report is not None and probe.report.models.get("ready")) or time.monotonic() > deadline:
            return probe
        time.sleep(0.05)


def test_no_daemon(endpoint: str) -> None:
    probe = doctor.probe_daemon(endpoint, timeout=0.5)
    assert isinstance(probe.error, DaemonUnavailable) and probe.info is None
    check = doctor.check_daemon(probe)
    assert check.ok is False and check.line == f"daemon: not running at {endpoint}"
    assert "sottovoce daemon" in check.fix and "service install" in check.fix


def test_stale_socket_and_hung_daemon(endpoint: str) -> None:
    path = endpoint.removeprefix("ipc://")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)  # a socket file nobody serves, as a killed daemon leaves
    probe = doctor.probe_daemon(endpoint, timeout=0.3)
    assert "stale socket" in doctor.check_daemon(probe).line
    check = doctor.check_daemon(probe, pid=4321)
    assert check.ok is False and "process 4321 holds" in check.line and "kill 4321" in check.fix


def test_protocol_mismatch_is_reported() -> None:
    probe = Probe("ipc:///x", error=VersionMismatch("the daemon speaks protocol 2.0, this client 1.0"))
    check = doctor.check_daemon(probe)
    assert check.ok is False and "protocol mismatch" in check.line and "upgrade" in check.fix


def test_daemon_up_with_fake_models(endpoint: str, tmp_path: Path) -> None:
    whisper_dir = fake_whisper(tmp_path / "w")
    settings = Settings(endpoint=endpoint)
    with RunningServer(endpoint, settings, FakeTranscriber(), FakeChat()):
        probe = wait_ready(endpoint)
        check = doctor.check_daemon(probe)
        assert check.ok is True and f"at {endpoint}, protocol {p.PROTOCOL_VERSION}" in check.line
        assert doctor.check_socket(endpoint).ok is True
        check = doctor.check_model("whisper", Settings(whisper_model=str(whisper_dir), stt_engine="mlx"), probe.report)
        assert check.ok is True and check.line.endswith("loaded in the daemon")
        assert "fake-whisper on fake (unit test)" in check.line  # the engine the daemon reports


def test_daemon_that_could_not_load_a_model(endpoint: str, tmp_path: Path) -> None:
    with RunningServer(endpoint, Settings(endpoint=endpoint), FakeTranscriber(fail_load="weights gone"), FakeChat()):
        probe = wait_ready(endpoint)
    settings = Settings(whisper_model=str(fake_whisper(tmp_path / "w")), stt_engine="mlx")
    check = doctor.check_model("whisper", settings, probe.report)
    assert check.ok is False and "could not load fake-whisper: weights gone" in check.line
    assert "models fetch-defaults" in check.fix


def test_daemon_pid_from_the_lock_file(endpoint: str) -> None:
    lock = Path(endpoint.removeprefix("ipc://") + ".lock")
    assert doctor.daemon_pid(endpoint) is None
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "sottovoce-daemon-standin"])
    try:
        lock.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10  # until the child has exec'd (before, /proc shows our own command line)
        while b"standin" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert doctor.daemon_pid(endpoint) == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert doctor.daemon_pid(endpoint) is None  # dead
    lock.write_text(f"{os.getpid()}\n")
    if b"sottovoce" not in Path("/proc/self/cmdline").read_bytes():
        assert doctor.daemon_pid(endpoint) is None  # alive, but not a sottovoce process (pid reused)


def test_socket_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    check = doctor.check_socket(f"ipc://{folder}/d.sock")
    assert check.ok is False and "mode 755" in check.line and check.fix == f"chmod 700 {folder}"
    folder.chmod(0o700)
    assert doctor.check_socket(f"ipc://{folder}/d.sock").ok is True
    check = doctor.check_socket(f"ipc://{folder}/d.sock", uid=os.getuid() + 1)
    assert check.ok is False and "not to you" in check.line
    (folder / "d.sock").write_text("not a socket")
    assert "is not a socket" in doctor.check_socket(f"ipc://{folder}/d.sock").line
    assert doctor.check_socket(f"ipc://{tmp_path}/missing/d.sock").ok is None
    assert doctor.check_socket("tcp://127.0.0.1:5555").ok is None
    assert doctor.check_socket("tcp://0.0.0.0:5555").ok is False


# ---- models ------------------------------------------------------------------------------------------------------


def safetensors(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")


def fake_whisper(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"n_mels": 80}))
    safetensors(folder / "weights.safetensors")
    return folder


def fake_llm(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    safetensors(folder / "model.safetensors")
    return folder


MLX = {"stt_engine": "mlx", "llm_engine": "mlx"}


def test_model_folders_present_truncated_and_vanished(tmp_path: Path) -> None:
    whisper = fake_whisper(tmp_path / "w")
    llm = fake_llm(tmp_path / "models" / "tiny-chat")  # in the store: found by name
    assert doctor.check_model("whisper", Settings(whisper_model=str(whisper), **MLX)).ok is True
    check = doctor.check_model("llm", Settings(llm_model="tiny-chat", **MLX))
    assert check.ok is True and check.line.startswith(f"chat model: mlx (chosen in the settings): {llm}")
    (whisper / "weights.safetensors").write_bytes(b"\x10\x00")
    check = doctor.check_model("whisper", Settings(whisper_model=str(whisper), **MLX))
    assert check.ok is False and "unreadable or truncated" in check.line
    for f in llm.iterdir():
        f.unlink()
    llm.rmdir()  # deleted while the daemon had it unloaded: the next reload would fail
    check = doctor.check_model("llm", Settings(llm_model="tiny-chat", **MLX))
    assert check.ok is False and "no llm model 'tiny-chat'" in check.line and "fetch-defaults" in check.fix


def test_model_of_the_wrong_kind_or_an_uncached_hub_id(tmp_path: Path) -> None:
    whisper = fake_whisper(tmp_path / "w")
    assert doctor.check_model("llm", Settings(llm_model=str(whisper), **MLX)).ok is False
    check = doctor.check_model("llm", Settings(llm_model="some-org/some-model", **MLX))
    assert check.ok is False and "hub id that is not downloaded" in check.line


def test_fast_engine_models_and_what_they_need(tmp_path: Path) -> None:
    fast = {"stt_engine": "faster-whisper", "llm_engine": "llama.cpp"}
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"\0")
    (ct2 / "config.json").write_text("{}")
    check = doctor.check_model("whisper", Settings(whisper_model=str(ct2), **fast))
    assert check.ok is True and check.line.startswith(f"whisper model: faster-whisper (chosen in the settings): {ct2}")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    assert doctor.check_model("llm", Settings(llm_model=str(gguf), **fast)).ok is True
    gguf.write_bytes(b"GGUF" + struct.pack("<IQ", 3, 0))  # cut short
    check = doctor.check_model("llm", Settings(llm_model=str(gguf), **fast))
    assert check.ok is False and "cut short" in check.line
    # An MLX folder is not something faster-whisper runs: the line says which engine would.
    check = doctor.check_model("whisper", Settings(whisper_model=str(fake_whisper(tmp_path / "w")), **fast))
    assert check.ok is False and "--stt-engine mlx" in check.line
    assert doctor.check_openblas(None, platform="linux", environ={}, uses_mlx=False).ok is None


# ---- OpenBLAS ----------------------------------------------------------------------------------------------------


def test_openblas_not_applicable_or_disabled() -> None:
    assert doctor.check_openblas(None, platform="darwin").ok is None
    assert doctor.check_openblas(None, platform="linux", environ={"SOTTOVOCE_OPENBLAS": "0"}).ok is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_openblas_in_a_running_process() -> None:
    if doctor.find_openblas() is None:
        pytest.skip("no OpenBLAS on this machine")
    from sottovoce.daemon.blas import openblas_in_use, preload_openblas

    preload_openblas()
    if openblas_in_use():  # conftest preloads it unless mlx came first
        check = doctor.check_openblas(os.getpid(), environ={})
        assert check.ok is True and "libopenblas" in check.line
    proc = subprocess.Popen(["sleep", "30"])
    try:
        check = doctor.check_openblas(proc.pid, environ={})
    finally:
        proc.kill()
        proc.wait()
    assert check.ok is False and "slow bundled BLAS" in check.line and "libopenblas0-pthread" in check.fix


def test_openblas_without_a_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "find_openblas", lambda: None)
    check = doctor.check_openblas(None, platform="linux", environ={})
    assert check.ok is False and "not installed" in check.line
    monkeypatch.setattr(doctor, "find_openblas", lambda: "/usr/lib/libopenblas.so.0")
    assert doctor.check_openblas(None, platform="linux", environ={}).ok is True


# ---- microphone (a fake sounddevice module) ---------------------------------------------------------------------


class FakeSD:
    class PortAudioError(Exception):
        pass

    def __init__(self, devices: list[dict[str, Any]], signal: float = 0.0, *, deliver: bool = True) -> None:
        self.devices = devices
        self.signal = signal
        self.deliver = deliver
        self.aborted = False
        sd = self

        class InputStream:
            def __init__(self, *, samplerate: int, channels: int, dtype: str, device: Any, blocksize: int, callback):
                if device is not None and not any(d["name"] == device for d in sd.devices):
                    raise sd.PortAudioError("Error opening InputStream: Invalid device")
                self.callback, self.blocksize = callback, blocksize

            def start(self) -> None:
                def feed() -> None:
                    for _ in range(10):
                        block = np.full((self.blocksize, 1), sd.signal, np.float32)
                        self.callback(block, self.blocksize, None, None)

                if sd.deliver:
                    threading.Thread(target=feed, daemon=True).start()

            def abort(self) -> None:
                sd.aborted = True

            def close(self) -> None:
                pass

        self.InputStream = InputStream

    def query_devices(self, device: Any = None, kind: str | None = None) -> Any:
        if kind is None:
            return self.devices
        inputs = [d for d in self.devices if d["max_input_channels"] > 0]
        if device is None:
            if not inputs:
                raise self.PortAudioError("Error querying device -1")
            return inputs[0]
        for d in inputs:
            if d["name"] == device:
                return d
        raise ValueError(f"No input device matching {device!r}")


MIC = {"name": "USB Mic", "max_input_channels": 1}
SPEAKER = {"name": "Speakers", "max_input_channels": 0}


def test_microphone_records_sound() -> None:
    sd = FakeSD([SPEAKER, MIC], signal=0.25)
    check = doctor.check_microphone(sd=sd)
    assert check.ok is True and "'USB Mic' records (peak 0.2500" in check.line and sd.aborted


def test_microphone_delivering_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    check = doctor.check_microphone(sd=FakeSD([MIC], signal=0.0), platform="linux")
    assert check.ok is False and "only zeros" in check.line and "pactl set-source-mute" in check.fix
    check = doctor.check_microphone(sd=FakeSD([MIC], signal=0.0), platform="darwin")
    assert "Privacy & Security > Microphone" in check.fix


def test_no_microphone_at_all() -> None:
    check = doctor.check_microphone(sd=FakeSD([SPEAKER]))
    assert check.ok is False and "no input device" in check.line


def test_configured_microphone_missing() -> None:
    check = doctor.check_microphone("Studio Mic", sd=FakeSD([MIC]))
    assert check.ok is False and "'Studio Mic' is not an input device" in check.line and "USB Mic" in check.line


def test_microphone_that_never_delivers() -> None:
    check = doctor.check_microphone(sd=FakeSD([MIC], deliver=False), timeout=0.2)
    assert check.ok is False and "delivered 0.00 s of audio in 0.2 s" in check.line


def test_microphone_without_sounddevice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import raises ImportError
    check = doctor.check_microphone()
    assert check.ok is None and "sounddevice is not installed" in check.line


# ---- tray host and hotkey ----------------------------------------------------------------------------------------


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "bus")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        yield path


def test_session_bus_address_parsing(tmp_path: Path) -> None:
    assert (
        doctor.session_bus_path({"DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1/bus,guid=ab"}) == "/run/user/1/bus"
    )
    assert doctor.session_bus_path({"DBUS_SESSION_BUS_ADDRESS": "unix:abstract=/tmp/dbus-x"}) == "\0/tmp/dbus-x"
    (tmp_path / "bus").touch()
    assert doctor.session_bus_path({"XDG_RUNTIME_DIR": str(tmp_path)}) == str(tmp_path / "bus")
    assert doctor.session_bus_path({}) is None


def test_tray_host_found(bus: str) -> None:
    env = {"DISPLAY": ":5", "DBUS_SESSION_BUS_ADDRESS": f"unix:path={bus}"}
    check = doctor.check_tray_host(env, "linux", xembed=lambda d: True, sni=lambda e: False)
    assert check.ok is True and "XEmbed tray on :5" in check.line and "D-Bus session bus reachable" in check.line
    check = doctor.check_tray_host(env, "linux", xembed=lambda d: False, sni=lambda e: True)
    assert check.ok is True and "StatusNotifierItem" in check.line
    assert doctor.check_tray_host({}, "darwin").ok is True


def test_tray_host_missing(bus: str, tmp_path: Path) -> None:
    env = {"DISPLAY": ":5", "DBUS_SESSION_BUS_ADDRESS": f"unix:path={bus}"}
    check = doctor.check_tray_host(env, "linux", xembed=lambda d: False, sni=lambda e: False)
    assert check.ok is False and "no system tray host" in check.line and "AppIndicator" in check.fix
    env = {"DISPLAY": ":5", "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/nobus"}
    check = doctor.check_tray_host(env, "linux", xembed=lambda d: False, sni=lambda e: False)
    assert check.ok is False and "no D-Bus session bus" in check.line
    check = doctor.check_tray_host({}, "linux")
    assert check.ok is False and "no graphical session" in check.line


def test_hotkey_backends() -> None:
    x11 = {"DISPLAY": ":1", "XDG_SESSION_TYPE": "x11"}
    check = doctor.check_hotkey(x11, "linux", have_pynput=True, x_record=lambda d: True)
    assert check.ok is True and "X11 on :1" in check.line
    check = doctor.check_hotkey(x11, "linux", have_pynput=True, x_record=lambda d: False)
    assert check.ok is False and "RECORD" in check.fix
    wayland = {"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"}
    check = doctor.check_hotkey(wayland, "linux", have_pynput=True, x_record=lambda d: True)
    assert check.ok is False and "Wayland" in check.line and "sottovoce record --toggle" in check.fix
    assert doctor.check_hotkey({}, "linux", have_pynput=True).ok is False
    assert doctor.check_hotkey(x11, "linux", have_pynput=False).ok is None
    assert doctor.check_hotkey({}, "darwin", have_pynput=True, ax_trusted=lambda: False).ok is False
    assert doctor.check_hotkey({}, "darwin", have_pynput=True, ax_trusted=lambda: True).ok is True


# ---- services ----------------------------------------------------------------------------------------------------


def state(**kw: Any) -> Any:
    from sottovoce.client.service import ServiceState

    base = dict(
        role="daemon", name="sottovoce-daemon.service", path=Path("/u/sottovoce-daemon.service"), installed=True,
        current=True, loaded=True, running=True, pid=7, detail="active (running)", python=sys.executable,
    )  # fmt: skip
    return ServiceState(**{**base, **kw})


def test_service_checks() -> None:
    assert doctor.check_service(state(installed=False, python=None), "systemd").ok is None
    check = doctor.check_service(state(), "systemd")
    assert check.ok is True and "active (running), pid 7" in check.line
    check = doctor.check_service(state(running=False, detail="failed (failed)"), "systemd")
    assert check.ok is False and "systemctl --user restart sottovoce-daemon.service" in check.fix
    check = doctor.check_service(state(python="/gone/venv/bin/python"), "systemd")
    assert check.ok is False and "no longer exists" in check.line and "service install" in check.fix
    tray = state(role="tray", name="sottovoce-tray.service", running=False, detail="inactive (dead)")
    assert doctor.check_service(tray, "systemd").ok is None  # waits for the graphical session
    assert doctor.check_service(state(running=False, detail="not loaded"), "launchd").ok is False


# ---- output and the command --------------------------------------------------------------------------------------


def test_format_and_exit_code() -> None:
    checks = [Check(True, "a: fine"), Check(None, "b: skipped", "maybe"), Check(False, "c: broken", "do X")]
    assert doctor.report(checks).splitlines() == [
        "[  ok] a: fine",
        "[  --] b: skipped  -> fix: maybe",
        "[FAIL] c: broken  -> fix: do X",
    ]
    assert doctor.exit_code(checks) == 1 and doctor.exit_code(checks[:2]) == 0
    assert json.loads(doctor.report(checks, as_json=True))[2] == {"ok": False, "line": "c: broken", "fix": "do X"}


def test_doctor_command_fails_without_a_daemon(endpoint: str, capsys) -> None:
    assert cli.main(["doctor", "--no-mic", "--timeout", "0.5", "--endpoint", endpoint, "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)
    by_name = {c["line"].split(":")[0]: c for c in checks}
    assert by_name["daemon"]["ok"] is False
    assert by_name["microphone"]["ok"] is None
    assert {"config", "socket", "whisper model", "chat model", "OpenBLAS", "tray host", "hotkey"} <= set(by_name)


def test_doctor_command_with_a_daemon(endpoint: str, tmp_path: Path, capsys) -> None:
    whisper, llm = fake_whisper(tmp_path / "w"), fake_llm(tmp_path / "l")
    (tmp_path / "config.toml").write_text(f'whisper_model = "{whisper}"\nllm_model = "{llm}"\n')
    with RunningServer(endpoint, Settings(endpoint=endpoint), FakeTranscriber(), FakeChat()):
        wait_ready(endpoint)
        cli.main(["doctor", "--no-mic", "--endpoint", endpoint])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[  ok] config:")
    assert lines[1].startswith("[  ok] daemon: sottovoce test at")
    assert lines[3].startswith("[  ok] whisper model:") and lines[4].startswith("[  ok] chat model:")


# ---- the real desktop -----------------------------------------------------------------------------------------


def _desktop() -> Any:
    if str(TESTS / "desktop") not in sys.path:
        sys.path.insert(0, str(TESTS / "desktop"))
    import desktop_env  # type: ignore[import-not-found]

    missing = desktop_env.Desktop.missing()
    if missing:
        pytest.skip(f"headless desktop not installed (missing {', '.join(missing)})")
    return desktop_env.Desktop


def mic_check_in(env: dict[str, str]) -> dict[str, Any]:
    """PortAudio reads the sound server's address when sounddevice is imported: ask a fresh process."""
    code = "import json; from sottovoce.client import doctor; print(json.dumps(doctor.check_microphone(timeout=8)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ok, line, fix = json.loads(out.stdout)
    return {"ok": ok, "line": line, "fix": fix}


def tone_wav(path: Path, seconds: float = 8.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.mark.desktop
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_desktop_checks_for_real(tmp_path: Path) -> None:
    Desktop = _desktop()
    with Desktop() as desk:
        check = doctor.check_tray_host(desk.env, "linux")
        assert check.ok is True and "XEmbed tray on" in check.line and "bus reachable" in check.line
        check = doctor.check_hotkey({**desk.env, "XDG_SESSION_TYPE": "x11"}, "linux", have_pynput=True)
        assert check.ok is True, check
        silent = mic_check_in(desk.env)  # the virtual mic with nothing playing: digital silence
        assert silent["ok"] is False and "only zeros" in silent["line"], silent
        player = threading.Thread(target=desk.play, args=(tone_wav(tmp_path / "tone.wav"),), daemon=True)
        player.start()
        time.sleep(0.3)
        heard = mic_check_in(desk.env)
        player.join(30)
        assert heard["ok"] is True and "records (peak" in heard["line"], heard
    with Desktop(tray_host=False, notifications=False) as desk:
        check = doctor.check_tray_host(desk.env, "linux")
        assert check.ok is False and "no system tray host is running" in check.line


@pytest.mark.slow
def test_doctor_load_loads_the_models_for_real(tiny_whisper_dir: Path, tiny_llm_dir: Path, tmp_path: Path) -> None:
    settings = Settings(whisper_model=str(tiny_whisper_dir), llm_model=str(tiny_llm_dir), **MLX)
    check = doctor.check_model_loads("whisper", settings)
    assert check.ok is True and check.line.startswith("whisper model:") and check.line.endswith("loads")
    assert doctor.check_model_loads("llm", settings).ok is True
    broken = fake_llm(tmp_path / "l")  # the right files, but no real weights in them
    check = doctor.check_model_loads("llm", Settings(llm_model=str(broken), **MLX))
    assert check.ok is False and "does not load" in check.line
