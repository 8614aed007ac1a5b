"""Settings: defaults < config file < environment < flags; a bad one stops start-up in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from session_manager.cli import build_parser, main
from session_manager.config import Settings, SettingsError, load_settings, reference_file


def test_defaults_match_the_spec_base_url() -> None:
    settings = load_settings(environ={}, config_file=None)
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.uses_managed_livekit


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "sm.toml"
    config.write_text('port = 9001\nlog_level = "DEBUG"\njoin_timeout = 5\n')
    env = {"SESSION_MANAGER_PORT": "9002", "SESSION_MANAGER_JOIN_TIMEOUT": "7"}
    settings = load_settings({"port": "9003"}, config_file=config, environ=env)
    assert settings.port == 9003  # flag beats env
    assert settings.join_timeout == 7  # env beats file
    assert settings.log_level == "DEBUG"  # file beats default


def test_livekit_env_names_are_livekits_own() -> None:
    env = {
        "LIVEKIT_URL": "wss://lk.example.test",
        "LIVEKIT_API_KEY": "k",
        "LIVEKIT_API_SECRET": "s",
    }
    settings = load_settings(environ=env)
    assert settings.livekit_url == "wss://lk.example.test"
    assert not settings.uses_managed_livekit
    assert settings.livekit_api_secret is not None
    assert "s" not in repr(settings.livekit_api_secret)


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({"port": "eighty"}, {}, "invalid setting port (from flag --port)"),
        ({}, {"SESSION_MANAGER_JOIN_TIMEOUT": "-1"}, "join_timeout (from environment"),
        ({"log_level": "LOUD"}, {}, "invalid setting log_level"),
        ({}, {"LIVEKIT_URL": "ws://127.0.0.1:7880"}, "livekit_api_key: required"),
        ({"livekit_url": "not a url"}, {}, "invalid setting livekit_url"),
    ],
)
def test_invalid_settings_name_the_setting(
    flags: dict[str, str], env: dict[str, str], expected: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(flags, environ=env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "sm.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting prot"):
        load_settings(config_file=config, environ={})


def test_help_lists_every_setting() -> None:
    text = build_parser().format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
    assert "--host" in text and "--port" in text


def test_cli_stops_with_one_line_on_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("session-manager: invalid setting port")
    assert "\n" not in err


def test_module_entry_point_prints_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "session_manager", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert "--livekit-url" in result.stdout


def test_the_shipped_config_file_lists_every_setting() -> None:
    shipped = Path(__file__).resolve().parents[2] / "config" / "session-manager.toml"
    assert shipped.read_text(encoding="utf-8") == reference_file(), (
        "config/session-manager.toml is stale: run scripts/write_config_reference.py"
    )
    assert load_settings(config_file=shipped, environ={}) == Settings()


def test_a_managed_livekit_takes_a_key_pair_whole() -> None:
    settings = load_settings(environ={"LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "secret"})
    assert settings.uses_managed_livekit and settings.livekit_api_key == "devkey"
    with pytest.raises(SettingsError, match="give both or neither"):
        load_settings(environ={"LIVEKIT_API_KEY": "devkey"})
