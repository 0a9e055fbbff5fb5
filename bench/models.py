"""Model stages on the real models, with MLX's CPU backend on OpenBLAS and on its bundled BLAS, in one run.

- Whisper real-time factor (seconds of compute / seconds of audio) for whisper-tiny.en and whisper-base, float32
  and float16, on espeak-ng speech of about 10 s and 30 s: the daemon's own ``MlxWhisperTranscriber`` (its decoding
  settings, energy gate and warm-up), one transcription of the clip as a further warm-up, then the median of N.
- SmolLM2-135M-Instruct (float32) prompt tokens/s (a 256-token chat prompt: time to the first token) and generation
  tokens/s (128 tokens, end-of-turn suppressed so every run makes them all), with mlx-lm's ``stream_generate``.

Every configuration runs in a fresh subprocess: OpenBLAS has to be loaded before ``mlx.core`` is first imported, so
the bundled-BLAS runs (``SOTTOVOCE_OPENBLAS=0``) need processes of their own, and each child checks which BLAS it
really got. The parent never imports mlx. The bundled BLAS is slow: those runs use only the 10 s clip, fewer repeats
and fewer generated tokens (the table says so) to keep the whole run near 10 minutes on a 2-core machine.

The machine may be shared: each configuration records how many cores other processes kept busy meanwhile (from
/proc/stat less this process tree's CPU time), and those disturbed by more than BUSY_CORES are run again at the end
within --retry-budget seconds, keeping the quieter run.

    .venv/bin/python bench/models.py                  # prints the table, writes bench/models.md
    .venv/bin/python bench/models.py --only whisper-tiny.en --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STORE = Path(os.environ.get("SOTTOVOCE_MODELS_DIR") or ROOT / ".work" / "models")


def mlx_folder(name: str) -> Path:
    """The MLX copy of a store model (the store keeps CTranslate2/GGUF originals; MLX converts them on first use)."""
    from sottovoce.daemon.models import store
    from sottovoce.daemon.models.importer import ensure_mlx_copy

    entry = store.read_entry(STORE / name)
    if entry is None:
        raise SystemExit(f"{name} is not in {STORE}: run `sottovoce models fetch-defaults`")
    return ensure_mlx_copy(entry)
OUT = Path(__file__).resolve().with_name("models.md")
RESULT_PREFIX = "RESULT "
BUSY_CORES = 0.3
"""A configuration measured while other processes kept more than this many cores busy is run once more at the end
(the most disturbed first, while the retry budget lasts), and the run with less interference is reported."""

SENTENCES = [
    "Please set a timer for twenty minutes while the bread is in the oven.",
    "Remind me to call the dentist tomorrow morning about my appointment.",
    "I am looking for a good book about the history of science and electricity.",
    "The weather is cold today, so I will wear a warm coat and take the bus.",
    "Write a short list of things I need for a picnic: bread, cheese, apples and water.",
    "My garden has tomatoes, beans and a few rows of potatoes this summer.",
]
CLIPS = {
    10: [*SENTENCES[:2], "What is the capital of France?"],  # 10.0 s with espeak-ng 1.51
    30: [*SENTENCES, "Turn off the lights in the kitchen."],  # 29.0 s: fits one 30 s window (see "decoder passes")
}
PAUSE_SECONDS = 0.4
LLM_PROMPT_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Config:
    kind: str  # "whisper" | "llm"
    model: str  # store name
    openblas: bool
    fp16: bool = False
    clips: tuple[int, ...] = ()  # CLIPS keys (whisper)
    repeats: int = 3
    full_warmup: bool = True
    """Whisper: transcribe the clip once before timing; else load()'s own warm-up (1 s of silence through the encoder
    and a few decoder steps) is the only one. LLM: the whole prompt and 8 tokens; else 16 prompt tokens and 8. The
    slow configurations run after the fast ones have filled MLX's compiled-kernel cache on disk: they compile nothing."""
    gen_tokens: int = 128  # llm
    timeout: float = 240.0

    @property
    def label(self) -> str:
        what = f"{self.model} {'fp16' if self.fp16 else 'fp32'}"
        return f"{what} OpenBLAS {'on' if self.openblas else 'off'}"


