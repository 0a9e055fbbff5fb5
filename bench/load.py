"""Load: many concurrent clients streaming audio faster than real time, plus typed asks, against the real daemon.

Each client is a thread with its own DEALER socket speaking the wire protocol directly (so every reply is seen and
accounted for, including stray ones). In a loop until the deadline it either records (streams an utterance in
4096-sample chunks at ``--speed`` x real time, then `ask`s with it) or types (a text `ask`), and waits for the
ask's final reply. A `busy` answer is retried after a short back-off (the daemon keeps the buffered audio).

Routing is checked by content, because the tiny random Whisper says the same words for any audio:
- a voice ask's `transcript` must report ``audio_seconds`` equal to the length of *this client's* utterance; every
  (client, round) pair has a distinct length (20 000 + 160*client + 8 000*(round % 4) samples), so audio mixed between
  clients, lost chunks, or another client's transcript all show up as a wrong length; and its text must equal what
  the same kind of audio gives when sent alone (measured before the load);
- a text ask's answer must equal, token for token, the answer the same question got when asked alone before the
  load (greedy decoding, ``--history-turns 0``); each client asks its own question;
- every reply's ``ref`` must be the id of the ask the client is waiting on (anything else is misrouted), every ask
  must end with exactly one `done` or `error` within ``--ask-timeout`` (else it is lost).

The daemon's RSS is sampled every 0.25 s from /proc (peak and the growth over the second half of the run).

    .venv/bin/python bench/load.py                                 # 20 clients, 120 s, 10x: prints a markdown row
    .venv/bin/python bench/load.py --clients 4 --duration 15 --json out.json
    .venv/bin/python bench/load.py --whisper-model DIR --llm-model DIR  # other models than the tiny random ones

The test suite runs a 15 s version (tests/integration/test_load.py, marked slow).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
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


@dataclasses.dataclass
class LoadConfig:
    clients: int = 20
    duration: float = 120.0
    speed: float = 10.0
    """Audio is streamed this many times faster than real time."""
    queue_depth: int = 4
    max_tokens: int = 8
    text_every: int = 3
    """Every n-th round of a client is a typed ask; the others are spoken."""
    ask_timeout: float = 60.0
    busy_backoff: float = 0.05


# ---- what each client sends ------------------------------------------------------------------------------------


def utterance_samples(client: int, round_: int) -> int:
    """Distinct per (client, round % 4) for up to 50 clients: 1.25 s to 3.6 s."""
    return 20_000 + 160 * client + 8_000 * (round_ % 4)


def utterance(client: int, round_: int) -> np.ndarray:
    """A warbling tone (loud enough for the energy gate and the VAD), pitched per client."""
    n = utterance_samples(client, round_)
    t = np.arange(n) / RATE
    f0 = 170.0 + 23.0 * client
    return (0.3 * np.sin(2 * np.pi * (f0 + 60 * np.sin(2 * np.pi * 3 * t)) * t)).astype(np.float32)


def question(client: int) -> str:
    """Each client's question has its own length, so its prompt token count names the client."""
    return f"Client number {client} would like to know,{' please' * client} what {client} plus {7 * client + 3} is."


# ---- one client ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClientStats:
    voice_asks: int = 0
    text_asks: int = 0
    busy: int = 0
    chunks: int = 0
    audio_seconds: float = 0.0
    lost: int = 0
    misrouted: int = 0
    mismatched: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    voice_latency: list[float] = dataclasses.field(default_factory=list)
    text_latency: list[float] = dataclasses.field(default_factory=list)
    busy_latency: list[float] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 5:
            self.problems.append(text)


