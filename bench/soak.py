"""Soak: a well-behaved speaker keeps being answered while a quarter of 20 clients abuse the daemon (issue 11).

Against the real daemon (tiny MLX models unless given others), every client a thread with its own DEALER socket
speaking the wire protocol directly:

- **the speaker** (measured): streams a 2 s spoken question in real time (4096-sample chunks every 256 ms), releases
  the key (`ask`), and records key-up -> first `answer-chunk` and key-up -> `done`; then pauses 1 s and again;
- **14 polite clients**: the same kind of turn with 1.5-3 s utterances, then 3-8 s of quiet;
- **5 abusive clients**, only during the *abusive* phases: a *dumper* (600 s of audio in 30 s chunks as fast as the
  socket takes them, then it leaves), a *hoarder* (the same dump, then `reset`, staying connected), a *churner*
  (connect, `hello`, `status`, a chunk, close, as fast as it can), an *id reuser* (routing id of its own choosing:
  tells a secret, leaves, comes back with the same id and asks for it) and a *vanisher* (asks for a 20 000-token
  answer and closes its socket after the first piece).

Quiet and abusive phases alternate (``--phase`` seconds each), so both see the same machine weather. The report
gives, per kind of phase, the median and min-max of the speaker's latencies and of the machine's load average.

Checked on the way: the reuser's second prompt must be exactly as long as a newcomer's (no conversation leaks
across an id reuse); every reply any client gets must answer a request it sent (nothing misrouted); no `internal`
error. After the run everybody leaves and, after ``--settle`` s, the daemon's RSS and CPU are compared with the
baseline taken before any abuse.

    .venv/bin/python bench/soak.py                       # 10 minutes: writes bench/SOAK.md
    .venv/bin/python bench/soak.py --duration 60 --phase 15 --out /tmp/soak.md

The test suite runs a bounded version (tests/integration/test_soak.py, under 60 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zmq  # noqa: E402

from sottovoce.client import protocol as p  # noqa: E402

RATE = p.SAMPLE_RATE
CHUNK = p.CHUNK_SAMPLES
SECRET = "Remember this: my bank PIN is 4921."
QUESTION = "What is my bank PIN?"


@dataclasses.dataclass
class SoakConfig:
    duration: float = 600.0
    phase: float = 60.0
    """Quiet and abusive phases alternate, this long each (the run starts and ends quiet)."""
    polite: int = 14
    settle: float = 60.0
    """After everybody leaves: how long before memory and CPU are measured."""
    max_tokens: int = 8
    reply_timeout: float = 60.0
    cpu_window: float = 10.0
    """How long the daemon's idle CPU is measured for, after the settling time."""


def tone(seconds: float, pitch: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * (pitch + 60 * np.sin(2 * np.pi * 3 * t)) * t)).astype(np.float32)


def spoken(text: str, seconds: float | None = None) -> np.ndarray:
    """espeak-ng saying ``text`` (padded or cut to ``seconds``), so that voice activity detection hears speech and
    the chat model is asked; a tone where espeak-ng is missing (the answers are then empty: no speech)."""
    from speech import HAVE_ESPEAK, say  # tests/speech.py

    pcm = np.array(say(text)) if HAVE_ESPEAK else tone(seconds or 2.0)
    if seconds is None:
        return pcm
    out = np.zeros(int(seconds * RATE), np.float32)
    out[: min(out.size, pcm.size)] = pcm[: out.size]
    return out


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def problem(self, text: str) -> None:
        with self.lock:
            self.counts["problems"] = self.counts.get("problems", 0) + 1
            if len(self.problems) < 20:
                self.problems.append(text)


