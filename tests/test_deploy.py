"""deploy/: the container image, the Kubernetes manifests and the compose file, checked here.

- The manifests, rendered by kubectl's kustomize, against Kubernetes 1.37's schemas (strict:
  an unknown field fails), and what they promise: secrets only from Secrets, a grace period that
  covers the drain and the grace, restricted security contexts, only the service reaching the
  agent server (and the monitoring namespace its metrics), each part's metrics port wired
  through, how gRPC is balanced, an autoscaler and a disruption budget for each part.
- checkov over the Dockerfile and the manifests: no failed check, every skip justified.
- The compose file against the compose spec, with the manifests' settings.
- The images, built with podman on a Debian base made here (slow): health reaches SERVING, a
  Chat from outside the container streams an answer, the process is not root, SIGTERM with a
  stream open ends with exit 0 inside the grace period, the agent image serves the service over
  the network on PostgreSQL and Redis, and docs/deploy.md records the images' sizes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import free_port, wait_serving
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from tests.support.podman import AGENT_IMAGE, SERVICE_IMAGE, Podman, require_podman
from tests.support.stores import POSTGRES_DSN, require_postgres

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
KUBECTL = Path(sys.executable).parent / "kubectl"
CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
SECRET_NAME = "healthagent"
# whichever image test runs first builds the images (a cold base and both images took 3-4 min)
IMAGE_TEST_TIMEOUT = 1800
# settings whose values are secrets: never in a ConfigMap, always from the Secret
SECRET_SETTINGS = re.compile(r"SECRET|API_KEY|PASSWORD|TOKEN|DATABASE_URL|REDIS_URL|AUTH_HEADER")
SERVICE = {"app.kubernetes.io/name": "healthagent", "app.kubernetes.io/component": "service"}
AGENT = {"app.kubernetes.io/name": "healthagent", "app.kubernetes.io/component": "agent"}


# ---- the manifests


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes`: what `kubectl apply -k` would send."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def of_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def config_of(resources: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    """The ConfigMap settings a Deployment's container takes (envFrom)."""
    settings: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        settings.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    return settings


def secret_keys_of(deployment: dict[str, Any]) -> set[str]:
    """The settings a Deployment's container takes from the Secret."""
    return {
        entry["name"]
        for entry in container(deployment).get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }


def test_manifests_validate_against_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "every manifest is in the kustomization"
    for path in files:  # each file alone, as written
        for document in yaml.safe_load_all((KUBERNETES / path).read_text()):
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    for resource in rendered:  # and what kustomize makes of them
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    kinds = sorted({r["kind"] for r in rendered})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    assert all(
        r["metadata"].get("namespace") == "healthagent"
        for r in rendered
        if r["kind"] != "Namespace"
    )
    # strict validation does catch a misspelt field (the check is not a no-op)
    broken = json.loads(json.dumps(find(rendered, "Deployment", "healthagent")))
    container(broken)["livenesProbe"] = container(broken).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_secrets_come_only_from_the_secret(rendered: list[dict[str, Any]]) -> None:
    assert not of_kind(rendered, "Secret"), "the Secret is made apart (docs/deploy.md)"
    for config_map in of_kind(rendered, "ConfigMap"):
        for key, value in config_map["data"].items():
            assert not SECRET_SETTINGS.search(key), f"{key} is a secret, in a ConfigMap"
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{key} holds a password"
    service = find(rendered, "Deployment", "healthagent")
    agent = find(rendered, "Deployment", "healthagent-agent")
    for deployment in (service, agent):
        for entry in container(deployment).get("env", []):
            if SECRET_SETTINGS.search(entry["name"]):
                reference = entry.get("valueFrom", {}).get("secretKeyRef")
                assert reference is not None and "value" not in entry, entry["name"]
                assert reference["name"] == SECRET_NAME and reference["key"] == entry["name"]
    assert secret_keys_of(service) == {
        "HEALTHAGENT_AUTH_JWT_SECRET",
        "HEALTHAGENT_DATABASE_URL",
        "HEALTHAGENT_REDIS_URL",
        "HEALTHAGENT_CHATKIT_AUTH_HEADER",
        "HEALTHAGENT_AGENT_TOKEN_SECRET",
        "OPENAI_API_KEY",
    }
    assert secret_keys_of(agent) == {
        "OPENAI_API_KEY",
        "HEALTHAGENT_DATABASE_URL",
        "HEALTHAGENT_CHATKIT_AUTH_HEADER",
        "HEALTHAGENT_AGENT_TOKEN_SECRET",
    }
    # the docs' command makes every key the Deployments take
    command = DEPLOY_DOC.read_text().split("kubectl -n healthagent create secret generic")[1]
    command = command.split("```")[0]
    for key in secret_keys_of(service) | secret_keys_of(agent):
        assert f"--from-literal={key}=" in command, key


