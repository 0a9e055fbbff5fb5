"""Audio chunking for the tray: mailbox, chunker, pre-roll, the edges of a recording, resampling, device choice."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sottovoce.client.protocol import CHUNK_SAMPLES, SAMPLE_RATE
from sottovoce.tray import audio
from sottovoce.tray.audio import AudioBlock, Chunker, Mailbox, PreRoll, Recording


def ramp(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)


def blocks(total: int, size: int, t0: float = 100.0) -> list[AudioBlock]:
    """Consecutive blocks of a ramp (sample value = sample index), timestamped on a 16 kHz clock."""
    return [AudioBlock(ramp(min(size, total - i), i), SAMPLE_RATE, t0 + i / SAMPLE_RATE) for i in range(0, total, size)]


# ---- Chunker ----


def test_chunker_cuts_exact_chunks_in_order() -> None:
    chunker = Chunker()
    out: list[np.ndarray] = []
    for block in blocks(3 * CHUNK_SAMPLES + 100, 1000):
        out += chunker.push(block.pcm)
    assert [c.size for c in out] == [CHUNK_SAMPLES] * 3
    assert chunker.pending == 100
    rest = chunker.flush()
    assert rest is not None and rest.size == 100
    np.testing.assert_array_equal(np.concatenate([*out, rest]), ramp(3 * CHUNK_SAMPLES + 100))
    assert chunker.flush() is None


def test_chunker_big_block_and_empty_push() -> None:
    chunker = Chunker(4)
    assert chunker.push(np.zeros(0, np.float32)) == []
    out = chunker.push(ramp(10))
    assert [c.tolist() for c in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rest = chunker.flush()
    assert rest is not None and rest.tolist() == [8, 9]
    with pytest.raises(ValueError):
        Chunker(0)


def test_chunks_are_float32_copies() -> None:
    chunker = Chunker(4)
    data = ramp(8)
    out = chunker.push(data)
    data[:] = -1
    assert out[0].dtype == np.float32 and out[0].tolist() == [0, 1, 2, 3]


# ---- Mailbox ----


def test_mailbox_commands_first_then_audio_fifo() -> None:
    box = Mailbox(max_audio_blocks=10)
    b1, b2 = blocks(2048, 1024)
    box.put_audio(b1)
    box.put_command("stop")
    box.put_audio(b2)
    assert box.get(0) == "stop"
    assert box.get(0) is b1 and box.get(0) is b2
    assert box.get(0) is None


def test_mailbox_drops_oldest_audio_when_full_and_never_blocks() -> None:
    box = Mailbox(max_audio_blocks=3)
    all_blocks = blocks(5 * 100, 100)
    for block in all_blocks:
        box.put_audio(block)
    assert box.dropped_blocks == 2
    assert [box.get(0) for _ in range(3)] == all_blocks[2:]


def test_mailbox_wakes_a_waiting_consumer() -> None:
    box = Mailbox(4)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(box.get(5)))
    thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    box.put_command("go")
    thread.join(2)
    assert got == ["go"] and time.monotonic() - started < 1
    assert box.get(0.01) is None  # times out


# ---- PreRoll and Recording ----


def test_preroll_keeps_the_newest_seconds() -> None:
    pre = PreRoll(0.1)  # 1600 samples
    for block in blocks(10 * 512, 512):
        pre.add(block)
    kept = pre.take()
    n = sum(b.pcm.size for b in kept)
    assert 1600 <= n < 1600 + 512
    assert kept[-1].pcm[-1] == 10 * 512 - 1
    assert pre.take() == []
    off = PreRoll(0.0)
    off.add(blocks(512, 512)[0])
    assert off.take() == []


def test_recording_cuts_at_preroll_start_and_at_release_to_the_sample() -> None:
    t0 = 100.0
    all_blocks = blocks(SAMPLE_RATE * 3, 1024, t0)  # 3 s of ramp: value = index
    press, release = t0 + 1.0, t0 + 2.5
    rec = Recording(start=press, preroll=0.25)
    pre = PreRoll(0.25)
    delivered_before_press = [b for b in all_blocks if b.t1 is not None and b.t1 <= press - 0.1]
    for block in delivered_before_press:
        pre.add(block)
    chunks = rec.add_preroll(pre.take())
    rest_blocks = all_blocks[len(delivered_before_press) :]
    rec.stop = release
    for block in rest_blocks:
        chunks += rec.feed(block)
        if rec.covers_stop(block):
            break
    tail = rec.finish()
    pcm = np.concatenate([*chunks, tail]) if tail is not None else np.concatenate(chunks)
    first, last = int(0.75 * SAMPLE_RATE), int(2.5 * SAMPLE_RATE)
    np.testing.assert_array_equal(pcm, ramp(last - first, first))
    assert all(c.size == CHUNK_SAMPLES for c in chunks)
    assert rec.seconds == pytest.approx(1.75)
    assert rec.pre_samples == int(0.25 * SAMPLE_RATE)
    assert rec.peak == last - 1


def test_recording_without_timestamps_keeps_newest_preroll_and_everything_after() -> None:
    untimed = [AudioBlock(b.pcm, b.rate, None) for b in blocks(16000, 1000)]
    rec = Recording(start=None, preroll=0.1)
    chunks = rec.add_preroll(untimed[:10])  # 10000 samples delivered before the press
    chunks += rec.feed(untimed[10])
    assert not rec.covers_stop(untimed[10])
    tail = rec.finish()
    assert tail is not None
    pcm = np.concatenate([*chunks, tail])
    np.testing.assert_array_equal(pcm, ramp(1600 + 1000, 10000 - 1600))
    assert rec.pre_samples == 1600


def test_recording_with_no_preroll_and_silence() -> None:
    rec = Recording(start=100.0, preroll=0.0)
    assert rec.add_preroll([]) == []
    rec.feed(AudioBlock(np.zeros(2048, np.float32), SAMPLE_RATE, 100.0))
    assert rec.samples == 2048 and rec.peak == 0.0


# ---- resampling and devices ----


def test_resampler_48k_to_16k_streams_without_losing_audio() -> None:
    resample = audio.Resampler(48_000)
    t = np.arange(48_000 * 2) / 48_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = [resample(tone[i : i + 3072]) for i in range(0, tone.size, 3072)]
    out.append(resample(np.zeros(0, np.float32), last=True))
    pcm = np.concatenate(out)
    assert pcm.dtype == np.float32 and abs(pcm.size - 32_000) <= 2
    spectrum = np.abs(np.fft.rfft(pcm[4000:20000]))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / 16000 - 440) < 2


class FakeStream:
    def __init__(self, sd: FakeSD, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.sd = sd
        self.latency = 0.128
        self.time = 42.0
        self.aborted = self.closed = False

    def start(self) -> None:
        if self.sd.fail_open:
            raise RuntimeError("Device unavailable [PaErrorCode -9985]")

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class FakeSD:
    """Enough of the sounddevice module for Microphone."""

    def __init__(self, devices: list[dict[str, Any]], rates: tuple[int, ...] = (16000,), fail_open: bool = False):
        self.devices = devices
        self.rates = rates
        self.fail_open = fail_open
        self.default = SimpleNamespace(device=(0, 0))
        self.streams: list[FakeStream] = []

    def query_devices(self) -> list[dict[str, Any]]:
        return self.devices

    def query_hostapis(self) -> list[dict[str, Any]]:
        return [{"name": "ALSA"}]

    def check_input_settings(self, device: Any, samplerate: int, channels: int, dtype: str) -> None:
        if samplerate not in self.rates:
            raise RuntimeError("Invalid sample rate [PaErrorCode -9997]")

    def InputStream(self, **kwargs: Any) -> FakeStream:
        stream = FakeStream(self, **kwargs)
        self.streams.append(stream)
        return stream


def dev(name: str, inputs: int = 2, rate: float = 48000.0) -> dict[str, Any]:
    return {"name": name, "max_input_channels": inputs, "hostapi": 0, "default_samplerate": rate}


def test_list_and_find_devices() -> None:
    sd = FakeSD([dev("pulse"), dev("HDMI out", inputs=0), dev("USB Mic (hw:2,0)")])
    devices = audio.list_input_devices(sd)
    assert [d.name for d in devices] == ["pulse", "USB Mic (hw:2,0)"]
    assert devices[0].is_default and devices[1].index == 2
    assert audio.find_device(devices, "USB Mic (hw:2,0)") is devices[1]
    assert audio.find_device(devices, "usb mic") is devices[1]
    assert audio.find_device(devices, "nothing") is None
    assert audio.find_device(devices, None) is None


def test_microphone_opens_16k_mono_and_delivers_timestamped_blocks() -> None:
    sd = FakeSD([dev("pulse")])
    got: list[AudioBlock] = []
    mic = audio.Microphone(got.append, sd=sd)
    assert mic.open(None) is None
    stream = sd.streams[-1]
    assert stream.kwargs["samplerate"] == 16000 and stream.kwargs["channels"] == 1
    assert stream.kwargs["dtype"] == "float32" and stream.kwargs["blocksize"] == audio.BLOCK_SAMPLES
    indata = np.ones((1024, 1), np.float32)
    stream.kwargs["callback"](indata, 1024, SimpleNamespace(inputBufferAdcTime=41.5), 0)
    indata[:] = 5  # PortAudio reuses its buffer: the block must be a copy
    assert got[0].t0 == 41.5 and got[0].pcm.tolist() == [1.0] * 1024
    assert mic.time() == 42.0 and not mic.stalled(time.monotonic())
    mic.close()
    assert stream.aborted and stream.closed and not mic.is_open


def test_microphone_falls_back_to_native_rate_when_16k_is_refused() -> None:
    sd = FakeSD([dev("Built-in", rate=44100.0)], rates=(44100,))
    mic = audio.Microphone(lambda b: None, sd=sd)
    mic.open(None)
    assert mic.rate == 44100 and sd.streams[-1].kwargs["blocksize"] == round(1024 * 44100 / 16000)


def test_microphone_problems_have_clear_messages() -> None:
    with pytest.raises(audio.MicrophoneError, match="no microphone found"):
        audio.Microphone(lambda b: None, sd=FakeSD([dev("out", inputs=0)])).open(None)
    with pytest.raises(audio.MicrophoneError, match="cannot open the microphone"):
        audio.Microphone(lambda b: None, sd=FakeSD([dev("pulse")], fail_open=True)).open(None)
    with pytest.raises(audio.MicrophoneError, match="accepts none of the formats"):
        audio.Microphone(lambda b: None, sd=FakeSD([dev("pulse")], rates=())).open(None)
    mic = audio.Microphone(lambda b: None, sd=FakeSD([dev("pulse")]))
    warning = mic.open("USB Mic")
    assert warning is not None and "not found" in warning and "system default" in warning


def test_stall_watchdog() -> None:
    mic = audio.Microphone(lambda b: None, sd=FakeSD([dev("pulse")]))
    mic.open(None)
    now = mic.opened_at
    assert not mic.stalled(now + 1.0)  # PortAudio takes a while to start
    assert mic.stalled(now + 5.0)  # ...but not this long
    mic.last_block_at = now + 5.0
    assert not mic.stalled(now + 6.0)
    assert mic.stalled(now + 7.5)
    mic.finished.set()  # the stream ended on its own (device error)
    assert mic.stalled(now + 5.1)
