"""Settings: precedence defaults < file < environment < flags, every error naming its key and origin, the
commented template, and the `sottovoce config` commands."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import tomllib
from pathlib import Path

import pytest

from sottovoce.client import cli, config
from sottovoce.client.config import ConfigError, Settings


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "config.toml"


def load(cfg: Path, text: str | None = None, env: dict[str, str] | None = None, flags: dict | None = None):
    if text is not None:
        cfg.write_text(text, encoding="utf-8")
    return config.load(flags, config_path=cfg, environ=env or {})


# ---- precedence ------------------------------------------------------------------------------------------------


def test_defaults_when_there_is_no_file_env_or_flag(cfg: Path) -> None:
    settings, sources = load(cfg)
    assert settings == Settings(endpoint=settings.endpoint)
    assert set(sources) == set(config.FIELDS)
    assert set(sources.values()) == {"default"}


def test_file_beats_default_env_beats_file_flag_beats_env(cfg: Path) -> None:
    text = 'max_tokens = 100\ntemperature = 0.5\nlanguage = "de"\nqueue_depth = 7\n'
    env = {"SOTTOVOCE_TEMPERATURE": "0.7", "SOTTOVOCE_LANGUAGE": "fr"}
    settings, sources = load(cfg, text, env, flags={"language": "it", "max_tokens": None})
    assert (settings.max_tokens, settings.temperature, settings.language, settings.queue_depth) == (100, 0.7, "it", 7)
    assert sources["max_tokens"] == str(cfg)  # a None flag was not given: the file's value stands
    assert sources["queue_depth"] == str(cfg)
    assert sources["temperature"] == "env SOTTOVOCE_TEMPERATURE"
    assert sources["language"] == "flag"
    assert sources["buffer_seconds"] == "default"


def test_environment_text_is_parsed_per_type(cfg: Path) -> None:
    env = {
        "SOTTOVOCE_LOG_TEXT": "yes",
        "SOTTOVOCE_FP16": "off",
        "SOTTOVOCE_MAX_TOKENS": " 42 ",
        "SOTTOVOCE_BUFFER_SECONDS": "90",
        "SOTTOVOCE_TOGGLE_HOTKEY": "none",
        "SOTTOVOCE_MICROPHONE": "",
    }
    settings, _ = load(cfg, env=env)
    assert settings.log_text is True and settings.fp16 is False
    assert settings.max_tokens == 42 and settings.buffer_seconds == 90.0
    assert settings.toggle_hotkey is None and settings.microphone is None


def test_toml_types_and_empty_string_means_unset(cfg: Path) -> None:
    settings, _ = load(cfg, 'temperature = 1\nfp16 = true\ntoggle_hotkey = ""\nlanguage = ""\n')
    assert settings.temperature == 1.0 and isinstance(settings.temperature, float)
    assert settings.fp16 is True and settings.toggle_hotkey is None and settings.language is None


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text("max_tokens = 9\n")
    monkeypatch.setenv("SOTTOVOCE_CONFIG", str(path))
    settings, sources = config.load(environ={})
    assert settings.max_tokens == 9 and sources["max_tokens"] == str(path)


# ---- every error names the key and where the value came from ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_tokens = ", "not valid TOML"),
        ("max_tokens = 1\nmax_tokens = 2\n", "not valid TOML"),
        ("max_token = 5\n", "unknown setting 'max_token' (did you mean 'max_tokens'?)"),
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ("[daemon]\nmax_tokens = 5\n", "[daemon]: the config file has no sections"),
        ('max_tokens = "5"\n', "max_tokens must be an integer, got '5'"),
        ("max_tokens = 5.5\n", "max_tokens must be an integer"),
        ("max_tokens = true\n", "max_tokens must be an integer"),
        ("max_tokens = 0\n", "max_tokens must be between 1 and 32768, got 0"),
        ("temperature = 3.0\n", "temperature must be between 0.0 and 2.0"),
        ("temperature = nan\n", "temperature must be a number"),
        ("session_idle_seconds = 0.5\n", "session_idle_seconds must be at least 1.0"),
        ('log_text = "yes"\n', "log_text must be true or false"),
        ("language = 5\n", "language must be a string (or empty for unset)"),
        ('whisper_model = "  "\n', "whisper_model must not be empty"),
        ('endpoint = "http://localhost"\n', "endpoint must be ipc://PATH or tcp://127.0.0.1:PORT"),
        ('endpoint = "tcp://127.0.0.1"\n', "endpoint a tcp:// endpoint needs a host and a port"),
        ('endpoint = "ipc://"\n', "endpoint an ipc:// endpoint needs a path"),
        ('hotkey = "ctrl+alt+space"\n', "hotkey must look like <ctrl>+<alt>+<space> ('ctrl' should be one"),
        ('toggle_hotkey = "<ctrl>+"\n', "toggle_hotkey must not be empty or end with '+'"),
        ('hotkey = "<ctrl>+<CTRL>"\n', "hotkey names a key twice"),
        ("system_prompt = [1, 2]\n", "system_prompt must be a string"),
    ],
)
def test_file_errors(cfg: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(cfg, text)
    message = str(info.value)
    assert message.startswith(f"{cfg}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("SOTTOVOCE_MAX_TOKENS", "many", "SOTTOVOCE_MAX_TOKENS: max_tokens must be an integer, got 'many'"),
        ("SOTTOVOCE_MAX_TOKENS", "1.5", "SOTTOVOCE_MAX_TOKENS: max_tokens must be an integer"),
        ("SOTTOVOCE_TEMPERATURE", "warm", "SOTTOVOCE_TEMPERATURE: temperature must be a number"),
        ("SOTTOVOCE_TEMPERATURE", "inf", "SOTTOVOCE_TEMPERATURE: temperature must be a number"),
        ("SOTTOVOCE_LOG_TEXT", "maybe", "SOTTOVOCE_LOG_TEXT: log_text must be true or false"),
        ("SOTTOVOCE_QUEUE_DEPTH", "0", "SOTTOVOCE_QUEUE_DEPTH: queue_depth must be between 1 and 1024"),
        ("SOTTOVOCE_ENDPOINT", "udp://x", "SOTTOVOCE_ENDPOINT: endpoint must be ipc://PATH"),
    ],
)
def test_environment_errors(cfg: Path, var: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        load(cfg, env={var: value})


def test_flag_errors_name_the_flag(cfg: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--max-tokens: max_tokens must be between 1 and 32768, got -1"):
        load(cfg, flags={"max_tokens": -1})
    with pytest.raises(ConfigError, match=r"^--no-such: unknown setting 'no_such'"):
        load(cfg, flags={"no_such": 1})


def test_file_that_is_not_utf8_or_a_directory(tmp_path: Path, cfg: Path) -> None:
    cfg.write_bytes(b"max_tokens = 5 # \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load(cfg)
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(config_path=tmp_path, environ={})


def test_unreadable_file(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg.write_text("max_tokens = 5\n")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads any file, so chmod 0 proves nothing here
    with pytest.raises(ConfigError, match=r"cannot read the config file: Permission denied"):
        load(cfg)


def test_unknown_sottovoce_variables_are_reported_not_fatal(cfg: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"SOTTOVOCE_MAX_TOKEN": "5", "SOTTOVOCE_MODELS_DIR": "/m", "SOTTOVOCE_CONFIG": str(cfg)}
    assert config.unknown_env_vars(env) == ["SOTTOVOCE_MAX_TOKEN"]
    with caplog.at_level(logging.WARNING, logger="sottovoce.client.config"):
        settings, _ = load(cfg, env=env)
    assert settings.max_tokens == 256
    assert "SOTTOVOCE_MAX_TOKEN" in caplog.text and "did you mean 'max_tokens'" in caplog.text


HOTKEYS = ["<ctrl>+<alt>+<space>", "<cmd>+<shift>+a", "<f9>", "<ctrl>++", "+", "a+b", "ctrl+alt", "<ctrl>+",
           "", "<>+a", "<ctrl>+<CTRL>", "<ctrl>+<alt>+t+t", "<ctrl> +a", "<shift>+<"]  # fmt: skip


def test_hotkeys_are_checked_as_the_tray_parses_them() -> None:
    hotkeys = pytest.importorskip("sottovoce.tray.hotkeys")
    for spec in HOTKEYS:
        try:
            hotkeys.parse_spec(spec)
            tray_ok = True
        except hotkeys.HotkeyError:
            tray_ok = False
        assert (config._check_hotkey(spec) is None) == tray_ok, spec


def test_toggle_hotkey_off_means_none(cfg: Path) -> None:
    assert load(cfg, 'toggle_hotkey = "off"\n')[0].toggle_hotkey is None
    assert load(cfg, env={"SOTTOVOCE_TOGGLE_HOTKEY": "OFF"})[0].toggle_hotkey is None
    assert load(cfg, env={"SOTTOVOCE_FP16": "off"})[0].fp16 is False  # "off" is unset only where it says so


def test_every_setting_has_a_doc_and_a_type_the_loader_knows() -> None:
    for field in dataclasses.fields(Settings):
        assert field.metadata["doc"], field.name
        base = str(field.type).removesuffix(" | None")
        assert base in ("str", "int", "float", "bool"), field.name


# ---- template ----------------------------------------------------------------------------------------------------


def test_template_changes_nothing_until_uncommented(cfg: Path) -> None:
    text = config.template()
    for name, doc in Settings.docs().items():
        assert f"# {doc}\n" in text and f"\n#{name} = " in text and config.env_name(name) in text
    settings, sources = load(cfg, text)
    assert set(sources.values()) == {"default"}
    assert settings == Settings(endpoint=settings.endpoint)


def test_template_uncommented_is_valid_and_gives_the_defaults(cfg: Path) -> None:
    lines = [line[1:] if re.match(r"#[a-z0-9_]+ = ", line) else line for line in config.template().splitlines()]
    settings, sources = load(cfg, "\n".join(lines))
    assert set(sources.values()) == {str(cfg)}
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        value, default = getattr(settings, field.name), getattr(defaults, field.name)
        if default is None:  # shown with an example value
            assert value == field.metadata.get("example", None) or value is None, field.name
        else:
            assert value == default, field.name


@pytest.mark.parametrize("value", ['a "quoted" \\ path', "tab\there", "line\nbreak", 0.1, 1e-05, 10**9, False])
def test_toml_value_round_trips(value: object) -> None:
    assert tomllib.loads(f"x = {config.toml_value(value)}")["x"] == value


def test_write_template_is_private_and_never_overwrites(cfg: Path) -> None:
    path = config.write_template(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("max_tokens = 5\n")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        config.write_template(cfg)
    assert path.read_text() == "max_tokens = 5\n"
    config.write_template(cfg, force=True)
    assert path.read_text() == config.template()
    assert [p.name for p in cfg.parent.iterdir()] == [cfg.name]  # no temp file left behind


# ---- the commands ----------------------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, cfg: Path) -> Path:
    for var in list(os.environ):
        if var.startswith("SOTTOVOCE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SOTTOVOCE_CONFIG", str(cfg))
    return cfg


def test_config_show_prints_values_and_sources(env: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    env.write_text("max_tokens = 77\n")
    monkeypatch.setenv("SOTTOVOCE_LANGUAGE", "en")
    assert cli.main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert f"# config file: {env}\n" in out
    assert any(line.startswith("max_tokens") and line.endswith("= 77  # file") for line in out.splitlines())
    assert any(line.endswith('= "en"  # env SOTTOVOCE_LANGUAGE') for line in out.splitlines())
    assert any(line.startswith("queue_depth") and line.endswith("= 4  # default") for line in out.splitlines())


def test_config_show_json(env: Path, capsys) -> None:
    env.write_text("fp16 = false\n")
    assert cli.main(["config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config_file"] == str(env) and data["config_file_exists"] is True
    assert data["settings"]["fp16"] == {"value": False, "source": str(env)}
    assert data["settings"]["language"] == {"value": None, "source": "default"}


def test_config_show_with_a_bad_file_exits_2_naming_the_key(env: Path, capsys) -> None:
    env.write_text("max_tokens = -3\n")
    assert cli.main(["config", "show"]) == 2
    err = capsys.readouterr().err
    assert f"{env}: max_tokens must be between 1 and 32768, got -3" in err


def test_config_path_and_init(env: Path, capsys) -> None:
    assert cli.main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(env)
    assert cli.main(["config", "init"]) == 0
    assert env.read_text() == config.template()
    assert cli.main(["config", "init"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["config", "init", "--force"]) == 0
    assert cli.main(["config", "init", "--print"]) == 0
    assert capsys.readouterr().out.endswith(config.template())
