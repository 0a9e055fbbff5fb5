#!/usr/bin/env python
"""Coverage-guided fuzzing (atheris/libFuzzer) of frame decoding and dispatch.

Each input is a sequence of client messages (see ``harness.steps_from_bytes``) from up to four client identities,
some of which vanish mid-ask; it runs through the real ``protocol.decode``, ``Server.handle``, the session table and
the model worker's serving code (fake models), and the oracle in ``harness.py`` turns any escaped exception, malformed
or misrouted reply, lost or doubled final reply, or unbounded state into a crash.

    python tests/fuzz/fuzz_protocol.py -max_total_time=60            # CI: one minute, seed corpus in a temp dir
    python tests/fuzz/fuzz_protocol.py CORPUS_DIR -max_total_time=600  # keep what it learns in CORPUS_DIR
    python tests/fuzz/fuzz_protocol.py crash-FILE                      # replay one input (a regression check)

Any libFuzzer flag works (-runs=N, -timeout=S, -rss_limit_mb=MB, -print_final_stats=1, -atheris_runs=N). With no
corpus folder given, the seeds from ``harness.seed_inputs()`` are written to a temporary one, and ``protocol.dict``
beside this file is used as the dictionary. Crash inputs are written as ``crash-<sha1>`` in the current directory
(``-artifact_prefix=DIR/`` to change).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

with atheris.instrument_imports(include=["sottovoce", "harness", "fakes"]):
    import harness

logging.disable(logging.CRITICAL)  # the daemon logs every bad message; millions of lines help nobody


def test_one_input(data: bytes) -> None:
    harness.check_bytes(data)


# ---- structure-aware mutation ------------------------------------------------------------------------------------
# Byte flips alone rarely keep the step framing and the JSON intact; half of the mutations here edit one header as
# JSON (a field set to a hostile value, dropped, or the type switched), or add, drop, duplicate or reorder whole
# messages. The rest are libFuzzer's own byte mutations, on one frame or on the whole input.

FIELDS = (
    "id",
    "type",
    "text",
    "rate",
    "stream",
    "max_tokens",
    "temperature",
    "language",
    "system_prompt",
    "protocol",
    "client",
    "ref",
    "x",
)
TYPES = ("hello", "chunk", "ask", "cancel", "reset", "status", "done", "error", "transcript-chunk", "")
RAW_VALUES = (
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "4000",
    "16000",
    "44100",
    "384000",
    "384001",
    "2147483648",
    "9223372036854775808",
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "0.5",
    "2.0000001",
    "1e-320",
    '""',
    '" "',
    '"\\ud800"',
    '"\\udfff\\ud800"',
    '"\\u0000"',
    '"en"',
    '"xx-invalid"',
    '"1.0"',
    '"2.0"',
    '"1"',
    '"\\ufeff"',
    '"é中😀"',
    "[]",
    "{}",
    '["a"]',
    '{"a":{"b":[1]}}',
    "[" * 64 + "]" * 64,
    '"' + "w " * 3000 + '"',
)


def _mutate_header(header: bytes, rng: random.Random) -> bytes | None:
    try:
        obj = json.loads(header)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    raw: dict[str, str] = {}
    op = rng.randrange(4)
    if op == 0 or not obj:
        key = rng.choice(FIELDS)
        token = f"@@raw{len(raw)}@@"
        raw[token] = rng.choice(RAW_VALUES)
        obj[key] = token
    elif op == 1:
        obj.pop(rng.choice(list(obj)), None)
    elif op == 2:
        obj["type"] = rng.choice(TYPES)
    else:
        obj["id"] = rng.choice(["x", "y", "", "probe-0074726179", "a" * 300])
    text = json.dumps(obj, ensure_ascii=True, allow_nan=True)
    for token, value in raw.items():
        text = text.replace(f'"{token}"', value)
    return text.encode()


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    steps = harness.steps_from_bytes(data)
    choice = rng.random()
    if not steps or choice < 0.25:
        return atheris.Mutate(data, max_size)
    i = rng.randrange(len(steps))
    step = steps[i]
    if choice < 0.6 and len(step.frames) >= 2:
        mutated = _mutate_header(step.frames[1], rng)
        if mutated is not None:
            step.frames[1] = mutated
        else:
            step.frames[1] = atheris.Mutate(step.frames[1], 4096)
    elif choice < 0.75 and step.frames:
        j = rng.randrange(len(step.frames))
        step.frames[j] = atheris.Mutate(step.frames[j], min(0xFFFF, max(16, 2 * len(step.frames[j]))))
    elif choice < 0.85:
        steps.insert(rng.randrange(len(steps) + 1), harness.Step(i, list(step.frames), rng.random() < 0.5))
    elif choice < 0.9 and len(steps) > 1:
        del steps[i]
    elif choice < 0.95 and len(steps) > 1:
        j = rng.randrange(len(steps))
        steps[i], steps[j] = steps[j], steps[i]
    else:
        step.identity = rng.randrange(4)
        step.run_worker = not step.run_worker
        step.vanish = rng.random() < 0.2
    out = harness.steps_to_bytes(steps)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def _args(argv: list[str]) -> list[str]:
    args = list(argv)
    flags = [a for a in args[1:] if a.startswith("-")]
    paths = [a for a in args[1:] if not a.startswith("-")]
    if not any(f.startswith("-dict=") for f in flags):
        args.append(f"-dict={HERE / 'protocol.dict'}")
    if not any(f.startswith("-timeout=") for f in flags):
        args.append("-timeout=10")  # a single input running 10 s is a hang
    if not any(f.startswith("-rss_limit_mb=") for f in flags):
        args.append("-rss_limit_mb=1024")  # and one passing 1 GiB is unbounded memory
    if not paths:  # no corpus given: start from the seeds, in a scratch folder (libFuzzer writes into it)
        corpus = Path(tempfile.mkdtemp(prefix="sottovoce-fuzz-corpus-"))
        for name, data in harness.seed_inputs().items():
            (corpus / name).write_bytes(data)
        args.append(str(corpus))
    return args


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    atheris.Setup(_args(sys.argv), test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
