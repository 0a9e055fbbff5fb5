"""Use the system OpenBLAS for MLX's CPU backend on Linux.

The ``mlx-cpu`` wheel links a bundled reference BLAS (~3-8 GFLOP/s on a 512x512 matmul here, ~130-230 with
OpenBLAS: Whisper tiny.en 9.2 s -> 1.4 s). Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is first
imported puts its ``cblas_*``/``sgemm_`` symbols ahead of the bundled ones when the dynamic linker binds mlx's
library. Loading it afterwards changes nothing (measured), so that case only warns.

This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV_VAR = "SOTTOVOCE_OPENBLAS"
"""Set to ``0`` to keep MLX's bundled BLAS (benchmarks compare both)."""

# Debian/Ubuntu's libopenblas0-pthread; find_library("openblas") covers other layouts.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)


def _mapped_openblas() -> str | None:
    """Path of a libopenblas mapped into this process (by us, LD_PRELOAD or anyone), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "libopenblas" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def openblas_in_use() -> bool:
    """True when a libopenblas is loaded in this process (Linux only; False elsewhere)."""
    return _mapped_openblas() is not None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU backend uses it; returns the path loaded, or None.

    Call before anything imports ``mlx.core``. No-op off Linux, when ``SOTTOVOCE_OPENBLAS=0``, or when no OpenBLAS is
    installed (MLX then runs on its slow bundled BLAS).
    """
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        logger.debug("OpenBLAS preload disabled by %s=0", ENV_VAR)
        return None
    already = _mapped_openblas()
    if already is not None:
        return already
    if "mlx.core" in sys.modules:
        logger.warning(
            "mlx.core was imported before OpenBLAS could be preloaded: MLX keeps its slow bundled BLAS "
            "(call preload_openblas() first, or set LD_PRELOAD)"
        )
        return None
    found = ctypes.util.find_library("openblas")
    for candidate in (*_CANDIDATES, *([found] if found else [])):
        if candidate.startswith("/") and not os.path.exists(candidate):
            continue
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            logger.debug("could not load %s: %s", candidate, exc)
            continue
        path = _mapped_openblas() or candidate
        logger.debug("preloaded OpenBLAS from %s", path)
        return path
    logger.debug("no OpenBLAS found; MLX uses its bundled BLAS")
    return None
