"""The Kubernetes manifests render, validate, and agree with the code: services, ports, probes,
settings, scaling, the GPU pool and the network policies.

Both overlays (deploy/k8s/overlays/dev and prod) are rendered with ``kubectl kustomize`` and every
object is checked as the cluster would get it. Without kubectl the tests skip, under ``CI=true``
they fail (``tests.conftest.missing``).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clipchat.broker.topology import COMPOSE_QUEUE, REGENERATE_QUEUE
from clipchat.health import LIVENESS_SERVICE
from clipchat.settings import Settings
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32"
GRPC_PORTS = {"status": 50051, "regenerator": 50052, "composer": 50053}
SERVICES = (*GRPC_PORTS, "gateway")
WORKER_QUEUES = {"regenerator": REGENERATE_QUEUE, "composer": COMPOSE_QUEUE}
PREFIX = "CLIPCHAT_"
# Set in the manifests for the container runtime, not read by ClipChat.
RUNTIME_ENV = {"NVIDIA_DRIVER_CAPABILITIES"}
# GPUs without NVENC: a composer there holds a GPU and encodes on the CPU.
NO_NVENC = ("A100", "H100", "H200", "B200")
GPU = "nvidia.com/gpu"
PLACEHOLDER = "CHANGE_ME"
# Custom resources, each checked against a schema of our own (deploy/k8s/schemas).
CRD_SCHEMAS = {"ScaledObject": "keda.json", "TriggerAuthentication": "keda.json",
               "PodMonitor": "monitoring.json", "PrometheusRule": "monitoring.json"}
METRICS_PORT = 9464
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}

Doc = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------------


@functools.cache
def _render(overlay: str) -> tuple[list[Doc], str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return [], "kubectl (with kustomize)"
    result = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None], ""


def rendered(overlay: str) -> list[Doc]:
    docs, why_not = _render(overlay)
    if why_not:
        missing(why_not)
    return docs


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Rendered:
    """One overlay's objects, with the lookups the tests need."""

    def __init__(self, docs: list[Doc]) -> None:
        self.docs = docs

    def of_kind(self, kind: str) -> dict[str, Doc]:
        return {doc["metadata"]["name"]: doc for doc in self.docs if doc["kind"] == kind}

    def pod(self, deployment: str) -> Doc:
        return dict(self.of_kind("Deployment")[deployment]["spec"]["template"]["spec"])

    def container(self, deployment: str) -> Doc:
        [container] = self.pod(deployment)["containers"]
        return dict(container)

    def pod_specs(self) -> Iterator[tuple[str, Doc]]:
        for doc in self.docs:
            if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]

    def containers(self) -> Iterator[tuple[str, Doc, Doc]]:
        for owner, spec in self.pod_specs():
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                yield f"{owner}/{container['name']}", spec, container

    def config(self) -> dict[str, str]:
        return dict(self.of_kind("ConfigMap")["clipchat-config"]["data"])


@pytest.fixture
def k8s(overlay: str) -> Rendered:
    return Rendered(rendered(overlay))


@pytest.fixture
def prod() -> Rendered:
    return Rendered(rendered("prod"))


@pytest.fixture
def dev() -> Rendered:
    return Rendered(rendered("dev"))


