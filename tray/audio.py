"""Microphone capture for the tray: PortAudio callback -> bounded mailbox -> 16 kHz 4096-sample chunks.

Three pieces, so that all the logic is testable without a sound card:

- ``Mailbox``: what the IO thread waits on. The PortAudio callback only copies its block into it (bounded: if
  the IO thread falls behind, the oldest blocks are dropped and counted, the callback never blocks); the tray's
  commands go into it too, ahead of audio, so one ``get`` wakes the IO thread for either.
- ``Recording`` (with ``PreRoll``, ``Chunker``, ``Resampler``): turns captured blocks into the chunks one turn
  sends. Blocks carry the time their first sample was captured (PortAudio's ADC time), so a recording takes
  exactly the audio from ``preroll`` seconds before the key press to the key release, although PortAudio
  delivers each block 0.1-0.6 s after it was captured.
- ``Microphone``: the sounddevice stream (imported lazily). It opens the named device (or the default) at 16 kHz,
  falling back to the device's own rate with soxr resampling when 16 kHz is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sottovoce.client.protocol import CHUNK_SAMPLES, SAMPLE_RATE

log = logging.getLogger(__name__)

BLOCK_SAMPLES = 1024
"""PortAudio block at 16 kHz (64 ms). Smaller than a chunk so the last words reach us sooner after the key is
released (see bench/TRAY.md); the chunks on the wire are still ``CHUNK_SAMPLES`` (4096)."""
STREAM_LATENCY = "low"
MAILBOX_SECONDS = 10.0
"""Audio the mailbox holds if the IO thread stalls; older blocks are dropped beyond that."""

NO_DEVICE = (
    "no microphone found: PortAudio sees no input device (is a sound server such as PulseAudio or PipeWire "
    "running, and is a microphone plugged in?)"
)
SILENT_MIC = (
    "the microphone delivers only silence (every sample is zero). On macOS: allow microphone access for the "
    "app that runs `sottovoce tray` (System Settings > Privacy & Security > Microphone) and restart it; "
    "elsewhere: check that the input is not muted"
)
STALLED_MIC = "the microphone stopped delivering audio (unplugged, or taken by another program?)"


class MicrophoneError(RuntimeError):
    """The microphone cannot be used; the message says why and what to do."""


# ---- blocks and the mailbox ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioBlock:
    pcm: np.ndarray
    """Mono float32 at ``rate``."""
    rate: int
    t0: float | None
    """Stream time (seconds, the stream's clock) of the first sample; None where the host gives none."""
    arrived: float = 0.0
    """time.monotonic() when the callback delivered it."""

    @property
    def duration(self) -> float:
        return self.pcm.size / self.rate

    @property
    def t1(self) -> float | None:
        return None if self.t0 is None else self.t0 + self.duration


class Mailbox:
    """Commands (unbounded, first out) and audio blocks (bounded, drop-oldest) behind one condition variable."""

    def __init__(self, max_audio_blocks: int) -> None:
        self._cond = threading.Condition()
        self._commands: collections.deque[object] = collections.deque()
        self._audio: collections.deque[AudioBlock] = collections.deque()
        self._max_audio = max_audio_blocks
        self.dropped_blocks = 0

    def put_audio(self, block: AudioBlock) -> None:
        """From the PortAudio callback: O(1), never waits for the consumer."""
        with self._cond:
            if len(self._audio) >= self._max_audio:
                self._audio.popleft()
                self.dropped_blocks += 1
            self._audio.append(block)
            self._cond.notify()

    def put_command(self, command: object) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def get(self, timeout: float | None) -> object | None:
        """The next command, else the next audio block; None after ``timeout`` seconds with neither."""
        with self._cond:
            if not self._commands and not self._audio:
                self._cond.wait(timeout)
            if self._commands:
                return self._commands.popleft()
            if self._audio:
                return self._audio.popleft()
            return None

    def clear_audio(self) -> None:
        with self._cond:
            self._audio.clear()


# ---- turning blocks into chunks ------------------------------------------------------------------------------


class Chunker:
    """Re-cuts a stream of arrays into ``size``-sample chunks; ``flush`` returns the rest."""

    def __init__(self, size: int = CHUNK_SAMPLES) -> None:
        if size <= 0:
            raise ValueError("chunk size must be positive")
        self.size = size
        self._parts: list[np.ndarray] = []
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        if pcm.size == 0:
            return []
        self._parts.append(np.asarray(pcm, dtype=np.float32))
        self._pending += pcm.size
        if self._pending < self.size:
            return []
        data = np.concatenate(self._parts)
        n_full = data.size // self.size
        chunks = [data[i * self.size : (i + 1) * self.size].copy() for i in range(n_full)]
        rest = data[n_full * self.size :]
        self._parts = [rest] if rest.size else []
        self._pending = rest.size
        return chunks

    def flush(self) -> np.ndarray | None:
        if not self._pending:
            return None
        data = np.concatenate(self._parts)
        self._parts, self._pending = [], 0
        return data


class Resampler:
    """Streaming resampling to 16 kHz with soxr (state kept across blocks, so no clicks at block edges)."""

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE) -> None:
        import soxr

        self.rate_in, self.rate_out = rate_in, rate_out
        self._stream = soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality="HQ")

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        out = self._stream.resample_chunk(np.ascontiguousarray(pcm, dtype=np.float32), last=last)
        return np.asarray(out, dtype=np.float32).reshape(-1)