class RawClient:
    """A DEALER speaking frames; ``ask`` waits for the final reply and checks every reply's ref on the way."""

    def __init__(self, endpoint: str, ctx: zmq.Context[Any], stats: ClientStats) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.stats = stats

    def close(self) -> None:
        self.sock.close(linger=0)

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart(p.encode(msg))

    def request(self, msg: p.Message, timeout: float) -> list[p.Message] | None:
        """Send ``msg`` and collect its replies until a final one (done/error; or the one reply of other requests);
        None if none came in ``timeout``. Replies with another ref are counted as misrouted."""
        self.send(msg)
        replies: list[p.Message] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1):
                return None
            reply = p.decode(self.sock.recv_multipart())
            ref = getattr(reply, "ref", None)
            if ref is None and reply.TYPE == "transcript-chunk":
                continue  # an early transcript of this client's own recording (unsolicited by design)
            if ref != msg.id:
                self.stats.misrouted += 1
                self.stats.problem(f"got {reply.TYPE} with ref {ref!r} while waiting for {msg.id}")
                continue
            replies.append(reply)
            if isinstance(reply, p.Done | p.Error) or not isinstance(msg, p.Ask):
                return replies


class LoadClient(threading.Thread):
    def __init__(self, index: int, endpoint: str, cfg: LoadConfig, expected: Expected, deadline: float) -> None:
        super().__init__(name=f"load-client-{index}", daemon=True)
        self.index = index
        self.endpoint = endpoint
        self.cfg = cfg
        self.expected = expected
        self.deadline = deadline
        self.stats = ClientStats()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        client = RawClient(self.endpoint, ctx, self.stats)
        try:
            hello = client.request(p.Hello(client=f"load-{self.index}"), 10)
            if not hello or not isinstance(hello[0], p.Info):
                self.stats.lost += 1
                self.stats.problem(f"hello got {hello!r}")
                return
            round_ = 0
            while time.monotonic() < self.deadline:
                if round_ % self.cfg.text_every == self.cfg.text_every - 1:
                    self._text_ask(client)
                else:
                    self._voice_ask(client, round_)
                round_ += 1
        finally:
            client.close()

    def _stream(self, client: RawClient, pcm: np.ndarray) -> None:
        period = CHUNK / RATE / self.cfg.speed
        start = time.monotonic()
        for n, offset in enumerate(range(0, pcm.size, CHUNK)):
            delay = start + n * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            client.send(p.Chunk(pcm=pcm[offset : offset + CHUNK]))
            self.stats.chunks += 1
        self.stats.audio_seconds += pcm.size / RATE

    def _ask(self, client: RawClient, text: str | None) -> tuple[list[p.Message] | None, float]:
        """Ask (retrying while busy); returns the replies and the latency of the successful attempt."""
        while True:
            msg = p.Ask(text=text, max_tokens=self.cfg.max_tokens)
            sent = time.perf_counter()
            replies = client.request(msg, self.cfg.ask_timeout)
            latency = time.perf_counter() - sent
            if replies is None:
                self.stats.lost += 1
                self.stats.problem(f"ask {msg.id} got no final reply in {self.cfg.ask_timeout} s")
                return None, latency
            final = replies[-1]
            if isinstance(final, p.Error) and final.code == p.ErrorCode.BUSY:
                self.stats.busy += 1
                self.stats.busy_latency.append(latency)
                time.sleep(self.cfg.busy_backoff * (1 + self.index % 4))
                continue
            return replies, latency

    def _voice_ask(self, client: RawClient, round_: int) -> None:
        pcm = utterance(self.index, round_)
        self._stream(client, pcm)
        replies, latency = self._ask(client, None)
        self.stats.voice_asks += 1
        if replies is None:
            return
        final = replies[-1]
        if isinstance(final, p.Error):
            self.stats.errors[final.code] += 1
            self.stats.problem(f"voice ask: {final.code}: {final.text}")
            return
        transcripts = [r for r in replies if isinstance(r, p.Transcript)]
        want_seconds = pcm.size / RATE
        ok = (
            len(transcripts) == 1
            and abs(transcripts[0].audio_seconds - want_seconds) < 1e-6
            and transcripts[0].text == self.expected.voice_text
            and isinstance(final, p.Done)
            and final.transcript == transcripts[0].text
        )
        if not ok:
            self.stats.mismatched += 1
            got = transcripts[0].audio_seconds if transcripts else None
            self.stats.problem(f"voice ask: wanted {want_seconds:.4f} s / {self.expected.voice_text!r}, got {got} / "
                               f"{[t.text for t in transcripts]!r} / {getattr(final, 'transcript', None)!r}")  # fmt: skip
            return
        self.stats.voice_latency.append(latency)

    def _text_ask(self, client: RawClient) -> None:
        replies, latency = self._ask(client, question(self.index))
        self.stats.text_asks += 1
        if replies is None:
            return
        final = replies[-1]
        if isinstance(final, p.Error):
            self.stats.errors[final.code] += 1
            self.stats.problem(f"text ask: {final.code}: {final.text}")
            return
        assert isinstance(final, p.Done)
        streamed = "".join(r.text for r in replies if isinstance(r, p.AnswerChunk))
        if (final.answer, final.prompt_tokens) != self.expected.answers[self.index] or streamed != final.answer:
            self.stats.mismatched += 1
            self.stats.problem(
                f"text ask: wanted {self.expected.answers[self.index]!r}, got {(final.answer, final.prompt_tokens)!r}"
            )
            return
        self.stats.text_latency.append(latency)


