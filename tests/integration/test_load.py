"""Load against the real daemon (tiny MLX models): 20 clients streaming audio at 10x real time plus typed asks.

A 15 s cut of ``bench/load.py`` (the full 2-minute run and its results are in bench/LOAD.md). Checked: nothing lost
or misrouted (each client's transcript reports its own utterance's length, each typed answer and prompt size match
what its own question got alone), the queue answers `busy` instead of growing, and the daemon's memory stays flat.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def exited_cleanly(code: int, log: str) -> bool:
    """0, or bug R5: MLX aborts in its C++ static destructors at interpreter exit when models were loaded on the model
    thread ("terminate called without an active exception", SIGABRT) even though shutdown itself went fine."""
    return code == 0 or (code == -6 and "terminate called without an active exception" in log)


def _load_bench():
    spec = importlib.util.spec_from_file_location("sottovoce_bench_load", ROOT / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


load = _load_bench()


@pytest.mark.parametrize("queue_depth", [2])
def test_20_clients_at_10x_for_15_s_lose_and_misroute_nothing(
    tmp_path: Path, tiny_whisper_dir: Path, tiny_llm_dir: Path, queue_depth: int
) -> None:
    cfg = load.LoadConfig(clients=20, duration=15.0, speed=10.0, queue_depth=queue_depth, max_tokens=8)
    daemon = DaemonProcess(
        tmp_path,
        whisper_model=str(tiny_whisper_dir),
        llm_model=str(tiny_llm_dir),
        extra_args=["--queue-depth", str(queue_depth), "--max-tokens", "8", "--history-turns", "0"],
    )
    daemon.start()
    try:
        assert daemon.proc is not None
        result = load.run_load(daemon.endpoint, daemon.proc.pid, cfg)
    finally:
        exit_code = daemon.stop()
    print(load.MARKDOWN_HEADER)
    print(load.markdown_row(result))
    summary = {k: result[k] for k in ("lost", "misrouted", "mismatched", "errors", "problems", "hung_clients")}
    assert result["lost"] == 0 and result["misrouted"] == 0 and result["mismatched"] == 0, summary
    assert result["errors"] == {}, summary
    assert result["distinct_prompt_tokens"] == cfg.clients  # every client's question is told apart by content
    assert result["voice_p50_s"] is not None and result["text_p50_s"] is not None  # both kinds completed
    assert result["busy"] > 0  # 20 clients against 1 running + 2 waiting: the queue pushed back
    assert result["busy_p99_s"] < 1.0  # and said so at once, not after waiting in line
    assert result["rss_second_half_growth_mb"] < 64, result  # bounded: no growth once warm
    assert result["rss_peak_mb"] < 2048, result
    assert exited_cleanly(exit_code, daemon.log()), daemon.log()[-3000:]
