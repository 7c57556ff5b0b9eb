"""compose.yaml and the Dockerfile say what the README and the settings say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from queue_worker.cli import build_parser
from queue_worker.config import Settings
from queue_worker.errors import ConfigError
from queue_worker.http.app import create_app
from queue_worker.http.auth import ACCESS

ROOT = Path(__file__).parents[1]


def test_compose_brings_up_the_whole_stack_with_the_seed_environment() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {
        "redis", "queue", "executor-1", "executor-2", "executor-3", "queue-worker",
    }  # fmt: skip
    assert "healthcheck" in services["redis"]
    worker = services["queue-worker"]
    environment = dict(worker["environment"])
    for name in ("API_TOKEN", "ADMIN_TOKEN"):  # required: compose stops without them
        assert environment[name].startswith(f"${{{name}:?"), environment[name]
        environment[name] = f"{name.lower()}-0123456789abcdef"
    settings = Settings.from_env(environment)  # valid settings
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


def test_the_tracing_override_adds_jaeger_and_points_the_worker_at_it() -> None:
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())
    tracing = yaml.safe_load((ROOT / "compose.tracing.yaml").read_text())
    jaeger = tracing["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/") and ":latest" not in jaeger["image"]
    environment = {
        **dict(base["services"]["queue-worker"]["environment"]),
        **tracing["services"]["queue-worker"]["environment"],
        "API_TOKEN": "api-token-0123456789abcdef",
        "ADMIN_TOKEN": "admin-token-0123456789abcdef",
    }
    settings = Settings.from_env(environment)
    assert settings.traces_endpoint == "http://jaeger:4318/v1/traces"


def test_dockerfile_runs_the_worker_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER worker" in text
    assert 'ENTRYPOINT ["queue-worker"]' in text and "8084" in text


def test_k8s_reads_the_tokens_from_a_mounted_secret(tmp_path: Path) -> None:
    """The Deployment reads API_TOKEN_FILE and ADMIN_TOKEN_FILE from the Secret of
    secret.yaml, mounted read-only and readable by the pod's user; the placeholders there
    are refused, so a worker never starts with them; the probes need no token."""
    k8s = ROOT / "deploy" / "k8s"
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    secret = yaml.safe_load((k8s / "secret.yaml").read_text())
    configmap = yaml.safe_load((k8s / "configmap.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-tokens"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "api-tokens"]
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert volume["secret"]["defaultMode"] & 0o040  # group-readable
    assert secret["kind"] == "Secret" and set(secret["stringData"]) == {"api-token", "admin-token"}
    for variable, key in (("API_TOKEN_FILE", "api-token"), ("ADMIN_TOKEN_FILE", "admin-token")):
        assert env[variable] == f"{mount['mountPath']}/{key}"
        placeholder = tmp_path / key
        placeholder.write_text(secret["stringData"][key])
        with pytest.raises(ConfigError) as info:
            Settings.from_env({variable: str(placeholder)})
        assert info.value.variable == variable
        placeholder.write_text("ops:" + "k" * 32 + "\n")
        assert Settings.from_env({variable: str(placeholder)})
    # Nothing opens the API: no AUTH_DISABLED, no token in the ConfigMap.
    assert not {"AUTH_DISABLED", "API_TOKEN", "ADMIN_TOKEN"} & (set(env) | set(configmap["data"]))
    # The probes are on routes that need no token.
    app = create_app(Settings())
    open_paths = {
        route.resource.canonical
        for route in app.router.routes()
        if route.resource is not None and app[ACCESS].get(route.handler, "open") == "open"
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in open_paths


def test_the_keda_example_scales_a_statefulset_on_metrics_the_worker_exports() -> None:
    scaled = yaml.safe_load((ROOT / "deploy" / "k8s" / "keda-scaledobject.yaml").read_text())
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert scaled["spec"]["minReplicaCount"] >= 1
    exported = (ROOT / "queue_worker" / "http" / "metrics.py").read_text()
    for trigger in scaled["spec"]["triggers"]:
        for metric in re.findall(r"queue_worker_(\w+)", trigger["metadata"]["query"]):
            assert f'f"{{NS}}_{metric}"' in exported or f'"{metric}"' in exported, metric