class PreRoll:
    """The newest ``seconds`` of audio (plus the block in progress), kept while nobody is recording."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._blocks: collections.deque[AudioBlock] = collections.deque()
        self._samples = 0

    def add(self, block: AudioBlock) -> None:
        if self.seconds <= 0:
            return
        self._blocks.append(block)
        self._samples += block.pcm.size
        keep = int(self.seconds * block.rate)
        while self._blocks and self._samples - self._blocks[0].pcm.size >= keep:
            self._samples -= self._blocks.popleft().pcm.size

    def take(self) -> list[AudioBlock]:
        blocks = list(self._blocks)
        self._blocks.clear()
        self._samples = 0
        return blocks

    def clear(self) -> None:
        self._blocks.clear()
        self._samples = 0


class Recording:
    """One turn's audio: blocks in, 16 kHz chunks out, from ``start - preroll`` up to ``stop``.

    With timestamps (``start``/``stop`` and the blocks' ``t0`` on the stream's clock) the edges are cut to the
    sample; without them the pre-roll is the newest ``preroll`` seconds and the recording ends with the blocks
    delivered before the stop.
    """

    def __init__(self, start: float | None, preroll: float, chunk_samples: int = CHUNK_SAMPLES) -> None:
        self.start = start
        self.preroll = preroll
        self.begin = None if start is None else start - preroll
        self.stop: float | None = None
        self.stopped = False
        self.chunker = Chunker(chunk_samples)
        self.samples = 0
        self.pre_samples = 0
        """Of ``samples``, those captured before the press (the pre-roll)."""
        self.peak = 0.0

    def add_preroll(self, blocks: Sequence[AudioBlock]) -> list[np.ndarray]:
        if self.begin is None or any(b.t0 is None for b in blocks):
            # No clock: keep the newest `preroll` seconds.
            want = int(self.preroll * SAMPLE_RATE)
            pcm = np.concatenate([b.pcm for b in blocks]) if blocks else np.zeros(0, np.float32)
            pcm = pcm[max(0, pcm.size - want) :] if want else pcm[:0]
            self.pre_samples += pcm.size
            return self._take(pcm)
        chunks: list[np.ndarray] = []
        for block in blocks:
            chunks.extend(self.feed(block))
        return chunks

    def feed(self, block: AudioBlock) -> list[np.ndarray]:
        """The chunks completed by ``block`` (its part inside [begin, stop))."""
        pcm = block.pcm
        if block.t0 is None:
            return self._take(pcm)
        first = 0
        if self.begin is not None:
            first = max(0, round((self.begin - block.t0) * block.rate))
        end = pcm.size
        if self.stop is not None:
            end = max(0, round((self.stop - block.t0) * block.rate))
        pcm = pcm[first:end]
        if self.start is not None and pcm.size:
            before_press = round((self.start - block.t0) * block.rate) - first
            self.pre_samples += min(max(before_press, 0), pcm.size)
        return self._take(pcm)

    def covers_stop(self, block: AudioBlock) -> bool:
        """Whether ``block`` reaches the stop time, so no later block can hold audio from before the release."""
        return self.stop is not None and block.t1 is not None and block.t1 >= self.stop

    def finish(self) -> np.ndarray | None:
        self.stopped = True
        return self.chunker.flush()

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def _take(self, pcm: np.ndarray) -> list[np.ndarray]:
        if pcm.size:
            self.samples += pcm.size
            self.peak = max(self.peak, float(np.max(np.abs(pcm))))
        return self.chunker.push(pcm)


# ---- the device ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    hostapi: str
    default_rate: float
    is_default: bool


def _sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # libportaudio missing
        raise MicrophoneError(f"PortAudio is not available ({exc}); install libportaudio2") from None
    except ImportError:
        raise MicrophoneError("the `sounddevice` package is missing: pip install 'sottovoce[tray]'") from None
    return sounddevice


def list_input_devices(sd: Any = None, *, refresh: bool = False) -> list[InputDevice]:
    """Input devices PortAudio sees (``refresh`` re-scans, to see devices plugged in since; only with no stream
    open)."""
    sd = sd or _sounddevice()
    if refresh and hasattr(sd, "_terminate"):
        try:
            sd._terminate()
            sd._initialize()
        except Exception:  # pragma: no cover - PortAudio re-init failure leaves the old list
            log.debug("PortAudio re-scan failed", exc_info=True)
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except Exception as exc:
        raise MicrophoneError(f"cannot list audio devices: {exc}") from None
    found = []
    for index, dev in enumerate(devices):
        if dev["max_input_channels"] <= 0:
            continue
        api = hostapis[dev["hostapi"]]["name"] if dev["hostapi"] < len(hostapis) else "?"
        found.append(InputDevice(index, dev["name"], api, float(dev["default_samplerate"]), index == default_in))
    return found


def find_device(devices: Sequence[InputDevice], name: str | None) -> InputDevice | None:
    """The device called ``name`` (exact, else the only case-insensitive substring match); None: the default."""
    if not name:
        return None
    for dev in devices:
        if dev.name == name:
            return dev
    matches = [d for d in devices if name.lower() in d.name.lower()]
    return matches[0] if len(matches) == 1 else None


class Microphone:
    """A sounddevice input stream that sends ``AudioBlock``s to ``sink`` (from PortAudio's thread)."""

    def __init__(self, sink: Callable[[AudioBlock], None], sd: Any = None) -> None:
        self._sink = sink
        self._sd = sd
        self._stream: Any = None
        self.rate = SAMPLE_RATE
        self.channels = 1
        self.device_name = ""
        self.opened_at = time.monotonic()
        self.last_block_at = 0.0
        """time.monotonic() of the last callback; 0 until the first (PortAudio takes 0.5-1.6 s to start)."""
        self.status_flags = 0
        self.finished = threading.Event()
        self.devices: list[str] = []
        """The input devices' names, as seen at the last ``open``."""

    @property
    def is_open(self) -> bool:
        return self._stream is not None

    def open(self, name: str | None, *, rescan: bool = False) -> str | None:
        """Open ``name`` (None: the default); returns a warning (e.g. fell back to the default) or None.

        ``rescan``: ask PortAudio for its device list afresh first (it is read once, at PortAudio's start), to see
        a microphone plugged in since; it takes a moment, so only after a failure or when ``name`` is missing.
        """
        self.close()
        sd = self._sd = self._sd or _sounddevice()
        devices = list_input_devices(sd, refresh=rescan)
        if not rescan and (not devices or (name and find_device(devices, name) is None)):
            devices = list_input_devices(sd, refresh=True)
        self.devices = [d.name for d in devices]
        if not devices:
            raise MicrophoneError(NO_DEVICE)
        warning = None
        device = find_device(devices, name)
        if name and device is None:
            warning = f"microphone {name!r} not found; using the system default"
        index = device.index if device is not None else None
        rate, channels = self._choose_format(sd, index, devices)
        block = max(64, round(BLOCK_SAMPLES * rate / SAMPLE_RATE))
        self.finished.clear()
        try:
            stream = sd.InputStream(
                samplerate=rate,
                channels=channels,
                dtype="float32",
                blocksize=block,
                latency=STREAM_LATENCY,
                device=index,
                callback=self._callback,
                finished_callback=self.finished.set,
            )
            stream.start()
        except Exception as exc:
            raise MicrophoneError(f"cannot open the microphone ({name or 'system default'}): {exc}") from None
        self._stream = stream
        self.rate, self.channels = int(rate), channels
        dev_info = devices[[d.index for d in devices].index(index)] if index is not None else None
        self.device_name = dev_info.name if dev_info else "system default"
        self.opened_at = time.monotonic()
        self.last_block_at = 0.0
        log.info(
            "microphone open: %s at %d Hz, %d channel(s), block %d, latency %.3f s",
            self.device_name,
            self.rate,
            channels,
            block,
            float(getattr(stream, "latency", 0.0) or 0.0),
        )
        return warning

    def _choose_format(self, sd: Any, index: int | None, devices: Sequence[InputDevice]) -> tuple[int, int]:
        """16 kHz mono if the device takes it; else its own rate (resampled by us), mono or stereo."""
        default = next((d for d in devices if d.index == index or (index is None and d.is_default)), None)
        native = int(default.default_rate) if default else 48_000
        errors = []
        for rate, channels in ((SAMPLE_RATE, 1), (native, 1), (native, 2)):
            try:
                sd.check_input_settings(device=index, samplerate=rate, channels=channels, dtype="float32")
                if rate != SAMPLE_RATE:
                    log.info("the microphone refuses 16 kHz mono; capturing at %d Hz x%d, resampling", rate, channels)
                return rate, channels
            except Exception as exc:
                errors.append(f"{rate} Hz x{channels}: {exc}")
        raise MicrophoneError(f"the microphone accepts none of the formats tried ({'; '.join(errors)})")

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # PortAudio's thread: copy and hand over, nothing else (never block, never touch a socket).
        pcm = indata[:, 0].copy() if self.channels == 1 else indata.mean(axis=1, dtype=np.float32)
        adc = getattr(time_info, "inputBufferAdcTime", 0.0)
        now = time.monotonic()
        self.last_block_at = now
        if status:
            self.status_flags |= int(status)
        self._sink(AudioBlock(pcm, self.rate, adc if adc else None, now))

    def time(self) -> float | None:
        """The stream's clock now (same clock as the blocks' ``t0``), or None."""
        if self._stream is None:
            return None
        try:
            return float(self._stream.time) or None
        except Exception:
            return None

    def stalled(self, now: float, first_block_grace: float = 4.0, gap: float = 2.0) -> bool:
        """No block for a while: the device vanished or stopped (the stream's own error callback may never come)."""
        if self._stream is None:
            return False
        if self.finished.is_set():
            return True
        if self.last_block_at == 0.0:
            return now - self.opened_at > first_block_grace
        return now - self.last_block_at > gap

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.abort()  # stop() can block forever when the source has stopped delivering
        except Exception:
            log.debug("abort failed", exc_info=True)
        try:
            stream.close()
        except Exception:
            log.debug("close failed", exc_info=True)