def plan() -> list[Config]:
    """The run, fast configurations first; about 10 minutes on the 2-core EPYC box.

    With OpenBLAS, float32: both clips, warm-up on the clip, median of 3. The slow ones (MLX's bundled BLAS; float16,
    which is as slow on the CPU with or without OpenBLAS) take 20-60 s a run here: the 10 s clip, one run after the
    load's warm-up. float16 without OpenBLAS runs for tiny.en only (base's would add ~1.5 minutes to show the same).
    """
    whisper, llm = "whisper", "llm"
    slow = {"clips": (10,), "repeats": 1, "full_warmup": False, "timeout": 420.0}
    return [
        Config(whisper, "whisper-tiny.en", True, False, (10, 30)),
        Config(whisper, "whisper-base", True, False, (10, 30), timeout=420.0),
        Config(llm, "smollm2-135m-instruct", True, gen_tokens=128),
        Config(whisper, "whisper-tiny.en", False, False, **slow),  # type: ignore[arg-type]
        Config(whisper, "whisper-base", False, False, **slow),  # type: ignore[arg-type]
        Config(whisper, "whisper-tiny.en", True, True, **slow),  # type: ignore[arg-type]
        Config(whisper, "whisper-base", True, True, **slow),  # type: ignore[arg-type]
        Config(whisper, "whisper-tiny.en", False, True, **slow),  # type: ignore[arg-type]
        Config(llm, "smollm2-135m-instruct", False, repeats=1, full_warmup=False, gen_tokens=32),
    ]


# ------------------------------------------------------------------------------------------------ in the child


def speech_clip(target: int) -> tuple[Any, str]:
    """espeak-ng sentences with short pauses, about ``target`` seconds (CLIPS)."""
    import numpy as np
    from speech import say

    pause = np.zeros(int(PAUSE_SECONDS * 16_000), np.float32)
    parts: list[Any] = []
    for sentence in CLIPS[target]:
        parts += [pause, say(sentence)] if parts else [say(sentence)]
    return np.concatenate(parts), " ".join(CLIPS[target])


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    def norm(text: str) -> str:
        return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())

    return float(jiwer.wer(norm(reference), norm(hypothesis)))


def child_whisper(config: Config) -> dict[str, Any]:
    from mlx_whisper.whisper import Whisper

    from sottovoce.daemon.backends.mlx_whisper_backend import MlxWhisperTranscriber

    # Count decoder passes: one per 30 s window, plus one per temperature fallback (each re-runs the encoder too).
    passes: list[float] = []
    real_decode = Whisper.decode

    def counting_decode(self: Any, *args: Any, **kwargs: Any) -> Any:
        options = args[1] if len(args) > 1 else kwargs.get("options")
        passes.append(getattr(options, "temperature", 0.0))
        return real_decode(self, *args, **kwargs)

    Whisper.decode = counting_decode
    transcriber = MlxWhisperTranscriber(mlx_folder(config.model), fp16=config.fp16)
    started = time.perf_counter()
    transcriber.load()
    out: dict[str, Any] = {"load_s": time.perf_counter() - started, "clips": []}
    for target in config.clips:
        pcm, reference = speech_clip(target)
        audio_s = pcm.size / 16_000
        warmup = None
        if config.full_warmup:
            started = time.perf_counter()
            transcriber.transcribe(pcm, language="en")  # warm-up: this clip's decoder lengths
            warmup = time.perf_counter() - started
        times, text = [], ""
        for _ in range(config.repeats):
            passes.clear()
            started = time.perf_counter()
            text = transcriber.transcribe(pcm, language="en").text
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        out["clips"].append(
            {
                "target": target,
                "audio_s": audio_s,
                "warmup_s": warmup,
                "times": times,
                "median_s": median,
                "rtf": median / audio_s,
                "wer": wer(reference, text),
                "text": text,
                "passes": list(passes),
            }
        )
    return out


