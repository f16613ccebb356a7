from __future__ import annotations

from pathlib import Path

import pytest

from nexus.cli import example_config
from nexus.config import ConfigError, Settings, load_settings, settings_from_dict


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return path


def test_missing_file_means_defaults(tmp_path):
    settings = load_settings(tmp_path / "absent.toml", environ={})
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.routing.strategy == "smart"
    assert settings.routing.max_retries == 2
    assert (settings.health_check.failure_threshold, settings.health_check.recovery_threshold) == (
        3,
        2,
    )


def test_missing_file_is_an_error_when_required(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={}, require_file=True)


def test_the_example_config_loads_cleanly(tmp_path):
    settings = load_settings(write(tmp_path, example_config()), environ={})
    assert [b.name for b in settings.backends] == ["local-ollama", "local-llamacpp"]
    assert settings.routing.aliases["fast"] == "gpt-4"
    assert settings.discovery.interfaces == Settings().discovery.interfaces  # the default shown


def test_rust_nexus_keys_are_accepted(tmp_path):
    text = """
[server]
host = "0.0.0.0"
port = 9000
request_timeout_seconds = 60
max_concurrent_requests = 10
[discovery]
enabled = false
service_types = ["_ollama._tcp.local"]
grace_period_seconds = 5
[health_check]
enabled = true
interval_seconds = 10
timeout_seconds = 2
failure_threshold = 4
recovery_threshold = 1
[routing]
strategy = "round_robin"
max_retries = 1
[routing.weights]
priority = 10
load = 10
latency = 80
[routing.aliases]
a = "b"
[routing.fallbacks]
b = ["c", "d"]
[[routing.policies]]
model_pattern = "gpt-*"
privacy = "Restricted"
min_tier = 2
[routing.budget]
monthly_limit_usd = 10.0
[logging]
level = "debug"
format = "json"
[logging.component_levels]
health = "debug"
[quality]
error_rate_threshold = 0.2
[queue]
max_size = 5
[[backends]]
name = "gpu"
url = "http://10.0.0.5:8000/v1/"
type = "vLLM"
priority = 1
api_key_env = "GPU_KEY"
zone = "Open"
tier = 3
"""
    settings = load_settings(write(tmp_path, text), environ={})
    backend = settings.backends[0]
    assert backend.url == "http://10.0.0.5:8000"  # no /v1 doubling later
    assert backend.type == "vllm"
    assert backend.zone == "open"
    assert backend.tier == 3
    assert backend.priority == 1
    assert settings.routing.policies[0].privacy == "restricted"
    assert settings.routing.weights.latency == 80
    assert settings.logging.format == "json"


def test_zone_defaults_by_type():
    settings = settings_from_dict(
        {
            "backends": [
                {"name": "a", "url": "http://127.0.0.1:1", "type": "ollama"},
                {"name": "b", "url": "https://api.openai.com", "type": "openai"},
            ]
        }
    )
    assert [b.effective_zone for b in settings.backends] == ["restricted", "open"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[routing]\nstratgy = "smart"\n',
            r"routing\.stratgy: unknown key \(did you mean 'strategy'\?\)",
        ),
        ("[sever]\nport = 1\n", r"sever: unknown key \(did you mean 'server'\?\)"),
        (
            '[[backends]]\nname = "x"\nurl = "http://h"\ntype = "ollama"\nzome = "open"\n',
            r"backends\[0\] \(x\)\.zome: unknown key \(did you mean 'zone'\?\)",
        ),
        ('[server]\nport = "eighty"\n', r"server\.port: .*integer"),
        ("[server]\nport = 0\n", r"server\.port: .*greater than or equal to 1"),
        ('[[backends]]\nname = "x"\nurl = "h"\ntype = "ollama"\n', r"backends\[0\] \(x\)\.url"),
        (
            '[[backends]]\nname = "x"\nurl = "http://h"\ntype = "tgi"\n',
            r"backends\[0\] \(x\)\.type",
        ),
        ('[[backends]]\nname = "x"\nurl = "http://h"\ntype = "ollama"\nzone = "dmz"\n', r"\.zone"),
        ('[[backends]]\nname = "x"\nurl = "http://h"\ntype = "ollama"\ntier = 9\n', r"\.tier"),
        ('[[backends]]\nurl = "http://h"\ntype = "ollama"\n', r"backends\[0\]\.name: required key"),
        ('[routing]\nstrategy = "fastest"\n', r"routing\.strategy"),
        ("[server\n", r"invalid TOML"),
    ],
)
def test_invalid_config_names_the_key_and_reason(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path, text), environ={})


