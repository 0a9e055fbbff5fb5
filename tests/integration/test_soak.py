"""The soak of bench/soak.py, bounded (about 45 s): a quarter of 20 clients abuse the daemon (600 s dumps, churn,
routing-id reuse, vanishing mid-answer) while a well-behaved speaker keeps asking. Asserts what must never happen,
whatever the machine's speed: a leak across an id reuse, a misrouted reply, an `internal` error, state left behind
by clients that are gone. Latencies are reported by bench/soak.py (bench/SOAK.md), not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import soak  # type: ignore[import-not-found]  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_abusive_clients_neither_leak_nor_misroute_nor_leave_state(
    tmp_path: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path
) -> None:
    daemon = DaemonProcess(tmp_path, whisper_model=str(tiny_whisper_dir), llm_model=str(tiny_llm_dir)).start()
    try:
        assert daemon.proc is not None
        cfg = soak.SoakConfig(duration=30, phase=10, settle=2, reply_timeout=20, cpu_window=1)
        result = soak.run_soak(daemon.endpoint, daemon.proc.pid, cfg)
    finally:
        daemon.stop()
    counts = result["counts"]
    print(soak.report(result, "test"))
    assert counts.get("leaks", 0) == 0 and counts.get("misrouted", 0) == 0, result["problems"]
    assert not [t for t in result["problems"] if "internal" in t], result["problems"]
    # The abuse happened...
    assert counts.get("dumps_left", 0) and counts.get("churns", 0) and counts.get("vanished", 0), counts
    # ...the speaker was answered...
    assert [s for s in result["samples"] if s["phase"] == "quiet"], result
    # ...and nothing of the clients that left is kept.
    assert result["sessions_after"] == 0 and result["buffered_after"] == 0 and result["listening_after"] == 0