def child_llm(config: Config) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_lm

    started = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(mlx_folder(config.model)))[:2]
    load_s = time.perf_counter() - started
    prompt = llm_prompt(tokenizer)
    eos = mx.array(sorted(tokenizer.eos_token_ids))

    def no_end(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[..., eos] = -float("inf")  # every run generates all its tokens
        return logits

    def one_run() -> tuple[float, float, int]:
        stamps: list[float] = []
        generated = 0
        started = time.perf_counter()
        stream = mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=config.gen_tokens, logits_processors=[no_end]
        )
        for response in stream:
            stamps.append(time.perf_counter())
            generated = response.generation_tokens
        prompt_s = stamps[0] - started  # prefill + the first token
        return prompt_s, stamps[-1] - stamps[0], generated

    # Warm-up: the whole prompt and a few tokens build every kernel; the slow configuration warms up on 16 tokens.
    warm_prompt = prompt if config.full_warmup else prompt[:16]
    for _ in mlx_lm.stream_generate(model, tokenizer, warm_prompt, max_tokens=8, logits_processors=[no_end]):
        pass
    runs = [one_run() for _ in range(config.repeats)]
    prompt_tps = [len(prompt) / p for p, _, _ in runs]
    gen_tps = [(n - 1) / g for _, g, n in runs]
    return {
        "load_s": load_s,
        "prompt_tokens": len(prompt),
        "generated": runs[-1][2],
        "prompt_tps": statistics.median(prompt_tps),
        "gen_tps": statistics.median(gen_tps),
        "all_prompt_tps": prompt_tps,
        "all_gen_tps": gen_tps,
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def llm_prompt(tokenizer: Any) -> list[int]:
    """A chat prompt (the daemon's system prompt and a long question) of LLM_PROMPT_TOKENS tokens."""
    from sottovoce.client.config import DEFAULT_SYSTEM_PROMPT

    filler = " ".join(SENTENCES * 4).split()
    best: list[int] = []
    for n in range(10, len(filler)):
        question = "Here is what I said today: " + " ".join(filler[:n]) + " Summarise it for me."
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if len(tokens) > LLM_PROMPT_TOKENS:
            break
        best = tokens
    return best


def matmul_gflops(n: int = 512, seconds: float = 1.0) -> float:
    """float32 n x n matmul speed: how fast this process's BLAS is right now."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        mx.eval(a @ a)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e9


def child(spec: str) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sottovoce.daemon.blas import _mapped_openblas, preload_openblas

    config = Config(**{**json.loads(spec), "clips": tuple(json.loads(spec)["clips"])})
    preload_openblas()
    blas = _mapped_openblas()
    if (blas is not None) != config.openblas:
        raise SystemExit(f"wanted OpenBLAS {'on' if config.openblas else 'off'}, got {blas}")
    gflops = matmul_gflops()
    result = child_whisper(config) if config.kind == "whisper" else child_llm(config)
    result["blas"] = blas
    result["gflops"] = gflops
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- in the parent


def machine() -> dict[str, str]:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    os_name = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("mlx", "mlx-whisper", "mlx-lm"))
    return {
        "cpu": f"{usable} cores usable ({os.cpu_count()} online), {cpu}",
        "os": f"{os_name}, Linux {platform.release()}, Python {platform.python_version()}",
        "versions": versions,
    }


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes on this machine have used, CPU seconds this process and its children used)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, _steal = fields
    mine = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), sum(r.ru_utime + r.ru_stime for r in mine)


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_config(config: Config) -> dict[str, Any]:
    env = {**os.environ, "SOTTOVOCE_OPENBLAS": "1" if config.openblas else "0", "HF_HUB_OFFLINE": "1"}
    env["SOTTOVOCE_MODELS_DIR"] = str(STORE)
    spec = json.dumps(dataclasses.asdict(config))
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=config.timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {config.timeout:.0f} s", "wall_s": time.perf_counter() - started}
    wall = time.perf_counter() - started
    cpu_after = cpu_seconds()
    others = ((cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / wall  # cores busy elsewhere
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX) :]), "wall_s": wall, "others_cores": max(others, 0.0)}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", "wall_s": wall}


SLOW_MARK = "¹"
SLOW_NOTE = (
    f"{SLOW_MARK} one run of the 10 s clip after the load's own warm-up (1 s of silence through the model), not a "
    "warm-up on the clip and a median of 3: these configurations take 20-60 s a run here."
)


def fmt_rtf(clip: dict[str, Any] | None) -> str:
    if clip is None:
        return "not run"
    mark = "" if clip["full"] else SLOW_MARK
    return f"**{clip['rtf']:.2f}** ({clip['median_s']:.2f} s){mark}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def render(
    results: list[tuple[Config, dict[str, Any]]], info: dict[str, str], start: str, end: str, total: float
) -> str:
    def whisper_clip(model: str, fp16: bool, openblas: bool, target: int) -> dict[str, Any] | None:
        for config, result in results:
            if (config.kind, config.model, config.fp16, config.openblas) == ("whisper", model, fp16, openblas):
                for clip in result.get("clips", []):
                    if clip["target"] == target:
                        full = config.full_warmup and config.repeats == 3
                        return {**clip, "full": full}
        return None

    def llm(openblas: bool) -> tuple[Config, dict[str, Any]] | None:
        for config, result in results:
            if config.kind == "llm" and config.openblas == openblas and "error" not in result:
                return config, result
        return None

    lines = [
        "# Model stages on the real models: Whisper real-time factor, LLM tokens/s, OpenBLAS on and off",
        "",
        "Written by `.venv/bin/python bench/models.py` (one fresh process per configuration, since OpenBLAS must be",
        "loaded before `mlx.core` is imported; `SOTTOVOCE_OPENBLAS=0` keeps the reference BLAS bundled in the",
        "`mlx-cpu` wheel). MLX's CPU backend throughout.",
        "",
        f"- machine: {info['cpu']}; {info['os']}",
        f"- {info['versions']}",
        f"- load average (1/5/15 min) at the start: {start}; at the end: {end}. The machine is shared with other",
        "  engineers' test runs: the last table gives, per configuration, how many cores other processes kept busy",
        "  meanwhile (of 2) and the 512x512 float32 matmul speed the process measured before it started. A",
        f"  configuration that ran while others kept more than {BUSY_CORES} cores busy was run once more at the end",
        "  (the most disturbed first, within a 4-minute budget), and the quieter of the two runs is reported.",
        f"- whole run: {total / 60:.1f} min",
        "",
        "## Whisper: real-time factor (compute s / audio s; lower is better)",
        "",
        "The daemon's `MlxWhisperTranscriber` (the seed's decoding: temperature fallback and thresholds), language",
        "given as `en`, on espeak-ng speech. Warm-up on the clip, then the median of 3 runs, unless marked",
        f"{SLOW_MARK}. Ratios compare times: `off/on` = time with the bundled BLAS / time with OpenBLAS; `fp16/fp32` =",
        "float16 time / float32 time, with OpenBLAS (and without, where both ran).",
        "",
        "| model | precision | audio | decoder passes | OpenBLAS on: RTF (median s) | OpenBLAS off: RTF (s) | off/on "
        "| fp16/fp32 | WER |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in ("whisper-tiny.en", "whisper-base"):
        for fp16 in (False, True):
            for target in CLIPS:
                on = whisper_clip(model, fp16, True, target)
                off = whisper_clip(model, fp16, False, target)
                if on is None and off is None:
                    continue
                audio = (on or off or {})["audio_s"]
                half = ""
                if fp16:
                    fp32_on, fp32_off = (
                        whisper_clip(model, False, True, target),
                        whisper_clip(model, False, False, target),
                    )
                    parts = []
                    if on and fp32_on:
                        parts.append(f"{ratio(on['median_s'], fp32_on['median_s'])} on")
                    if off and fp32_off:
                        parts.append(f"{ratio(off['median_s'], fp32_off['median_s'])} off")
                    half = ", ".join(parts)
                slowdown = ratio(off["median_s"], on["median_s"]) if on and off else "-"
                wers = " / ".join(f"{c['wer'] * 100:.0f} %" for c in (on, off) if c is not None)
                passes = " / ".join(str(len(c["passes"])) for c in (on, off) if c is not None)
                lines.append(
                    f"| {model} | {'float16' if fp16 else 'float32'} | {audio:.1f} s | {passes} | {fmt_rtf(on)} "
                    f"| {fmt_rtf(off)} | {slowdown} | {half} | {wers} |"
                )
    lines += [
        "",
        SLOW_NOTE,
        "WER: against the sentences espeak-ng spoke (on / off where both ran). Decoder passes: 30 s windows Whisper",
        "decoded in the last timed run, each with its own encoder pass (a window ending mid-sentence makes Whisper decode",
        "the rest as one more, padded, window; a temperature fallback adds passes too).",
        "",
        "## SmolLM2-135M-Instruct, float32 (mlx-lm `stream_generate`)",
        "",
        f"Prompt: the daemon's system prompt and a question, {LLM_PROMPT_TOKENS} tokens with the chat template;",
        "prompt tok/s = prompt tokens / time to the first token. Generation tok/s over the tokens after the first,",
        "end-of-turn suppressed so that every run generates them all. Warm-up first (the prompt and 8 tokens), then",
        f"the median of 3, unless marked {SLOW_MARK}. `off/on` compares times (= tok/s on / tok/s off).",
        "",
        "| measure | OpenBLAS on | OpenBLAS off | off/on |",
        "|---|---|---|---|",
    ]
    on_llm, off_llm = llm(True), llm(False)

    def llm_cell(entry: tuple[Config, dict[str, Any]] | None, key: str) -> str:
        if entry is None:
            return "not run"
        config, result = entry
        count = result["prompt_tokens"] if key == "prompt_tps" else result["generated"]
        mark = "" if config.full_warmup and config.repeats == 3 else SLOW_MARK
        what = "prompt" if key == "prompt_tps" else "generated"
        return f"**{result[key]:.0f}** tok/s ({count} {what} tokens){mark}"

    for key, name in (("prompt_tps", "prompt"), ("gen_tps", "generation")):
        slow = ratio(on_llm[1][key], off_llm[1][key]) if on_llm and off_llm else "-"
        lines.append(f"| {name} | {llm_cell(on_llm, key)} | {llm_cell(off_llm, key)} | {slow} |")
    peaks = [f"{entry[1]['peak_gb']:.2f} GB" if entry else "-" for entry in (on_llm, off_llm)]
    lines += [
        f"| peak MLX memory | {peaks[0]} | {peaks[1]} | |",
        "",
        f"{SLOW_MARK} one run after a short warm-up (16 prompt tokens, 8 generated), 32 tokens generated instead of 128.",
    ]
    errors = [f"- {config.label}: {result['error']}" for config, result in results if "error" in result]
    if errors:
        lines += ["", "## Failed configurations", "", *errors]
    lines += [
        "",
        "## Runs",
        "",
        "| configuration | process wall s | model load s (Whisper: with its warm-up) | matmul GFLOP/s | other processes (cores) | BLAS |",
        "|---|---|---|---|---|---|",
    ]
    for config, result in results:
        blas = f"`{Path(result['blas']).name}`" if result.get("blas") else "bundled"
        load = f"{result['load_s']:.1f}" if "load_s" in result else "-"
        gflops = f"{result['gflops']:.0f}" if "gflops" in result else "-"
        others = f"{result['others_cores']:.2f}" if "others_cores" in result else "-"
        if "retried_from" in result:
            first, second = result["retried_from"], result["others_cores"]
            others += f" (ran twice: {min(first, second):.2f} / {max(first, second):.2f}; the quieter kept)"
        lines.append(f"| {config.label} | {result['wall_s']:.0f} | {load} | {gflops} | {others} | {blas} |")
    return "\n".join(lines) + "\n"


def measure(config: Config, *, retry: bool = False) -> dict[str, Any]:
    print(f"== {config.label}{' (again: other processes were busy)' if retry else ''} ...", file=sys.stderr, flush=True)
    result = run_config(config)
    summary = result.get("error") or (
        ", ".join(f"{c['target']} s: RTF {c['rtf']:.3f}" for c in result["clips"])
        if config.kind == "whisper"
        else f"prompt {result['prompt_tps']:.0f} tok/s, generation {result['gen_tps']:.1f} tok/s"
    )
    others = result.get("others_cores", float("nan"))
    print(f"   {summary} ({result['wall_s']:.0f} s; others {others:.2f} cores)", file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only", action="append", help="run only configurations whose label contains this")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=240.0,
        help=f"seconds for rerunning configurations disturbed by >{BUSY_CORES} busy cores (default 240; 0: none)",
    )
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    missing = [m for m in ("whisper-tiny.en", "whisper-base", "smollm2-135m-instruct") if not (STORE / m).is_dir()]
    if missing:
        print(f"models {missing} not in {STORE}: run `sottovoce models fetch-defaults`", file=sys.stderr)
        return 2
    info = machine()
    start = loadavg()
    print(f"{info['cpu']}; load average at the start: {start}", file=sys.stderr)
    began = time.perf_counter()
    results = [
        (config, measure(config)) for config in plan() if not args.only or any(w in config.label for w in args.only)
    ]
    retry_until = time.perf_counter() + args.retry_budget
    for i in sorted(range(len(results)), key=lambda i: -results[i][1].get("others_cores", 0.0)):
        config, result = results[i]
        if result.get("others_cores", 0.0) > BUSY_CORES and time.perf_counter() + result["wall_s"] < retry_until:
            again = measure(config, retry=True)
            if again.get("others_cores", 9.0) < result["others_cores"]:
                results[i] = (config, {**again, "retried_from": result["others_cores"]})
            else:
                result["retried_from"] = again.get("others_cores", result["others_cores"])
    end = loadavg()
    text = render(results, info, start, end, time.perf_counter() - began)
    print(text)
    if not args.no_write:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([(dataclasses.asdict(c), r) for c, r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
