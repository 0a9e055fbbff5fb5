"""Engines benchmark: MLX against faster-whisper + llama.cpp (and the seed design on the fast engines), on the real
daemon, same weights, one run with the engines interleaved.

Each configuration is a real daemon subprocess. Speech (espeak-ng) is streamed into it at real-time pace in
4096-sample chunks, as the tray does, and the key is released 0.3 s after the speech ends; times are from key-up to
the final transcript, the first answer chunk and done. Rounds go through every configuration in turn, so the
machine's load (it is shared) falls on all of them alike. Reported: medians with min-max, word error rates, the
daemon's resident memory with both models loaded, the load average, and the answers of the two chat engines to a
fixed set of typed questions. Also the daemon's overhead against the same engine calls in this process.

    .venv/bin/python bench/engines.py                       # writes bench/engines.md
    .venv/bin/python bench/engines.py --rounds 1 --configs fast-tiny mlx-tiny   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SOTTOVOCE_MODELS_DIR", str(ROOT / ".work" / "models"))

from daemon_proc import DaemonProcess  # noqa: E402
from speech import say  # noqa: E402

from sottovoce.client import config  # noqa: E402
from sottovoce.client import protocol as p  # noqa: E402

RATE = p.SAMPLE_RATE
CHUNK = p.CHUNK_SAMPLES
RELEASE_SECONDS = 0.3
MAX_TOKENS = 32
LLM = "smollm2-135m-instruct"

SHORT_QUESTIONS = [  # 2.1-2.8 s each when espeak-ng says them
    "Can you tell me what the capital of France is?",
    "How far away is the Moon from the Earth?",
    "Who wrote the play Romeo and Juliet?",
    "How long should I boil an egg for breakfast?",
    "What is the tallest mountain in the whole world?",
    "Please set a reminder for tomorrow morning at eight.",
]
LONG_SENTENCES = [
    "I am planning a trip to Europe next spring.",
    "I would like to see a few famous cities and museums.",
    "My budget is limited, so I want to travel by train.",
    "I also enjoy good food and long walks in old towns.",
    "Last year I visited Italy and loved the coffee there.",
    "This time I have about two weeks of holiday.",
    "What is the capital of France?",
]
TYPED_QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Germany?", "berlin"),
    ("How many days are in a week?", "seven|7"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is two plus two?", "four|4"),
    ("Which planet do we live on?", "earth"),
]


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    label: str
    whisper: str
    flags: tuple[str, ...]
    stream: bool = True
    long: bool = True
    """Also measured on the 20 s request."""


FAST = ("--stt-engine", "faster-whisper", "--llm-engine", "llama.cpp")
MLX = ("--stt-engine", "mlx", "--llm-engine", "mlx")
SEED = ("--no-incremental", "--no-prompt-cache", "--history-turns", "0")
CONFIGS = {
    c.name: c
    for c in (
        Config("fast-tiny", "faster-whisper int8 + llama.cpp, tiny.en", "whisper-tiny.en", FAST),
        Config(
            "fast-tiny-f32",
            "faster-whisper float32 + llama.cpp, tiny.en",
            "whisper-tiny.en",
            (*FAST, "--whisper-compute-type", "float32"),
            long=False,
        ),
        Config("fast-base", "faster-whisper int8 + llama.cpp, base", "whisper-base", FAST),
        Config(
            "seed-fast",
            "seed design on faster-whisper + llama.cpp, tiny.en",
            "whisper-tiny.en",
            (*FAST, *SEED),
            stream=False,
        ),
        Config("mlx-tiny", "MLX (mlx-whisper + mlx-lm), tiny.en", "whisper-tiny.en", MLX),
        Config("mlx-base", "MLX (mlx-whisper + mlx-lm), base", "whisper-base", MLX, long=False),
    )
}


def long_request() -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(20)
    parts, words = [], []
    for sentence in LONG_SENTENCES:
        parts += [say(sentence), np.zeros(int(rng.uniform(0.3, 0.7) * RATE), np.float32)]
        words.append(sentence)
    return np.concatenate(parts[:-1]), " ".join(words)


def play_and_ask(daemon: DaemonProcess, speech: np.ndarray, *, stream: bool) -> dict[str, Any]:
    """Stream ``speech`` + the release pause at real-time pace, then ask; seconds from key-up to each event."""
    recording = np.concatenate([speech, np.zeros(int(RELEASE_SECONDS * RATE), np.float32)])
    with daemon.client(timeout=300) as client:
        client.reset()
        start = time.perf_counter()
        for offset in range(0, recording.size, CHUNK):
            block = recording[offset : offset + CHUNK]
            time.sleep(max(0.0, start + (offset + block.size) / RATE - time.perf_counter()))
            client.send_chunk(block)
        key_up = time.perf_counter()
        times: dict[str, Any] = {}
        for event in client.stream(max_tokens=MAX_TOKENS, temperature=0.0, stream=stream):
            now = time.perf_counter() - key_up
            if isinstance(event, p.Transcript):
                times["transcript"] = now
                times["text"] = event.text
            elif isinstance(event, p.AnswerChunk) and "first" not in times:
                times["first"] = now
            elif isinstance(event, p.Done):
                times["done"] = now
                times.setdefault("first", now)  # unstreamed: the first word arrives with the rest
                times["answer"] = event.answer
                times["ask_to_done"] = event.seconds.get("total", now)
    return times


def typed(daemon: DaemonProcess, question: str) -> str:
    with daemon.client(timeout=120) as client:
        client.reset()
        return client.ask(question, max_tokens=MAX_TOKENS, temperature=0.0).answer


def memory(daemon: DaemonProcess) -> int:
    with daemon.client(timeout=10) as client:
        return client.status().memory_bytes


def norm(text: str) -> str:
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    import jiwer

    return float(jiwer.wer([norm(r) for r, _ in pairs], [norm(h) for _, h in pairs]))


class InProcess:
    """The seed pipeline on the fast engines called directly in the benchmark's process (transcribe the recording,
    then the whole answer, no prompt cache): the baseline for the daemon's overhead, run between the daemon turns."""

    def __init__(self, whisper: str) -> None:
        from sottovoce.daemon import engines
        from sottovoce.daemon.backends.factory import build_chat_model, build_transcriber

        settings = config.Settings(
            whisper_model=whisper,
            llm_model=LLM,
            stt_engine="faster-whisper",
            llm_engine="llama.cpp",
            prompt_cache=False,
        )
        self.stt = build_transcriber(engines.plan_stt(settings), settings)
        self.chat = build_chat_model(engines.plan_llm(settings), settings)
        self.stt.load()
        self.chat.load()

    def turn(self, speech: np.ndarray) -> float:
        from sottovoce.daemon.backends.base import ChatMessage

        recording = np.concatenate([speech, np.zeros(int(RELEASE_SECONDS * RATE), np.float32)])  # as the daemon gets it
        started = time.perf_counter()
        text = self.stt.transcribe(recording).text
        messages = [ChatMessage("system", config.DEFAULT_SYSTEM_PROMPT), ChatMessage("user", text)]
        for _step in self.chat.stream(messages, max_tokens=MAX_TOKENS, temperature=0.0, should_stop=lambda: False):
            pass
        return time.perf_counter() - started