def env_value(container: Doc, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def source_docs() -> Iterator[tuple[Path, Doc]]:
    """Every object in every YAML file under deploy/k8s, applied or not (kustomizations aside)."""
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                if doc is not None:
                    yield path, doc


# --- every object is valid ------------------------------------------------------------------------


def test_every_object_validates_against_its_schema(k8s: Rendered) -> None:
    import kubernetes_validate

    assert k8s.docs
    for doc in k8s.docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_SCHEMAS:
            schema = {**json.loads((K8S / "schemas" / CRD_SCHEMAS[doc["kind"]]).read_text()),
                      "$ref": f"#/$defs/{doc['kind']}"}
            errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from None


def test_every_object_lands_in_the_clipchat_namespace(k8s: Rendered) -> None:
    for doc in k8s.docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "clipchat"
            assert doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        else:
            assert doc["metadata"].get("namespace") == "clipchat", doc["metadata"]["name"]


# --- services, ports and probes -------------------------------------------------------------------


def test_each_service_has_a_deployment_that_serves_it(k8s: Rendered) -> None:
    deployments = k8s.of_kind("Deployment")
    assert set(deployments) == set(SERVICES)
    for service in SERVICES:
        assert k8s.container(service).get("args") == ["serve", service]
        spec = deployments[service]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_grpc_services_serve_the_port_their_service_and_probes_use(k8s: Rendered) -> None:
    services = k8s.of_kind("Service")
    config = k8s.config()
    for name, port in GRPC_PORTS.items():
        [service_port] = services[name]["spec"]["ports"]
        container = k8s.container(name)
        [container_port] = [p for p in container["ports"] if p["name"] == "grpc"]
        assert service_port["port"] == container_port["containerPort"] == port, name
        assert service_port["targetPort"] in (port, container_port["name"]), name
        # The server binds the port its Service sends to, and callers dial that Service.
        assert env_value(container, "CLIPCHAT_GRPC_PORT") == str(port), name
        assert config[f"CLIPCHAT_{name.upper()}_ADDR"] == f"{name}:{port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name} {probe}"
    assert config["CLIPCHAT_GRPC_HOST"] == "0.0.0.0"


def test_only_readiness_follows_dependencies(k8s: Rendered) -> None:
    # gRPC health "" goes NOT_SERVING while a dependency is down: a restart would not help.
    for name in GRPC_PORTS:
        container = k8s.container(name)
        assert "service" not in container["readinessProbe"]["grpc"], name
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"].get("service") == LIVENESS_SERVICE, f"{name} {probe}"


def test_services_select_their_deployment_pods(k8s: Rendered) -> None:
    deployments = k8s.of_kind("Deployment")
    for name, service in k8s.of_kind("Service").items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name


def test_every_deployment_has_probes_and_a_prestop(k8s: Rendered) -> None:
    for name in SERVICES:
        container = k8s.container(name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, f"{name} has no {probe}"
        assert "preStop" in container.get("lifecycle", {}), name


def _http_probes() -> dict[str, str]:
    """Every HTTP probe of both overlays, "overlay deployment probe" → path, on the gateway's port."""
    probes: dict[str, str] = {}
    for overlay in OVERLAYS:
        k8s = Rendered(rendered(overlay))
        for owner, _, container in k8s.containers():
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = container.get(probe, {}).get("httpGet")
                if http is None:
                    continue
                assert owner.endswith("/gateway"), f"{owner}: only the gateway serves HTTP"
                port = ports.get(http["port"], http["port"])
                assert port == int(k8s.config()["CLIPCHAT_GATEWAY_PORT"]), f"{overlay} {owner} {probe}"
                probes[f"{overlay} {owner} {probe}"] = http["path"]
    return probes


async def test_every_http_probe_path_answers_200_on_the_gateway(tmp_path: Path) -> None:
    """The gateway itself, with its services up (fakes behind real gRPC servers), answers each
    probe path with 200: a path the app does not serve would restart or never ready the pod."""
    probes = _http_probes()
    assert {p.split()[-1] for p in probes} == {"startupProbe", "readinessProbe", "livenessProbe"}

    from clipchat.rpc import create_server
    from clipchat.storage.local import LocalStorage
    from clipchat.v1 import composer_pb2_grpc, jobs_pb2_grpc, regenerator_pb2_grpc
    from gateway.app import create_app
    from tests.unit.gateway.gateway_rig import FakeComposer, FakeRegenerator, FakeStatus, running

    status = FakeStatus()  # type: ignore[abstract]  # implements only what the gateway calls
    servers = [
        await create_server([(jobs_pb2_grpc.add_JobStatusServiceServicer_to_server, status,
                              "clipchat.v1.JobStatusService")]),
        await create_server([(regenerator_pb2_grpc.add_RegeneratorServiceServicer_to_server,
                              FakeRegenerator(status), "clipchat.v1.RegeneratorService")]),
        await create_server([(composer_pb2_grpc.add_ComposerServiceServicer_to_server, FakeComposer(),  # type: ignore[abstract]
                              "clipchat.v1.ComposerService")]),
    ]
    try:
        status_addr, regenerator_addr, composer_addr = (f"127.0.0.1:{s.port}" for s in servers)
        settings = Settings(data_dir=tmp_path, status_addr=status_addr, regenerator_addr=regenerator_addr,
                            composer_addr=composer_addr, grpc_deadline_seconds=5.0)
        app = create_app(settings, storage=LocalStorage(tmp_path / "storage"))
        async with running(app) as client:
            for where, path in probes.items():
                # The kubelet sends no credentials.
                response = await client.get(path, headers={"Authorization": ""})
                assert response.status_code == 200, f"{where}: GET {path} -> {response.status_code}"
    finally:
        for server in servers:
            await server.stop(0)


def test_gateway_is_reachable_through_the_ingress_with_sse_settings(k8s: Rendered) -> None:
    config = k8s.config()
    [port] = k8s.of_kind("Service")["gateway"]["spec"]["ports"]
    assert port["port"] == int(config["CLIPCHAT_GATEWAY_PORT"])
    assert config["CLIPCHAT_GATEWAY_HOST"] == "0.0.0.0"
    [ingress] = k8s.of_kind("Ingress").values()
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


# --- resources, security, shutdown ---------------------------------------------------------------


def test_every_container_has_requests_and_limits(k8s: Rendered) -> None:
    for where, _, container in k8s.containers():
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
        assert {"cpu", "memory"} <= resources.get("limits", {}).keys(), where


def test_no_image_is_latest_or_untagged(k8s: Rendered) -> None:
    for where, _, container in k8s.containers():
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag), f"{where}: {image} has no tag"
        assert tag != "latest", f"{where}: {image}"
        assert name == "registry.example.com/clipchat/clipchat", f"{where}: {image} (kustomize images:)"


def test_workers_finish_their_work_within_the_pods_grace(k8s: Rendered) -> None:
    """The services' own shutdown grace is set, and below the pod's, so SIGTERM drains before SIGKILL."""
    for name in GRPC_PORTS:
        spec = k8s.pod(name)
        env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env", [])}
        grace = float(env[f"{PREFIX}SHUTDOWN_GRACE_SECONDS"])
        assert 0 < grace < spec["terminationGracePeriodSeconds"] - 5, name


def test_every_container_runs_as_non_root_on_a_read_only_root(k8s: Rendered) -> None:
    data_dir = k8s.config()["CLIPCHAT_DATA_DIR"]
    for where, pod, container in k8s.containers():
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, where
        assert security.get("runAsUser", 1) != 0, where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert pod.get("automountServiceAccountToken") is False, where
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for path in ("/tmp", data_dir):
            assert mounts.get(path) in empty_dirs, f"{where}: no emptyDir on {path}"


# --- the GPU pool ---------------------------------------------------------------------------------


def _gpus(container: Doc) -> tuple[Any, Any]:
    resources = container.get("resources", {})
    return resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)


