"""The coverage-guided fuzzer (atheris) runs for a bounded time as part of the test suite and finds no crash."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("SOTTOVOCE_FUZZ_SECONDS", "60"))

pytest.importorskip("atheris", reason="atheris is not installed (it is in the [dev] extra)")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(SECONDS + 240)]


def test_fuzzer_finds_no_crash_in_bounded_time(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz" / "fuzz_protocol.py"),
            f"-max_total_time={SECONDS}",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 180,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
    print(f"atheris: {runs[-1] if runs else '?'} executions in {SECONDS} s, crashes: {crashes or 'none'}")
    assert result.returncode == 0 and not crashes, output[-4000:]
    assert runs and int(runs[-1]) > 100
