"""compose.yaml and the Dockerfile say what the README and the settings say."""

from __future__ import annotations

from pathlib import Path

import yaml

from queue_worker.cli import build_parser
from queue_worker.config import Settings

ROOT = Path(__file__).parents[1]


def test_compose_brings_up_the_whole_stack_with_the_seed_environment() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {
        "redis", "queue", "executor-1", "executor-2", "executor-3", "queue-worker",
    }  # fmt: skip
    assert "healthcheck" in services["redis"]
    worker = services["queue-worker"]
    settings = Settings.from_env(worker["environment"])  # valid settings
    assert settings.executor_endpoints() == tuple(f"http://executor-{i}:8083" for i in (1, 2, 3))
    assert settings.queue_service_url == "http://queue:8081"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    parser = build_parser()
    for name, service in services.items():
        if name == "redis":
            continue
        args = parser.parse_args(service["command"])  # every command is a real CLI call
        assert callable(args.func)
        if name.startswith("executor-"):
            assert args.id == name and args.port == 8083


def test_dockerfile_runs_the_worker_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER worker" in text
    assert 'ENTRYPOINT ["queue-worker"]' in text and "8084" in text
