"""Which float precision to run models in on the current MLX device.

Half precision halves memory and is fast on Metal/CUDA, but MLX's CPU backend has no fast half-precision kernels:
mlx-whisper's default ``fp16=True`` ran ~7x slower than float32 on the CPU (GUIDE section 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx


def prefers_half_precision() -> bool:
    """True on a GPU (Metal or CUDA), False on the CPU."""
    import mlx.core as mx  # imported late: OpenBLAS must be preloaded before mlx.core is first imported

    return mx.default_device().type != mx.DeviceType.cpu


def compute_dtype(half: bool | None = None) -> mx.Dtype:
    """float16 when ``half`` (default: ``prefers_half_precision()``), else float32."""
    import mlx.core as mx

    if half is None:
        half = prefers_half_precision()
    return mx.float16 if half else mx.float32
