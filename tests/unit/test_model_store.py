"""The model store: where it is, how specs resolve, what is listed, atomic imports, and the ``models`` CLI."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sottovoce.daemon.backends.base import ModelLoadError
from sottovoce.daemon.models import cli, store
from sottovoce.daemon.models.errors import ModelImportError


def _safetensors(path: Path, dtype: str = "F32") -> None:
    """A valid safetensors file holding one 2-element tensor (the store only reads headers)."""
    header = json.dumps({"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8 if dtype == "F32" else 4]}})
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (8 if dtype == "F32" else 4))


def make_whisper(folder: Path, dtype: str = "F32") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"n_mels": 80, "model_type": "whisper"}))
    _safetensors(folder / "weights.safetensors", dtype)
    return folder


def make_llm(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": {"bits": 4}}))
    _safetensors(folder / "model.safetensors")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def test_models_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOTTOVOCE_MODELS_DIR", str(tmp_path / "x"))
    assert store.models_dir() == tmp_path / "x"
    monkeypatch.delenv("SOTTOVOCE_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if sys.platform.startswith("linux"):
        assert store.models_dir() == tmp_path / "data" / "sottovoce" / "models"
    assert store.models_dir().name == "models"


def test_resolve_store_names(store_dir: Path) -> None:
    make_whisper(store_dir / "whisper-tiny.en")
    make_llm(store_dir / "smollm2")
    store.write_manifest(store_dir / "smollm2", kind="llm", source="test", dtype="float32")
    assert store.resolve("whisper-tiny.en", "whisper") == str(store_dir / "whisper-tiny.en")
    assert store.resolve(" smollm2 ", "llm") == str(store_dir / "smollm2")
    with pytest.raises(ModelLoadError, match="is a whisper model, not an llm model"):
        store.resolve("whisper-tiny.en", "llm")


def test_resolve_local_paths(store_dir: Path, tmp_path: Path) -> None:
    whisper = make_whisper(tmp_path / "somewhere" / "w")
    llm = make_llm(tmp_path / "somewhere" / "l")
    assert store.resolve(str(whisper), "whisper") == str(whisper)
    assert store.resolve(str(llm), "llm") == str(llm)
    with pytest.raises(ModelLoadError, match="mlx-whisper model, not an llm model"):
        store.resolve(str(whisper), "llm")
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"x")
    (ct2 / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"CTranslate2 model.*sottovoce models import"):
        store.resolve(str(ct2), "whisper")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelLoadError, match="GGUF model"):
        store.resolve(str(gguf), "llm")
    with pytest.raises(ModelLoadError, match=r"needs config\.json, model"):
        store.resolve(str(tmp_path), "llm")


def test_resolve_hub_ids_and_unknown_names(store_dir: Path) -> None:
    assert store.resolve("mlx-community/whisper-tiny", "whisper") == "mlx-community/whisper-tiny"
    assert store.resolve("mlx-community/Meta-Llama-3-8B-Instruct-4bit", "llm").endswith("4bit")
    for spec in ("foo", "a/b/c", "../nothing"):
        with pytest.raises(ModelLoadError) as info:
            store.resolve(spec, "whisper")
        message = str(info.value)
        assert "\n" not in message and "fetch-defaults" in message and str(store_dir) in message
    with pytest.raises(ModelLoadError, match="no llm model configured"):
        store.resolve("", "llm")


def test_list_models(store_dir: Path) -> None:
    assert store.list_models() == []
    make_whisper(store_dir / "b-whisper", dtype="F16")
    make_llm(store_dir / "a-llm")
    imported = make_whisper(store_dir / "a-whisper")
    store.write_manifest(imported, kind="whisper", source="pypi:x==1", dtype="float32")
    make_whisper(store_dir / ".partial-1-x-abc")  # half-written: never listed
    (store_dir / "junk").mkdir()  # not a model
    (store_dir / "file.txt").write_text("x")
    entries = store.list_models()
    assert [(e.name, e.kind) for e in entries] == [("a-llm", "llm"), ("a-whisper", "whisper"), ("b-whisper", "whisper")]
    by_name = {e.name: e for e in entries}
    assert by_name["a-whisper"].source == "pypi:x==1"
    assert by_name["b-whisper"].source == "unknown" and by_name["b-whisper"].dtype == "float16"
    assert by_name["a-llm"].quantization == 4
    assert by_name["a-whisper"].size_bytes == sum(p.stat().st_size for p in imported.iterdir())
    assert json.loads(json.dumps(by_name["a-llm"].to_json()))["path"] == str(store_dir / "a-llm")


def test_staging_commits_atomically_and_cleans_up(store_dir: Path) -> None:
    with store.staging("m") as tmp:
        assert tmp.parent == store_dir and tmp.name.startswith(".partial-")
        (tmp / "f").write_text("1")
        assert not (store_dir / "m").exists()
    assert (store_dir / "m" / "f").read_text() == "1"

    with pytest.raises(RuntimeError, match="boom"), store.staging("n") as tmp:
        (tmp / "f").write_text("1")
        raise RuntimeError("boom")
    assert sorted(p.name for p in store_dir.iterdir()) == ["m"]

    with pytest.raises(ModelImportError, match="already in"), store.staging("m"):
        pass
    with store.staging("m", force=True) as tmp:
        (tmp / "f").write_text("2")
    assert (store_dir / "m" / "f").read_text() == "2"
    assert sorted(p.name for p in store_dir.iterdir()) == ["m"]


def test_staging_removes_partials_of_dead_imports(store_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (store_dir / f".partial-{dead.pid}-x-abc").mkdir(parents=True)
    alive = store_dir / f".partial-{os.getppid()}-y-abc"
    alive.mkdir()
    with store.staging("m"):
        pass
    assert not (store_dir / f".partial-{dead.pid}-x-abc").exists()
    assert alive.exists()


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "a b", "x" * 200])
def test_bad_names_are_refused(store_dir: Path, name: str) -> None:
    with pytest.raises(ModelImportError, match="bad model name"):
        store.check_name(name)


def test_import_copies_mlx_folders(store_dir: Path, tmp_path: Path) -> None:
    from sottovoce.daemon.models.importer import import_model

    src = make_whisper(tmp_path / "mlx-whisper-small", dtype="F16")
    entry = import_model(src, progress=False)
    assert (entry.name, entry.kind, entry.dtype) == ("mlx-whisper-small", "whisper", "float16")
    assert (entry.path / "weights.safetensors").read_bytes() == (src / "weights.safetensors").read_bytes()
    with pytest.raises(ModelImportError, match="leave out --dtype"):
        import_model(src, name="again", dtype="float32", progress=False)
    with pytest.raises(ModelImportError, match="does not exist"):
        import_model(tmp_path / "missing", progress=False)


# ---- CLI -------------------------------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sottovoce")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func is cli.run
    return cli.run(args)


def test_cli_path_and_list(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["models", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(store_dir)
    assert _run(["models", "list"]) == 0
    assert "fetch-defaults" in capsys.readouterr().err
    make_llm(store_dir / "smollm2")
    store.write_manifest(store_dir / "smollm2", kind="llm", source="pypi:x==1", dtype="float32", quantization=4)
    assert _run(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "KIND", "DTYPE", "SIZE", "SOURCE"]
    assert out[1].split()[:3] == ["smollm2", "llm", "4-bit/float32"] and out[1].endswith("pypi:x==1")
    assert _run(["models", "list", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["name"] == "smollm2" and entry["quantization"] == 4


def test_cli_errors_are_one_line(store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["models", "import", str(tmp_path / "nope.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sottovoce models: error: ") and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "junk.bin").write_bytes(b"junk")
    assert _run(["models", "import", str(tmp_path / "junk.bin"), "--name", "x"]) == 1
    assert "not a model this can import" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["models", "import", "x", "--quantize", "3"])


def test_cli_module_runs_as_a_script(store_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sottovoce.daemon.models.cli", "models", "path"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SOTTOVOCE_MODELS_DIR": str(store_dir)},
    )
    assert result.stdout.strip() == str(store_dir)
