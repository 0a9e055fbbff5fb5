"""Remembering the microphone in the config file without disturbing the rest of it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sottovoce.client import config
from sottovoce.tray import prefs


def test_add_replace_remove_keep_comments(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    prefs.save_setting("microphone", "USB Mic", path)
    assert tomllib.loads(path.read_text())["microphone"] == "USB Mic"
    path.write_text('# my settings\nmax_tokens = 99   # short answers\nmicrophone = "old"\n')
    prefs.save_setting("microphone", 'Mic "2" \\ é', path)
    text = path.read_text()
    assert text.startswith("# my settings\nmax_tokens = 99   # short answers\n")
    assert tomllib.loads(text) == {"max_tokens": 99, "microphone": 'Mic "2" \\ é'}
    settings, sources = config.load(config_path=path, environ={})
    assert settings.microphone == 'Mic "2" \\ é' and sources["microphone"] == str(path)
    prefs.save_setting("microphone", None, path)
    assert tomllib.loads(path.read_text()) == {"max_tokens": 99}


def test_key_goes_before_tables() -> None:
    text = 'hotkey = "<f9>"\n\n[future]\nx = 1\n'
    out = prefs.update_text(text, "microphone", "pulse")
    data = tomllib.loads(out)
    assert data["microphone"] == "pulse" and data["future"] == {"x": 1}
    assert prefs.update_text("", "microphone", None) == ""


def test_refuses_to_break_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("this is not toml =\n")
    with pytest.raises(prefs.PrefsError, match="not be valid TOML"):
        prefs.save_setting("microphone", "x", path)
    assert path.read_text() == "this is not toml =\n"


def test_toml_values() -> None:
    assert prefs.toml_value(True) == "true"
    assert prefs.toml_value(0.3) == "0.3"
    assert tomllib.loads("x = " + prefs.toml_value("a\nb\t\u0001"))["x"] == "a\nb\t\u0001"