def test_termination_grace_covers_the_drain_and_the_grace(
    rendered: list[dict[str, Any]],
) -> None:
    service = find(rendered, "Deployment", "healthagent")
    settings = config_of(rendered, service)
    drain = float(settings["HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS"])
    grace = float(settings["HEALTHAGENT_SHUTDOWN_GRACE_SECONDS"])
    pod = service["spec"]["template"]["spec"]
    # the drain, the grace, then closing the stores and connections (at least 10 s more)
    assert pod["terminationGracePeriodSeconds"] >= drain + grace + 10
    probes = container(service)
    health = {"port": 50051, "service": "healthagent.v1.HealthAgent"}
    assert probes["readinessProbe"]["grpc"] == health
    assert probes["startupProbe"]["grpc"] == health
    # health says NOT_SERVING through the whole shutdown: liveness must not restart the pod then
    liveness = probes["livenessProbe"]
    assert liveness["grpc"]["port"] == 50051
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= drain + grace
    # readiness notices the drain well within it
    readiness = probes["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < drain
    agent = find(rendered, "Deployment", "healthagent-agent")
    agent_grace = float(config_of(rendered, agent)["HEALTHAGENT_SHUTDOWN_GRACE_SECONDS"])
    sleep = container(agent)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert agent["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= (
        sleep + agent_grace + 10
    )
    # an agent turn may run as long as the service lets a stream finish
    assert agent_grace >= grace
    for deployment in (service, agent):
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER (\d+):(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert len(users) == 1
    return int(users[0][0]), int(users[0][1])


def test_pods_run_restricted(rendered: list[dict[str, Any]]) -> None:
    namespace = find(rendered, "Namespace", "healthagent")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    uid, gid = dockerfile_user()
    assert uid >= 10000
    for deployment in of_kind(rendered, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        context = container(deployment)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        resources = container(deployment)["resources"]
        for amount in ("requests", "limits"):
            assert set(resources[amount]) == {"cpu", "memory"}
        # the read-only root: what is written goes to emptyDirs
        mounts = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
        assert mounts == {"/tmp", "/var/lib/healthagent"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted: dict[str, str] = selector.get("matchLabels", {})
    assert not selector.get("matchExpressions")
    return all(labels.get(key) == value for key, value in wanted.items())


MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def ingress_rules(policies: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """The ingress rules of every policy that selects pods labelled `labels`."""
    return [
        rule
        for policy in policies
        if selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("ingress", [])
    ]


def test_only_the_service_reaches_the_agent_server(rendered: list[dict[str, Any]]) -> None:
    policies = of_kind(rendered, "NetworkPolicy")
    default = find(rendered, "NetworkPolicy", "default-deny")
    assert default["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    agent_labels = find(rendered, "Deployment", "healthagent-agent")["spec"]["template"][
        "metadata"
    ]["labels"]
    service_labels = find(rendered, "Deployment", "healthagent")["spec"]["template"]["metadata"][
        "labels"
    ]
    rules = ingress_rules(policies, agent_labels)
    # the API from the service's pods; /metrics from the monitoring namespace, and only it
    api = [rule for rule in rules if rule["ports"] == [{"protocol": "TCP", "port": 8790}]]
    metrics = [rule for rule in rules if rule["ports"] == [{"protocol": "TCP", "port": 9465}]]
    assert len(api) == len(metrics) == 1 and len(rules) == 2, rules
    peers = api[0].get("from", [{}])  # a rule without `from` admits everyone
    assert peers, "the agent server takes no traffic at all"
    for peer in peers:
        assert set(peer) == {"podSelector"}, f"{peer}: more than the service's pods"
        assert selects(peer["podSelector"], service_labels)
        assert not selects(peer["podSelector"], agent_labels)
    assert metrics[0].get("from") == [MONITORING]
    service_policy = find(rendered, "NetworkPolicy", "healthagent")
    egress_ports = {
        port["port"] for rule in service_policy["spec"]["egress"] for port in rule["ports"]
    }
    assert {53, 8790, 5432, 6379, 443} <= egress_ports


@pytest.mark.parametrize(
    ("deployment_name", "compose_name", "setting"),
    [
        ("healthagent", "healthagent", "HEALTHAGENT_METRICS_LISTEN"),
        ("healthagent-agent", "agent", "HEALTHAGENT_AGENT_METRICS_LISTEN"),
    ],
)
def test_each_part_is_scraped_where_it_serves_metrics(
    rendered: list[dict[str, Any]], deployment_name: str, compose_name: str, setting: str
) -> None:
    # the setting, the container port, the annotations, the Service and the network policy
    # name the one port, or Prometheus scrapes nothing
    deployment = find(rendered, "Deployment", deployment_name)
    host, _, port = config_of(rendered, deployment)[setting].rpartition(":")
    assert host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports["metrics"] == int(port)
    template = deployment["spec"]["template"]["metadata"]
    assert template["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": port,
        "prometheus.io/path": "/metrics",
    }
    service = find(rendered, "Service", deployment_name)
    assert {"name": "metrics", "port": int(port), "targetPort": "metrics"}.items() <= next(
        p for p in service["spec"]["ports"] if p["name"] == "metrics"
    ).items()
    admitted = [
        rule
        for rule in ingress_rules(of_kind(rendered, "NetworkPolicy"), template["labels"])
        if {"protocol": "TCP", "port": int(port)} in rule["ports"]
    ]
    assert [rule.get("from") for rule in admitted] == [[MONITORING]]
    # compose publishes it on loopback only
    published = [p for p in compose()["services"][compose_name]["ports"] if p.endswith(f":{port}")]
    assert len(published) == 1 and published[0].startswith("127.0.0.1:")


def test_services_say_how_grpc_is_balanced(rendered: list[dict[str, Any]]) -> None:
    service = find(rendered, "Service", "healthagent")
    headless = find(rendered, "Service", "healthagent-headless")
    assert service["spec"]["selector"] == headless["spec"]["selector"] == SERVICE
    assert headless["spec"]["clusterIP"] == "None"
    for grpc_service in (service, headless):
        grpc_port = next(p for p in grpc_service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c" and grpc_port["port"] == 50051
    agent = find(rendered, "Service", "healthagent-agent")
    assert agent["spec"]["selector"] == AGENT
    service_settings = config_of(rendered, find(rendered, "Deployment", "healthagent"))
    assert service_settings["HEALTHAGENT_CHATKIT_URL"] == (
        "http://healthagent-agent.healthagent.svc.cluster.local:8790/chatkit"
    )
    grace = float(service_settings["HEALTHAGENT_SHUTDOWN_GRACE_SECONDS"])
    grpc_ingress = find(rendered, "Ingress", "healthagent-grpc")["metadata"]["annotations"]
    assert grpc_ingress["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    http_ingress = find(rendered, "Ingress", "healthagent-http")["metadata"]["annotations"]
    assert http_ingress["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    for notes in (grpc_ingress, http_ingress):
        assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= grace
    for ingress in of_kind(rendered, "Ingress"):
        assert ingress["spec"]["tls"], "gRPC through an ingress needs TLS at the edge"


def test_each_part_scales_and_keeps_a_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    for name, labels in (("healthagent", SERVICE), ("healthagent-agent", AGENT)):
        autoscaler = find(rendered, "HorizontalPodAutoscaler", name)
        assert autoscaler["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert autoscaler["spec"]["minReplicas"] >= 2
        budget = find(rendered, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"] == labels
        assert budget["spec"]["maxUnavailable"] == 1
        deployment = find(rendered, "Deployment", name)
        assert deployment["spec"]["selector"]["matchLabels"] == labels


# ---- checkov


@pytest.mark.timeout(600)
def test_checkov_fails_nothing_and_every_skip_says_why() -> None:
    if not CHECKOV.exists():
        message = f"{CHECKOV} is missing (bash tests/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(DEPLOY),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {report["check_type"]: report for report in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    for check_type, report in by_type.items():
        summary = report["summary"]
        failed = [
            f"{c['check_id']} {c['file_path']} {c['resource']}"
            for c in report["results"]["failed_checks"]
        ]
        assert summary["failed"] == 0 and not failed, f"{check_type}: {failed}"
        assert summary["parsing_errors"] == 0 and summary["passed"] > 50
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped["check_result"].get("suppress_comment", "")
            assert len(reason) >= 40, f"{skipped['check_id']} skipped without a reason"
        print(f"checkov {check_type}: {summary}")
    assert result.returncode == 0, result.stderr[-2000:]


# ---- the compose file


def compose() -> dict[str, Any]:
    source = (DEPLOY / "compose.yaml").read_text()
    PyCompose.from_yaml(source)  # raises on anything the compose spec does not allow
    loaded: dict[str, Any] = yaml.safe_load(source)
    return loaded


def test_compose_has_the_manifests_settings(rendered: list[dict[str, Any]]) -> None:
    services = compose()["services"]
    assert set(services) == {"healthagent", "agent", "postgres", "redis"}
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    # where the container runs differs (its peers' names, the issuer of local tokens)
    local = {"HEALTHAGENT_CHATKIT_URL", "HEALTHAGENT_AUTH_JWT_ISSUER"}
    example = (DEPLOY / "compose.env.example").read_text()
    for name, deployment_name in (("healthagent", "healthagent"), ("agent", "healthagent-agent")):
        compose_service = services[name]
        assert compose_service["build"]["target"] in targets
        assert compose_service["build"]["dockerfile"] == "deploy/Dockerfile"
        deployment = find(rendered, "Deployment", deployment_name)
        settings = config_of(rendered, deployment)
        environment: dict[str, str] = compose_service["environment"]
        assert set(environment) == set(settings) | secret_keys_of(deployment)
        for key, value in settings.items():
            if key not in local:
                assert environment[key].split(":-")[-1].rstrip("}") == value or (
                    environment[key] == value
                ), key
        for key in secret_keys_of(deployment):  # from .env, never written in the file
            assert "${" in environment[key], key
        for variable in re.findall(r"\$\{(\w+)", " ".join(environment.values())):
            assert re.search(rf"^{variable}=", example, re.M), f"{variable} not in the example"
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert compose_service["stop_grace_period"] == f"{grace}s"
        assert compose_service["read_only"] is True and compose_service["cap_drop"] == ["ALL"]
    assert services["healthagent"]["depends_on"]["agent"]["condition"] == "service_healthy"
    for port in services["healthagent"]["ports"]:
        assert port.startswith("127.0.0.1:"), "published on loopback only"


# ---- the images, built and run with podman


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    require_podman()
    tool = Podman(tmp_path_factory.mktemp("podman"))
    started = time.monotonic()
    tool.ensure_base(tmp_path_factory.mktemp("base"))
    tool.build("service", SERVICE_IMAGE)
    tool.build("agent", AGENT_IMAGE)
    tool.prune_earlier_builds()
    print(f"images ready in {time.monotonic() - started:.0f} s: {tool.timings}")
    yield tool


def token(secret: str, user: str, **claims: Any) -> str:
    return jwt.encode(
        {"sub": user, "exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256"
    )


def chat(address: str, bearer: str, user: str, message: str) -> list[pb.ChatResponse]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.HealthAgentStub(channel)
        return list(
            stub.Chat(
                pb.ChatRequest(user=user, message=message),
                metadata=(("authorization", f"Bearer {bearer}"),),
                timeout=60,
            )
        )


def recorded_sizes() -> dict[str, int]:
    """docs/deploy.md's table of image sizes: {"service": MB, "agent": MB}."""
    rows = re.findall(
        r"^\| `(service|agent)` \|[^|]*\| ([\d,]+) MB \|", DEPLOY_DOC.read_text(), re.M
    )
    return {name: int(size.replace(",", "")) for name, size in rows}


@pytest.mark.slow
@pytest.mark.timeout(IMAGE_TEST_TIMEOUT)
def test_images_are_as_documented(podman: Podman) -> None:
    recorded = recorded_sizes()
    assert set(recorded) == {"service", "agent"}
    for name, image, entrypoint in (
        ("service", SERVICE_IMAGE, "[healthagent serve]"),
        ("agent", AGENT_IMAGE, "[healthagent agent]"),
    ):
        assert podman.inspect(image, "{{.Config.User}}") == "10001:10001"
        assert podman.inspect(image, "{{.Config.Entrypoint}}") == entrypoint
        health_check = podman.inspect(image, "{{.HealthCheck.Test}}")
        assert health_check.startswith("[CMD ") and ("health" in health_check), health_check
        size = podman.image_size(image) / 1e6
        print(f"{name} image: {size:.0f} MB ({podman.timings})")
        # the sizes in docs/deploy.md are measured ones: within 15% of today's
        assert abs(size - recorded[name]) <= 0.15 * recorded[name], (name, size, recorded)
        # the runtime dependencies only: no pip, no compiler, no sources
        probe = podman.run(
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "python3",
            image,
            "-c",
            "import importlib.util as u, shutil, os; print(u.find_spec('pip') is None, "
            "shutil.which('gcc') is None, os.path.exists('/src'))",
            timeout=120,
        )
        assert probe.stdout.split() == ["True", "True", "False"]


@pytest.mark.slow
@pytest.mark.timeout(IMAGE_TEST_TIMEOUT)
def test_service_image_streams_and_drains_on_sigterm(podman: Podman) -> None:
    secret = "image-test-jwt-secret-0123456789abcdef"
    port = free_port()
    address = f"127.0.0.1:{port}"
    drain, grace = 2.0, 20.0
    env = {
        # host networking here, so the host's loopback; in a pod it is 0.0.0.0:50051
        "HEALTHAGENT_LISTEN": address,
        "HEALTHAGENT_AUTH_JWT_SECRET": secret,
        "HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS": "20",
        "HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS": str(drain),
        "HEALTHAGENT_SHUTDOWN_GRACE_SECONDS": str(grace),
    }
    with podman.container(SERVICE_IMAGE, env) as name:
        wait_serving(address, timeout=60.0)
        # the image's own health check (`healthagent health` inside the container)
        podman.run("healthcheck", "run", name, timeout=60)
        assert podman.process_ids(name) == (10001, 10001)
        # even root in it (no capabilities) cannot write the image's files
        denied = podman.run("exec", "--user", "0", name, "touch", "/proof", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        events = chat(address, token(secret, "alice"), "alice", "Hello from outside")
        kinds = [event.WhichOneof("event") for event in events]
        assert kinds.count("chunk") > 1 and kinds[-1] == "response_done"
        assert events[-1].response_done.text.startswith("You said: Hello from outside.")
        # SIGTERM with a stream open (150 chunks x 20 ms): it finishes, and the process exits 0
        result: dict[str, Any] = {}
        first_chunk = threading.Event()

        def long_chat() -> None:
            try:
                with grpc.insecure_channel(address) as channel:
                    stub = pb_grpc.HealthAgentStub(channel)
                    call = stub.Chat(
                        pb.ChatRequest(user="bob", message="[chunks=150]"),
                        metadata=(("authorization", f"Bearer {token(secret, 'bob')}"),),
                        timeout=60,
                    )
                    for event in call:
                        result["last"] = event.WhichOneof("event")
                        if result["last"] == "chunk":
                            result["chunks"] = result.get("chunks", 0) + 1
                            first_chunk.set()
            except grpc.RpcError as error:
                result["error"] = error
            finally:
                first_chunk.set()

        streamer = threading.Thread(target=long_chat)
        streamer.start()
        assert first_chunk.wait(30)
        stopped = time.monotonic()
        podman.run("kill", "--signal", "TERM", name)
        # the drain: health says NOT_SERVING (readiness drops) while the stream goes on
        with grpc.insecure_channel(address) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(
                health_pb2.HealthCheckRequest(service="healthagent.v1.HealthAgent"), timeout=1
            )
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        status = podman.wait_exit(name, timeout=drain + grace + 30)
        took = time.monotonic() - stopped
        streamer.join(30)
        logs = podman.logs(name)
        assert status == 0, logs[-3000:]
        assert took < drain + grace, f"stopped after {took:.1f} s"
        assert "error" not in result and result["last"] == "response_done", result
        assert result["chunks"] == 150
        assert "Traceback" not in logs
        print(f"SIGTERM with a stream open: exit 0 after {took:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(IMAGE_TEST_TIMEOUT)
def test_service_image_refuses_the_network_without_authentication(podman: Podman) -> None:
    # the image listens on 0.0.0.0:50051: without caller authentication it must not start
    result = podman.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        SERVICE_IMAGE,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without caller authentication" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(IMAGE_TEST_TIMEOUT)
def test_agent_image_serves_the_service_on_postgres_and_redis(podman: Podman) -> None:
    """The Kubernetes topology on one host: the service's and the agent server's images apart,
    over the network, sharing PostgreSQL (history, threads) and Redis (limits)."""
    secret = "image-test-jwt-secret-0123456789abcdef"
    credential = "Authorization: Bearer image-test-service-credential"
    token_secret = "image-test-agent-token-secret-0123456789"
    agent_port, service_port = free_port(), free_port()
    service_address = f"127.0.0.1:{service_port}"

    asyncio.run(require_postgres())
    schema = f"test_deploy_{secrets.token_hex(6)}"
    try:
        shared = {
            "HEALTHAGENT_DATABASE_URL": POSTGRES_DSN,
            "HEALTHAGENT_DATABASE_SCHEMA": schema,
            "HEALTHAGENT_CHATKIT_AUTH_HEADER": credential,
            "HEALTHAGENT_AGENT_TOKEN_SECRET": token_secret,
            "HEALTHAGENT_SHUTDOWN_GRACE_SECONDS": "10",
        }
        agent_env = {**shared, "HEALTHAGENT_AGENT_LISTEN": f"127.0.0.1:{agent_port}"}
        service_env = {
            **shared,
            "HEALTHAGENT_LISTEN": service_address,
            "HEALTHAGENT_UPSTREAM": "agent",
            "HEALTHAGENT_CHATKIT_URL": f"http://127.0.0.1:{agent_port}/chatkit",
            "HEALTHAGENT_AUTH_JWT_SECRET": secret,
            "HEALTHAGENT_REDIS_URL": "redis://127.0.0.1:6379/0",
            "HEALTHAGENT_REDIS_PREFIX": f"deploy-test-{schema}",
            "HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS": "1",
        }
        with podman.container(AGENT_IMAGE, agent_env) as agent:
            deadline = time.monotonic() + 90
            while podman.run("healthcheck", "run", agent, check=False).returncode != 0:
                assert time.monotonic() < deadline, podman.logs(agent)[-3000:]
                time.sleep(1)
            assert podman.process_ids(agent) == (10001, 10001)
            with podman.container(SERVICE_IMAGE, service_env) as service:
                wait_serving(service_address, timeout=60.0)
                bearer = token(secret, "carol")
                events = chat(service_address, bearer, "carol", "hello agent")
                kinds = [event.WhichOneof("event") for event in events]
                assert kinds[0] == "session" and kinds[-1] == "response_done", kinds
                assert events[-1].response_done.text.startswith("You said: hello agent.")
                with grpc.insecure_channel(service_address) as channel:
                    minted = pb_grpc.HealthAgentStub(channel).MintSession(
                        pb.MintSessionRequest(user="carol"),
                        metadata=(("authorization", f"Bearer {bearer}"),),
                        timeout=30,
                    )
                assert minted.workflow_id == "agent" and minted.client_secret
                podman.run("kill", "--signal", "TERM", service)
                assert podman.wait_exit(service, timeout=60) == 0, podman.logs(service)[-3000:]
            podman.run("kill", "--signal", "TERM", agent)
            assert podman.wait_exit(agent, timeout=60) == 0, podman.logs(agent)[-3000:]
    finally:
        asyncio.run(drop_schema(schema))


async def drop_schema(schema: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN, timeout=10)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()
