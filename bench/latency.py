"""Latency of a voice turn: the seed design against ours, on the same real models, in one run.

Plays the same espeak-ng speech (about 5, 10, 20 and 40 s, sentences with natural pauses) into the real daemon at
real-time pace in 4096-sample chunks, as the tray does, then 0.4 s of silence (the key release), then `ask`.
Measured from the end of the speech: final transcript, first answer chunk, done.

  (a) seed: the whole recording transcribed after the ask, the answer sent whole at the end, no KV cache
      (daemon --no-incremental --no-prompt-cache --history-turns 0, ask with stream=false)
  (b) ours: stretches transcribed while the person speaks, streamed answer, prompt cache (the defaults)

Also: word error rate of both transcripts (incremental must be as good as whole), the daemon's overhead against
calling the same model functions in this process, and a follow-up question's prefill against a cold one.

    .venv/bin/python bench/latency.py        # updates the latency section of bench/README.md, docs/images/latency.png
    .venv/bin/python bench/latency.py --lengths 5 10 --repeats 1 --whisper DIR --llm DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SOTTOVOCE_MODELS_DIR", str(ROOT / ".work" / "models"))

from sottovoce.daemon.blas import preload_openblas  # noqa: E402

preload_openblas()

from daemon_proc import DaemonProcess  # noqa: E402
from speech import say  # noqa: E402

from sottovoce.client import protocol as p  # noqa: E402

RATE = p.SAMPLE_RATE
CHUNK = p.CHUNK_SAMPLES
RELEASE_SECONDS = 0.4
MAX_TOKENS = 48
SENTENCES = [
    "I am planning a trip to Europe next spring.",
    "I would like to see a few famous cities and museums.",
    "My budget is limited, so I want to travel by train.",
    "I also enjoy good food and long walks in old towns.",
    "Last year I visited Italy and loved the coffee there.",
    "This time I have about two weeks of holiday.",
    "My friend recommends starting in the north and going south.",
    "I do not speak French, but I can learn a few words.",
    "The weather in April can be rainy, so I will pack a coat.",
    "I want to spend at least three days in one city.",
    "Trains between the big cities are fast and comfortable.",
    "I prefer small hotels to large international chains.",
]
QUESTION = "What is the capital of France?"


def utterance(seconds: float) -> tuple[np.ndarray, str, int]:
    """Sentences with pauses until about ``seconds``, ending with the question; returns pcm, text, end of speech."""
    rng = np.random.default_rng(int(seconds))
    parts, words = [], []
    total = say(QUESTION).size
    for sentence in SENTENCES:
        if (total + say(sentence).size) / RATE > seconds:
            break
        parts.append(say(sentence))
        parts.append(np.zeros(int(rng.uniform(0.3, 0.7) * RATE), np.float32))
        words.append(sentence)
        total += parts[-1].size + parts[-2].size
    parts.append(say(QUESTION))
    words.append(QUESTION)
    speech = np.concatenate(parts)
    return speech, " ".join(words), speech.size


def play_and_ask(daemon: DaemonProcess, pcm: np.ndarray, speech_end: int, *, stream: bool) -> dict[str, float | str]:
    """Send at real-time pace; return seconds from the end of speech to transcript / first answer / done."""
    recording = np.concatenate([pcm, np.zeros(int(RELEASE_SECONDS * RATE), np.float32)])
    with daemon.client(timeout=300) as client:
        client.reset()
        start = time.perf_counter()
        speech_ended_at = None
        for offset in range(0, recording.size, CHUNK):
            due = start + (offset + CHUNK) / RATE  # a chunk leaves once it has been "recorded"
            time.sleep(max(0.0, due - time.perf_counter()))
            client.send_chunk(recording[offset : offset + CHUNK])
            if speech_ended_at is None and offset + CHUNK >= speech_end:
                speech_ended_at = due - (offset + CHUNK - speech_end) / RATE
        assert speech_ended_at is not None
        times: dict[str, float | str] = {}
        for event in client.stream(max_tokens=MAX_TOKENS, temperature=0.0, stream=stream):
            now = time.perf_counter() - speech_ended_at
            if isinstance(event, p.Transcript):
                times["transcript"] = now
                times["text"] = event.text
            elif isinstance(event, p.AnswerChunk) and "first" not in times:
                times["first"] = now
            elif isinstance(event, p.Done):
                times["done"] = now
                times.setdefault("first", now)  # unstreamed: the first word arrives with the rest
                times["answer"] = event.answer
                times["ask_to_done"] = event.seconds["total"]
    return times


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    def norm(text: str) -> str:
        return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())

    return float(jiwer.wer(norm(reference), norm(hypothesis)))


def run_mode(name: str, args: argparse.Namespace, extra: list[str], clips, *, stream: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    daemon = DaemonProcess(work, whisper_model=args.whisper, llm_model=args.llm, extra_args=extra)
    daemon.start()
    results: dict[float, list[dict]] = {}
    try:
        warm_pcm, _, warm_end = clips[0]
        play_and_ask(daemon, warm_pcm[: warm_end // 2], warm_end // 2, stream=stream)  # warm-up, not counted
        for seconds, (pcm, text, end) in zip(args.lengths, clips, strict=True):
            runs = []
            for _ in range(args.repeats):
                times = play_and_ask(daemon, pcm, end, stream=stream)
                times["wer"] = wer(text, str(times.get("text", "")))
                runs.append(times)
                print(
                    f"{name:5} {seconds:>3} s: {json.dumps({k: v for k, v in times.items() if k not in ('text', 'answer')})}",
                    flush=True,
                )
            results[seconds] = runs
    finally:
        daemon.stop()
    return results


def backends(args: argparse.Namespace, *, prompt_cache: bool = True, load_whisper: bool = True):
    """The transcriber and chat model the daemon would build with these models (on the default engines)."""
    from sottovoce.client import config
    from sottovoce.daemon import engines
    from sottovoce.daemon.backends.factory import build_chat_model, build_transcriber

    settings = config.Settings(whisper_model=args.whisper, llm_model=args.llm, prompt_cache=prompt_cache)
    whisper = build_transcriber(engines.plan_stt(settings), settings) if load_whisper else None
    return whisper, build_chat_model(engines.plan_llm(settings), settings)


def in_process_overhead(args: argparse.Namespace, clips) -> list[tuple[float, float]]:
    """The seed pipeline called directly in this process: (transcribe + generate) seconds per clip length."""
    from sottovoce.client import config

    whisper, chat = backends(args, prompt_cache=False)
    whisper.load()
    chat.load()
    from sottovoce.daemon.backends.base import ChatMessage

    out = []
    for pcm, _, _ in clips:
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            text = whisper.transcribe(pcm).text
            messages = [ChatMessage("system", config.DEFAULT_SYSTEM_PROMPT), ChatMessage("user", text)]
            for _step in chat.stream(messages, max_tokens=MAX_TOKENS, temperature=0.0, should_stop=lambda: False):
                pass
            best = min(best, time.perf_counter() - started)
        out.append((pcm.size / RATE, best))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--whisper", default="whisper-tiny.en")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=float, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "README.md", help="file whose latency section is replaced"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "latency.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args()

    clips = [utterance(seconds) for seconds in args.lengths]
    args.load_start = os.getloadavg()[0]
    seed = run_mode(
        "seed", args, ["--no-incremental", "--no-prompt-cache", "--history-turns", "0"], clips, stream=False
    )
    ours = run_mode("ours", args, [], clips, stream=True)
    direct = in_process_overhead(args, clips)
    follow = follow_up_prefill(args)
    report = render(args, clips, seed, ours, direct, follow)
    replace_section(args.out, report)
    print(report)
    plot(args, clips, seed, ours)
    if args.json:
        args.json.write_text(json.dumps({"seed": seed, "ours": ours, "direct": direct}, default=str, indent=1))
    return 0


BEGIN, END = "<!-- latency:begin -->", "<!-- latency:end -->"


def replace_section(path: Path, report: str) -> None:
    """Put the report between the markers in ``path`` (the rest of the file is kept)."""
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{report}{END}{tail}")


def follow_up_prefill(args: argparse.Namespace, repeats: int = 3) -> dict[str, float]:
    """Prefill seconds of a follow-up question (system + 2 turns + question) with and without the KV cache."""
    from sottovoce.client import config
    from sottovoce.daemon.backends.base import ChatMessage

    _, cached = backends(args, load_whisper=False)
    _, cold = backends(args, prompt_cache=False, load_whisper=False)
    cached.load()
    cold.load()
    turns = [ChatMessage("system", config.DEFAULT_SYSTEM_PROMPT)]
    questions = [QUESTION, "What is it famous for?", "How many people live there?"]
    times: dict[str, list[float]] = {"cached": [], "cold": []}
    tokens = {"prompt": 0, "cached": 0}
    for run in range(repeats):
        key = f"bench-{run}"
        turns = turns[:1]
        for n, question in enumerate(questions):
            turns.append(ChatMessage("user", question))
            answer = ""
            for step in cached.stream(turns, max_tokens=24, temperature=0.0, should_stop=lambda: False, cache_key=key):
                answer += step.text
            if n == len(questions) - 1:
                times["cached"].append(step.prompt_seconds)
                tokens = {"prompt": step.prompt_tokens, "cached": step.cached_tokens}
                cold_steps = list(cold.stream(turns, max_tokens=1, temperature=0.0, should_stop=lambda: False))
                times["cold"].append(cold_steps[-1].prompt_seconds)
            turns.append(ChatMessage("assistant", answer))
    return {
        "cold": statistics.median(times["cold"]),
        "cached": statistics.median(times["cached"]),
        "prompt_tokens": tokens["prompt"],
        "cached_tokens": tokens["cached"],
    }


def median(runs: list[dict], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def render(args, clips, seed, ours, direct, follow) -> str:
    lines = [
        "# Voice-turn latency: seed design vs ours",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}. Models: Whisper `{args.whisper}`, LLM `{args.llm}` on the default engines. "
        f"Median of {args.repeats} run(s) after a warm-up; answers capped at {MAX_TOKENS} tokens, greedy. "
        f"Times in seconds from the end of the speech (the key is released {RELEASE_SECONDS} s later). "
        f"Load average {args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work shared "
        "the 2 cores). Made by `bench/latency.py`.",
        "",
        "| speech | seed: transcript | seed: first answer chunk | seed: done | ours: transcript | ours: first answer chunk | ours: done | first chunk, ours/seed | WER seed | WER ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seconds, (pcm, _, _) in zip(args.lengths, clips, strict=True):
        s, o = seed[seconds], ours[seconds]
        lines.append(
            f"| {pcm.size / RATE:.1f} s | {median(s, 'transcript'):.2f} | {median(s, 'first'):.2f} | {median(s, 'done'):.2f} "
            f"| {median(o, 'transcript'):.2f} | {median(o, 'first'):.2f} | {median(o, 'done'):.2f} "
            f"| **{median(o, 'first') / median(s, 'first'):.2f}x** | {median(s, 'wer'):.1%} | {median(o, 'wer'):.1%} |"
        )
    lines += [
        "",
        "## Daemon overhead (seed mode) against the same model calls in one process",
        "",
        "| speech | in process: transcribe + generate | daemon: ask -> done | ratio |",
        "|---|---|---|---|",
    ]
    for seconds, (length, direct_s) in zip(args.lengths, direct, strict=True):
        daemon_s = median(seed[seconds], "ask_to_done")
        lines.append(f"| {length:.1f} s | {direct_s:.2f} | {daemon_s:.2f} | {daemon_s / direct_s:.2f}x |")
    lines += [
        "",
        "## Follow-up question: prefill with the conversation's KV cache against a cold prefill",
        "",
        f"Third question of a conversation ({follow['prompt_tokens']} prompt tokens, {follow['cached_tokens']} of them "
        "cached from the earlier turns), median of 3, in process.",
        "",
        "| cold prefill | cached prefill | ratio |",
        "|---|---|---|",
        f"| {follow['cold']:.3f} s | {follow['cached']:.3f} s | **{follow['cached'] / follow['cold']:.2f}x** |",
    ]
    return "\n".join(lines) + "\n"


def plot(args, clips, seed, ours) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [pcm.size / RATE for pcm, _, _ in clips]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for runs, label, style in ((seed, "seed design", "--"), (ours, "ours", "-")):
        for key, marker in (("transcript", "o"), ("first", "s"), ("done", "^")):
            ax.plot(
                lengths,
                [median(runs[s], key) for s in args.lengths],
                style,
                marker=marker,
                label=f"{label}: {'first answer chunk' if key == 'first' else key}",
            )
    ax.set_xlabel("length of speech (s)")
    ax.set_ylabel("seconds after the speech ended")
    ax.set_title(f"Voice turn latency ({args.whisper} + {args.llm}, 2-core CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.plot)


if __name__ == "__main__":
    sys.exit(main())
