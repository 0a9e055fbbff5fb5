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


def make_ct2(folder: Path) -> Path:
    """A CTranslate2 Whisper folder as the store sees it (the files, not a loadable model)."""
    folder.mkdir(parents=True)

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    # CTranslate2's model.bin, version 6: one float16 2x2 weight, no aliases.
    weight = string("decoder/embeddings/weight") + struct.pack("<BIIBI", 2, 2, 2, 4, 8) + b"\0" * 8
    model = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 1, 1) + weight + struct.pack("<I", 0)
    (folder / "model.bin").write_bytes(model)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "vocabulary.txt").write_text("a\nb\n")
    return folder


def make_gguf(path: Path, file_type: int = 3) -> Path:
    """A GGUF file with a header only: an architecture, a vocabulary array (to be skipped) and the file type."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = string("general.architecture") + struct.pack("<I", 8) + string("llama")
    kvs += string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("b")
    kvs += string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0.0, 1.0)
    kvs += string("general.file_type") + struct.pack("<II", 4, file_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 4) + kvs)
    return path


def test_find_store_names(store_dir: Path) -> None:
    make_whisper(store_dir / "whisper-tiny.en")
    make_llm(store_dir / "smollm2")
    store.write_manifest(store_dir / "smollm2", kind="llm", source="test", dtype="float32")
    found = store.find(" whisper-tiny.en ")
    assert found is not None and (found.kind, found.format) == ("whisper", "mlx-whisper")
    entry = store.find("smollm2")
    assert entry is not None and entry.path == store_dir / "smollm2" and entry.format == "mlx-lm"
    for spec in ("nothing", "a/b", "../smollm2", ""):
        assert store.find(spec) is None


def test_import_keeps_ct2_and_gguf_as_they_are(store_dir: Path, tmp_path: Path) -> None:
    from sottovoce.daemon.models.importer import import_model

    ct2 = make_ct2(tmp_path / "faster-whisper-tiny")
    entry = import_model(ct2, name="tiny", progress=False)
    assert (entry.kind, entry.format, entry.dtype, entry.source) == ("whisper", "ct2", "float16", str(ct2))
    assert sorted(f.name for f in entry.path.iterdir()) == [
        "config.json",
        "model.bin",
        "sottovoce.json",
        "tokenizer.json",
        "vocabulary.txt",
    ]
    gguf = make_gguf(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    entry = import_model(gguf, progress=False)
    assert (entry.name, entry.kind, entry.format, entry.dtype, entry.quantization) == (
        "smollm2-135m-instruct",
        "llm",
        "gguf",
        "Q4_1",
        4,
    )
    assert store.gguf_file(entry.path).read_bytes() == gguf.read_bytes()
    assert store.detect_format(entry.path) == "gguf"
    (ct2 / "vocabulary.txt").unlink()
    with pytest.raises(ModelImportError, match="no vocabulary"):
        import_model(ct2, name="novocab", progress=False)
    assert store.find("novocab") is None


def test_gguf_header_types(tmp_path: Path) -> None:
    from sottovoce.daemon.models import gguf_header

    assert gguf_header.quantization(make_gguf(tmp_path / "a.gguf", 15)) == ("Q4_K_M", 4)
    assert gguf_header.quantization(make_gguf(tmp_path / "b.gguf", 1)) == ("F16", None)
    assert gguf_header.read_scalars(tmp_path / "a.gguf")["general.architecture"] == "llama"
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "a.gguf").read_bytes()[:30])
    with pytest.raises(ModelImportError, match="cut short"):
        gguf_header.read_scalars(tmp_path / "cut.gguf")
    (tmp_path / "not.gguf").write_bytes(b"JUNK" * 10)
    with pytest.raises(ModelImportError, match="not a GGUF file"):
        gguf_header.read_scalars(tmp_path / "not.gguf")


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
    assert out[0].split() == ["NAME", "KIND", "FORMAT", "DTYPE", "SIZE", "SOURCE"]
    assert out[1].split()[:4] == ["smollm2", "llm", "mlx-lm", "4-bit/float32"] and out[1].endswith("pypi:x==1")
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
