"""Engine choice and model resolution (``sottovoce.daemon.engines``): which engine runs each stage, why, and on what.

Store entries here are made of files the store recognises (nothing is loaded): the choice and the paths are the
subject, the real loading is the backends' tests.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest

from sottovoce.client import config
from sottovoce.daemon import engines
from sottovoce.daemon.models import store
from sottovoce.daemon.models.errors import ModelLoadError


def ct2_entry(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"\0")
    (folder / "config.json").write_text("{}")
    store.write_manifest(folder, kind="whisper", source="test", dtype="float16", model_format="ct2")
    return folder


def gguf_entry(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "Model.Q4_1.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    store.write_manifest(folder, kind="llm", source="test", dtype="Q4_1", model_format="gguf")
    return folder


def mlx_whisper_entry(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"n_mels": 80}))
    (folder / "weights.safetensors").write_bytes(b"\0")
    return folder


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(root))
    monkeypatch.setattr(engines, "hub_cached", lambda repo_id: False)  # no hub cache on this machine
    return root


def settings(**kw: object) -> config.Settings:
    return dataclasses.replace(config.Settings(), **kw)


# ---- choosing ------------------------------------------------------------------------------------------------


def test_auto_is_mlx_on_apple_silicon_and_the_fast_engines_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engines.choose_engine("stt", "auto", on_apple_silicon=True) == (
        "mlx",
        "auto: Apple Silicon, where MLX runs on the GPU",
    )
    monkeypatch.setattr(engines, "installed", lambda engine: True)
    engine, reason = engines.choose_engine("stt", "auto", on_apple_silicon=False)
    assert engine == "faster-whisper" and reason.startswith("auto: ") and "not Apple Silicon" in reason
    assert engines.choose_engine("llm", "auto", on_apple_silicon=False)[0] == "llama.cpp"
    # Where the fast engine is not installed, MLX (if it is) rather than a daemon that cannot load anything.
    monkeypatch.setattr(engines, "installed", lambda engine: engine == "mlx")
    engine, reason = engines.choose_engine("llm", "auto", on_apple_silicon=False)
    assert engine == "mlx" and "llama.cpp is not installed" in reason


@pytest.mark.parametrize("setting", ["mlx", "faster-whisper"])
def test_an_explicit_engine_is_used_as_chosen(setting: str) -> None:
    assert engines.choose_engine("stt", setting, on_apple_silicon=True) == (setting, "chosen in the settings")


def test_apple_silicon_detection() -> None:
    assert engines.apple_silicon("Darwin", "arm64")
    assert not engines.apple_silicon("Darwin", "x86_64") and not engines.apple_silicon("Linux", "aarch64")


def test_engine_settings_are_checked(tmp_path: Path) -> None:
    none = tmp_path / "none.toml"
    with pytest.raises(config.ConfigError, match="stt_engine must be one of auto, mlx, faster-whisper"):
        config.load({"stt_engine": "whisper.cpp"}, config_path=none, environ={})
    with pytest.raises(config.ConfigError, match="SOTTOVOCE_LLM_ENGINE: llm_engine must be one of"):
        config.load(config_path=none, environ={"SOTTOVOCE_LLM_ENGINE": "vllm"})
    with pytest.raises(config.ConfigError, match="llm_url must be an http:// or https:// address"):
        config.load({"llm_url": "ftp://host/v1"}, config_path=none, environ={})
    loaded, sources = config.load({"llm_engine": "openai", "llm_url": "http://10.0.0.5:8000/v1"}, config_path=none)
    assert (loaded.llm_engine, loaded.llm_url, sources["llm_engine"]) == ("openai", "http://10.0.0.5:8000/v1", "flag")


def test_the_api_key_never_shows(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('llm_api_key = "sk-very-secret"\n')
    loaded, sources = config.load(config_path=cfg, environ={})
    assert loaded.llm_api_key == "sk-very-secret" and sources["llm_api_key"] == str(cfg)
    assert "sk-very-secret" not in repr(loaded)
    assert config.is_secret("llm_api_key") and not config.is_secret("llm_url")


# ---- resolving for each engine ---------------------------------------------------------------------------------


def test_fast_engines_run_the_store_models_as_they_are(store_dir: Path) -> None:
    whisper = ct2_entry(store_dir, "whisper-tiny.en")
    llm = gguf_entry(store_dir, "smollm2-135m-instruct")
    s = settings(
        stt_engine="faster-whisper",
        llm_engine="llama.cpp",
        whisper_model="whisper-tiny.en",
        llm_model=" smollm2-135m-instruct",
    )
    stt, chat = engines.plan_stt(s), engines.plan_llm(s)
    assert (stt.engine, stt.model, stt.convert) == ("faster-whisper", str(whisper), None)
    assert (chat.engine, chat.model, chat.convert) == ("llama.cpp", str(llm / "Model.Q4_1.gguf"), None)
    # A GGUF file or a CTranslate2 folder given by path works too.
    s = settings(stt_engine="faster-whisper", llm_engine="llama.cpp", whisper_model=str(whisper))
    s = dataclasses.replace(s, llm_model=str(llm / "Model.Q4_1.gguf"))
    assert engines.plan_stt(s).model == str(whisper) and engines.plan_llm(s).model == str(llm / "Model.Q4_1.gguf")


def test_mlx_converts_ct2_and_gguf_entries_on_first_use(store_dir: Path) -> None:
    whisper = ct2_entry(store_dir, "whisper-base")
    llm = gguf_entry(store_dir, "smollm2")
    s = settings(stt_engine="mlx", llm_engine="mlx", whisper_model="whisper-base", llm_model="smollm2")
    stt, chat = engines.plan_stt(s), engines.plan_llm(s)
    assert stt.model == str(whisper / "mlx") and stt.convert is not None and stt.convert.path == whisper
    assert chat.model == str(llm / "mlx") and chat.convert is not None and chat.convert.format == "gguf"
    # An MLX entry is used as it is.
    mlx = mlx_whisper_entry(store_dir, "mlx-only")
    stt = engines.plan_stt(dataclasses.replace(s, whisper_model="mlx-only"))
    assert (stt.model, stt.convert) == (str(mlx), None)


def test_a_model_the_engine_cannot_run_says_what_to_do(store_dir: Path, tmp_path: Path) -> None:
    mlx_whisper_entry(store_dir, "mlx-only")
    s = settings(stt_engine="faster-whisper", whisper_model="mlx-only")
    with pytest.raises(
        ModelLoadError, match=r"mlx-whisper model; faster-whisper needs a CTranslate2.*--stt-engine mlx"
    ):
        engines.plan_stt(s)
    ct2_entry(store_dir, "whisper-x")
    with pytest.raises(ModelLoadError, match="is a whisper model, not an llm model"):
        engines.plan_llm(settings(llm_engine="llama.cpp", llm_model="whisper-x"))
    with pytest.raises(ModelLoadError, match=r"no llm model 'nothing-here'.*fetch-defaults"):
        engines.plan_llm(settings(llm_engine="llama.cpp", llm_model="nothing-here"))
    with pytest.raises(ModelLoadError, match="the MLX engine needs mlx-whisper"):
        engines.plan_stt(settings(stt_engine="mlx", whisper_model=str(store_dir / "whisper-x")))


def test_the_hub_defaults_fall_back_to_the_embedded_models(store_dir: Path) -> None:
    tiny = ct2_entry(store_dir, engines.EMBEDDED_FAST_WHISPER)
    base = ct2_entry(store_dir, engines.EMBEDDED_WHISPER)
    smol = gguf_entry(store_dir, engines.EMBEDDED_LLM)
    fast = engines.plan_stt(settings(stt_engine="faster-whisper"))  # whisper_model is the MLX hub default
    assert fast.model == str(tiny) and config.DEFAULT_WHISPER in fast.note and "cannot run" in fast.note
    mlx = engines.plan_stt(settings(stt_engine="mlx"))
    assert mlx.model == str(base / "mlx") and "not on this machine" in mlx.note
    chat = engines.plan_llm(settings(llm_engine="llama.cpp"))
    assert chat.model == str(smol / "Model.Q4_1.gguf") and chat.note


def test_the_hub_default_is_used_when_cached(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ct2_entry(store_dir, engines.EMBEDDED_WHISPER)
    monkeypatch.setattr(engines, "hub_cached", lambda repo_id: repo_id == config.DEFAULT_WHISPER)
    plan = engines.plan_stt(settings(stt_engine="mlx"))
    assert (plan.model, plan.note) == (config.DEFAULT_WHISPER, "")


def test_openai_needs_a_url_and_names_the_served_model(store_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs the server's address: --llm-url"):
        engines.plan_llm(settings(llm_engine="openai"))
    plan = engines.plan_llm(settings(llm_engine="openai", llm_url="http://127.0.0.1:8000/v1"))
    assert (plan.engine, plan.model) == ("openai", "")  # the default (an MLX hub id): the server's only model
    plan = engines.plan_llm(settings(llm_engine="openai", llm_url="http://127.0.0.1:8000/v1", llm_model="llama3"))
    assert plan.model == "llama3" and "http://127.0.0.1:8000/v1" in plan.describe()


def test_describe_says_engine_reason_and_model_or_why_not(store_dir: Path) -> None:
    ct2_entry(store_dir, "whisper-tiny.en")
    lines = engines.describe(
        settings(stt_engine="faster-whisper", llm_engine="llama.cpp", whisper_model="whisper-tiny.en")
    )
    assert lines["stt"].startswith("faster-whisper (chosen in the settings): ") and "whisper-tiny.en" in lines["stt"]
    assert lines["llm"].startswith("llama.cpp (chosen in the settings): no model: ")


def test_auto_runs_a_local_mlx_model_on_mlx(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "installed", lambda engine: True)
    monkeypatch.setattr(engines, "apple_silicon", lambda: False)
    folder = mlx_whisper_entry(store_dir.parent, "some-mlx-whisper")
    plan = engines.plan_stt(settings(whisper_model=str(folder)))
    assert (plan.engine, plan.model) == ("mlx", str(folder))
    assert plan.reason == "auto: some-mlx-whisper is an MLX model, which only MLX runs"
    # Chosen explicitly, faster-whisper is not overridden: it says it cannot run the folder.
    with pytest.raises(ModelLoadError, match="--stt-engine mlx"):
        engines.plan_stt(settings(whisper_model=str(folder), stt_engine="faster-whisper"))
    ct2_entry(store_dir, "whisper-tiny.en")
    assert engines.plan_stt(settings(whisper_model="whisper-tiny.en")).engine == "faster-whisper"


def test_a_store_gguf_is_named_by_its_store_name(store_dir: Path, tmp_path: Path) -> None:
    from sottovoce.daemon.backends.factory import build_chat_model

    gguf_entry(store_dir, "smollm2-135m-instruct")
    s = settings(llm_engine="llama.cpp", llm_model="smollm2-135m-instruct")
    assert build_chat_model(engines.plan_llm(s), s).name == "smollm2-135m-instruct"
    loose = tmp_path / "elsewhere" / "Other-Model.Q8_0.gguf"
    loose.parent.mkdir()
    loose.write_bytes((store_dir / "smollm2-135m-instruct" / "Model.Q4_1.gguf").read_bytes())
    s = settings(llm_engine="llama.cpp", llm_model=str(loose))
    assert build_chat_model(engines.plan_llm(s), s).name == "Other-Model.Q8_0"