def test_only_the_prod_composer_asks_for_a_gpu(k8s: Rendered, overlay: str) -> None:
    for where, _, container in k8s.containers():
        if overlay == "prod" and where == "Deployment/composer/composer":
            assert _gpus(container) == (1, 1), where
        else:
            assert _gpus(container) == (None, None), f"{where} asks for a GPU in {overlay}"
    if overlay == "dev":
        pod = k8s.pod("composer")
        assert not {"affinity", "nodeSelector", "tolerations", "runtimeClassName"} & pod.keys()
        assert k8s.config()["CLIPCHAT_ENCODER"] == "libx264"


def test_prod_composer_runs_only_on_nvenc_capable_gpus(prod: Rendered) -> None:
    pod = prod.pod("composer")
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    [product] = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.product"]
    assert product["operator"] == "In"
    assert {"NVIDIA-L4", "Tesla-T4", "NVIDIA-A10", "NVIDIA-L40S"} <= set(product["values"])
    assert not [v for v in product["values"] if any(card in v for card in NO_NVENC)]
    assert any(t["key"] == GPU and t.get("effect") == "NoSchedule" and t.get("operator") == "Exists"
               for t in pod["tolerations"])
    capabilities = env_value(prod.container("composer"), "NVIDIA_DRIVER_CAPABILITIES") or ""
    assert {"compute", "utility", "video"} <= set(capabilities.split(","))
    assert prod.config()["CLIPCHAT_ENCODER"] == "auto"
    # A surge pod would wait for a spare GPU: replace one at a time.
    assert prod.of_kind("Deployment")["composer"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    # Long enough to finish the composition in hand on shutdown.
    assert pod["terminationGracePeriodSeconds"] >= 300


# --- migrations -----------------------------------------------------------------------------------


def test_migrations_run_before_the_status_server_starts(k8s: Rendered) -> None:
    """Re-appliable (no Job whose pod template cannot change), and before the status service serves."""
    assert not k8s.of_kind("Job")
    [migrate] = k8s.pod("status")["initContainers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == k8s.container("status")["image"]
    for name in ("gateway", "regenerator", "composer"):
        assert "initContainers" not in k8s.pod(name), name


# --- scaling --------------------------------------------------------------------------------------


def test_every_deployment_has_a_disruption_budget(k8s: Rendered) -> None:
    deployments = k8s.of_kind("Deployment")
    budgets = k8s.of_kind("PodDisruptionBudget")
    assert set(budgets) == set(SERVICES)
    for name, pdb in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        # A single replica must not block a node drain.
        assert "maxUnavailable" in pdb["spec"], name


def test_dev_runs_one_replica_of_each_without_autoscalers(dev: Rendered) -> None:
    for name, deployment in dev.of_kind("Deployment").items():
        assert deployment["spec"]["replicas"] == 1, name
    assert not dev.of_kind("HorizontalPodAutoscaler")
    assert not dev.of_kind("ScaledObject")


def test_prod_scales_requests_on_cpu_and_workers_on_their_backlog(prod: Rendered) -> None:
    hpas = prod.of_kind("HorizontalPodAutoscaler")
    scaled = prod.of_kind("ScaledObject")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {"gateway", "status"}
    for name, hpa in hpas.items():
        [metric] = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu", name
        assert hpa["spec"]["minReplicas"] >= 2, name
    # KEDA owns one HPA a ScaledObject: no Deployment may have both, nor replicas of its own.
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == set(WORKER_QUEUES)
    for name, deployment in prod.of_kind("Deployment").items():
        assert "replicas" not in deployment["spec"], f"{name}: re-applying would reset the autoscaler"


def test_keda_counts_messages_in_progress_on_the_work_queues(prod: Rendered) -> None:
    namespace = prod.config().get("CLIPCHAT_BROKER_NAMESPACE", "")
    auths = prod.of_kind("TriggerAuthentication")
    for name, scaled in prod.of_kind("ScaledObject").items():
        [trigger] = scaled["spec"]["triggers"]
        metadata = trigger["metadata"]
        assert trigger["type"] == "rabbitmq", name
        assert metadata["queueName"] == namespace + WORKER_QUEUES[name], name
        # Ready + unacked is the management API's count (http); amqp counts only the ready ones.
        assert metadata["protocol"] == "http", name
        assert metadata["mode"] == "QueueLength" and metadata.get("excludeUnacknowledged") != "true", name
        concurrency = env_value(prod.container(name), "CLIPCHAT_WORKER_CONCURRENCY")
        assert float(metadata["value"]) == float(concurrency or 1), f"{name}: a replica's share"
        assert trigger["authenticationRef"]["name"] in auths, name
        # Scale in slowly: a stopping pod first finishes what it holds.
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300, name
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in behavior["scaleDown"]["policies"]), name
    assert prod.of_kind("ScaledObject")["composer"]["spec"]["minReplicaCount"] == 0
    # The regenerator also serves gRPC the gateway needs: never zero.
    assert prod.of_kind("ScaledObject")["regenerator"]["spec"]["minReplicaCount"] >= 1


# --- network policies -----------------------------------------------------------------------------


def _policies_for(k8s: Rendered, component: str, direction: str) -> list[Doc]:
    """The rules of every policy of ``direction`` (ingress/egress) that selects ``component``'s pods."""
    labels = k8s.of_kind("Deployment")[component]["spec"]["template"]["metadata"]["labels"]
    rules = []
    for policy in k8s.of_kind("NetworkPolicy").values():
        spec = policy["spec"]
        if direction.capitalize() in spec["policyTypes"] and _selects(spec["podSelector"], labels):
            rules.extend(spec.get(direction, []))
    return rules


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _ports(rule: Doc) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def test_everything_is_denied_unless_allowed(k8s: Rendered) -> None:
    policies = k8s.of_kind("NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies.values())


def test_only_the_gateway_is_reachable_from_the_ingress_controller(k8s: Rendered) -> None:
    gateway_port = int(k8s.config()["CLIPCHAT_GATEWAY_PORT"])
    rules = _policies_for(k8s, "gateway", "ingress")
    # The ingress controller, and Prometheus for /metrics: the same port.
    assert sorted(json.dumps(rule["from"]) for rule in rules) == sorted(json.dumps(peers) for peers in (
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}], [MONITORING]))
    assert all(_ports(rule) == {gateway_port} for rule in rules)
    for name, port in GRPC_PORTS.items():
        for rule in _policies_for(k8s, name, "ingress"):
            if rule["from"] == [MONITORING]:
                assert _ports(rule) == {METRICS_PORT}, name
                continue
            assert _ports(rule) == {port}, name
            for peer in rule["from"]:
                # Pods of this namespace only (no namespaceSelector, no ipBlock), ClipChat's own.
                assert peer.keys() == {"podSelector"}, name
                assert _selects(peer["podSelector"], {"app.kubernetes.io/name": "clipchat",
                                                      "app.kubernetes.io/component": "gateway"}), name