def test_duplicate_backend_names_are_rejected():
    with pytest.raises(ConfigError, match="used twice"):
        settings_from_dict(
            {
                "backends": [
                    {"name": "a", "url": "http://127.0.0.1:1", "type": "ollama"},
                    {"name": "a", "url": "http://127.0.0.1:2", "type": "ollama"},
                ]
            }
        )


def test_alias_cycle_is_rejected_naming_the_loop():
    with pytest.raises(ConfigError, match=r"alias cycle: a -> b -> a"):
        settings_from_dict({"routing": {"aliases": {"a": "b", "b": "a"}}})


def test_alias_chain_of_three_hops_is_fine_and_four_is_rejected():
    three = {"a": "b", "b": "c", "c": "d"}
    assert settings_from_dict({"routing": {"aliases": three}}).routing.aliases == three
    with pytest.raises(ConfigError, match=r"deeper than 3 hops: a -> b -> c -> d -> e"):
        settings_from_dict({"routing": {"aliases": {**three, "d": "e"}}})


@pytest.mark.parametrize("bad", ["next\r\nX-Injected: 1", "modèle", "", "m" * 257])
def test_fallback_model_names_are_fit_for_a_header(bad):
    """The fallback's name is sent as X-Nexus-Fallback-Model: it must be a valid header value."""
    with pytest.raises(ConfigError, match=r"fallbacks: model name"):
        settings_from_dict({"routing": {"fallbacks": {"big": [bad]}}})
    ok = {"big": ["org/model:7b-q4_K_M", "m" * 256]}
    assert settings_from_dict({"routing": {"fallbacks": ok}}).routing.fallbacks == ok


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    path = write(tmp_path, '[server]\nport = 9001\nhost = "127.0.0.2"\n')
    file_only = load_settings(path, environ={})
    assert (file_only.server.port, file_only.server.host) == (9001, "127.0.0.2")
    env = {"NEXUS_PORT": "9002", "NEXUS_LOG_FORMAT": "json", "NEXUS_HEALTH_CHECK": "false"}
    with_env = load_settings(path, environ=env)
    assert with_env.server.port == 9002
    assert with_env.server.host == "127.0.0.2"
    assert with_env.logging.format == "json"
    assert with_env.health_check.enabled is False
    with_cli = load_settings(path, environ=env, overrides={("server", "port"): 9003})
    assert with_cli.server.port == 9003
    defaults = load_settings(tmp_path / "none.toml", environ={})
    assert defaults.server.port == 8000


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NEXUS_PORT": "abc"}, "NEXUS_PORT='abc': not a whole number"),
        ({"NEXUS_DISCOVERY": "maybe"}, "NEXUS_DISCOVERY='maybe': expected true or false"),
        ({"NEXUS_PORT": "70000"}, r"server\.port \(from NEXUS_PORT\)"),
        ({"NEXUS_LOG_FORMAT": "xml"}, r"logging\.format \(from NEXUS_LOG_FORMAT\)"),
    ],
)
def test_bad_environment_values_name_the_variable(tmp_path, env, expected):
    with pytest.raises(ConfigError, match=expected):
        load_settings(tmp_path / "none.toml", environ=env)


def test_api_key_is_read_from_the_named_variable():
    settings = settings_from_dict(
        {"backends": [{"name": "o", "url": "https://x.y", "type": "openai", "api_key_env": "K"}]}
    )
    assert settings.backends[0].api_key({"K": "sk-123"}) == "sk-123"
    assert settings.backends[0].api_key({}) is None


@pytest.mark.parametrize("name", ["gpu-box", "local ollama", "box_2.lan:11434", "n" * 64, "a"])
def test_backend_names_fit_for_headers_are_accepted(name):
    entry = {"name": name, "url": "http://127.0.0.1:9", "type": "vllm"}
    assert settings_from_dict({"backends": [entry]}).backends[0].name == name


@pytest.mark.parametrize(
    "name", ["", "bad\r\nX-Evil: 1", "tab\there", " lead", "trail ", "n" * 65, "Küche", "a/b"]
)
def test_backend_names_unfit_for_headers_stop_the_config(name):
    entry = {"name": name, "url": "http://127.0.0.1:9", "type": "vllm"}
    with pytest.raises(ConfigError, match=r"backends\[0\].*\.name: a backend name is"):
        settings_from_dict({"backends": [entry]})


def test_cloud_types_default_their_url_and_others_still_need_one():
    settings = settings_from_dict(
        {"backends": [{"name": "claude", "type": "anthropic", "api_key_env": "K"}]}
    )
    assert settings.backends[0].url == "https://api.anthropic.com"
    given = {"name": "claude", "type": "Anthropic", "url": "http://127.0.0.1:9/v1"}
    assert settings_from_dict({"backends": [given]}).backends[0].url == "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="'url' is required"):
        settings_from_dict({"backends": [{"name": "gpu", "type": "vllm"}]})
