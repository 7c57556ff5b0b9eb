"""Settings: defaults from the seed, validation that names the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from queue_worker.config import ENVIRONMENT, Settings
from queue_worker.errors import ConfigError


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
        ("STREAM_PREFIX", "a{b}"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("QUEUE_BACKOFF_MAX_S", "1"),
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


def test_every_setting_is_documented() -> None:
    documented = {name for name, _, _ in ENVIRONMENT}
    assert {"QUEUE_SERVICE_URL", "QUEUE_API_KEY", "REDIS_URL", "EXECUTOR_COUNT",
            "EXECUTOR_BASE_URL", "HOSTNAME", "EXECUTOR_URLS", "EXECUTOR_CAPACITY", "PORT",
            "ROUTING_STRATEGY", "POLL_INTERVAL_S", "HEALTH_TIMEOUT_S", "STREAM_PREFIX",
            "LOG_LEVEL", "LOG_FORMAT"} <= documented  # fmt: skip
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in text for name in documented)
