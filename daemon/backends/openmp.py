"""OpenMP thread pools that share the CPU politely.

CTranslate2 (faster-whisper) and llama.cpp each run an OpenMP thread pool, one thread per core. By default an OpenMP
thread spins for a while after its work is done, waiting for more: on a 2-core machine the Whisper pool's spinning
threads then starve the chat model's pool, which starts right after the transcript. Measured here (in process, same
weights, 32-token answers): first token 1.1-4.5 s and the whole answer 3-7 s with spinning threads, 0.17-0.19 s and
0.5 s with ``OMP_WAIT_POLICY=PASSIVE``, while transcription kept its speed. (``KMP_BLOCKTIME=0`` alone did not help.)
The setting is read when the OpenMP runtime starts, so it has to be in the environment before either library loads.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


def wait_passively() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise (call before the engines load)."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