# ---- calibration: each question and an utterance, alone -----------------------------------------------------


@dataclasses.dataclass
class Expected:
    answers: list[tuple[str, int]]
    """Per client: the answer and the prompt's token count its question got alone."""
    voice_text: str


def calibrate(endpoint: str, cfg: LoadConfig) -> Expected:
    stats = ClientStats()
    client = RawClient(endpoint, zmq.Context.instance(), stats)
    try:
        answers = []
        for k in range(cfg.clients):
            replies = client.request(p.Ask(text=question(k), max_tokens=cfg.max_tokens), cfg.ask_timeout)
            if not replies or not isinstance(replies[-1], p.Done):
                raise RuntimeError(f"calibration: question {k} got {replies!r}")
            answers.append((replies[-1].answer, replies[-1].prompt_tokens))
        for chunk_start in range(0, utterance_samples(0, 0), CHUNK):
            client.send(p.Chunk(pcm=utterance(0, 0)[chunk_start : chunk_start + CHUNK]))
        replies = client.request(p.Ask(max_tokens=cfg.max_tokens), cfg.ask_timeout)
        if not replies or not isinstance(replies[0], p.Transcript):
            raise RuntimeError(f"calibration: voice ask got {replies!r}")
        return Expected(answers, replies[0].text)
    finally:
        client.close()


