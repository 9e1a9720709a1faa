"""The Helm chart: `helm lint` and `helm template` with a real helm, every rendered object validated
against the Kubernetes schemas (kubernetes-validate, strict), and the security, probe, resource,
secret and autoscaling properties asserted on the rendered objects."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flowcloud import keys

from .conftest import CHART, cli_commands, find_tool, secret_env_names, settings_env_names

CI_VALUES = CHART / "ci" / "gpu-keda-external-redis-values.yaml"
CLUSTER_VALUES = CHART / "ci" / "redis-cluster-values.yaml"
KEDA_API = "keda.sh/v1alpha1/ScaledObject"
# Kubernetes versions the chart supports and is validated against (strict: unknown fields are errors).
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Custom resources kubernetes-validate has no schema for; their shape is asserted below instead.
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Pod"}

Obj = dict[str, Any]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [find_tool("helm"), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def render(*args: str) -> list[Obj]:
    out = helm("template", "flowcloud", str(CHART), "--namespace", "fc", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, component: str) -> Obj:
    found = [
        o for o in by_kind(objs, kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"expected one {kind} for {component}, got {len(found)}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def containers(obj: Obj) -> Iterator[Obj]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


RENDERINGS = {
    "default": (),
    "gpu-keda-external-redis": ("-f", str(CI_VALUES), "--api-versions", KEDA_API),
    "cpu-hpa": ("--set", "worker.mode=cpu", "--set", "worker.autoscaling.engine=hpa"),
    "keda-internal-redis": ("--api-versions", KEDA_API),
    "redis-cluster": ("-f", str(CLUSTER_VALUES), "--api-versions", KEDA_API),
}


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(*RENDERINGS[request.param])


@pytest.fixture(scope="module")
def default_objs() -> list[Obj]:
    return render()


@pytest.fixture(scope="module")
def ci_objs() -> list[Obj]:
    return render(*RENDERINGS["gpu-keda-external-redis"])


@pytest.mark.parametrize(
    "values",
    [(), ("-f", str(CI_VALUES)), ("-f", str(CLUSTER_VALUES))],
    ids=["default", "gpu-keda-external-redis", "redis-cluster"],
)
def test_helm_lint_passes(values: tuple[str, ...]) -> None:
    result = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in result.stdout


def test_every_object_validates_against_the_kubernetes_schemas(rendered: list[Obj]) -> None:
    assert len(rendered) >= 15
    for obj in rendered:
        for version in K8S_VERSIONS:
            if obj["kind"] in CRD_KINDS:
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(obj, version, strict=True)
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {exc}"
                )


def test_strict_validation_catches_a_bad_object(default_objs: list[Obj]) -> None:
    """The validator is really strict: a misspelled field in a rendered Deployment is an error."""
    deployment = yaml.safe_load(yaml.safe_dump(by_kind(default_objs, "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_names_and_labels(default_objs: list[Obj]) -> None:
    release = "r" * 53  # the longest release name helm allows
    out = helm("template", release, str(CHART), "--api-versions", KEDA_API).stdout
    long = [doc for doc in yaml.safe_load_all(out) if doc]
    assert any(o["metadata"]["name"].endswith("-worker") for o in long), (
        "component suffixes survive truncation"
    )
    for obj in default_objs + long:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        labels = obj["metadata"]["labels"]
        for label in ("name", "instance", "component", "version", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{label}" in labels, (obj["kind"], obj["metadata"]["name"], label)


def test_pods_meet_the_restricted_pod_security_standard(rendered: list[Obj]) -> None:
    workloads = [o for o in rendered if o["kind"] in WORKLOAD_KINDS]
    assert len(workloads) >= 4
    for obj in workloads:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc.get("runAsUser", 1) != 0, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert not any("hostPath" in v for v in volumes.values()), where
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], (
                where,
                c["name"],
            )
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", (where, c["name"])
            assert sc.get("privileged", False) is False, (where, c["name"])
            assert sc.get("runAsUser", 1) != 0, (where, c["name"])
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}/{c['name']}: no emptyDir at /tmp"


def test_every_container_has_requests_and_limits(rendered: list[Obj]) -> None:
    for obj in (o for o in rendered if o["kind"] in WORKLOAD_KINDS):
        for c in containers(obj):
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert c["resources"][kind][resource], (
                        obj["metadata"]["name"],
                        c["name"],
                        kind,
                        resource,
                    )


def test_services_have_liveness_and_readiness_probes_that_differ(rendered: list[Obj]) -> None:
    for obj in rendered:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in containers(obj):
            live, ready = c["livenessProbe"], c["readinessProbe"]
            assert live != ready, f"{obj['metadata']['name']}: liveness and readiness probes are the same"
            if "httpGet" in live:
                assert (live["httpGet"]["path"], ready["httpGet"]["path"]) == ("/healthz", "/readyz")


def test_worker_is_ready_only_when_its_model_is_loaded(default_objs: list[Obj]) -> None:
    worker = next(containers(one(default_objs, "Deployment", "worker")))
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # Liveness waits for a slow model load through the startup probe instead of killing the pod.
    assert worker["startupProbe"]["failureThreshold"] * worker["startupProbe"]["periodSeconds"] >= 120
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == 9102


def test_no_secret_is_a_literal_env_value_or_in_a_configmap(rendered: list[Obj]) -> None:
    secret_names = secret_env_names() | {"REDIS_PASSWORD", "REDISCLI_AUTH"}
    pattern = re.compile(r"(PASSWORD|TOKEN|SECRET|_KEY$|AUTH$|REDIS_URL)")
    for obj in (o for o in rendered if o["kind"] in WORKLOAD_KINDS):
        for c in containers(obj):
            for env in c.get("env", []):
                if env["name"] in secret_names or pattern.search(env["name"]):
                    assert "value" not in env, f"{c['name']}: {env['name']} is a literal"
                    assert "secretKeyRef" in env["valueFrom"], f"{c['name']}: {env['name']} not from a Secret"
                assert "redis://:" not in str(env.get("value", "")) and "rediss://:" not in str(
                    env.get("value", "")
                )
            text = " ".join(c.get("args", []) + c.get("command", []))
            assert "requirepass" not in text or "$REDIS_PASSWORD" in text
    for cm in by_kind(rendered, "ConfigMap"):
        for name, value in cm["data"].items():
            assert name not in secret_names and not pattern.search(name), f"{name} in ConfigMap"
            assert "://" not in value or "@" not in value, f"{name} looks like a URL with credentials"


def test_values_hold_no_secret() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                lowered = key.lower()
                if key in ("secretName", "secretKey", "existingSecret"):
                    continue  # references to a Secret, not secrets
                if any(word in lowered for word in ("password", "token", "apikey", "secret")) and isinstance(
                    value, str
                ):
                    assert value == "", f"{path}.{key} holds a literal secret"
                walk(value, f"{path}.{key}")
        elif isinstance(node, str):
            assert not re.search(r"rediss?://[^/@]*:[^/@]+@", node), f"{path}: a URL with a password"

    walk(values, "")


def test_generated_secrets_are_kept_across_upgrades(default_objs: list[Obj]) -> None:
    secrets = {s["metadata"]["name"]: s for s in by_kind(default_objs, "Secret")}
    assert set(secrets) == {"flowcloud-api", "flowcloud-redis", "flowcloud-control-redis"}
    assert set(secrets["flowcloud-api"]["data"]) == {"admin-key"}
    for redis in ("flowcloud-redis", "flowcloud-control-redis"):
        assert set(secrets[redis]["data"]) == {"redis-password", "redis-url"}
    template = (CHART / "templates" / "secrets.yaml").read_text()
    assert template.count('lookup "v1" "Secret"') == 2, "each generated secret must be read back on upgrade"
    # An admin key named by the user is not generated.
    objs = render("--set", "api.adminKey.existingSecret=mine")
    assert "flowcloud-api" not in {s["metadata"]["name"] for s in by_kind(objs, "Secret")}
    api = next(containers(one(objs, "Deployment", "api")))
    ref = next(e for e in api["env"] if e["name"] == "FLOWCLOUD_API_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mine", "key": "admin-key"}


def test_commands_and_env_match_the_cli_and_settings(rendered: list[Obj]) -> None:
    known_env = settings_env_names()
    configmaps = {cm["metadata"]["name"]: cm["data"] for cm in by_kind(rendered, "ConfigMap")}
    for data in configmaps.values():
        assert set(data) <= known_env, set(data) - known_env
    for obj in by_kind(rendered, "Deployment"):
        c = next(containers(obj))
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        assert c["args"] == [component] and component in cli_commands()
        assert "command" not in c, "the image's entrypoint (flowcloud) runs the command"
        env = {e["name"] for e in c["env"]}
        prefix = f"FLOWCLOUD_{component.upper()}_"
        assert env <= known_env
        from_cm = {n for r in c["envFrom"] for n in configmaps[r["configMapRef"]["name"]]}
        assert all(n.startswith(prefix) for n in from_cm), f"{component} gets another service's settings"
        assert "FLOWCLOUD_REDIS_URL" in env
        # Devices, keys and alert rules come from the control plane; the workers never read them.
        assert ("FLOWCLOUD_CONTROL_REDIS_URL" in env) == (component in ("gateway", "api", "alerts")), (
            component
        )


def test_ports_match_the_service_contract(default_objs: list[Obj]) -> None:
    data = {cm["metadata"]["name"]: cm["data"] for cm in by_kind(default_objs, "ConfigMap")}
    assert data["flowcloud-gateway"]["FLOWCLOUD_GATEWAY_PORT"] == "7000"
    assert data["flowcloud-gateway"]["FLOWCLOUD_GATEWAY_METRICS_PORT"] == "9101"
    assert data["flowcloud-worker"]["FLOWCLOUD_WORKER_METRICS_PORT"] == "9102"
    assert data["flowcloud-api"]["FLOWCLOUD_API_PORT"] == "8000"
    # Whole numbers reach the services as integers, not 8e+06.
    assert data["flowcloud-gateway"]["FLOWCLOUD_GATEWAY_MAX_BYTES_PER_SECOND"] == "8000000"
    gateway_svc = next(
        s for s in by_kind(default_objs, "Service") if s["metadata"]["name"] == "flowcloud-gateway"
    )
    assert gateway_svc["spec"]["type"] == "LoadBalancer"
    assert gateway_svc["spec"]["ports"] == [
        {"name": "ingest", "port": 7000, "targetPort": "ingest", "protocol": "TCP"}
    ]


def test_gateway_service_can_be_a_node_port(ci_objs: list[Obj]) -> None:
    svc = next(s for s in by_kind(ci_objs, "Service") if s["metadata"]["name"] == "flowcloud-gateway")
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["nodePort"] == 30700


def test_gpu_worker_requests_gpus_and_cpu_mode_does_not(ci_objs: list[Obj]) -> None:
    gpu = one(ci_objs, "Deployment", "worker")
    c = next(containers(gpu))
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
    assert "worker-cuda" in c["image"]
    spec = pod_spec(gpu)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert {"name": "weights", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    worker_cm = next(
        cm for cm in by_kind(ci_objs, "ConfigMap") if cm["metadata"]["name"] == "flowcloud-worker"
    )
    assert worker_cm["data"]["FLOWCLOUD_WORKER_DEVICE"] == "cuda"
    assert worker_cm["data"]["FLOWCLOUD_WORKER_WEIGHTS"] == "/models/deeplabv3_resnet50.pt"

    cpu_objs = render("--set", "worker.mode=cpu", "--set", "worker.tolerations=null")
    cpu = one(cpu_objs, "Deployment", "worker")
    c = next(containers(cpu))
    assert not any("gpu" in r for kind in ("requests", "limits") for r in c["resources"][kind])
    assert "worker-cuda" not in c["image"]
    cpu_cm = next(cm for cm in by_kind(cpu_objs, "ConfigMap") if cm["metadata"]["name"] == "flowcloud-worker")
    assert cpu_cm["data"]["FLOWCLOUD_WORKER_DEVICE"] == "cpu"
    assert cpu_cm["data"]["FLOWCLOUD_WORKER_PRECISION"] == "fp32"
    assert "FLOWCLOUD_WORKER_WEIGHTS" not in cpu_cm["data"]  # the bundled demo model


def test_keda_scales_workers_on_the_frames_group_lag(ci_objs: list[Obj]) -> None:
    assert not by_kind(ci_objs, "HorizontalPodAutoscaler")
    scaled = one(ci_objs, "ScaledObject", "worker")
    spec = scaled["spec"]
    worker = one(ci_objs, "Deployment", "worker")
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert "replicas" not in worker["spec"], "the autoscaler owns the replica count"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 16, 600)
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert meta["stream"] == keys.frame_shard(0) and meta["consumerGroup"] == keys.WORKER_GROUP
    assert meta["lagCount"] == "30" and meta["activationLagCount"] == "0"
    assert "pendingEntriesCount" not in meta and "streamLength" not in meta
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert meta["address"] == "redis.example.internal:6380" and meta["enableTLS"] == "true"
    auth = one(ci_objs, "TriggerAuthentication", "worker")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "flowcloud-redis-external", "key": "redis-password"}
    ]


def test_keda_with_the_in_cluster_redis_authenticates_from_its_secret() -> None:
    objs = render("--api-versions", KEDA_API)
    meta = one(objs, "ScaledObject", "worker")["spec"]["triggers"][0]["metadata"]
    assert meta["address"] == "flowcloud-redis:6379"
    auth = one(objs, "TriggerAuthentication", "worker")["spec"]["secretTargetRef"][0]
    assert (auth["name"], auth["key"]) == ("flowcloud-redis", "redis-password")


def test_hpa_is_the_fallback_without_keda(default_objs: list[Obj]) -> None:
    assert not by_kind(default_objs, "ScaledObject")
    hpa = one(default_objs, "HorizontalPodAutoscaler", "worker")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == one(default_objs, "Deployment", "worker")["metadata"]["name"]
    )
    assert hpa["spec"]["minReplicas"] >= 1
    zero = render("--set", "worker.autoscaling.minReplicas=0")
    assert one(zero, "HorizontalPodAutoscaler", "worker")["spec"]["minReplicas"] == 1
    fixed = render("--set", "worker.autoscaling.enabled=false", "--set", "worker.replicaCount=3")
    assert not by_kind(fixed, "HorizontalPodAutoscaler") and not by_kind(fixed, "ScaledObject")
    assert one(fixed, "Deployment", "worker")["spec"]["replicas"] == 3


@pytest.mark.parametrize(("component", "size"), [("redis", "8Gi"), ("control-redis", "1Gi")])
def test_redis_statefulsets_persist_with_aof(default_objs: list[Obj], component: str, size: str) -> None:
    redis = one(default_objs, "StatefulSet", component)
    c = next(containers(redis))
    assert "--appendonly yes" in c["args"][0]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == size
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]


def test_the_control_plane_has_its_own_redis(default_objs: list[Obj]) -> None:
    """Devices and keys never share the frames' Redis: a frames Redis without persistence is allowed,
    and the gateway and API read the control plane from the control-redis Secret."""
    objs = render("--set", "redis.appendonly=false", "--set", "redis.persistence.enabled=false")
    control = next(containers(one(objs, "StatefulSet", "control-redis")))
    assert "--appendonly yes" in control["args"][0] and "--appendfsync everysec" in control["args"][0]
    for component in ("gateway", "api"):
        env = {e["name"]: e for e in next(containers(one(default_objs, "Deployment", component)))["env"]}
        assert env["FLOWCLOUD_CONTROL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "flowcloud-control-redis",
            "key": "redis-url",
        }
        assert env["FLOWCLOUD_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "flowcloud-redis"


@pytest.mark.parametrize(
    "settings",
    [
        ("controlRedis.appendonly=false",),
        ("controlRedis.persistence.enabled=false",),
        # The frames Redis outside the cluster changes nothing for the control plane.
        ("controlRedis.appendonly=false", "redis.enabled=false", "externalRedis.url.secretName=ext"),
    ],
)
def test_the_chart_refuses_a_control_plane_that_a_restart_can_lose(settings: tuple[str, ...]) -> None:
    args = [a for s in settings for a in ("--set", s)]
    result = helm("template", "x", str(CHART), *args, check=False)
    assert result.returncode != 0, f"{settings} was accepted"
    assert "controlRedis.appendonly and controlRedis.persistence.enabled must stay true" in result.stderr
    # fsync "no" is refused by the schema; an external control plane needs its Secret.
    result = helm("template", "x", str(CHART), "--set", "controlRedis.appendfsync=no", check=False)
    assert result.returncode != 0 and "schema" in result.stderr
    result = helm("template", "x", str(CHART), "--set", "controlRedis.enabled=false", check=False)
    assert result.returncode != 0 and "externalControlRedis.url.secretName is required" in result.stderr


def test_external_redis_replaces_the_statefulsets(ci_objs: list[Obj]) -> None:
    assert not by_kind(ci_objs, "StatefulSet")
    for obj in by_kind(ci_objs, "Deployment"):
        env = {e["name"]: e for e in next(containers(obj))["env"]}
        ref = env["FLOWCLOUD_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "flowcloud-redis-external", "key": "redis-url"}
        if "FLOWCLOUD_CONTROL_REDIS_URL" in env:
            ref = env["FLOWCLOUD_CONTROL_REDIS_URL"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "flowcloud-control-redis-external", "key": "redis-url"}
    result = helm("template", "x", str(CHART), "--set", "redis.enabled=false", check=False)
    assert result.returncode != 0 and "externalRedis" in result.stderr + result.stdout


def test_only_flowcloud_pods_reach_redis(default_objs: list[Obj]) -> None:
    policy = one(default_objs, "NetworkPolicy", "redis")
    redis = one(default_objs, "StatefulSet", "redis")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    flowcloud_peer = rule["from"][0]["podSelector"]["matchLabels"]
    for kind in ("Deployment",):
        for obj in by_kind(default_objs, kind):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert flowcloud_peer.items() <= labels.items(), f"{obj['metadata']['name']} cannot reach Redis"
    # No other pod in the namespace matches: the peer needs this release's FlowCloud labels.
    assert flowcloud_peer == {
        "app.kubernetes.io/instance": "flowcloud",
        "app.kubernetes.io/part-of": "flowcloud",
    }
    keda_peer = rule["from"][1]
    assert keda_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}


def test_pod_disruption_budgets_select_their_pods(default_objs: list[Obj]) -> None:
    for component in ("gateway", "worker", "api"):
        pdb = one(default_objs, "PodDisruptionBudget", component)
        labels = one(default_objs, "Deployment", component)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ingress_and_service_monitors(ci_objs: list[Obj]) -> None:
    ingress = one(ci_objs, "Ingress", "api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "flowcloud-api", "port": {"name": "http"}}
    monitors = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m for m in by_kind(ci_objs, "ServiceMonitor")
    }
    assert set(monitors) == {"gateway", "worker", "api", "alerts"}
    services = by_kind(ci_objs, "Service")
    for component, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        port = monitor["spec"]["endpoints"][0]["port"]
        selector = monitor["spec"]["selector"]["matchLabels"].items()
        assert any(
            selector <= s["metadata"]["labels"].items() and port in {p["name"] for p in s["spec"]["ports"]}
            for s in services
        ), f"the {component} ServiceMonitor selects no Service with port {port}"


def test_helm_test_pod_checks_api_health(default_objs: list[Obj]) -> None:
    (pod,) = by_kind(default_objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = next(containers(pod))["args"][0]
    assert "http://flowcloud-api:8000" in script and "/healthz" in script and "/readyz" in script
    compile(script, "helm-test", "exec")  # the script the pod runs is valid Python


def test_notes_explain_devices_and_the_api() -> None:
    result = helm("install", "flowcloud", str(CHART), "--dry-run=client", "--namespace", "fc")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "flowcloud devices add DEVICE_ID --tenant TENANT" in notes
    assert "port-forward svc/flowcloud-api" in notes
    assert "flowcloud edge --gateway $GATEWAY --device-id DEVICE_ID --token TOKEN" in notes


def test_schema_rejects_typos_and_bad_values() -> None:
    for bad in (
        "gateway.prot=7001",
        "worker.mode=tpu",
        "worker.autoscaling.engine=magic",
        "redis.appendfsync=often",
    ):
        result = helm("template", "x", str(CHART), "--set", bad, check=False)
        assert result.returncode != 0, f"{bad} was accepted"
        assert "schema" in result.stderr, result.stderr


def test_schema_covers_only_real_settings() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    known = settings_env_names()
    for component in ("gateway", "worker", "api"):
        props = schema["properties"][component]["properties"]["settings"]["properties"]
        for name in props:
            assert f"FLOWCLOUD_{component.upper()}_{name.upper()}" in known, f"{component}.settings.{name}"


FREEFORM_KEYS = {
    "resources", "nodeSelector", "affinity", "annotations", "labels", "podAnnotations", "podLabels",
}  # fmt: skip


def test_every_value_is_documented() -> None:
    """Every leaf of values.yaml (a scalar, a list or a free-form map) has a `# --` comment block above it;
    sections (maps of documented keys) need none."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    inside_leaf_at: int | None = None  # indent of the leaf whose children (list items, map) are its value
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if inside_leaf_at is not None and indent > inside_leaf_at:
            continue
        inside_leaf_at = None
        match = re.match(r"^\s*([A-Za-z0-9_.\-/]+):(.*)$", line)
        assert match, f"line {i + 1}: not a key"
        key, rest = match.group(1), match.group(2).strip()
        following = next((x for x in lines[i + 1 :] if x.strip() and not x.strip().startswith("#")), "")
        deeper = len(following) - len(following.lstrip()) > indent
        if not rest and deeper and not following.strip().startswith("- ") and key not in FREEFORM_KEYS:
            continue  # a section
        if not rest:
            inside_leaf_at = indent
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        if not any(c.startswith("# --") for c in block):
            undocumented.append(f"line {i + 1}: {key}")
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == "0.1.0"
    readme = (CHART / "README.md").read_text()
    for topic in ("scale to zero", "single pending message", "KEDA", "NVIDIA", "externalRedis"):
        assert topic.lower() in readme.lower(), f"the chart README does not cover {topic}"


def test_ci_values_file_exists_and_is_the_documented_example() -> None:
    assert CI_VALUES.is_file()
    assert Path(CI_VALUES).read_text().count("secretName") >= 2
