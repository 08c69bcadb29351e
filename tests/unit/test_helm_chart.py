"""The Helm chart, rendered by Helm's own engine (helm-python-sdk wraps Helm's Go SDK) and
checked against the Kubernetes schemas (kubernetes-validate)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.controlplane.registry import RegistryData
from gateway.metrics import GatewayMetrics
from tests.conftest import ROOT

CHART = ROOT / "helm"
THREE = yaml.safe_load((ROOT / "tests" / "helm" / "three-deployments.yaml").read_text())
K8S_VERSION = kubernetes_validate.latest_version()
# Custom resources have no schema in kubernetes-validate; they are checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                ("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
# The part of KEDA's ScaledObject CRD (v2.16, keda.sh/v1alpha1) that the chart uses.
SCALED_OBJECT_SPEC = {
    "type": "object", "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "name": {"type": "string"}}},
        "minReplicaCount": {"type": "integer", "format": "int32"},
        "maxReplicaCount": {"type": "integer", "format": "int32"},
        "cooldownPeriod": {"type": "integer", "format": "int32"},
        "triggers": {"type": "array", "items": {
            "type": "object", "required": ["type", "metadata"],
            "properties": {"type": {"type": "string"},
                           "metadata": {"type": "object",
                                        "additionalProperties": {"type": "string"}}}}}},
    "additionalProperties": False}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(CHART).render(values, name="rel", namespace="prod",
                                              is_install=True)
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None
         ) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("values", [None, THREE], ids=["defaults", "three-deployments"])
def test_every_manifest_validates_against_kubernetes_schemas(values: dict[str, Any] | None
                                                             ) -> None:
    objects = render(values)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            check_custom(obj)
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        labels = obj["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
            assert key in labels, (obj["kind"], key)


@pytest.mark.parametrize("values", [None, THREE], ids=["defaults", "three-deployments"])
def test_chart_lints_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def check_custom(obj: dict[str, Any]) -> None:
    """Custom resources, which kubernetes-validate has no schema for."""
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert spec["endpoints"][0]["port"] == "http"
    elif obj["kind"] == "PodMonitor":
        assert spec["podMetricsEndpoints"][0]["path"] == "/metrics"
    else:
        jsonschema.validate(spec, SCALED_OBJECT_SPEC)


def test_registry_routes_every_deployment_to_a_service_selecting_its_workers() -> None:
    objects = render(THREE)
    registry_text = find(objects, "ConfigMap")[0]["data"]["registry.yaml"]
    registry = RegistryData.model_validate(yaml.safe_load(registry_text))  # the gateway loads it
    assert {d.id for d in registry.deployments} == {d["id"] for d in THREE["deployments"]}
    assert {a.id for a in registry.accounts} == {"fireworks", "acme", "globex"}
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    workers = find(objects, "Deployment")
    for deployment in registry.deployments:
        (replica,) = deployment.replicas  # every pod of a headless Service, found by DNS
        host, port = replica.url.removeprefix("dns+http://").split(":")
        name, namespace, svc, domain = host.split(".", 3)
        assert (namespace, svc, domain) == ("prod", "svc", "cluster.local")
        service = services[name]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"][0]["port"] == int(port)
        selector = service["spec"]["selector"]
        selected = [w for w in workers if selector.items() <=
                    w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, deployment.id
        worker = container(selected[0])
        assert worker["args"][worker["args"].index("--served-model-name") + 1] == deployment.id
        # The selector of the Deployment also matches its own pods.
        assert selected[0]["spec"]["selector"]["matchLabels"].items() <= \
            selected[0]["spec"]["template"]["metadata"]["labels"].items()
    qwen = next(d for d in registry.deployments if d.id == "qwen-7b")
    assert qwen.generation_config == {"temperature": 0.7, "top_p": 0.8}
    # What the workers run is what the gateway knows: reasoning and priority scheduling.
    assert qwen.reasoning_parser == "deepseek_r1" and qwen.priority_scheduling
    args = next(container(w)["args"] for w in workers
                if w["metadata"]["labels"].get("fireworks-gateway/deployment") == "qwen-7b")
    assert args[args.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert args[args.index("--scheduling-policy") + 1] == "priority"
    prod = next(d for d in registry.deployments if d.id == "llama-8b-prod")
    assert prod.reasoning_parser is None and not prod.priority_scheduling
    embed = next(d for d in registry.deployments if d.id == "bge-small")
    assert embed.task == "embed" and prod.task == "generate"
    args = next(container(w)["args"] for w in workers
                if w["metadata"]["labels"].get("fireworks-gateway/deployment") == "bge-small")
    assert args[args.index("--runner") + 1] == "pooling" and "--no-plugins" in args
    # Generating workers publish KV-cache events on a port the gateway is told of.
    assert embed.kv_events_port is None and "--kv-events-port" not in args
    assert qwen.kv_events_port == 5557
    worker = next(container(w) for w in workers
                  if w["metadata"]["labels"].get("fireworks-gateway/deployment") == "qwen-7b")
    assert worker["args"][worker["args"].index("--kv-events-port") + 1] == "5557"
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == \
        {"http": 8000, "kv-events": 5557, "kv-replay": 5558}


def test_gateway_has_redis_url_registry_and_key_secret() -> None:
    objects = render(THREE)
    gateway = find(objects, "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    assert env["GATEWAY_REDIS_URL"] == "redis://redis.shared.svc:6379/2"
    assert not find(objects, "StatefulSet")  # external Redis: none deployed
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    secret = find(objects, "Secret", volumes["keys"]["secret"]["secretName"])[0]
    keys = yaml.safe_load(secret["stringData"]["keys.yaml"])
    assert set(keys) == {"acme", "globex"}
    mounts = {m["name"]: m["mountPath"] for m in container(gateway)["volumeMounts"]}
    assert env["GATEWAY_KEYS_PATH"].startswith(mounts["keys"])
    assert env["GATEWAY_REGISTRY_PATH"].startswith(mounts["registry"])
    spec = gateway["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 600
    assert container(gateway)["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    defaults = render()
    bundled = find(defaults, "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e.get("value") for e in container(bundled)["env"]}
    redis_service = find(defaults, "Service", "rel-fireworks-gateway-redis")[0]
    assert env["GATEWAY_REDIS_URL"] == "redis://rel-fireworks-gateway-redis:6379/0"
    assert env["GATEWAY_WORKERS"] == "2"  # several processes, sharing state through Redis
    assert redis_service["spec"]["ports"][0]["port"] == 6379
    assert find(defaults, "StatefulSet")[0]["spec"]["volumeClaimTemplates"]
    assert find(defaults, "HorizontalPodAutoscaler") and find(defaults, "PodDisruptionBudget")


def test_gpus_and_vllm_args_land_on_the_right_containers() -> None:
    objects = render(THREE)
    by_id = {w["metadata"]["labels"]["fireworks-gateway/deployment"]: w
             for w in find(objects, "Deployment") if "fireworks-gateway/deployment"
             in w["metadata"]["labels"]}
    prod = container(by_id["llama-8b-prod"])
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert prod["args"][prod["args"].index("--tensor-parallel-size") + 1] == "2"
    assert prod["args"][-2:] == ["--gpu-memory-utilization", "0.92"]
    assert "--enable-auto-tool-choice" in prod["args"]
    assert prod["args"][prod["args"].index("--max-loras") + 1] == "4"  # LoRA adapters on
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in prod["env"]
    assert by_id["llama-8b-prod"]["spec"]["replicas"] == 3
    pod = by_id["llama-8b-prod"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    canary = container(by_id["llama-8b-canary"])
    assert canary["args"][canary["args"].index("--model") + 1] == "/models/llama-8b-canary"
    assert canary["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--gpu-memory-utilization" not in canary["args"]
    claims = [v for v in by_id["llama-8b-canary"]["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims[0]["persistentVolumeClaim"]["claimName"] == "model-cache"
    for worker in by_id.values():
        env = {e["name"]: e["value"] for e in container(worker)["env"]}
        assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # plugins loaded: V1 runner
        assert container(worker)["command"][-1] == "engine_plugins.worker"
        assert container(worker)["readinessProbe"]["httpGet"]["path"] == "/health"
        shm = [v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm"]
        assert shm[0]["emptyDir"]["medium"] == "Memory"
    gateway = container(find(objects, "Deployment", "rel-fireworks-gateway-gateway")[0])
    assert "nvidia.com/gpu" not in str(gateway["resources"])


def test_tracing_reaches_the_gateways_and_the_workers_only_when_asked() -> None:
    def parts(values: dict[str, Any] | None) -> tuple[dict[str, str], list[list[str]]]:
        objects = render(values)
        gateway = container(find(objects, "Deployment", "rel-fireworks-gateway-gateway")[0])
        workers = [container(w)["args"] for w in find(objects, "Deployment")
                   if "fireworks-gateway/deployment" in w["metadata"]["labels"]]
        return {e["name"]: e.get("value", "") for e in gateway["env"]}, workers

    env, workers = parts(None)
    assert not [name for name in env if name.startswith("OTEL_")]
    assert all("--otlp-traces-endpoint" not in args for args in workers)
    endpoint = "http://otel-collector.observability:4317"
    env, workers = parts({"tracing": {"otlpEndpoint": endpoint}})
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == endpoint
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"
    assert env["OTEL_SERVICE_NAME"] == "fireworks-gateway"
    assert workers and all(args[args.index("--otlp-traces-endpoint") + 1] == endpoint
                           for args in workers)


@pytest.mark.parametrize("change", [
    lambda v: v["deployments"][0].pop("source"),
    lambda v: v["deployments"][0].update(id="Bad Id!"),
    lambda v: v["deployments"][0].update(model="llama-8b"),
    lambda v: v["deployments"][0].update(gpus=-1),
    lambda v: v["deployments"][0].update(source={"huggingFace": "a", "path": "/b"}),
    lambda v: v["deployments"][0].update(unknown=1),
    lambda v: v["redis"].pop("url"),
    lambda v: v["apiKeys"]["accounts"].update(acme=["plaintext-key"]),
    lambda v: v.update(deployments=[]),
    lambda v: v.update(tracing={"otlpEndpoint": "otel-collector:4317"}),
])
def test_schema_rejects_malformed_values(change: Any) -> None:
    values = yaml.safe_load(yaml.safe_dump(THREE))
    change(values)
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(CHART).render(values, name="rel", namespace="prod")


def test_admin_and_metrics_keys_come_from_their_own_secrets_as_files_and_settings_parse(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gateway.config import Settings

    objects = render(THREE)
    gateway = find(objects, "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e for e in container(gateway)["env"]}
    assert not any("valueFrom" in e for e in env.values())  # no secret in the environment
    mounts = {m["name"]: m["mountPath"] for m in container(gateway)["volumeMounts"]}
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    for name, entry in (("admin-key", "admin-key"), ("metrics-key", "metrics-key")):
        setting = f"GATEWAY_{name.upper().replace('-', '_')}_FILE"
        assert env[setting]["value"] == f"{mounts[name]}/{entry}"
        secret = find(objects, "Secret", volumes[name]["secret"]["secretName"])[0]
        value = secret.get("stringData", {}).get(entry) or base64.b64decode(
            secret["data"][entry]).decode()
        (tmp_path / entry).write_text(value + "\n")  # as the container sees the file
        monkeypatch.setenv(setting, str(tmp_path / entry))
    for name in ("GATEWAY_PUBLIC_ACCOUNTS", "GATEWAY_REDIS_URL"):
        monkeypatch.setenv(name, env[name]["value"])  # as the container gets them
    settings = Settings()
    assert settings.admin_key == "test-admin-key"
    assert settings.metrics_key and settings.metrics_key != settings.admin_key
    assert settings.public_accounts == ["fireworks"]
    assert settings.redis_url == "redis://redis.shared.svc:6379/2"
    defaults = render()  # no admin key configured: no admin Secret, no admin API
    bundled = find(defaults, "Deployment", "rel-fireworks-gateway-gateway")[0]
    assert "GATEWAY_ADMIN_KEY_FILE" not in {e["name"] for e in container(bundled)["env"]}


def test_edge_limits_reach_the_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import Settings

    values = yaml.safe_load(yaml.safe_dump(THREE))
    values["gateway"] = {"edge": {"maxBodyBytes": 1 << 20, "headerTimeoutSeconds": 3}}
    gateway = find(render(values), "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    for name, value in env.items():
        if name.startswith(("GATEWAY_MAX", "GATEWAY_BODY", "GATEWAY_HEADER", "GATEWAY_KEEP")):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.max_body_bytes == 1 << 20 and settings.header_timeout == 3
    defaults = {e["name"]: e.get("value") for e in container(find(
        render(), "Deployment", "rel-fireworks-gateway-gateway")[0])["env"]}
    assert defaults["GATEWAY_MAX_BODY_BYTES"] == str(Settings.model_fields[
        "max_body_bytes"].default)
    assert defaults["GATEWAY_MAX_CONNECTIONS"] == "4096"


def test_the_service_monitor_scrapes_with_the_metrics_key_not_the_admin_key() -> None:
    values = yaml.safe_load(yaml.safe_dump(THREE))
    values["serviceMonitor"] = {"enabled": True, "interval": "30s", "labels": {}}
    values["admin"] = {"key": "", "existingSecret": ""}  # no admin API at all
    objects = render(values)
    monitor = find(objects, "ServiceMonitor")[0]
    credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == {"name": "rel-fireworks-gateway-metrics-key", "key": "metrics-key"}
    assert find(objects, "Secret", credentials["name"])[0]["data"]["metrics-key"]


def test_worker_autoscaling_is_a_keda_scaled_object_on_the_workers_load() -> None:
    objects = render(THREE)
    (scaled,) = find(objects, "ScaledObject")
    jsonschema.validate(scaled["spec"], SCALED_OBJECT_SPEC)
    target = scaled["spec"]["scaleTargetRef"]["name"]
    workers = {w["metadata"]["name"]: w for w in find(objects, "Deployment")}
    assert "replicas" not in workers[target]["spec"]  # KEDA owns the count
    assert workers["rel-fireworks-gateway-llama-8b-prod"]["spec"]["replicas"] == 3
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 6)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "4"
    query = trigger["metadata"]["query"]
    assert 'model_name="qwen-7b"' in query and 'namespace="prod"' in query
    assert "vllm:num_requests_waiting" in query and "vllm:num_requests_running" in query
    assert find(objects, "PodMonitor")  # Prometheus scrapes what KEDA asks for
    assert not find(render(), "ScaledObject")  # off by default


def test_helm_test_sends_a_chat_completion_to_the_default_deployment() -> None:
    objects = render(THREE)
    pods = [p for p in find(objects, "Pod")
            if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    (pod,) = pods
    (test,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in test["env"]}
    assert env["GATEWAY_URL"]["value"] == "http://rel-fireworks-gateway-gateway:8000"
    assert env["MODEL"]["value"] == "accounts/acme/models/llama-8b"  # the first default
    # The key as a file (a secret in the environment leaks into crash dumps and child
    # processes): the Secret's entry, mounted where API_KEY_FILE says.
    (mount,) = test["volumeMounts"]
    assert env["API_KEY_FILE"]["value"] == mount["mountPath"] + "/api-key"
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    secret = find(objects, "Secret", volume["secret"]["secretName"])[0]
    assert secret["stringData"]["api-key"] == "fw-test-plaintext-key"
    compile(test["args"][0], "helm-test", "exec")  # the script is valid Python
    assert "/inference/v1/chat/completions" in test["args"][0]
    (plain,) = find(render(), "Pod")  # no key configured: nothing mounted
    assert "volumes" not in plain["spec"]


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    """The chart's Grafana dashboard: a ConfigMap with the sidecar's label holding valid
    JSON, whose every query names a metric the gateway exports or vLLM's workers do."""
    import vllm

    (config_map,) = [o for o in find(render(), "ConfigMap")
                     if o["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["fireworks-gateway.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"])
    named = {m for e in exprs for m in re.findall(r"\b(fwgw_[a-z_]+|vllm:[a-z_:]+)", e)}
    ours = {family.name for family in GatewayMetrics().registry.collect()}
    vllm_sources = "".join(path.read_text() for path in
                           (Path(vllm.__file__).parent / "v1" / "metrics").glob("*.py"))
    for name in named:
        if name.startswith("vllm:"):
            assert f'"{name}"' in vllm_sources, name
        else:
            assert re.sub(r"_(bucket|sum|count|total)$", "", name) in ours, name
    assert any(n.startswith("vllm:") for n in named) and len(named) >= 12
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Requests by status", "Time to first token", "Replicas",
            "Workers: KV-cache usage", "Usage records waiting for Redis",
            "Redis memory: used, bound, evictions, refusals"} <= titles
    assert not find(render({"grafanaDashboard": {"enabled": False}}), "ConfigMap",
                    "rel-fireworks-gateway-dashboard")


def test_only_the_gateway_reaches_the_workers_and_redis_and_holds_their_key() -> None:
    objects = render(THREE)
    (secret,) = find(objects, "Secret", "rel-fireworks-gateway-worker-key")
    assert len(base64.b64decode(secret["data"]["worker-key"])) == 48
    gateway = find(objects, "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    key_file = env["GATEWAY_WORKER_API_KEY_FILE"]
    mounts = {m["name"]: m["mountPath"] for m in container(gateway)["volumeMounts"]}
    assert key_file == mounts["worker-key"] + "/worker-key"
    workers = [w for w in find(objects, "Deployment") if w is not gateway]
    assert workers
    for worker in workers:
        args = container(worker)["args"]
        assert args[args.index("--api-key-file") + 1] == "/etc/worker-key/worker-key"
        volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
        assert volumes["worker-key"]["secret"]["secretName"] == secret["metadata"]["name"]
    policies = {p["metadata"]["name"]: p["spec"] for p in find(objects, "NetworkPolicy")}
    gateway_pods = {"app.kubernetes.io/component": "gateway"}
    workers_policy = policies["rel-fireworks-gateway-workers"]
    assert workers_policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] \
        == "worker"
    from_gateway, from_monitoring = workers_policy["ingress"]
    assert gateway_pods.items() <= from_gateway["from"][0]["podSelector"]["matchLabels"].items()
    assert "ports" not in from_gateway  # the API and the KV events
    assert from_monitoring["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert from_monitoring["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    assert "rel-fireworks-gateway-redis" not in policies  # an external Redis: not ours
    bundled = {p["metadata"]["name"]: p["spec"] for p in find(render(), "NetworkPolicy")}
    (redis_rule,) = bundled["rel-fireworks-gateway-redis"]["ingress"]
    assert gateway_pods.items() <= redis_rule["from"][0]["podSelector"]["matchLabels"].items()
    assert redis_rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    # Clients reach the gateway from anywhere, on its HTTP port; the test pod takes nothing.
    (gateway_rule,) = bundled["rel-fireworks-gateway-gateway"]["ingress"]
    assert gateway_rule == {"ports": [{"port": "http", "protocol": "TCP"}]}
    assert "ingress" not in bundled["rel-fireworks-gateway-test"]


CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"  # installed by `make test`


@pytest.mark.parametrize("values", [None, THREE], ids=["defaults", "three-deployments"])
def test_checkov_finds_nothing_in_the_rendered_chart(values: dict[str, Any] | None,
                                                     tmp_path: Path) -> None:
    """A well-kept scanner (checkov, its Kubernetes checks) on the chart as rendered: no
    failed check. The skips are helm/.checkov.yaml's (the installer's choices, each with its
    reason) and the `helm test` pod's two annotations (a one-shot pod has no probes)."""
    assert CHECKOV.exists(), "checkov is installed by `make test` (.tools/checkov)"
    manifests = helm.Chart.load(CHART).render(values, name="rel", namespace="prod",
                                              is_install=True)
    for path, text in manifests.items():
        if not path.endswith("NOTES.txt"):
            (tmp_path / path.replace("/", "_")).write_text(text)
    run = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes",
                          "--config-file", str(CHART / ".checkov.yaml"),
                          "--compact", "-o", "json"], capture_output=True, text=True,
                         timeout=300)
    report = json.loads(run.stdout)
    report = report if isinstance(report, dict) else report[0]
    failed = [(r["check_id"], r["resource"]) for r in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 300
    skipped = {r["check_id"] for r in report["results"]["skipped_checks"]}
    assert skipped <= {"CKV_K8S_8", "CKV_K8S_9"}, skipped  # the test pod's annotations


def test_the_bundled_redis_takes_a_password_only_the_gateways_hold_and_bounds_its_memory(
        ) -> None:
    objects = render()
    (secret,) = find(objects, "Secret", "rel-fireworks-gateway-redis")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 48
    assert base64.b64decode(secret["data"]["redis.conf"]).decode() == \
        f"requirepass {password}\n"
    # Two instances: the registry and limits never evicted, the bulk data apart from them.
    instances = {s["metadata"]["name"]: s for s in find(objects, "StatefulSet")}
    assert set(instances) == {"rel-fireworks-gateway-redis", "rel-fireworks-gateway-redis-bulk"}
    for name, maxmemory, policy, limit in (
            ("rel-fireworks-gateway-redis", "96mb", "noeviction", "192Mi"),
            ("rel-fireworks-gateway-redis-bulk", "320mb", "volatile-lru", "512Mi")):
        server = container(instances[name])
        args = server["args"]
        assert args[0] == "/etc/redis/auth/redis.conf"  # the password, not on the command line
        assert args[args.index("--maxmemory") + 1] == maxmemory
        assert args[args.index("--maxmemory-policy") + 1] == policy
        assert server["resources"]["limits"]["memory"] == limit
        assert "REDISCLI_AUTH" in server["readinessProbe"]["exec"]["command"][-1]
        volumes = {v["name"]: v for v in instances[name]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["auth"]["secret"]["secretName"] == secret["metadata"]["name"]
        (service,) = find(objects, "Service", name)  # each Service selects its own pods
        labels = instances[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert instances[name]["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    selectors = [find(objects, "Service", n)[0]["spec"]["selector"] for n in instances]
    assert selectors[0] != selectors[1]
    gateway = find(objects, "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    assert env["GATEWAY_REDIS_URL"] == "redis://rel-fireworks-gateway-redis:6379/0"
    assert env["GATEWAY_REDIS_BULK_URL"] == "redis://rel-fireworks-gateway-redis-bulk:6379/0"
    assert env["GATEWAY_USAGE_STREAM_MAX_LENGTH"] == "500000"
    gateway_volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(gateway)["volumeMounts"]}
    assert env["GATEWAY_REDIS_PASSWORD_FILE"] == mounts["redis"] + "/password"
    assert gateway_volumes["redis"]["secret"] == {
        "secretName": secret["metadata"]["name"], "items": [{"key": "password",
                                                             "path": "password"}]}
    workers = [w for w in find(objects, "Deployment") if w is not gateway]
    assert all("redis" not in {v["name"] for v in w["spec"]["template"]["spec"]["volumes"]}
               for w in workers)
    # An external Redis: the password from its Secret when given, none otherwise.
    external = render(THREE)
    assert not find(external, "Secret", "rel-fireworks-gateway-redis")
    values = yaml.safe_load(yaml.safe_dump(THREE))
    values["redis"]["existingSecret"] = "shared-redis-auth"
    gateway = find(render(values), "Deployment", "rel-fireworks-gateway-gateway")[0]
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["redis"]["secret"]["secretName"] == "shared-redis-auth"
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    assert "GATEWAY_REDIS_BULK_URL" not in env  # one external Redis for both, unless given
    values["redis"]["bulkUrl"] = "rediss://bulk.shared.svc:6380/0"
    gateway = find(render(values), "Deployment", "rel-fireworks-gateway-gateway")[0]
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    assert env["GATEWAY_REDIS_BULK_URL"] == "rediss://bulk.shared.svc:6380/0"


def test_a_terminating_worker_drains_before_vllm_exits() -> None:
    """preStop (out of the Service first), vLLM's drain timeout, and a grace period that
    covers both: streams finish on the pod, or the gateways continue them elsewhere."""
    for values in (None, THREE):
        objects = render(values)
        workers = [d for d in find(objects, "Deployment") if not
                   d["metadata"]["name"].endswith("-gateway")]
        assert workers
        for worker in workers:
            pod = worker["spec"]["template"]["spec"]
            vllm = container(worker)
            args = vllm["args"]
            timeout = int(args[args.index("--shutdown-timeout") + 1])
            sleep = vllm["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert (sleep, timeout) == (5, 60)
            assert pod["terminationGracePeriodSeconds"] > sleep + timeout


def test_every_gateway_pod_mounts_the_batch_volume_with_its_bounds() -> None:
    objects = render()
    claim = find(objects, "PersistentVolumeClaim", "rel-fireworks-gateway-batch") \
        or find(objects, "PersistentVolumeClaim")
    assert len(claim) == 1 and claim[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim[0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    gateway = next(d for d in find(objects, "Deployment") if d["metadata"]["name"].endswith(
        "-gateway"))
    spec = gateway["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "batch")
    assert volume["persistentVolumeClaim"]["claimName"] == claim[0]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container(gateway)["env"]}
    mount = next(m for m in container(gateway)["volumeMounts"] if m["name"] == "batch")
    assert env["GATEWAY_BATCH_DIR"] == mount["mountPath"]
    assert env["GATEWAY_BATCH_FILE_MAX_BYTES"] == "104857600"
    assert env["GATEWAY_BATCH_ACCOUNT_MAX_BYTES"] == "1073741824"
    off = render({"batch": {"persistence": {"enabled": False, "size": "1Gi"}}})
    assert find(off, "PersistentVolumeClaim") == [] or all(
        "batch" not in c["metadata"]["name"] for c in find(off, "PersistentVolumeClaim"))
