"""Configuration (README "Configuration"): sources and their precedence, defaults, validation."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from openai_proxy import config as config_module
from openai_proxy.config import (
    KNOWN_VARIABLES,
    Config,
    ConfigError,
    available_cpus,
    build_config,
    read_environment,
)
from tests.conftest import ROOT

EVERY_VARIABLE = {
    "PORT": ("port", "4000", 4000),
    "OPENAI_API_KEY": ("openai_api_key", "sk-from-file", "sk-from-file"),
    "OPENAI_PROJECT_KEY": ("openai_project", "proj_file", "proj_file"),
    "OPENAI_ORG_ID": ("openai_organization", "org_file", "org_file"),
    "OPENAI_BASE_URL": ("openai_base_url", "http://127.0.0.1:9/v1/", "http://127.0.0.1:9/v1"),
    "SECURITY_KEY": ("security_key", "sec", "sec"),
    "ACCESS_TOKEN": ("access_token", "tok", "tok"),
    "DEFAULT_MODEL": ("default_model", "gpt-4.1", "gpt-4.1"),
    "OPENAI_PROXY_UPSTREAM_TIMEOUT_MS": ("upstream_timeout_ms", "1000", 1000),
    "OPENAI_PROXY_UPSTREAM_MAX_TIMEOUT_MS": ("upstream_max_timeout_ms", "2000", 2000),
    "OPENAI_PROXY_MAX_PARALLEL_REQUESTS": ("max_parallel_requests", "7", 7),
    "OPENAI_PROXY_SSE_KEEPALIVE_INTERVAL_MS": ("sse_keepalive_interval_ms", "500", 500),
    "OPENAI_PROXY_MAX_BODY_BYTES": ("max_body_bytes", "1234", 1234),
    "OPENAI_PROXY_MAX_AUDIO_BYTES": ("max_audio_bytes", "4321", 4321),
    "OPENAI_PROXY_RUNTIME_DIR": ("runtime_dir", "/tmp/x", "/tmp/x"),
    "OPENAI_PROXY_WORKERS": ("workers", "3", 3),
    "OPENAI_PROXY_GRACEFUL_TIMEOUT_S": ("graceful_timeout_s", "9", 9),
    "OPENAI_PROXY_KEEPALIVE_S": ("keepalive_s", "65", 65),
    "OPENAI_PROXY_OUTBOUND_PROXY": ("outbound_proxy", "http://proxy:3128", "http://proxy:3128"),
    "OPENAI_PROXY_LOG_DB": ("log_db", "/tmp/log.sqlite3", "/tmp/log.sqlite3"),
    "OPENAI_PROXY_LOG_RETENTION": ("log_retention", "500", 500),
    "OPENAI_PROXY_PAGES_RATE_LIMIT": ("pages_rate_limit", "10/second", "10/second"),
    "OPENAI_PROXY_HEALTH2_RATE_LIMIT": ("health2_rate_limit", "2 per minute", "2 per minute"),
    "OPENAI_PROXY_RATELIMIT_STORAGE_URI": ("ratelimit_storage_uri", "redis://r:6379", "redis://r:6379"),
    "OPENAI_PROXY_REDIS_TIMEOUT_S": ("redis_timeout_s", "0.5", 0.5),
    "OPENAI_PROXY_REDIS_RETRY_S": ("redis_retry_s", "2.5", 2.5),
}


def test_defaults():
    config = build_config({})
    assert (config.port, config.default_model) == (3002, "gpt-4o-mini")
    assert (config.upstream_timeout_ms, config.upstream_max_timeout_ms) == (600000, 900000)
    assert (config.max_parallel_requests, config.sse_keepalive_interval_ms) == (32, 15000)
    assert (config.max_body_bytes, config.max_audio_bytes) == (20 * 1024 * 1024, 25 * 1024 * 1024)
    assert config.openai_base_url == "https://api.openai.com/v1"
    assert config.openai_project is None and config.security_key is None
    assert (config.log_db, config.log_retention) == ("var/openai-proxy.sqlite3", 10000)
    assert (config.pages_rate_limit, config.health2_rate_limit) == ("60/minute", "6/minute")
    assert config.ratelimit_storage_uri == "memory://"


def test_every_variable_works_from_dotenv(tmp_path):
    (tmp_path / ".env").write_text("".join(f"{name}={raw}\n" for name, (_, raw, _) in EVERY_VARIABLE.items()))
    config = build_config(read_environment(environ={}, directory=tmp_path))
    for name, (attr, _, expected) in EVERY_VARIABLE.items():
        assert getattr(config, attr) == expected, name


def test_precedence_env_over_local_over_dotenv(tmp_path):
    (tmp_path / ".env").write_text("SECURITY_KEY=from-env-file\nDEFAULT_MODEL=file-model\nPORT=1111\n")
    (tmp_path / ".env.local").write_text("SECURITY_KEY=from-local\nPORT=2222\n")
    config = build_config(read_environment(environ={"PORT": "3333"}, directory=tmp_path))
    assert config.port == 3333
    assert config.security_key == "from-local"
    assert config.default_model == "file-model"


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5", "", "  ", "1e400", "nan"])
def test_invalid_integers_fall_back_with_a_warning(raw):
    config = build_config({"OPENAI_PROXY_MAX_PARALLEL_REQUESTS": raw})
    assert config.max_parallel_requests == 32
    if raw.strip():
        assert any(
            "OPENAI_PROXY_MAX_PARALLEL_REQUESTS" in w and "using the default 32" in w for w in config.warnings
        )


def test_max_timeout_below_default_uses_default():
    config = build_config(
        {"OPENAI_PROXY_UPSTREAM_TIMEOUT_MS": "5000", "OPENAI_PROXY_UPSTREAM_MAX_TIMEOUT_MS": "100"}
    )
    assert config.effective_max_timeout_ms == 5000
    assert any("effective max is 5000" in w for w in config.warnings)


def test_sdk_variable_aliases():
    config = build_config({"OPENAI_PROJECT_ID": "proj_sdk", "OPENAI_ORG_ID": "org_sdk"})
    assert (config.openai_project, config.openai_organization) == ("proj_sdk", "org_sdk")
    assert build_config({"OPENAI_PROJECT_KEY": "a", "OPENAI_PROJECT_ID": "b"}).openai_project == "a"


def test_missing_secrets_warn_loudly():
    warnings = " | ".join(build_config({}).warnings)
    assert "SECURITY_KEY is not set" in warnings
    assert "OPENAI_API_KEY is not set" in warnings
    assert "ACCESS_TOKEN is not set" in warnings


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1  # type: ignore[misc]


def test_public_view_has_no_secrets():
    view = build_config({"OPENAI_API_KEY": "sk-secret-value-1234", "SECURITY_KEY": "s3cret", "ACCESS_TOKEN": "t0ken",
                         "OPENAI_PROXY_OUTBOUND_PROXY": "http://user:pw@proxy:3128",
                         "OPENAI_PROXY_RATELIMIT_STORAGE_URI": "redis://:redispw@cache:6379/0"}).public_view()  # fmt: skip
    text = repr(view)
    assert view["ratelimit_storage_uri"] == "redis://cache:6379/0"
    for secret in ("sk-secret-value-1234", "s3cret", "t0ken", "pw@", "redispw"):
        assert secret not in text
    assert view["openai_api_key"] == "set" and view["security_key"] == "set"
    assert view["outbound_proxy"] == "http://proxy:3128"


@pytest.mark.parametrize(
    "raw", ["60/minute", "10 per second", "1/2 hours", "5/minute;100/day", "3 per 10 minutes"]
)
def test_rate_limits_use_flask_limiters_grammar(raw):
    from limits import parse_many

    assert parse_many(raw)
    assert build_config({"OPENAI_PROXY_PAGES_RATE_LIMIT": raw}).pages_rate_limit == raw


@pytest.mark.parametrize("raw", ["fast", "60", "60/fortnight", "/minute"])
def test_invalid_rate_limits_fall_back_with_a_warning(raw):
    config = build_config({"OPENAI_PROXY_HEALTH2_RATE_LIMIT": raw})
    assert config.health2_rate_limit == "6/minute"
    assert any(
        "OPENAI_PROXY_HEALTH2_RATE_LIMIT" in w and "using the default 6/minute" in w for w in config.warnings
    )


# -- start-up truths: a wrong setting says so, with the value really used ---------------------------


@pytest.mark.parametrize("raw", ["abc", "0", "65536", "-1", "80.5", "\uff13\uff10\uff10\uff12", "²"])
def test_a_port_that_cannot_be_used_stops_the_server_naming_the_variable(raw):
    with pytest.raises(ConfigError) as exc:
        build_config({"PORT": raw})
    assert str(exc.value) == f"PORT={raw!r} is not a port number (1-65535)"


def test_a_port_with_spaces_around_it_is_read():
    assert build_config({"PORT": " 4000 "}).port == 4000


def test_an_unknown_proxy_variable_is_named_with_the_closest_known_one():
    config = build_config(
        {"OPENAI_PROXY_MAX_PARALEL_REQUESTS": "4", "OPENAI_PROXY_ZZZ": "1", "OTHER_THING": "x"}
    )
    assert config.max_parallel_requests == 32
    assert [w for w in config.warnings if "not a setting" in w] == [
        "OPENAI_PROXY_MAX_PARALEL_REQUESTS is not a setting of the proxy "
        "(did you mean OPENAI_PROXY_MAX_PARALLEL_REQUESTS?); it is ignored",
        "OPENAI_PROXY_ZZZ is not a setting of the proxy; it is ignored",
    ]


def test_every_variable_the_config_module_names_is_known():
    # A new setting must be added to KNOWN_VARIABLES, or setting it would warn that it is unknown.
    source = Path(config_module.__file__).read_text()
    named = set(re.findall(r'"((?:OPENAI_PROXY|OPENAI)_[A-Z0-9_]+)"', source)) - {"OPENAI_PROXY_"}
    assert named - KNOWN_VARIABLES == set()
    assert [
        w for w in build_config({name: "" for name in KNOWN_VARIABLES}).warnings if "not a setting" in w
    ] == []


def test_a_bad_worker_count_says_what_is_used_instead():
    config = build_config({"OPENAI_PROXY_WORKERS": "two"})
    assert config.workers == 0
    assert (
        f"OPENAI_PROXY_WORKERS='two' is not an integer > 0; using one worker per available CPU "
        f"({available_cpus()})"
    ) in config.warnings


def test_available_cpus_follow_the_affinity_mask():
    assert available_cpus() == min(len(os.sched_getaffinity(0)), available_cpus())
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_cpu_quota_is_read_in_v2_and_v1_layouts(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert config_module._cgroup_cpu_quota(str(tmp_path)) == quota


def test_a_container_quota_caps_the_worker_count(monkeypatch):
    monkeypatch.setattr(config_module, "_cgroup_cpu_quota", lambda: 0.5)
    assert available_cpus() == 1
    monkeypatch.setattr(config_module, "_cgroup_cpu_quota", lambda: 1.2)
    assert available_cpus() == min(2, len(os.sched_getaffinity(0)))


@pytest.mark.gunicorn
def test_gunicorn_stops_on_a_port_it_cannot_use_and_names_it(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "PORT": "abc", "OPENAI_PROXY_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app.wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "openai-proxy cannot start: PORT='abc' is not a port number (1-65535)" in done.stderr
