"""MLX-only internals of the MLX backends, on tiny offline models (see tests/tiny_models.py).

The behaviour every engine shares (energy gate, decoding settings, prompts, no-speech results, streaming, cancel,
load errors, unload) is tested on every engine in test_transcribers.py and test_chat_models.py. Here: what only MLX
has (float casting, mlx_whisper's per-process ModelHolder, the reusing encoder, hub ids, role-line prompts without a
chat template, MLX's kernel compiler)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mlx_whisper")
pytest.importorskip("mlx_lm")

import mlx.core as mx
import mlx_lm

from sottovoce.daemon.backends.base import ChatMessage, GenerationStep, ModelLoadError, TranscriptResult
from sottovoce.daemon.backends.device import compute_dtype, prefers_half_precision
from sottovoce.daemon.backends.mlx_lm_backend import MlxChatModel
from sottovoce.daemon.backends.mlx_whisper_backend import MlxWhisperTranscriber
from sottovoce.daemon.backends.whisper_common import loudest_frame_dbfs

SR = 16_000


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    """White noise whose RMS is ``dbfs``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 10 ** (dbfs / 20)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- device


def test_cpu_prefers_float32() -> None:
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert prefers_half_precision() is (not on_cpu)
    assert compute_dtype() == (mx.float32 if on_cpu else mx.float16)
    assert compute_dtype(True) == mx.float16 and compute_dtype(False) == mx.float32


# ---------------------------------------------------------------------------------------------------- whisper


@pytest.fixture(scope="module")
def transcriber(tiny_whisper_dir: Path) -> MlxWhisperTranscriber:
    t = MlxWhisperTranscriber(str(tiny_whisper_dir))
    t.load()
    return t


def test_loudest_frame_dbfs() -> None:
    assert loudest_frame_dbfs(np.ones(SR, np.float32)) == pytest.approx(0.0)
    sine = 0.1 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    assert loudest_frame_dbfs(sine) == pytest.approx(-23.01, abs=0.05)  # 20*log10(0.1/sqrt(2))
    assert loudest_frame_dbfs(np.zeros(SR, np.float32)) == float("-inf")
    assert loudest_frame_dbfs(np.zeros(0, np.float32)) == float("-inf")
    # One loud 30 ms burst in a second of silence is found: the level is per frame, not over the whole clip.
    burst = np.zeros(SR, np.float32)
    burst[8000:8480] = 0.1
    assert loudest_frame_dbfs(burst) > -25
    assert loudest_frame_dbfs(noise(1.0, -70)) == pytest.approx(-70, abs=1.5)


def test_transcribes_speech_level_audio(transcriber: MlxWhisperTranscriber, tiny_whisper_dir: Path) -> None:
    result = transcriber.transcribe(noise(2.0, -20))

    assert isinstance(result, TranscriptResult)
    assert result == TranscriptResult("hello world", "en", False, 1)  # english-only model: language "en"
    # The reusing encoder around the model's own holds no window after the call (the person's audio).
    assert type(transcriber._model.encoder).__name__ == "ReusingEncoder" and transcriber._model.encoder._last is None


def test_weights_cast_to_the_compute_dtype(transcriber: MlxWhisperTranscriber, tiny_whisper_dir: Path) -> None:
    on_disk: Any = mx.load(str(tiny_whisper_dir / "weights.safetensors"))
    assert on_disk["decoder.token_embedding.weight"].dtype == mx.float16  # as in mlx-community checkpoints
    loaded = transcriber._model.decoder.token_embedding.weight.dtype
    assert loaded == (mx.float16 if prefers_half_precision() else mx.float32)
    assert transcriber.fp16 is prefers_half_precision()