def test_egress_goes_only_where_each_service_needs(k8s: Rendered) -> None:
    needs = {"gateway": {443}, "status": {5432, 5672}, "regenerator": {5672, 443},
             "composer": {5672, 443}}
    common = {53, 4317, *GRPC_PORTS.values()}
    for name, ports in needs.items():
        allowed = set().union(*(_ports(rule) for rule in _policies_for(k8s, name, "egress")))
        assert allowed == ports | common, name


# --- settings and secrets -------------------------------------------------------------------------


def test_every_env_var_is_a_clipchat_setting(k8s: Rendered) -> None:
    fields = Settings.model_fields
    seen = [(where, env["name"]) for where, _, container in k8s.containers()
            for env in container.get("env", [])]
    seen += [("ConfigMap/clipchat-config", key) for key in k8s.config()]
    seen += [(str(path.relative_to(K8S)), key) for path, doc in source_docs()
             if doc["kind"] == "Secret" and doc["metadata"]["name"] == "clipchat-secrets"
             for key in doc["stringData"]]
    assert seen
    for where, name in seen:
        if name in RUNTIME_ENV:
            continue
        assert name.startswith(PREFIX), f"{where}: {name} lacks the {PREFIX} prefix"
        assert name.removeprefix(PREFIX).lower() in fields, f"{where}: {name} is not a Settings field"


