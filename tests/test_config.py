from __future__ import annotations

import json
from pathlib import Path

import pytest

import config
from errors import ConfigError


def load(tmp_path: Path, env: dict[str, str] | None = None, auth: Path | None = None) -> config.Config:
    return config.load(env=env or {}, cwd=tmp_path, auth_path=auth or tmp_path / "no-auth.json")


def test_defaults_work_with_no_file_and_no_environment(tmp_path: Path) -> None:
    loaded = load(tmp_path)
    assert loaded.listen == "127.0.0.1:8700"
    assert loaded.workers == 2
    assert loaded.heartbeat_cost_cap == 0.05
    assert loaded.run_timeout == 300.0
    assert [m.name for m in loaded.models] == ["minimax-m2.5-free", "glm-5-free", "gemini-3-flash"]
    assert loaded.source == "defaults"


def test_environment_sets_typed_values(tmp_path: Path) -> None:
    loaded = load(
        tmp_path, {"PIDEPLOY_WORKERS": "4", "PIDEPLOY_RUN_COST_CAP": "0.5", "DATABASE_URL": "postgres://x"}
    )
    assert loaded.workers == 4
    assert loaded.run_cost_cap == 0.5
    assert loaded.database_url == "postgres://x"


def test_loop_guard_repeats_defaults_to_three_and_is_set_by_the_environment(tmp_path: Path) -> None:
    assert load(tmp_path).loop_guard_repeats == 3
    assert load(tmp_path, {"PIDEPLOY_LOOP_GUARD_REPEATS": "2"}).loop_guard_repeats == 2


def test_config_is_frozen(tmp_path: Path) -> None:
    loaded = load(tmp_path)
    with pytest.raises(AttributeError):
        loaded.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "key", "message"),
    [
        ({"PIDEPLOY_WORKERS": "many"}, "workers", "expected int"),
        ({"PIDEPLOY_WORKERS": "0"}, "workers", "at least 1"),
        ({"PIDEPLOY_LOOP_GUARD_REPEATS": "1"}, "loop_guard_repeats", "at least 2"),
        ({"PIDEPLOY_RETENTION_DAYS": "-1"}, "retention_days", "must be >= 0"),
        ({"PIDEPLOY_RUN_COST_CAP": "-1"}, "run_cost_cap", ">= 0"),
        ({"PIDEPLOY_AGENT": "maybe"}, "agent", "one of on, off"),
        ({"PIDEPLOY_LISTEN": "8700"}, "listen", "HOST:PORT"),
        ({"PIDEPLOY_PORT_RANGE": "30000-20000"}, "port_range", "LOW-HIGH"),
        ({"PIDEPLOY_MAX_TOKENS": "16"}, "max_tokens", "at least 256"),
        ({"PIDEPLOY_BOGUS": "1"}, "PIDEPLOY_BOGUS", "unknown environment variable"),
        # A trailing newline (a copy-paste slip) is refused, not carried into labels and commands.
        ({"PIDEPLOY_NAMESPACE": "prod\n"}, "namespace", "control character"),
        ({"PIDEPLOY_IMAGE": "localhost/gw:1\n"}, "image", "control character"),
        ({"PIDEPLOY_WORKERS": "2\n"}, "workers", "control character"),
        ({"PIDEPLOY_WORKERS": "\u0663"}, "workers", "expected int"),  # an Arabic-Indic 3
        ({"PIDEPLOY_NAMESPACE": "pr\u00e9d"}, "namespace", "letters, digits"),
        ({"PIDEPLOY_LISTEN": "127.0.0.1:\u0668\u0667\u0660\u0660"}, "listen", "HOST:PORT"),
    ],
)
def test_invalid_environment_names_the_key(
    tmp_path: Path, env: dict[str, str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load(tmp_path, env)
    assert caught.value.key == key


def test_toml_file_sets_models_and_settings(tmp_path: Path) -> None:
    (tmp_path / "pideploy.toml").write_text(
        """
[settings]
workers = 3
max_turns = 8

[[models]]
name = "local"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key_env = "LOCAL_KEY"
input_usd_per_mtok = 1.5
output_usd_per_mtok = 2
"""
    )
    loaded = load(tmp_path, {"LOCAL_KEY": "secret", "PIDEPLOY_MAX_TURNS": "5"})
    assert loaded.workers == 3
    assert loaded.max_turns == 5  # the environment wins over the file
    (model,) = loaded.models
    assert model.api_key == "secret"
    assert model.output_usd_per_mtok == 2.0
    assert model.cost_usd(1_000_000, 1_000_000) == pytest.approx(3.5)
    assert "secret" not in repr(model)
    assert loaded.source == str(tmp_path / "pideploy.toml")
    # The compatibility settings default to what OpenAI-style providers expect.
    assert (model.stream, model.tool_choice, model.send_usage_request) == (True, "none-sent", True)


def test_a_model_s_compatibility_settings(tmp_path: Path) -> None:
    (tmp_path / "pideploy.toml").write_text(
        '[[models]]\nname = "llama"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\napi_key_env = "K"\n'
        'stream = false\ntool_choice = "auto"\nsend_usage_request = false\n'
    )
    (model,) = load(tmp_path, {"K": "x"}).models
    assert (model.stream, model.tool_choice, model.send_usage_request) == (False, "auto", False)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[settings]\nwrokers = 3\n", "wrokers"),
        ("[setings]\n", "setings"),
        ("[settings]\nworkers = 'two'\n", "workers"),
        ('[[models]]\nname = "x"\n', "models[0].base_url"),
        (
            '[[models]]\nname="x"\nbase_url="u"\nmodel="m"\napi_key_env="K"\ntemperature=1\n',
            "models[0].temperature",
        ),
        (
            '[[models]]\nname="x"\nbase_url="u"\nmodel="m"\napi_key_env="K"\ntimeout="slow"\n',
            "models[0].timeout",
        ),
        (
            '[[models]]\nname="x"\nbase_url="u"\nmodel="m"\napi_key_env="K"\ntool_choice="always"\n',
            "models[0].tool_choice",
        ),
        (
            '[[models]]\nname="x"\nbase_url="u"\nmodel="m"\napi_key_env="K"\nstream="no"\n',
            "models[0].stream",
        ),
    ],
)
def test_invalid_file_names_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "custom.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"PIDEPLOY_CONFIG": str(path)})
    assert caught.value.key == key
    assert str(path) in caught.value.message


def test_unreadable_or_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path, {"PIDEPLOY_CONFIG": str(tmp_path / "missing.toml")})
    (tmp_path / "bad.toml").write_text("[settings\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, {"PIDEPLOY_CONFIG": str(tmp_path / "bad.toml")})


def test_api_keys_fall_back_to_pi_auth_json(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"opencode": {"type": "api_key", "key": "from-pi"}, "google": "legacy"}))
    loaded = load(tmp_path, {}, auth)
    keys = {m.name: m.api_key for m in loaded.models}
    assert keys == {"minimax-m2.5-free": "from-pi", "glm-5-free": "from-pi", "gemini-3-flash": "legacy"}
    from_env = load(tmp_path, {"OPENCODE_API_KEY": "from-env"}, auth)
    assert from_env.models[0].api_key == "from-env"  # the environment comes first


def test_describe_lists_every_setting_with_its_variable() -> None:
    rows = {variable for variable, _, _ in config.describe()}
    assert {"PIDEPLOY_HOME", "DATABASE_URL", "DOCKER_HOST", "PIDEPLOY_LISTEN", "PIDEPLOY_API_TOKEN"} <= rows
