"""OpenBLAS preloading, checked in fresh interpreters (this one already preloaded it in conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sottovoce.daemon import blas

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not any(os.path.exists(p) for p in blas._CANDIDATES),
    reason="needs Linux with Debian's libopenblas0-pthread",
)

PROBE = textwrap.dedent(
    """
    import json, logging, sys, time
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    from sottovoce.daemon.blas import openblas_in_use, preload_openblas
    if "--late" in sys.argv:
        import mlx.core
    loaded = preload_openblas()
    import mlx.core as mx
    a = mx.random.normal((384, 384))
    mx.eval(a @ a)
    started = time.perf_counter()
    for _ in range(4):
        mx.eval(a @ a)
    gflops = 4 * 2 * 384**3 / (time.perf_counter() - started) / 1e9
    with open("/proc/self/maps") as maps:
        mapped = "libopenblas" in maps.read()
    print(json.dumps({"loaded": loaded, "in_use": openblas_in_use(), "mapped": mapped, "gflops": gflops}))
    """
)


def _probe(*args: str, **env: str) -> tuple[dict[str, object], str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV_VAR)}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=environ, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_preload_loads_openblas_before_mlx_and_speeds_up_matmul() -> None:
    on, on_log = _probe()
    off, off_log = _probe(SOTTOVOCE_OPENBLAS="0")

    assert isinstance(on["loaded"], str) and "libopenblas" in on["loaded"]
    assert on["in_use"] is True and on["mapped"] is True
    assert "preloaded OpenBLAS" in on_log

    assert off["loaded"] is None
    assert off["in_use"] is False and off["mapped"] is False
    assert "disabled by SOTTOVOCE_OPENBLAS=0" in off_log
    # The point of it all: MLX's matmuls really run on OpenBLAS (~40x here; 4x leaves room for a busy machine).
    assert float(on["gflops"]) > 4 * float(off["gflops"]), (on, off)  # type: ignore[arg-type]


def test_preload_after_mlx_import_warns_and_does_nothing() -> None:
    late, log = _probe("--late")
    assert late["loaded"] is None
    assert late["mapped"] is False
    assert "WARNING" in log and "mlx.core was imported before" in log


@pytest.mark.skipif(os.environ.get(blas.ENV_VAR) == "0", reason="preloading disabled for this run")
def test_preload_reports_an_openblas_already_mapped() -> None:
    # conftest preloaded it in this process: a second call returns the mapped path and loads nothing new.
    assert blas.openblas_in_use()
    path = blas.preload_openblas()
    assert path is not None and "libopenblas" in os.path.basename(path) and os.path.exists(path)
