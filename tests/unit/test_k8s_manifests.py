"""The Kubernetes manifests and the Dockerfile agree with the code: services, ports, probes, settings."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipchat.health import LIVENESS_SERVICE
from clipchat.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
GRPC_PORTS = {"status": 50051, "regenerator": 50052, "composer": 50053}
SERVICES = (*GRPC_PORTS, "gateway")
PREFIX = "CLIPCHAT_"
# In the folder but deliberately not applied by kustomization.yaml (which must say so in a comment).
NOT_APPLIED = ("secret.example.yaml", "keda-scaledobjects.yaml")

Doc = dict[str, Any]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir()
                  if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml")


def load_docs() -> list[tuple[str, Doc]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = load_docs()


def of_kind(kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def pod_specs() -> Iterator[tuple[str, Doc]]:
    """Every pod template: Deployments and Jobs."""
    for _, doc in DOCS:
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers() -> Iterator[tuple[str, Doc, Doc]]:
    for owner, spec in pod_specs():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield f"{owner}/{container['name']}", spec, container


def deployment_container(name: str) -> Doc:
    [container] = of_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    return container


def env_value(container: Doc, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def kustomization() -> Doc:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_every_manifest_has_api_version_kind_and_name() -> None:
    assert DOCS, "no manifests in deploy/k8s"
    for file, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), file
        assert doc["metadata"].get("name"), file


def test_each_service_has_a_deployment_that_serves_it() -> None:
    deployments = of_kind("Deployment")
    for service in SERVICES:
        assert service in deployments, f"no Deployment for {service}"
        container = deployment_container(service)
        assert container.get("args") == ["serve", service]
        spec = deployments[service]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_grpc_services_expose_their_port() -> None:
    services = of_kind("Service")
    config = of_kind("ConfigMap")["clipchat-config"]["data"]
    for name, port in GRPC_PORTS.items():
        assert name in services, f"no Service for {name}"
        [service_port] = services[name]["spec"]["ports"]
        assert service_port["port"] == port
        container = deployment_container(name)
        [container_port] = container["ports"]
        assert container_port["containerPort"] == port
        assert service_port["targetPort"] in (port, container_port["name"])
        # The server binds the port its Service sends to, and callers dial that Service.
        assert env_value(container, "CLIPCHAT_GRPC_PORT") == str(port)
        assert config[f"CLIPCHAT_{name.upper()}_ADDR"] == f"{name}:{port}"


def test_services_select_their_deployment_pods() -> None:
    deployments = of_kind("Deployment")
    for name, service in of_kind("Service").items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name


def test_gateway_is_reachable_through_the_ingress_with_sse_settings() -> None:
    config = of_kind("ConfigMap")["clipchat-config"]["data"]
    [port] = of_kind("Service")["gateway"]["spec"]["ports"]
    assert port["port"] == int(config["CLIPCHAT_GATEWAY_PORT"])
    assert config["CLIPCHAT_GATEWAY_HOST"] == "0.0.0.0"
    [ingress] = of_kind("Ingress").values()
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"]
                for path in rule["http"]["paths"]]
    assert backends and all(b["name"] == "gateway" for b in backends)
    assert all(b["port"].get("number") == port["port"] or b["port"].get("name") == port["name"]
               for b in backends)
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.removesuffix("m")) * 1024 * 1024 == int(config["CLIPCHAT_MAX_UPLOAD_BYTES"])


def test_every_container_has_resources() -> None:
    for where, _, container in containers():
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
        assert "memory" in resources.get("limits", {}), where


def test_every_deployment_container_has_probes_and_a_prestop() -> None:
    for name in SERVICES:
        container = deployment_container(name)
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{name} has no {probe}"
            if name in GRPC_PORTS:
                assert container[probe]["grpc"]["port"] == GRPC_PORTS[name], f"{name} {probe}"
        assert "preStop" in container.get("lifecycle", {}), name
    gateway = deployment_container("gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_workers_finish_their_work_within_the_pods_grace() -> None:
    """The services' own shutdown grace is set, and below the pod's, so SIGTERM drains before SIGKILL."""
    for name in GRPC_PORTS:
        spec = of_kind("Deployment")[name]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env", [])}
        grace = float(env[f"{PREFIX}SHUTDOWN_GRACE_SECONDS"])
        assert 0 < grace < spec["terminationGracePeriodSeconds"] - 5, name


def test_only_readiness_follows_dependencies() -> None:
    # gRPC health "" goes NOT_SERVING while a dependency is down: a restart would not help.
    for name in GRPC_PORTS:
        container = deployment_container(name)
        assert "service" not in container["readinessProbe"]["grpc"], name
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"].get("service") == LIVENESS_SERVICE, f"{name} {probe}"


def test_every_container_runs_as_non_root_on_a_read_only_root() -> None:
    for where, pod, container in containers():
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, where
        assert security.get("runAsUser", 1) != 0, where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        data_dir = of_kind("ConfigMap")["clipchat-config"]["data"]["CLIPCHAT_DATA_DIR"]
        for path in ("/tmp", data_dir):
            assert mounts.get(path) in empty_dirs, f"{where}: no emptyDir on {path}"


def test_composer_runs_on_a_gpu_node() -> None:
    pod = of_kind("Deployment")["composer"]["spec"]["template"]["spec"]
    resources = deployment_container("composer")["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") in ("NoSchedule", None)
               and t.get("operator") in ("Exists", "Equal") for t in pod["tolerations"])
    assert pod.get("nodeSelector") or pod.get("affinity")
    # Long enough to finish the composition in hand on shutdown.
    assert pod["terminationGracePeriodSeconds"] >= 300


def test_migrations_run_as_a_job() -> None:
    [job] = of_kind("Job").values()
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]


def _env_names() -> Iterator[tuple[str, str]]:
    """Every environment variable name the manifests set or reference, with where."""
    for where, _, container in containers():
        for env in container.get("env", []):
            yield where, env["name"]
    for kind in ("ConfigMap", "Secret"):
        for name, doc in of_kind(kind).items():
            for key in [*doc.get("data", {}), *doc.get("stringData", {})]:
                yield f"{kind}/{name}", key
    for name, doc in of_kind("TriggerAuthentication").items():
        for ref in doc["spec"].get("secretTargetRef", []):
            yield f"TriggerAuthentication/{name}", ref["key"]


def test_every_env_var_is_a_clipchat_setting() -> None:
    fields = Settings.model_fields
    seen = list(_env_names())
    assert seen
    for where, name in seen:
        assert name.startswith(PREFIX), f"{where}: {name} lacks the {PREFIX} prefix"
        assert name.removeprefix(PREFIX).lower() in fields, f"{where}: {name} is not a Settings field"


def test_env_from_refers_to_the_config_and_the_secret() -> None:
    config_maps = of_kind("ConfigMap")
    secret_names = of_kind("Secret")
    for where, _, container in containers():
        refs = container.get("envFrom", [])
        assert {"clipchat-config"} == {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}, where
        assert {"clipchat-secrets"} == {r["secretRef"]["name"] for r in refs if "secretRef" in r}, where
    assert "clipchat-config" in config_maps
    assert "clipchat-secrets" in secret_names  # its shape, in secret.example.yaml


def test_config_and_example_secret_are_valid_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {**of_kind("ConfigMap")["clipchat-config"]["data"],
              **of_kind("Secret")["clipchat-secrets"]["stringData"]}
    for key, value in values.items():
        assert isinstance(value, str), f"{key}: ConfigMap and Secret values must be strings"
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.environment == "production"
    assert settings.budget_limit == 2000
    assert settings.encoder == "auto"
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.broker_url.startswith("amqp://")
    assert settings.storage_url.startswith("s3://")


def test_example_secret_holds_placeholders_only() -> None:
    for key, value in of_kind("Secret")["clipchat-secrets"]["stringData"].items():
        assert "CHANGE_ME" in value, f"{key} looks like a real value"


def test_kustomization_lists_every_file() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    present = {p.name for p in manifest_files()}
    assert set(listed) == present - set(NOT_APPLIED)
    text = (K8S / "kustomization.yaml").read_text()
    for name in NOT_APPLIED:
        assert (K8S / name).is_file()
        assert name in text, f"kustomization.yaml should say why {name} is not applied"
    readme = (K8S / "README.md").read_text()
    for name in present:
        assert f"`{name}`" in readme, f"README.md does not describe {name}"


def test_autoscalers_and_budgets_target_existing_deployments() -> None:
    deployments = of_kind("Deployment")
    for name, hpa in of_kind("HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments, name
    for name, scaled in of_kind("ScaledObject").items():
        assert scaled["spec"]["scaleTargetRef"]["name"] in {"regenerator", "composer"}, name
    assert set(of_kind("HorizontalPodAutoscaler")) == set(SERVICES)
    for name, pdb in of_kind("PodDisruptionBudget").items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    assert set(of_kind("PodDisruptionBudget")) == set(SERVICES)


def test_keda_scalers_watch_the_work_queues() -> None:
    from clipchat.broker.topology import COMPOSE_QUEUE, REGENERATE_QUEUE

    queues = {name: doc["spec"]["triggers"][0]["metadata"]["queueName"]
              for name, doc in of_kind("ScaledObject").items()}
    assert queues == {"regenerator": REGENERATE_QUEUE, "composer": COMPOSE_QUEUE}


def _dockerfile_instruction(name: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    [value] = re.findall(rf"^{name}\s+(.+)$", text, flags=re.MULTILINE)[-1:]
    return list(json.loads(value))  # exec form


def test_dockerfile_runs_clipchat_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    command = _dockerfile_instruction("ENTRYPOINT") + _dockerfile_instruction("CMD")
    assert command[0] == "clipchat"
    assert "FROM ${PYTHON_IMAGE}" in text and "ARG PYTHON_IMAGE=python:3.11-slim" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "grpc_tools.protoc -I protos --python_out=. --grpc_python_out=." in text
    assert "touch clipchat/v1/__init__.py" in text
