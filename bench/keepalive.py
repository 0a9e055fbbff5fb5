"""Keep-alive: the daemon's memory with the models loaded and after they unloaded, and what the first ask after an
unload costs, with and without a `warm` sent when recording starts (as the tray does on hotkey-down).

    .venv/bin/python bench/keepalive.py        # updates the keep-alive section of bench/README.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SOTTOVOCE_MODELS_DIR", str(ROOT / ".work" / "models"))

from daemon_proc import DaemonProcess  # noqa: E402
from speech import say  # noqa: E402

from sottovoce.client import protocol as p  # noqa: E402

KEEP_ALIVE = 4.0
QUESTION = "What is the capital of France?"
BEGIN, END = "<!-- keepalive:begin -->", "<!-- keepalive:end -->"


def ask(daemon: DaemonProcess, pcm: np.ndarray, *, warm_first: bool = False) -> float:
    """Seconds from the last chunk to the first answer chunk. With ``warm_first``, `warm` goes out as recording
    starts and the audio follows at real-time pace (so loading overlaps the speech)."""
    with daemon.client(timeout=300) as client:
        client.reset()
        if warm_first:
            client.warm()  # the tray's hotkey-down message
        started = time.perf_counter()
        for offset in range(0, pcm.size, p.CHUNK_SAMPLES):
            if warm_first:
                time.sleep(max(0.0, started + (offset + p.CHUNK_SAMPLES) / p.SAMPLE_RATE - time.perf_counter()))
            client.send_chunk(pcm[offset : offset + p.CHUNK_SAMPLES])
        sent = time.perf_counter()
        for event in client.stream(max_tokens=16):
            if isinstance(event, p.AnswerChunk | p.Done):
                return time.perf_counter() - sent
    raise AssertionError("no answer")


def memory(daemon: DaemonProcess) -> tuple[float, bool]:
    with daemon.client(timeout=30) as client:
        report = client.status()
    loaded = report.models["whisper"]["loaded"] and report.models["llm"]["loaded"]
    return report.memory_bytes / 2**20, loaded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--whisper", default="whisper-tiny.en")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "README.md")
    args = parser.parse_args()
    pcm = np.concatenate([say(QUESTION), np.zeros(6400, np.float32)])
    flags = ["--whisper-keep-alive", str(KEEP_ALIVE), "--llm-keep-alive", str(KEEP_ALIVE)]
    daemon = DaemonProcess(Path(tempfile.mkdtemp()), whisper_model=args.whisper, llm_model=args.llm, extra_args=flags)
    daemon.start()
    try:
        ask(daemon, pcm)  # warm-up
        warm_latency = min(ask(daemon, pcm) for _ in range(3))
        loaded_mb, _ = memory(daemon)
        rows = []
        for label, warm_first in (("after unload", False), ("after unload, `warm` at recording start", True)):
            deadline = time.monotonic() + 60
            while memory(daemon)[1] and time.monotonic() < deadline:
                time.sleep(0.5)
            unloaded_mb, still_loaded = memory(daemon)
            assert not still_loaded, "keep-alive did not unload the models"
            rows.append((label, unloaded_mb, ask(daemon, pcm, warm_first=warm_first)))
    finally:
        daemon.stop()
    report = "\n".join(
        [
            "## Keep-alive: idle memory and the first ask after an unload",
            "",
            f"Whisper `{args.whisper}` + `{args.llm}`, keep-alive {KEEP_ALIVE:g} s for both; a {pcm.size / 16000:.1f} s "
            f"spoken question; time from the last chunk to the first answer chunk. Load average {os.getloadavg()[0]:.1f}. "
            "Made by `bench/keepalive.py`.",
            "",
            "| state | daemon RSS | last chunk -> first answer chunk | vs models loaded |",
            "|---|---|---|---|",
            f"| models loaded | {loaded_mb:.0f} MiB | {warm_latency:.2f} s | 1.00x |",
            *(f"| {label} | {mb:.0f} MiB | {secs:.2f} s | {secs / warm_latency:.2f}x |" for label, mb, secs in rows),
        ]
    )
    text = args.out.read_text()
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    args.out.write_text(f"{head}{BEGIN}\n{report}\n{END}{rest.split(END, 1)[1]}")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
