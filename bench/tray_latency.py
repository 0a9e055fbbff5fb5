"""Latency through the real tray: global hotkey -> microphone -> daemon -> answer, on the headless desktop.

    .venv/bin/python bench/tray_latency.py [--turns 5] [--real/--fake] [--json out.json]

Starts the desktop of tests/desktop (Xvfb, trayer, D-Bus, PulseAudio virtual mic), a daemon (the real small
models from the store: $SOTTOVOCE_MODELS_DIR, else .work/models; or fake models to see the tray's own share), and
`sottovoce tray`; then, per turn: holds
the push-to-talk key with `xdotool keydown`, plays espeak-ng speech into the virtual mic, releases it, and reads the
tray's timings for the turn from its history file. All times are CLOCK_MONOTONIC, shared by the processes.

Measured, per microphone mode (kept open with pre-roll, the default; or opened at the press, `preroll 0`):
- xdotool -> tray: from running `xdotool keydown` to pynput delivering the key to the tray;
- down -> first chunk: from the key event to the first 4096-sample chunk sent to the daemon;
- down -> first live chunk: ... to the first chunk holding audio captured after the press;
- up -> transcript, up -> first answer chunk, up -> done: from the key release event to those replies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "desktop"))

from desktop_env import Desktop  # noqa: E402

BIN = Path(sys.executable).parent
PTT = "ctrl+alt+space"
QUESTION = "What is the capital of France?"
METRICS = (
    ("key_event", "xdotool → tray key event"),
    ("down_to_first_chunk", "key down → first chunk sent"),
    ("down_to_first_live_chunk", "key down → first chunk of post-press audio"),
    ("up_to_ask", "key up → ask sent (audio up to the release captured)"),
    ("up_to_transcript", "key up → transcript"),
    ("up_to_first_answer", "key up → first answer chunk"),
    ("up_to_done", "key up → answer done"),
)


def run_mode(
    desktop: Desktop, root: Path, *, real: bool, preroll: float, turns: int, wav: Path
) -> list[dict[str, Any]]:
    root.mkdir(parents=True)
    runtime = root / "rt"
    runtime.mkdir(mode=0o700)
    endpoint = f"ipc://{runtime}/daemon.sock"
    history = root / "history.jsonl"
    env = dict(desktop.env)
    env.update(
        SOTTOVOCE_RUNTIME_DIR=str(runtime),
        SOTTOVOCE_CONFIG=str(root / "config.toml"),
        SOTTOVOCE_HISTORY=str(history),
        PYSTRAY_BACKEND="gtk",
        HF_HUB_OFFLINE="1",
        SOTTOVOCE_MODELS_DIR=os.environ.get("SOTTOVOCE_MODELS_DIR") or str(REPO / ".work" / "models"),
    )
    if real:
        daemon_cmd = [
            str(BIN / "sottovoce"), "daemon", "--endpoint", endpoint,
            "--whisper-model", "whisper-tiny.en", "--llm-model", "smollm2-135m-instruct",
        ]  # fmt: skip
    else:
        daemon_cmd = [sys.executable, str(REPO / "tests" / "desktop" / "fake_daemon.py"), endpoint]
    logs = [open(root / n, "wb") for n in ("daemon.log", "tray.log")]  # noqa: SIM115
    daemon = subprocess.Popen(daemon_cmd, env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    tray = subprocess.Popen(
        [str(BIN / "sottovoce"), "tray", "--endpoint", endpoint, "--preroll-seconds", str(preroll),
         "--log-file", str(root / "tray-file.log")],
        env=env, stdout=logs[1], stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_ready(endpoint, env)
        _wait_tray(runtime)
        results = []
        for n in range(turns + (1 if real else 0)):  # with real models, one warm-up turn first
            t_down = time.monotonic()
            desktop.run("xdotool", "keydown", PTT)
            time.sleep(0.3)
            desktop.play(wav)
            time.sleep(0.3)
            t_up = time.monotonic()
            desktop.run("xdotool", "keyup", PTT)
            entry = _wait_entry(history, n + 1)
            timings = entry.get("timings", {})
            entry["key_event"] = round(timings.get("key_down", t_down) - t_down, 4)
            entry["xdotool_up_to_transcript"] = round(timings.get("transcript", t_up) - t_up, 4)
            if real and n == 0:
                continue
            results.append(entry)
            time.sleep(0.5)
        return results
    finally:
        for proc in (tray, daemon):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in logs:
            f.close()


def _wait_ready(endpoint: str, env: dict[str, str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run([str(BIN / "sottovoce"), "status", "--endpoint", endpoint, "--timeout", "2"],
                           env=env, capture_output=True)  # fmt: skip
        if r.returncode == 0:
            return
        time.sleep(0.5)
    raise SystemExit("the daemon did not get ready")


def _wait_tray(runtime: Path, timeout: float = 30) -> None:
    from sottovoce.tray import control

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = control.send_command("status", runtime_dir=runtime)
            if state.get("look") == "idle" and state.get("mic_ready"):
                return
        except control.TrayNotRunning:
            pass
        time.sleep(0.1)
    raise SystemExit("the tray did not connect")


def _wait_entry(history: Path, n: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if history.exists():
            lines = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
            if len(lines) >= n:
                return lines[n - 1]
        time.sleep(0.05)
    raise SystemExit(f"turn {n} was not answered")


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    names = list(runs)
    out = ["| median (min-max), seconds | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRICS:
        cells = []
        for name in names:
            values = [e[key] for e in runs[name] if isinstance(e.get(key), int | float)]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("| transcript (last turn) | " + " | ".join(repr(runs[n][-1]["transcript"]) for n in names) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=True, help="real small models")
    parser.add_argument("--fake", action=argparse.BooleanOptionalAction, default=True, help="fake models too")
    parser.add_argument("--json", type=Path, help="write every turn's entry here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: dict[str, list[dict[str, Any]]] = {}
    print(f"load average at the start (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sv-bench-") as tmp, Desktop() as desktop:
        wav = Path(tmp) / "q.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), QUESTION], check=True)
        plan = []
        if args.fake:
            plan += [("fake models, mic kept open (pre-roll 0.3 s)", False, 0.3),
                     ("fake models, mic opened at press", False, 0.0)]  # fmt: skip
        if args.real:
            plan += [("real models, mic kept open (pre-roll 0.3 s)", True, 0.3),
                     ("real models, mic opened at press", True, 0.0)]  # fmt: skip
        for n, (name, real, preroll) in enumerate(plan):
            print(f"== {name}", file=sys.stderr, flush=True)
            runs[name] = run_mode(desktop, Path(tmp) / f"run{n}", real=real, preroll=preroll, turns=args.turns, wav=wav)
    print(table(runs))
    print(f"\nload average at the end (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