def stat(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all configurations (>= 5 for the record)")
    parser.add_argument("--short", type=int, default=2, help="short questions per configuration and round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "engines.md")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    configs = [CONFIGS[name] for name in args.configs]
    shorts = [say(q) for q in SHORT_QUESTIONS]
    long_pcm, long_text = long_request()
    load_start = os.getloadavg()
    loads: list[float] = []
    direct_runs: list[float] = []
    direct = InProcess("whisper-tiny.en") if "seed-fast" in args.configs else None
    daemons: dict[str, DaemonProcess] = {}
    results: dict[str, dict[str, Any]] = {c.name: {"short": [], "long": [], "answers": []} for c in configs}
    try:
        for c in configs:
            daemon = DaemonProcess(
                Path(tempfile.mkdtemp(prefix=f"bench-{c.name}-")),
                whisper_model=c.whisper,
                llm_model=LLM,
                extra_args=list(c.flags),
            )
            daemons[c.name] = daemon.start(timeout=900)  # MLX converts the store's models on its first start
            play_and_ask(daemon, shorts[0], stream=c.stream)  # warm-up, not counted
            results[c.name]["rss"] = memory(daemon)
            print(f"started {c.name}: RSS {results[c.name]['rss'] / 2**20:.0f} MiB", flush=True)
        turn = 0
        for round_ in range(args.rounds):
            for k in range(args.short):
                index = (turn + k) % len(shorts)
                for c in configs:
                    loads.append(os.getloadavg()[0])
                    times = play_and_ask(daemons[c.name], shorts[index], stream=c.stream)
                    times["reference"] = SHORT_QUESTIONS[index]
                    results[c.name]["short"].append(times)
                    if c.name == "seed-fast" and direct is not None:
                        direct_runs.append(direct.turn(shorts[index]))
                    print(
                        f"r{round_} {c.name:13} short {json.dumps({k: v for k, v in times.items() if isinstance(v, float)})}",
                        flush=True,
                    )
            turn += args.short
            for c in configs:
                if c.long:
                    loads.append(os.getloadavg()[0])
                    times = play_and_ask(daemons[c.name], long_pcm, stream=c.stream)
                    results[c.name]["long"].append(times)
                    print(
                        f"r{round_} {c.name:13} long  {json.dumps({k: v for k, v in times.items() if isinstance(v, float)})}",
                        flush=True,
                    )
        for c in configs:
            if c.name in ("fast-tiny", "mlx-tiny"):
                results[c.name]["answers"] = [typed(daemons[c.name], q) for q, _ in TYPED_QUESTIONS]
            results[c.name]["rss_end"] = memory(daemons[c.name])
    finally:
        for daemon in daemons.values():
            daemon.stop()
    load_end = os.getloadavg()

    report = render(args, configs, results, direct_runs, long_pcm.size / RATE, long_text, (load_start, loads, load_end))
    args.out.write_text(report)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def render(args, configs, results, direct, long_seconds, long_text, loads) -> str:
    short_lengths = [say(q).size / RATE for q in SHORT_QUESTIONS]
    lines = [
        "# Engines: MLX against faster-whisper + llama.cpp",
        "",
        f"Made by `bench/engines.py` on {platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}. Chat model `{LLM}` (the registry's Q4_1 GGUF: "
        "llama.cpp runs it as it is, MLX a float32 copy converted from it); Whisper from the registry's CTranslate2 "
        "folders (MLX: float32 copies converted from them). Real daemon subprocesses, speech (espeak-ng) streamed at "
        f"real-time pace in {CHUNK}-sample chunks, key released {RELEASE_SECONDS} s after the speech; answers greedy, "
        f"at most {MAX_TOKENS} tokens. {args.rounds} rounds, each going through every configuration in turn "
        "(interleaved). Times in seconds from key-up: **median (min-max)**. "
        f"Load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in loads[0])} at the start and "
        f"{'/'.join(f'{x:.1f}' for x in loads[2])} at the end; the 1-min load at each turn's start: median "
        f"{statistics.median(loads[1]):.1f}, {min(loads[1]):.1f}-{max(loads[1]):.1f} (the machine is shared).",
        "",
        f"## (a) Short spoken questions ({min(short_lengths):.1f}-{max(short_lengths):.1f} s of speech), "
        f"{args.short * args.rounds} turns per row",
        "",
        "| configuration | key-up -> transcript | -> first answer chunk | -> done | WER | daemon RSS, models loaded |",
        "|---|---|---|---|---|---|",
    ]
    for c in configs:
        runs = results[c.name]["short"]
        wer = corpus_wer([(r["reference"], r.get("text", "")) for r in runs])
        lines.append(
            f"| {c.label} | {stat([r['transcript'] for r in runs])} | **{stat([r['first'] for r in runs])}** | "
            f"{stat([r['done'] for r in runs])} | {wer:.1%} | {results[c.name]['rss'] / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        f"## (b) A 20 s request ({long_seconds:.1f} s of speech with pauses, ending in a question), "
        f"{args.rounds} turns per row",
        "",
        "| configuration | key-up -> transcript | -> first answer chunk | -> done | WER |",
        "|---|---|---|---|---|",
    ]
    for c in configs:
        runs = results[c.name]["long"]
        if not runs:
            continue
        wer = corpus_wer([(long_text, r.get("text", "")) for r in runs])
        lines.append(
            f"| {c.label} | {stat([r['transcript'] for r in runs])} | **{stat([r['first'] for r in runs])}** | "
            f"{stat([r['done'] for r in runs])} | {wer:.1%} |"
        )
    if direct and "seed-fast" in results:
        daemon_runs = [r["ask_to_done"] for r in results["seed-fast"]["short"]]
        lines += [
            "",
            "## Daemon overhead: the seed design on the fast engines, daemon against the same calls in process",
            "",
            "Daemon: `ask` -> `done` as the daemon timed it (the whole recording transcribed, then the whole answer), "
            "no prompt cache. In process: `FasterWhisperTranscriber.transcribe` + `LlamaCppChatModel.stream` on the "
            "same recordings in the benchmark's own process, each right after the daemon's turn on the same clip. "
            f"{len(direct)} and {len(daemon_runs)} turns.",
            "",
            "| in process | daemon | ratio of medians |",
            "|---|---|---|",
            f"| {stat(direct)} | {stat(daemon_runs)} | **{statistics.median(daemon_runs) / statistics.median(direct):.2f}x** |",
        ]
    answered = [c for c in configs if results[c.name]["answers"]]
    if len(answered) == 2:
        import re

        lines += [
            "",
            "## The two chat engines' answers (typed questions, greedy, the daemon's system prompt)",
            "",
            f"| question | {answered[0].label} | {answered[1].label} |",
            "|---|---|---|",
        ]
        for i, (question, expect) in enumerate(TYPED_QUESTIONS):
            cells = []
            for c in answered:
                answer = results[c.name]["answers"][i]
                ok = "✓" if re.search(expect, answer.lower()) else "✗"
                cells.append(f"{ok} {' '.join(answer.split())[:90]}")
            lines.append(f"| {question} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