def test_env_from_refers_to_the_config_and_the_secret(k8s: Rendered) -> None:
    for where, _, container in k8s.containers():
        refs = container.get("envFrom", [])
        assert {"clipchat-config"} == {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}, where
        assert {"clipchat-secrets"} == {r["secretRef"]["name"] for r in refs if "secretRef" in r}, where


def _example_secret(name: str) -> dict[str, str]:
    [secret] = [doc for _, doc in source_docs() if doc["kind"] == "Secret" and doc["metadata"]["name"] == name]
    return dict(secret["stringData"])


def test_config_and_secret_make_valid_production_settings(k8s: Rendered, overlay: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The example's placeholders stand for real values: production refuses the placeholders.
    secret = {key: value.replace(PLACEHOLDER, "x" * 40) for key, value in
              _example_secret("clipchat-secrets").items()}
    for key, value in {**k8s.config(), **secret}.items():
        assert isinstance(value, str), f"{key}: ConfigMap and Secret values must be strings"
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.environment == "production"
    assert settings.budget_limit == {"dev": 50, "prod": 2000}[overlay]
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.broker_url.startswith("amqp://")
    assert settings.storage_url.startswith("s3://")


def test_no_secret_value_is_committed(k8s: Rendered) -> None:
    # Secrets are created out of band: no overlay applies one.
    assert not k8s.of_kind("Secret")
    for path, doc in source_docs():
        if doc["kind"] == "Secret":
            for key, value in {**doc.get("stringData", {}), **doc.get("data", {})}.items():
                assert PLACEHOLDER in value, f"{path.name}: {key} looks like a real value"
    # Nor credentials in a URL of the config.
    for key, value in k8s.config().items():
        assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{key} carries credentials"
    credential_keys = {"CLIPCHAT_DATABASE_URL", "CLIPCHAT_BROKER_URL", "CLIPCHAT_S3_SECRET_ACCESS_KEY",
                       "CLIPCHAT_MEDIA_SIGNING_KEY", "CLIPCHAT_AUTH_TOKENS", "CLIPCHAT_LLM_API_KEY",
                       "CLIPCHAT_GENERATOR_API_TOKEN"}
    assert not credential_keys & k8s.config().keys()
    for where, _, container in k8s.containers():
        assert not {e["name"] for e in container.get("env", [])} & credential_keys, where


# --- the files ------------------------------------------------------------------------------------


def test_every_file_is_applied_or_says_why_not() -> None:
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        folder = kustomization.parent
        text = kustomization.read_text()
        listed = yaml.safe_load(text).get("resources", [])
        patches = [p["path"] for p in yaml.safe_load(text).get("patches", []) if "path" in p]
        assert len(listed) == len(set(listed)), folder
        for name in [*listed, *patches]:
            assert (folder / name).exists(), f"{kustomization} lists missing {name}"
        for path in folder.glob("*.yaml"):
            if path.name not in (*listed, *patches, "kustomization.yaml"):
                assert path.name.endswith(".example.yaml"), f"{path} is neither applied nor an example"
                assert path.name in text, f"{kustomization} should say why {path.name} is not applied"
    readme = (K8S / "README.md").read_text()
    for path in K8S.rglob("*"):
        if path.is_file() and path.name not in ("README.md", "kustomization.yaml"):
            assert f"`{path.relative_to(K8S)}`" in readme, f"README.md does not describe {path.relative_to(K8S)}"


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


# --- metrics and alerts ---------------------------------------------------------------------------

# What may appear in an alert expression besides ClipChat's metrics (PromQL's own words).
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "absent", "absent_over_time",
    "sum_over_time", "avg_over_time", "max_over_time", "min_over_time", "count_over_time", "changes", "resets",
    "clamp_min", "clamp_max", "abs", "vector", "scalar", "time", "label_replace",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _alert_rules(k8s: Rendered) -> list[Doc]:
    return [rule for doc in k8s.of_kind("PrometheusRule").values() for group in doc["spec"]["groups"]
            for rule in group["rules"]]


def _metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: its identifiers less PromQL's words, label matchers,
    grouping labels, durations and strings."""
    expr = re.sub(r'"[^"]*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)  # labels
    expr = re.sub(r"\b\d+(\.\d+)?(ms|[smhdwy])?\b", "", expr)  # numbers and durations (offset 5m)
    return {word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if word not in PROMQL_WORDS}


def test_alert_rules_read_only_metrics_the_code_defines(prod: Rendered) -> None:
    from clipchat import metrics

    defined = set(metrics.METRIC_NAMES)
    defined |= {name + suffix for name in metrics.METRIC_NAMES for suffix in HISTOGRAM_SERIES}
    rules = _alert_rules(prod)
    alerts = {rule["alert"] for rule in rules}
    assert {"ClipChatRegenerationFailureRatioHigh", "ClipChatMessagesDeadLettered", "ClipChatLeaseExpiries",
            "ClipChatQueueWaitHigh", "ClipChatComposerFellBackToLibx264", "ClipChatNoComposerReady"} <= alerts
    read: set[str] = set()
    for rule in rules:
        names = _metric_names(rule["expr"])
        assert names, f"{rule['alert']} reads no metric"
        assert names <= defined, f"{rule['alert']} reads {sorted(names - defined)}, not defined in clipchat/metrics.py"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        read |= names
    # Queue names in the rules are the topology's (the metrics carry them without the broker namespace).
    for rule in rules:
        for queue in re.findall(r'queue="([^"]+)"', rule["expr"]):
            assert queue in WORKER_QUEUES.values(), f"{rule['alert']}: unknown queue {queue}"


def test_the_metric_name_parser_sees_through_promql() -> None:
    expr = ('sum by (le, queue) (rate(clipchat_queue_wait_seconds_bucket{queue="x"}[10m])) > 120 '
            'unless on() (max(clipchat_encoder_in_use) == 1) and other_metric offset 5m')
    assert _metric_names(expr) == {"clipchat_queue_wait_seconds_bucket", "clipchat_encoder_in_use", "other_metric"}


def test_every_pod_is_scraped_on_a_port_it_serves(prod: Rendered) -> None:
    config = prod.config()
    assert int(config["CLIPCHAT_METRICS_PORT"]) == METRICS_PORT
    monitors = prod.of_kind("PodMonitor")
    scraped: set[str] = set()
    for name in SERVICES:
        labels = prod.of_kind("Deployment")[name]["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for p in prod.container(name)["ports"]}
        for monitor in monitors.values():
            if _selects(monitor["spec"]["selector"], labels):
                for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                    assert endpoint["port"] in ports, f"{name}: no port {endpoint['port']}"
                    assert endpoint["path"] == "/metrics"
                    scraped.add(name)
        annotations = prod.of_kind("Deployment")[name]["spec"]["template"]["metadata"]["annotations"]
        expected = ports["http"] if name == "gateway" else ports["metrics"]
        assert annotations["prometheus.io/port"] == str(expected), name
        assert annotations["prometheus.io/path"] == "/metrics", name
        if name != "gateway":
            assert ports["metrics"] == METRICS_PORT, name
    assert scraped == set(SERVICES)


def test_dev_needs_no_prometheus_operator(dev: Rendered) -> None:
    assert not dev.of_kind("PodMonitor") and not dev.of_kind("PrometheusRule")
    assert int(dev.config()["CLIPCHAT_METRICS_PORT"]) == METRICS_PORT  # annotations still work


async def test_the_ingress_routes_the_public_paths_and_not_metrics(k8s: Rendered, tmp_path: Path) -> None:
    """Every path of the gateway's API document, its page, static files and docs reach it through the
    Ingress; /metrics (in-cluster only) does not."""
    from clipchat.storage.local import LocalStorage
    from gateway.app import create_app
    from tests.unit.gateway.gateway_rig import running

    [ingress] = k8s.of_kind("Ingress").values()
    paths = [(p["path"], p["pathType"]) for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]

    def routed(path: str) -> bool:
        return any(path == prefix if kind == "Exact" else path.startswith(prefix) for prefix, kind in paths)

    app = create_app(Settings(data_dir=tmp_path), storage=LocalStorage(tmp_path / "storage"))
    public = [*app.openapi()["paths"], "/", "/static/app.js", app.openapi_url, app.docs_url, app.redoc_url]
    assert "/api/v1/jobs" in public
    for path in public:
        assert path and routed(re.sub(r"\{[^}]+\}", "x", path)), f"the Ingress does not route {path}"
    async with running(app) as client:
        assert (await client.get("/metrics", headers={"Authorization": ""})).status_code == 200
    assert not routed("/metrics"), "the Ingress would expose /metrics"