class Raw:
    """One DEALER connection; remembers the ids it sent, so that any reply to something else is misrouted."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, stats: Stats, routing_id: bytes | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self.stats = stats
        self.sent: set[str] = set()

    def send(self, msg: p.Message) -> str:
        self.sent.add(msg.id)
        self.sock.send_multipart(p.encode(msg))
        return msg.id

    def recv(self, timeout: float) -> p.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg = p.decode(self.sock.recv_multipart())
        ref = getattr(msg, "ref", None)
        if ref is not None and ref not in self.sent:
            self.stats.count("misrouted")
            self.stats.problem(f"a {msg.TYPE} for {ref!r}, which this client never sent")
        if isinstance(msg, p.Error) and msg.code == p.ErrorCode.INTERNAL:
            self.stats.problem(f"internal error: {msg.text}")
        return msg

    def final(self, ref: str, timeout: float, on_reply: Any = None) -> p.Message | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is None:
                break
            if getattr(msg, "ref", None) != ref:
                continue
            if on_reply is not None:
                on_reply(msg)
            if isinstance(msg, p.Done | p.Error | p.Report | p.Ok | p.Info):  # the request's last reply
                return msg
        return None

    def stream_real_time(self, pcm: np.ndarray, stop: threading.Event) -> None:
        next_at = time.monotonic()
        for start in range(0, pcm.size, CHUNK):
            if stop.is_set():
                return
            self.send(p.Chunk(pcm=pcm[start : start + CHUNK]))
            next_at += CHUNK / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self.sock.close(linger=0)


class Phases:
    """Which phase the run is in: quiet phases have the abusive clients paused."""

    GRACE = 3.0
    """Seconds after a change during which samples count for neither phase (abusers finish what they started)."""

    def __init__(self, phase: float) -> None:
        self.phase = phase
        self.changed_at = time.monotonic()
        self.abuse = threading.Event()

    def set(self, abusive: bool) -> None:
        self.changed_at = time.monotonic()
        if abusive:
            self.abuse.set()
        else:
            self.abuse.clear()

    def name(self) -> str:
        if time.monotonic() - self.changed_at < self.GRACE:
            return "changing"
        return "abusive" if self.abuse.is_set() else "quiet"


# ---- the clients ---------------------------------------------------------------------------------------------


def speaker(ctx: zmq.Context[Any], endpoint: str, cfg: SoakConfig, phases: Phases, stats: Stats, stop: threading.Event,
            out: list[dict[str, Any]]) -> None:  # fmt: skip
    client = Raw(ctx, endpoint, stats)
    question = spoken("What is the capital of France?", 2.0)
    while not stop.is_set():
        client.send(p.Reset(conversation=False))
        client.stream_real_time(question, stop)
        phase = phases.name()
        key_up = time.perf_counter()
        first: list[float] = []

        def on_reply(msg: p.Message, first: list[float] = first) -> None:
            if isinstance(msg, p.AnswerChunk) and not first:
                first.append(time.perf_counter())

        done = None
        while not stop.is_set():  # `busy` (the queue is shared with 14 polite clients): retry, audio kept
            done = client.final(client.send(p.Ask(max_tokens=cfg.max_tokens)), cfg.reply_timeout, on_reply)
            if not (isinstance(done, p.Error) and done.code == p.ErrorCode.BUSY):
                break
            stats.count("speaker_busy")
            time.sleep(0.05)
        if stop.is_set():
            break
        if phase == "changing" or phase != phases.name():
            continue  # near or across a phase change: counts for neither
        if isinstance(done, p.Done) and first:
            out.append(
                {"phase": phase, "first_chunk": first[0] - key_up, "done": time.perf_counter() - key_up, "at": key_up}
            )
        else:
            stats.problem(f"the speaker's ask ended with {done!r}")
        stop.wait(1.0)
    client.close()


def polite(ctx: zmq.Context[Any], endpoint: str, cfg: SoakConfig, stats: Stats, stop: threading.Event, i: int) -> None:
    rng = random.Random(i)
    client = Raw(ctx, endpoint, stats)
    utterance = spoken(f"Client number {i} would like to know the weather in city number {i}.")
    while not stop.wait(rng.uniform(3.0, 8.0)):
        client.send(p.Reset(conversation=False))
        client.stream_real_time(utterance, stop)
        if stop.is_set():
            break
        done = client.final(client.send(p.Ask(max_tokens=cfg.max_tokens)), cfg.reply_timeout)
        if isinstance(done, p.Error) and done.code == p.ErrorCode.BUSY:
            stats.count("polite_busy")
        elif not isinstance(done, p.Done):
            stats.problem(f"a polite client's ask ended with {done!r}")
        else:
            stats.count("polite_answers")
    client.close()


DUMP_BLOCK = tone(30.0, 300.0)  # made once: the driver must not eat the CPU it measures


def dump(client: Raw) -> None:
    for _ in range(20):
        client.send(p.Chunk(pcm=DUMP_BLOCK))


def dumper(ctx: zmq.Context[Any], endpoint: str, phases: Phases, stats: Stats, stop: threading.Event) -> None:
    while not stop.is_set():
        if not phases.abuse.wait(0.2):
            continue
        client = Raw(ctx, endpoint, stats)
        dump(client)
        client.final(client.send(p.Status()), 30)  # the dump was taken in...
        client.close()  # ...and its sender is gone
        stats.count("dumps_left")


def hoarder(ctx: zmq.Context[Any], endpoint: str, phases: Phases, stats: Stats, stop: threading.Event) -> None:
    client = Raw(ctx, endpoint, stats)
    while not stop.is_set():
        if not phases.abuse.wait(0.2):
            continue
        dump(client)
        client.final(client.send(p.Status()), 30)
        client.final(client.send(p.Reset()), 30)
        stats.count("dumps_kept")
    client.close()


def churner(ctx: zmq.Context[Any], endpoint: str, phases: Phases, stats: Stats, stop: threading.Event) -> None:
    while not stop.is_set():
        if not phases.abuse.wait(0.2):
            continue
        client = Raw(ctx, endpoint, stats)
        client.send(p.Hello(client="churner"))
        client.send(p.Chunk(pcm=tone(0.25)))
        client.final(client.send(p.Status()), 30)
        client.close()
        stats.count("churns")


def reuser(ctx: zmq.Context[Any], endpoint: str, phases: Phases, stats: Stats, stop: threading.Event,
           baseline_prompt: int) -> None:  # fmt: skip
    n = 0
    while not stop.is_set():
        if not phases.abuse.wait(0.2):
            continue
        n += 1
        routing_id = b"reuse-%d" % (n % 3)
        teller = Raw(ctx, endpoint, stats, routing_id)
        teller.final(teller.send(p.Ask(text=SECRET, max_tokens=2)), 60)
        teller.close()
        asker = Raw(ctx, endpoint, stats, routing_id)
        answer = asker.final(asker.send(p.Ask(text=QUESTION, max_tokens=2)), 60)
        asker.close()
        if isinstance(answer, p.Error) and answer.code == p.ErrorCode.BUSY:
            stats.count("reuse_busy")
        if isinstance(answer, p.Done):
            stats.count("reuses")
            if answer.prompt_tokens != baseline_prompt:
                stats.count("leaks")
                stats.problem(f"id reuse: prompt of {answer.prompt_tokens} tokens, a newcomer's is {baseline_prompt}")


def vanisher(ctx: zmq.Context[Any], endpoint: str, phases: Phases, stats: Stats, stop: threading.Event) -> None:
    while not stop.is_set():
        if not phases.abuse.wait(0.2):
            continue
        client = Raw(ctx, endpoint, stats)
        ask = client.send(p.Ask(text="Tell me a very long story", max_tokens=20_000))
        while (msg := client.recv(30)) is not None and getattr(msg, "ref", None) != ask:
            pass
        client.close()  # mid-answer
        stats.count("vanished")


# ---- measuring the daemon ------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_percent(pid: int, window: float = 10.0) -> float:
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = ticks()
    time.sleep(window)
    return 100.0 * (ticks() - before) / os.sysconf("SC_CLK_TCK") / window


def status(ctx: zmq.Context[Any], endpoint: str) -> p.Report:
    client = Raw(ctx, endpoint, Stats())
    try:
        reply = client.final(client.send(p.Status()), 30)
        assert isinstance(reply, p.Report), reply
        return reply
    finally:
        client.close()


def newcomer_prompt(ctx: zmq.Context[Any], endpoint: str) -> int:
    client = Raw(ctx, endpoint, Stats())
    done = client.final(client.send(p.Ask(text=QUESTION, max_tokens=2)), 60)
    client.close()
    assert isinstance(done, p.Done), done
    return done.prompt_tokens


# ---- a run ---------------------------------------------------------------------------------------------------


def run_soak(endpoint: str, pid: int, cfg: SoakConfig) -> dict[str, Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    stats = Stats()
    baseline_prompt = newcomer_prompt(ctx, endpoint)
    phases = Phases(cfg.phase)
    stop, abusers_stop = threading.Event(), threading.Event()
    samples: list[dict[str, Any]] = []
    threads = [threading.Thread(target=speaker, args=(ctx, endpoint, cfg, phases, stats, stop, samples))]
    threads += [threading.Thread(target=polite, args=(ctx, endpoint, cfg, stats, stop, i)) for i in range(cfg.polite)]
    abusers = [
        threading.Thread(target=f, args=(ctx, endpoint, phases, stats, abusers_stop))
        for f in (dumper, hoarder, churner, vanisher)
    ]
    abusers.append(threading.Thread(target=reuser, args=(ctx, endpoint, phases, stats, abusers_stop, baseline_prompt)))
    for t in threads + abusers:
        t.daemon = True
        t.start()
    time.sleep(min(10.0, cfg.phase / 2))  # everybody connected and talking
    baseline_rss = rss_bytes(pid)
    load: dict[str, list[float]] = {"quiet": [], "abusive": []}
    started = time.monotonic()
    n_phases = max(3, round(cfg.duration / cfg.phase) | 1)  # odd: starts and ends quiet
    for i in range(n_phases):
        phases.set(abusive=bool(i % 2))
        time.sleep(cfg.phase)
        load["abusive" if i % 2 else "quiet"].append(os.getloadavg()[0])
    phases.set(abusive=False)
    peak = status(ctx, endpoint)
    abusers_stop.set()
    stop.set()
    for t in threads + abusers:
        t.join(cfg.reply_timeout + 10)
    ran = time.monotonic() - started
    time.sleep(cfg.settle)
    after = status(ctx, endpoint)
    result = {
        "config": dataclasses.asdict(cfg),
        "ran_seconds": round(ran, 1),
        "samples": samples,
        "load": load,
        "counts": dict(stats.counts),
        "problems": stats.problems,
        "baseline_rss": baseline_rss,
        "rss_after": rss_bytes(pid),
        "cpu_after": cpu_percent(pid, cfg.cpu_window),
        "sessions_after": after.sessions,
        "buffered_after": after.buffered_seconds_total,
        "listening_after": after.listening_seconds,
        "memory_during": peak.memory_bytes,
    }
    ctx.destroy(linger=0)
    return result


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ms ({min(ms):.0f}-{max(ms):.0f}, n={len(ms)})"


def report(r: dict[str, Any], machine: str) -> str:
    by = {ph: [s for s in r["samples"] if s["phase"] == ph] for ph in ("quiet", "abusive")}
    first = {ph: [s["first_chunk"] for s in v] for ph, v in by.items()}
    ratio = (
        statistics.median(first["abusive"]) / statistics.median(first["quiet"])
        if first["quiet"] and first["abusive"]
        else float("nan")
    )
    loads = {ph: v for ph, v in r["load"].items()}
    c = r["counts"]
    lines = [
        "# Soak: isolation under abuse",
        "",
        f"`bench/soak.py`, {r['ran_seconds']:.0f} s of alternating {r['config']['phase']:.0f} s phases; "
        f"{machine}. The speaker streams a 2 s question in real time and releases the key; "
        f"{r['config']['polite']} polite clients talk now and then; in abusive phases 5 more clients dump 600 s of "
        "audio (leaving, or staying and resetting), churn connections, reuse a routing id and vanish mid-answer.",
        "",
        "| phase | speaker key-up → first answer chunk | key-up → done | load average (1 min) |",
        "|---|---|---|---|",
    ]
    for ph in ("quiet", "abusive"):
        done = [s["done"] for s in by[ph]]
        la = loads[ph]
        la_text = f"{statistics.median(la):.2f} ({min(la):.2f}-{max(la):.2f})" if la else "-"
        lines.append(f"| {ph} | {summary(first[ph])} | {summary(done)} | {la_text} |")
    lines += [
        "",
        f"- abusive / quiet median key-up → first chunk: **{ratio:.2f}x** (target ≤ 1.5x)",
        f"- abuse done: {c.get('dumps_left', 0)} dumps of 600 s left behind, {c.get('dumps_kept', 0)} kept and reset, "
        f"{c.get('churns', 0)} churned connections, {c.get('reuses', 0)} id reuses, {c.get('vanished', 0)} vanished "
        f"mid-answer; polite answers {c.get('polite_answers', 0)}, polite `busy` {c.get('polite_busy', 0)}",
        f"- cross-session leaks: **{c.get('leaks', 0)}**; misrouted replies: **{c.get('misrouted', 0)}**; other "
        f"problems: {c.get('problems', 0) - c.get('leaks', 0)}",
        f"- {r['config']['settle']:.0f} s after everybody left: RSS {r['rss_after'] / 1e6:.0f} MB vs "
        f"{r['baseline_rss'] / 1e6:.0f} MB baseline ({100 * (r['rss_after'] / r['baseline_rss'] - 1):+.1f} %), "
        f"CPU {r['cpu_after']:.2f} % ({r['config']['cpu_window']:.0f} s window), sessions {r['sessions_after']}, buffered "
        f"{r['buffered_after']:.1f} s, waiting for VAD {r['listening_after']:.1f} s",
    ]
    if r["problems"]:
        lines += ["", "Problems seen (first 20):", ""] + [f"- {t}" for t in r["problems"]]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import platform

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--phase", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=60.0)
    parser.add_argument("--whisper-model", help="default: a tiny random Whisper built here")
    parser.add_argument("--llm-model", help="default: a tiny random llama built here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "SOAK.md")
    args = parser.parse_args(argv)

    from daemon_proc import DaemonProcess  # tests/daemon_proc.py

    from sottovoce.daemon.blas import preload_openblas

    preload_openblas()
    cfg = SoakConfig(duration=args.duration, phase=args.phase, settle=args.settle)
    with tempfile.TemporaryDirectory(prefix="sottovoce-soak-") as tmp:
        work = Path(tmp)
        whisper, llm = args.whisper_model, args.llm_model
        if not (whisper and llm):
            import tiny_models

            whisper, llm = (str(d) for d in tiny_models.build_all(work / "models"))
        daemon = DaemonProcess(work, whisper_model=whisper, llm_model=llm)
        daemon.start()
        try:
            assert daemon.proc is not None
            result = run_soak(daemon.endpoint, daemon.proc.pid, cfg)
        finally:
            daemon.stop()
    text = report(result, machine())
    args.out.write_text(text)
    print(text)
    return 0 if not result["counts"].get("leaks") and not result["counts"].get("misrouted") else 1


if __name__ == "__main__":
    sys.exit(main())