def test_runs_its_own_loaded_model(transcriber: MlxWhisperTranscriber, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another model sits in mlx_whisper's per-process cache, and loading from disk is forbidden.
    holder = sys.modules["mlx_whisper.transcribe"].ModelHolder
    monkeypatch.setattr(holder, "model", object())
    monkeypatch.setattr(holder, "model_path", "/somewhere/else")

    def no_reload(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("mlx_whisper reloaded the model from disk")

    monkeypatch.setattr(sys.modules["mlx_whisper.transcribe"], "load_model", no_reload)

    assert transcriber.transcribe(noise(1.0, -20)).text == "hello world"
    assert holder.model is transcriber._model


def _assert_one_line_load_error(excinfo: pytest.ExceptionInfo[ModelLoadError], path: Path) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and len(message) < 400


def test_broken_whisper_model_is_a_load_error(tmp_path: Path, tiny_whisper_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_whisper_dir / "config.json", broken / "config.json")  # weights missing
    with pytest.raises(ModelLoadError) as excinfo:
        MlxWhisperTranscriber(str(broken)).load()
    _assert_one_line_load_error(excinfo, broken)


# ------------------------------------------------------------------------------------------------------- chat

MESSAGES = [ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the capital of France?")]


@pytest.fixture(scope="module")
def chat(tiny_llm_dir: Path) -> MlxChatModel:
    model = MlxChatModel(str(tiny_llm_dir))
    model.load()
    return model


class RecordingStream:
    """Wraps mlx_lm.stream_generate to record every response it hands out."""

    def __init__(self) -> None:
        self.real = mlx_lm.stream_generate
        self.responses: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for response in self.real(*args, **kwargs):
            self.responses.append(response)
            yield response


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> RecordingStream:
    recording = RecordingStream()
    monkeypatch.setattr(mlx_lm, "stream_generate", recording)
    return recording


def run(chat: MlxChatModel, max_tokens: int = 12, stop_after: int | None = None, **kw: Any) -> list[GenerationStep]:
    steps: list[GenerationStep] = []

    def should_stop() -> bool:
        return stop_after is not None and len(steps) >= stop_after

    for step in chat.stream(
        MESSAGES, max_tokens=max_tokens, temperature=kw.get("temperature", 0.0), should_stop=should_stop
    ):
        steps.append(step)
    return steps


def test_stops_at_end_of_turn(tiny_llm_dir: Path, recorder: RecordingStream) -> None:
    model = MlxChatModel(str(tiny_llm_dir))
    model.load()
    recorder.responses.clear()  # load() warms up by generating
    greedy = run(model, max_tokens=6)
    third = recorder.responses[2].token
    first_two = [r.token for r in recorder.responses[:2]]
    assert third not in first_two, "pick a seed whose third greedy token is new"
    model._tokenizer.add_eos_token(str(third))  # as if the model had chosen to end its turn there
    recorder.responses.clear()

    steps = run(model, max_tokens=6)

    assert steps[-1].finish_reason == "stop"
    assert steps[-1].generated_tokens == 3  # the end-of-turn token is counted, as mlx-lm counts it
    assert "".join(s.text for s in steps) == model._tokenizer.decode(first_two)
    assert greedy[-1].finish_reason == "length"


def test_without_chat_template_falls_back_to_role_lines(tiny_llm_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_llm_dir, plain)
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    model = MlxChatModel(str(plain))
    model.load()

    prompt = model.prompt_tokens(MESSAGES)
    assert model._tokenizer.decode(prompt) == (
        "system: Answer briefly.\nuser: What is the capital of France?\nassistant:"
    )
    assert run(model, max_tokens=3)[-1].generated_tokens == 3


def test_broken_chat_model_is_a_load_error(tiny_llm_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-llm"
    shutil.copytree(tiny_llm_dir, broken)
    for weights in broken.glob("model*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        MlxChatModel(str(broken)).load()
    _assert_one_line_load_error(excinfo, broken)


def built_kernels() -> set[str]:
    """The fused kernels MLX's CPU backend has built with the C++ compiler (its on-disk cache, one .so each)."""
    folder = Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu"
    return {p.name for p in folder.glob("*.so")} if folder.is_dir() else set()


def test_new_temperatures_need_no_kernel_build(chat: MlxChatModel) -> None:
    # A Python-float temperature would be baked into a fused kernel that MLX's CPU backend builds with the C++
    # compiler (~1 s, cached on disk per value): fresh random values show whether that happens per request.
    run(chat, max_tokens=2, temperature=0.5)  # whatever sampling needs at all is built (once) by now
    before = built_kernels()
    rng = np.random.default_rng()  # unseeded on purpose: values no earlier run cached
    for temperature in rng.uniform(0.05, 1.5, size=2):
        steps = run(chat, max_tokens=4, temperature=float(temperature))
        assert steps[-1].generated_tokens == 4
    assert built_kernels() - before == set(), "a kernel was built for a temperature value"


# ------------------------------------------------------------------------------------------------ hub ids


def fake_hf_cache(
    root: Path, repo_id: str, model_dir: Path, revision: str = "0123456789abcdef" * 2 + "01234567"
) -> Path:
    """Lay out ``model_dir`` in ``root`` the way huggingface_hub caches a model repo; returns the snapshot folder."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in ``tmp_path`` (offline: conftest sets HF_HUB_OFFLINE=1 before any import)."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests must never reach the hub"
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads HF_HUB_CACHE when it is imported: point the already-imported constant there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_chat_model_from_a_cached_hub_id(hf_cache: Path, tiny_llm_dir: Path) -> None:
    snapshot = fake_hf_cache(hf_cache, "test-org/tiny-llm", tiny_llm_dir)
    model = MlxChatModel("test-org/tiny-llm")
    assert model.name == "tiny-llm"

    model.load()

    assert model.path == snapshot
    assert run(model, max_tokens=3)[-1].generated_tokens == 3


def test_whisper_from_a_cached_hub_id(hf_cache: Path, tiny_whisper_dir: Path) -> None:
    snapshot = fake_hf_cache(hf_cache, "test-org/tiny-whisper", tiny_whisper_dir)
    t = MlxWhisperTranscriber("test-org/tiny-whisper")
    assert t.name == "tiny-whisper"

    t.load()

    assert t.path == snapshot
    assert t.transcribe(noise(1.0, -20)).text == "hello world"


@pytest.mark.parametrize("backend", [MlxChatModel, MlxWhisperTranscriber], ids=["llm", "whisper"])
def test_uncached_hub_id_offline_is_a_load_error(hf_cache: Path, backend: Any) -> None:
    with pytest.raises(ModelLoadError) as excinfo:
        backend("mlx-community/Meta-Llama-3-8B-Instruct-4bit").load()
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    assert "mlx-community/Meta-Llama-3-8B-Instruct-4bit is neither a local folder" in message
    assert "sottovoce models fetch-defaults" in message and "sottovoce models import" in message


def test_existing_relative_folder_wins_over_a_hub_id(
    hf_cache: Path, tiny_llm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hf_cache(hf_cache, "models/tiny", tiny_llm_dir)
    shutil.copytree(tiny_llm_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    model = MlxChatModel("models/tiny")
    model.load()
    assert model.path == Path("models/tiny")


def test_hub_snapshot_without_config_is_a_load_error(hf_cache: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here\n")
    fake_hf_cache(hf_cache, "test-org/empty", empty)
    with pytest.raises(ModelLoadError, match=r"has no config\.json.*models fetch-defaults"):
        MlxChatModel("test-org/empty").load()


def test_looks_like_hub_id() -> None:
    from sottovoce.daemon.backends.hub import looks_like_hub_id

    assert looks_like_hub_id("mlx-community/Meta-Llama-3-8B-Instruct-4bit")
    assert looks_like_hub_id("org/name.v1_2")
    for spec in ("/abs/path", "./rel", "~/models/x", "a/b/c", "name", "org/", "../x", "org/..", ""):
        assert not looks_like_hub_id(spec), spec


def test_unload_releases_mlx_whispers_model_cache(tiny_whisper_dir: Path) -> None:
    t = MlxWhisperTranscriber(str(tiny_whisper_dir))
    t.load()
    holder = sys.modules["mlx_whisper.transcribe"].ModelHolder
    assert t.transcribe(noise(1.0, -20)).text == "hello world" and holder.model is t._model

    t.unload()

    assert t._model is None and holder.model is None  # mlx_whisper's cache no longer pins the weights
    t.load()
    assert t.transcribe(noise(1.0, -20)).text == "hello world" and holder.model is t._model
