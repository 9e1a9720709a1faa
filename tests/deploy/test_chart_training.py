"""The chart's training Job: off by default; on, an Indexed Job of torchrun pods and the headless
Service of their rendezvous, GPUs per pod, the dataset and output claims, and the services' restricted
security context. Rendered by the real helm, validated strictly against the Kubernetes schemas, and
its command lines parsed by torchrun's and `flowcloud train`'s own parsers."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from torch.distributed.run import get_args_parser

from .conftest import CHART, parse_cli
from .test_chart import K8S_VERSIONS, Obj, by_kind, containers, helm, one, pod_spec, render

ON = (
    "--set", "training.enabled=true",
    "--set", "training.data.existingClaim=cityscapes",
    "--set", "training.output.existingClaim=weights",
)  # fmt: skip
TWO_NODES = (*ON, "--set", "training.nodes=2", "--set", "training.gpusPerNode=8")


@pytest.fixture(scope="module")
def objs() -> list[Obj]:
    return render(*TWO_NODES)


def test_off_by_default() -> None:
    default = render()
    assert not [o for o in default if o["metadata"]["labels"]["app.kubernetes.io/component"] == "train"]
    assert not by_kind(default, "Job")


def test_the_job_and_its_service_validate_strictly(objs: list[Obj]) -> None:
    for obj in (
        one(objs, "Job", "train"),
        one(objs, "Service", "train"),
        one(objs, "NetworkPolicy", "train"),
    ):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_torchrun_rendezvous_through_the_headless_service(objs: list[Obj]) -> None:
    job, service = one(objs, "Job", "train"), one(objs, "Service", "train")
    spec = pod_spec(job)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # Pod i is <job>-i.<service>: the endpoint names pod 0 through the Service, on the container's port.
    assert spec["subdomain"] == service["metadata"]["name"]
    container = next(containers(job))
    port = service["spec"]["ports"][0]
    assert container["ports"] == [
        {"name": port["targetPort"], "containerPort": port["port"], "protocol": "TCP"}
    ]
    assert container["command"] == ["torchrun"]
    args = get_args_parser().parse_args(container["args"])  # torchrun's own parser
    assert args.rdzv_backend == "c10d"
    assert args.rdzv_endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port['port']}"
    assert (args.nnodes, args.nproc_per_node, args.module) == ("2", "8", True)
    assert args.training_script == "flowcloud.cli.main" and args.training_script_args[0] == "train"
    # What follows is a valid `flowcloud train` command line, on the mounted volumes.
    train_args = args.training_script_args[1:]
    parse_cli(["flowcloud", "train", *train_args])
    assert {"--data=/data", "--output-dir=/output", "--device=cuda", "--sync-bn"} <= set(train_args)


def test_pod_hostnames_fit_in_a_dns_label() -> None:
    long = helm("template", "r" * 53, str(CHART), *TWO_NODES, "--show-only", "templates/training-job.yaml")
    job = next(o for o in yaml.safe_load_all(long.stdout) if o and o["kind"] == "Job")
    assert job["metadata"]["name"].endswith("-train")
    assert len(f"{job['metadata']['name']}-{job['spec']['completions'] - 1}") <= 63


def test_gpus_per_pod_and_resources(objs: list[Obj]) -> None:
    container = next(containers(one(objs, "Job", "train")))
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 8
        assert container["resources"][kind]["cpu"] and container["resources"][kind]["memory"]
    tolerations = pod_spec(one(objs, "Job", "train"))["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_dataset_read_only_and_output_on_their_claims(objs: list[Obj]) -> None:
    job = one(objs, "Job", "train")
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in next(containers(job))["volumeMounts"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "cityscapes", "readOnly": True}
    assert mounts["/data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "weights"}
    assert mounts["/output"]["name"] == "output" and not mounts["/output"].get("readOnly")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_the_same_restricted_security_context_as_the_services(objs: list[Obj]) -> None:
    job, worker = one(objs, "Job", "train"), one(objs, "Deployment", "worker")
    assert pod_spec(job)["securityContext"] == pod_spec(worker)["securityContext"]
    assert next(containers(job))["securityContext"] == next(containers(worker))["securityContext"]
    assert pod_spec(job)["automountServiceAccountToken"] is False
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True


def test_only_training_pods_reach_training_pods(objs: list[Obj]) -> None:
    policy = one(objs, "NetworkPolicy", "train")
    pod_labels = one(objs, "Job", "train")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items() and policy["spec"]["policyTypes"] == ["Ingress"]
    # One rule: from the training pods, on any port (the rendezvous, then NCCL's own ports).
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    assert not by_kind(render(*ON, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_preemption_does_not_count_as_failure(objs: list[Obj]) -> None:
    job = one(objs, "Job", "train")
    assert pod_spec(job)["restartPolicy"] == "Never"  # what a podFailurePolicy requires
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert pod_spec(job)["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("--set", "training.enabled=true"), "existingClaim"),
        ((*ON, "--set", "training.gpusPerNod=2"), "gpusPerNod"),
        ((*ON, "--set", "training.nodes=0"), "nodes"),
        ((*ON, "--set-json", 'training.args=["model"]'), "args"),
    ],
    ids=["no-claims", "typo", "no-nodes", "not-an-option"],
)
def test_the_schema_rejects_bad_training_values(values: tuple[str, ...], message: str) -> None:
    result = helm("template", "x", str(CHART), *values, check=False)
    assert result.returncode != 0, f"{values} was accepted"
    assert "schema" in result.stderr and message in result.stderr, result.stderr