# ---- the daemon's memory -------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.25) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.wait(self.period):
            rss = read_status_kb(self.pid, "VmRSS")
            if rss is None:
                return
            self.samples.append((time.monotonic() - start, rss))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def read_status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# ---- a run ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_load(endpoint: str, pid: int, cfg: LoadConfig) -> dict[str, Any]:
    """Calibrate, then run ``cfg.clients`` clients for ``cfg.duration`` s against the daemon at ``endpoint``."""
    expected = calibrate(endpoint, cfg)
    rss_before = read_status_kb(pid, "VmRSS")
    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    clients = [LoadClient(k, endpoint, cfg, expected, started + cfg.duration) for k in range(cfg.clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(cfg.duration + cfg.ask_timeout + 30)
    elapsed = time.monotonic() - started
    sampler.stop()
    hung = [c.name for c in clients if c.is_alive()]
    peak_kb = read_status_kb(pid, "VmHWM")
    stats = [c.stats for c in clients]
    voice_lat = [x for s in stats for x in s.voice_latency]
    text_lat = [x for s in stats for x in s.text_latency]
    busy_lat = [x for s in stats for x in s.busy_latency]
    rss = [kb for _, kb in sampler.samples]
    half = [kb for t, kb in sampler.samples if t >= elapsed / 2]
    errors: Counter[str] = Counter()
    for s in stats:
        errors.update(s.errors)
    completed = len(voice_lat) + len(text_lat)
    return {
        "clients": cfg.clients,
        "duration_s": round(elapsed, 1),
        "speed": cfg.speed,
        "queue_depth": cfg.queue_depth,
        "max_tokens": cfg.max_tokens,
        "voice_asks": sum(s.voice_asks for s in stats),
        "text_asks": sum(s.text_asks for s in stats),
        "completed": completed,
        "completed_per_s": round(completed / elapsed, 2),
        "chunks": sum(s.chunks for s in stats),
        "audio_seconds_sent": round(sum(s.audio_seconds for s in stats), 1),
        "audio_seconds_per_s": round(sum(s.audio_seconds for s in stats) / elapsed, 1),
        "busy": sum(s.busy for s in stats),
        "lost": sum(s.lost for s in stats) + len(hung),
        "misrouted": sum(s.misrouted for s in stats),
        "mismatched": sum(s.mismatched for s in stats),
        "errors": dict(errors),
        "voice_p50_s": percentile(voice_lat, 50),
        "voice_p99_s": percentile(voice_lat, 99),
        "text_p50_s": percentile(text_lat, 50),
        "text_p99_s": percentile(text_lat, 99),
        "busy_p50_s": percentile(busy_lat, 50),
        "busy_p99_s": percentile(busy_lat, 99),
        "rss_before_mb": round((rss_before or 0) / 1024, 1),
        "rss_peak_mb": round((peak_kb or max(rss, default=0)) / 1024, 1),
        "rss_second_half_growth_mb": round((max(half) - min(half)) / 1024, 1) if half else None,
        "rss_timeline_mb": [(round(t), round(kb / 1024, 1)) for t, kb in sampler.samples[:: max(1, int(10 / 0.25))]],
        "distinct_answers": len({a for a, _ in expected.answers}),
        "distinct_prompt_tokens": len({n for _, n in expected.answers}),
        "problems": [x for s in stats for x in s.problems][:20],
        "hung_clients": hung,
    }


def markdown_row(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    return (
        f"| {r['clients']} | {r['duration_s']:.0f} s | {r['speed']:g}x | {r['queue_depth']} | "
        f"{r['voice_asks']}/{r['text_asks']} | {r['completed']} ({r['completed_per_s']}/s) | "
        f"{r['audio_seconds_per_s']} | {r['busy']} | {r['lost']} | {r['misrouted']} | {r['mismatched']} | "
        f"{ms(r['voice_p50_s'])} / {ms(r['voice_p99_s'])} | {ms(r['text_p50_s'])} / {ms(r['text_p99_s'])} | "
        f"{ms(r['busy_p50_s'])} / {ms(r['busy_p99_s'])} | {r['rss_peak_mb']:.0f} MB "
        f"(+{r['rss_second_half_growth_mb']} MB) |"
    )


MARKDOWN_HEADER = (
    "| clients | time | speed | queue | voice/text asks | completed | audio s/s | busy | lost | misrouted | "
    "wrong content | voice p50/p99 ms | text p50/p99 ms | busy p50/p99 ms | daemon peak RSS (2nd-half growth) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = ""
    try:
        total = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        total = f", {int(total) / 1024 / 1024:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}){total}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--speed", type=float, default=10.0)
    parser.add_argument("--queue-depth", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--whisper-model", help="default: a tiny random Whisper built here")
    parser.add_argument("--llm-model", help="default: a tiny random llama built here")
    parser.add_argument("--json", type=Path, help="write the full result here")
    args = parser.parse_args(argv)

    from daemon_proc import DaemonProcess  # tests/daemon_proc.py

    from sottovoce.daemon.blas import preload_openblas

    preload_openblas()
    cfg = LoadConfig(args.clients, args.duration, args.speed, args.queue_depth, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="sottovoce-load-") as tmp:
        work = Path(tmp)
        whisper, llm = args.whisper_model, args.llm_model
        if not (whisper and llm):
            import tiny_models

            whisper, llm = (str(d) for d in tiny_models.build_all(work / "models"))
        daemon = DaemonProcess(
            work,
            whisper_model=whisper,
            llm_model=llm,
            extra_args=[
                "--queue-depth",
                str(cfg.queue_depth),
                "--max-tokens",
                str(cfg.max_tokens),
                "--history-turns",
                "0",
            ],
        )
        daemon.start()
        try:
            assert daemon.proc is not None
            result = run_load(daemon.endpoint, daemon.proc.pid, cfg)
        finally:
            code = daemon.stop()
        result["daemon_exit"] = code
        result["machine"] = machine()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(MARKDOWN_HEADER)
    print(markdown_row(result))
    print(f"\nmachine: {result['machine']}")
    print(f"errors: {result['errors']}; problems: {result['problems'][:5]}")
    ok = not (result["lost"] or result["misrouted"] or result["mismatched"] or result["daemon_exit"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
