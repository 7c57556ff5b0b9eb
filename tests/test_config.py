"""Settings: defaults from the seed; every bad variable named at once, in plain words;
one declaration behind the settings, --help and the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from queue_worker import config_reader
from queue_worker.config import ENVIRONMENT, Settings
from queue_worker.errors import ConfigError
from queue_worker.router import bodies, queue_client
from queue_worker.router.bodies import task_body_max_bytes
from queue_worker.streams import publisher


def test_defaults_are_the_seeds() -> None:
    s = Settings.from_env({})
    assert s.queue_service_url == "http://queue:8081"
    assert s.redis_url == "redis://redis:6379"
    assert s.executor_count == 3 and s.executor_capacity == 1
    assert s.hostname == "queue-worker-1" and s.port == 8084
    assert s.health_timeout_s == 2.0
    assert (s.queue_backoff_step_s, s.queue_backoff_max_s) == (5.0, 30.0)
    assert s.executor_endpoints() == (
        "http://executor-1:8083",
        "http://executor-2:8083",
        "http://executor-3:8083",
    )


def test_compose_naming_and_explicit_list() -> None:
    s = Settings.from_env({"EXECUTOR_BASE_URL": "http://exec:9000", "EXECUTOR_COUNT": "2"})
    assert s.executor_endpoints() == ("http://exec-1:9000", "http://exec-2:9000")
    s = Settings.from_env({"EXECUTOR_URLS": " http://a:1/ , http://b:2 ", "EXECUTOR_COUNT": "9"})
    assert s.executor_endpoints() == ("http://a:1", "http://b:2")


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "ROUTING_STRATEGY": "random",
            "POLL_INTERVAL_S": "0.5",
            "PORT": "9001",
            "HOSTNAME": "w-7",
            "QUEUE_API_KEY": "k",
            "LOG_FORMAT": "console",
        }
    )
    assert (s.routing_strategy, s.poll_interval_s, s.port) == ("random", 0.5, 9001)
    assert (s.worker_id, s.queue_api_key, s.log_format) == ("w-7", "k", "console")


def test_size_caps() -> None:
    s = Settings.from_env({})
    # The defaults the readers fall back to when they are not given a setting.
    assert s.max_response_bytes == bodies.MAX_RESPONSE_BYTES == 16 << 20
    assert s.publish_max_bytes == publisher.PUBLISH_MAX_BYTES == 1 << 20
    assert task_body_max_bytes(s.max_code_bytes) == queue_client.DEFAULT_TASK_MAX_BYTES
    s = Settings.from_env({"MAX_RESPONSE_BYTES": "1048576", "PUBLISH_MAX_BYTES": "65536"})
    assert (s.max_response_bytes, s.publish_max_bytes) == (1 << 20, 64 << 10)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXECUTOR_COUNT", "three"),
        ("EXECUTOR_COUNT", "0"),
        ("EXECUTOR_CAPACITY", "-1"),
        ("PORT", "70000"),
        ("ROUTING_STRATEGY", "fastest"),
        ("POLL_INTERVAL_S", "nan"),
        ("HEALTH_TIMEOUT_S", "-2"),
        ("QUEUE_SERVICE_URL", "queue:8081"),
        ("QUEUE_SERVICE_URL", "http://queue:port"),
        ("EXECUTOR_URLS", " , "),
        ("EXECUTOR_URLS", "http://a:1,ftp://b"),
        ("REDIS_URL", "http://redis:6379"),
        ("REDIS_URL", "redis://:pw@redis:notaport"),
        ("REDIS_URL", "redis://redis:70000"),
        ("REDIS_URL", "redis://redis:0"),
        ("REDIS_URL", "redis://:pw@:6379/0"),
        ("REDIS_URL", "redis://redis:6379?socket_timeout=soon"),
        ("REDIS_URL", "unix://"),
        ("STREAM_PREFIX", "a{b}"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("QUEUE_BACKOFF_MAX_S", "1"),
        ("MAX_RESPONSE_BYTES", "1000"),
        ("PUBLISH_MAX_BYTES", "many"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")


def test_secrets_stay_out_of_repr() -> None:
    s = Settings.from_env({"QUEUE_API_KEY": "hunter2", "REDIS_URL": "redis://:pw0rd@r:6379/0"})
    assert "hunter2" not in repr(s) and "pw0rd" not in repr(s)
    assert s.redacted_redis_url() == "redis://:***@r:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@redis:notaport/0",
        "redis://admin:hunter2@redis:99999",
        "redis://:hun/ter2@redis:6379",  # an unencoded "/" ends the authority early
        "redis://:hunter2@:6379",
        "redis://:hunter2@redis:6379?socket_timeout=soon",
        "http://:hunter2@redis:6379",
    ],
)
def test_a_bad_redis_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL": url})
    assert info.value.variable == "REDIS_URL"
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_every_setting_is_documented() -> None:
    documented = {name for name, _, _ in ENVIRONMENT}
    assert {"QUEUE_SERVICE_URL", "QUEUE_API_KEY", "REDIS_URL", "EXECUTOR_COUNT",
            "EXECUTOR_BASE_URL", "HOSTNAME", "EXECUTOR_URLS", "EXECUTOR_CAPACITY", "PORT",
            "ROUTING_STRATEGY", "POLL_INTERVAL_S", "HEALTH_TIMEOUT_S", "STREAM_PREFIX",
            "LOG_LEVEL", "LOG_FORMAT"} <= documented  # fmt: skip
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in text for name in documented)


def test_credentials_in_urls_are_kept_apart_from_the_urls() -> None:
    settings = Settings.from_env(
        {
            "QUEUE_SERVICE_URL": "http://ops:p%40ss@queue:8081/",
            "EXECUTOR_URLS": "http://a:b@ex1:8083,http://ex2:8083",
            "EXECUTOR_CAPACITIES": "http://a:b@ex1:8083=3,http://ex2:8083=1",
        }
    )
    assert settings.queue_service_url == "http://queue:8081"
    assert settings.executor_urls == ("http://ex1:8083", "http://ex2:8083")
    assert settings.executor_capacities == (("http://ex1:8083", 3), ("http://ex2:8083", 1))
    assert settings.credentials == (
        ("http://ex1:8083", "a", "b"),
        ("http://queue:8081", "ops", "p@ss"),
    )
    assert "p@ss" not in repr(settings) and "p%40ss" not in repr(settings)
    compose = Settings.from_env({"EXECUTOR_BASE_URL": "http://x:y@executor", "EXECUTOR_COUNT": "2"})
    assert compose.executor_endpoints() == ("http://executor-1:8083", "http://executor-2:8083")
    assert {origin for origin, _, _ in compose.credentials} == set(compose.executor_endpoints())
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"EXECUTOR_URLS": "http://a:hunter2@ex1:port"})
    assert "hunter2" not in str(bad.value) and "EXECUTOR_URLS" in str(bad.value)


# --- every problem at once, in plain words -------------------------------------------

CLI = [sys.executable, "-m", "queue_worker"]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def problems_of(env: dict[str, str]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == info.value.problems[0][0]
    return list(info.value.problems)


def test_every_bad_variable_is_reported_in_declaration_order() -> None:
    problems = problems_of(
        {
            "LOG_FORMAT": "xml",
            "PORT": "abc",
            "EXECUTOR_COUNT": "0",
            "LEARN_CAPACITY": "perhaps",
            "POLL_INTERVAL_S": "soon",
            "QUEUE_BACKOFF_MAX_S": "1",  # below QUEUE_BACKOFF_STEP_S: a rule across settings
            "HOSTNAME": "w-1",  # good ones are not mentioned
        }
    )
    assert [variable for variable, _ in problems] == [
        "EXECUTOR_COUNT", "LEARN_CAPACITY", "PORT", "POLL_INTERVAL_S", "QUEUE_BACKOFF_MAX_S",
        "LOG_FORMAT",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "abc"}, "PORT: expected a whole number from 0 to 65535, got 'abc'"),
        ({"PORT": "80.5"}, "PORT: expected a whole number from 0 to 65535, got '80.5'"),
        ({"MAX_DELIVERIES": "0"}, "MAX_DELIVERIES: expected a whole number of 1 or more, got '0'"),
        (
            {"STREAM_MAXLEN": "9" * 12},
            f"STREAM_MAXLEN: expected a whole number from 0 to {1 << 31}, got '{'9' * 12}'",
        ),
        (
            {"POLL_INTERVAL_S": "soon"},
            "POLL_INTERVAL_S: expected a number of at least 0.001, got 'soon'",
        ),
        (
            {"HEALTH_TIMEOUT_S": "inf"},
            "HEALTH_TIMEOUT_S: expected a finite number of at least 0.01, got 'inf'",
        ),
        ({"SHUTDOWN_GRACE_S": "-1"}, "SHUTDOWN_GRACE_S: expected a number of 0 or more, got '-1'"),
        (
            {"SHARED_CAPACITY": "perhaps"},
            "SHARED_CAPACITY: expected true or false (or 1/0, yes/no, on/off), got 'perhaps'",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT: expected json or console, got 'xml'"),
        (
            {"ROUTING_STRATEGY": "fastest"},
            "ROUTING_STRATEGY: expected least_loaded, round_robin, random, weighted or sticky, "
            "got 'fastest'",
        ),
        (
            {"QUEUE_SERVICE_URL": "queue:8081"},
            "QUEUE_SERVICE_URL: expected an http(s) URL with a host, got 'queue:8081'",
        ),
        (
            {"EXECUTOR_URLS": "http://a:1,http://[::1"},
            "EXECUTOR_URLS: expected an http(s) URL with a host, got 'http://[::1'",
        ),
        (
            {"QUEUE_SERVICE_URL": "http://queue:port"},
            "QUEUE_SERVICE_URL: expected a port from 0 to 65535 in 'http://queue:port'",
        ),
        (
            {"REDIS_URL": "redis://redis:6379?socket_timeout=soon"},
            "REDIS_URL: invalid value for 'socket_timeout' in connection URL: "
            "'redis://redis:6379?socket_timeout=soon'",
        ),
        (
            {"EXECUTOR_WEIGHTS": "http://a:1=0"},
            "EXECUTOR_WEIGHTS: expected a number above 0, got '0'",
        ),
        (
            {"DEAD_AFTER_S": "3"},
            "DEAD_AFTER_S: expected at least 2 times HEARTBEAT_INTERVAL_S (4), got '3'",
        ),
        (
            {"EJECT_BASE_S": "60", "EJECT_MAX_S": "30"},
            "EJECT_MAX_S: expected at least EJECT_BASE_S (60), got '30'",
        ),
        (
            {"EXECUTOR_DNS_NAME": "x", "EXECUTOR_URLS": "http://a:1"},
            "EXECUTOR_DNS_NAME: set EXECUTOR_URLS or EXECUTOR_DNS_NAME, not both",
        ),
        (
            {"STREAM_PREFIX": "a b"},
            "STREAM_PREFIX: expected no braces or white space, got 'a b'",
        ),
    ],
)
def test_errors_are_in_plain_words(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value) == expected
    for python in ("literal", "int()", "float", "convert", "ValueError", "base 10"):
        assert python not in str(info.value)


def test_a_rule_across_settings_waits_for_the_settings_it_needs() -> None:
    # A bad EXECUTOR_COUNT leaves nothing to align EXECUTOR_CAPACITIES with: only the
    # count is reported, not a second, misleading problem.
    problems = problems_of({"EXECUTOR_COUNT": "two", "EXECUTOR_CAPACITIES": "1,2"})
    assert [variable for variable, _ in problems] == ["EXECUTOR_COUNT"]
    problems = problems_of({"HEARTBEAT_INTERVAL_S": "x", "DEAD_AFTER_S": "1"})
    assert [variable for variable, _ in problems] == ["HEARTBEAT_INTERVAL_S"]
    # ... while the value's own form is still checked.
    problems = problems_of({"HEARTBEAT_INTERVAL_S": "x", "DEAD_AFTER_S": "y"})
    assert [variable for variable, _ in problems] == ["HEARTBEAT_INTERVAL_S", "DEAD_AFTER_S"]


def test_a_default_follows_the_setting_it_comes_from() -> None:
    s = Settings.from_env({"EJECT_BASE_S": "600"})
    assert (s.eject_base_s, s.eject_max_s) == (600.0, 600.0)
    s = Settings.from_env({"QUEUE_SERVICE_URLS": "http://u:pw@high:1=2, http://low:2"})
    assert s.queue_service_url == "http://high:1" and s.queue_weights == (2.0, 1.0)
    assert s.credentials == (("http://high:1", "u", "pw"),)


def test_no_error_shows_a_password() -> None:
    env = {
        "QUEUE_SERVICE_URL": "http://ops:hunter2@queue:port",
        "QUEUE_SERVICE_URLS": "http://ops:hunter2@a:1,http://ops:hunter2@a:1",
        "EXECUTOR_URLS": "http://ops:hunter2@[::1",
        "EXECUTOR_CAPACITIES": "http://ops:hunter2@ex:1",
        "EXECUTOR_DNS_SERVER": "ops:hunter2@ns",
        "REDIS_URL": "redis://:hunter2@redis:6379?socket_timeout=soon",
        "QUEUE_API_KEY": "hunter2",
        "PORT": "x",
    }
    problems = problems_of(env)
    assert {variable for variable, _ in problems} == set(env) - {"QUEUE_API_KEY"}
    assert all("hunter2" not in message for _, message in problems)
    shown = {variable for variable, message in problems if "***" in message}
    assert shown == set(env) - {"QUEUE_API_KEY", "PORT", "QUEUE_SERVICE_URLS"}
    assert ("QUEUE_SERVICE_URLS", "http://a:1 is listed twice") in problems  # without the user


def test_queue_worker_run_prints_every_bad_variable_and_exits_2() -> None:
    result = run_cli(
        "run",
        env={
            "PORT": "abc",
            "LOG_LEVEL": "LOUD",
            "REDIS_URL": "redis://:hunter2@redis:notaport/0",
            "EXECUTOR_COUNT": "many",
        },
    )
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr
    assert result.stderr.splitlines() == [
        "queue-worker: configuration error: REDIS_URL: expected a port from 1 to 65535 in "
        "'redis://:***@redis:notaport/0'",
        "queue-worker: configuration error: EXECUTOR_COUNT: expected a whole number from 1 to "
        "1000, got 'many'",
        "queue-worker: configuration error: PORT: expected a whole number from 0 to 65535, "
        "got 'abc'",
        "queue-worker: configuration error: LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or "
        "CRITICAL, got 'LOUD'",
    ]


# --- one declaration: the settings, --help and the README agree ------------------------


def test_every_field_is_declared_once_or_derived() -> None:
    declared = {name.lower() for name, _, _ in ENVIRONMENT}
    assert len(declared) == len(ENVIRONMENT)
    assert {f.name for f in fields(Settings)} - declared == {"credentials", "queue_weights"}


def test_each_default_shown_is_the_default_read() -> None:
    defaults = Settings()
    for (variable, shown, _), (name, declared) in zip(
        ENVIRONMENT, config_reader.declared(Settings), strict=True
    ):
        assert variable == name.upper()
        if shown.startswith("("):  # (none), or a default that comes of other settings
            continue
        assert declared.parse(shown) == getattr(defaults, name), variable
        assert Settings.from_env({variable: shown}) == Settings.from_env({}), variable


def test_the_readme_table_is_the_environment() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \| (.*) \|$", text, re.MULTILINE)
    assert tuple(rows) == ENVIRONMENT


def test_help_lists_every_setting_with_its_default_once() -> None:
    out = run_cli("--help", env={}).stdout
    lines = out.splitlines()
    for variable, default, meaning in ENVIRONMENT:
        (line,) = [x for x in lines if x.split()[:1] == [variable]]
        assert line.split(None, 1)[1] == f"{meaning} (default: {default})"
    assert sum("(default:" in line for line in lines) == len(ENVIRONMENT)
    assert all(line.count("default") <= 1 for line in lines)


def test_tokens_are_read_named_and_never_shown(tmp_path: Path) -> None:
    secret_file = tmp_path / "tokens"
    secret_file.write_text("ci:file-token-0123456789abc\nfile-token-unnamed-0123456\n")
    s = Settings.from_env(
        {
            "API_TOKEN": "ops:read-token-0123456789abc, read-token-rotated-0123456",
            "API_TOKEN_FILE": str(secret_file),
            "ADMIN_TOKEN": "admin-token-0123456789abcdef",
        }
    )
    assert s.api_token == (("ops", "read-token-0123456789abc"), ("", "read-token-rotated-0123456"))
    assert s.api_token_file == (
        ("ci", "file-token-0123456789abc"),
        ("", "file-token-unnamed-0123456"),
    )
    assert s.admin_token == (("", "admin-token-0123456789abcdef"),)
    assert "0123456789" not in repr(s)
    for variable, value in [
        ("API_TOKEN", "short-secret"),
        ("API_TOKEN", "has space-0123456789abcdef"),
        ("ADMIN_TOKEN", "bad name:admin-token-0123456789abcdef"),
        ("API_TOKEN_FILE", str(tmp_path / "missing")),
    ]:
        with pytest.raises(ConfigError) as info:
            Settings.from_env({variable: value})
        assert info.value.variable == variable
        assert "secret" not in str(info.value) and "0123456789" not in str(info.value)
    assert Settings.from_env({"AUTH_DISABLED": "true", "METRICS_PUBLIC": "1"}).auth_disabled
