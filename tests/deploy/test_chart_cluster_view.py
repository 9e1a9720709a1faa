"""The chart's side of the API's cluster view: a read-only Role and ClusterRole that grant exactly the
reads services/api/cluster.py makes (its PERMISSIONS, which the integration test checks against the
requests the real kubernetes client sends), bound only to the API's own ServiceAccount, whose token
only the API pod mounts; and the settings that point the view at this release's workers."""

from __future__ import annotations

from services.api.cluster import PERMISSIONS

from .test_chart import Obj, by_kind, containers, one, pod_spec, render

READ_VERBS = {"get", "list", "watch"}
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def granted(role: Obj) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_roles_grant_exactly_what_the_view_reads() -> None:
    objs = render()
    (role,) = by_kind(objs, "Role")
    (cluster_role,) = by_kind(objs, "ClusterRole")
    assert granted(role) | granted(cluster_role) == PERMISSIONS
    assert {v for _g, _r, v in PERMISSIONS} <= READ_VERBS
    assert granted(cluster_role) == {("", "nodes", "get")}  # the one cluster-scoped read
    deployment_rule = next(r for r in role["rules"] if r["resources"] == ["deployments"])
    assert deployment_rule["resourceNames"] == ["flowcloud-worker"]
    one(objs, "Deployment", "worker")  # the Deployment it names exists
    for binding, target in (
        (one(objs, "RoleBinding", "api"), role),
        (one(objs, "ClusterRoleBinding", "api"), cluster_role),
    ):
        assert binding["roleRef"]["name"] == target["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "flowcloud-api", "namespace": "fc"}]


def test_only_the_api_pod_holds_a_token_and_the_settings_find_the_workers() -> None:
    objs = render()
    for obj in (o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Pod")):
        spec = pod_spec(obj)
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        mounts = [
            m for c in containers(obj) for m in c.get("volumeMounts", []) if m["mountPath"] == TOKEN_DIR
        ]
        assert spec["automountServiceAccountToken"] is False
        if component == "api":
            assert spec["serviceAccountName"] == "flowcloud-api" and mounts and mounts[0]["readOnly"]
            volume = next(v for v in spec["volumes"] if v["name"] == mounts[0]["name"])
            token = volume["projected"]["sources"][0]["serviceAccountToken"]
            assert token["path"] == "token" and token["expirationSeconds"] <= 3607
        else:
            assert spec.get("serviceAccountName", "flowcloud") == "flowcloud" and not mounts, component
    config = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"] == "flowcloud-api")["data"]
    assert config["FLOWCLOUD_API_CLUSTER_VIEW"] == "true"
    assert config["FLOWCLOUD_API_CLUSTER_WORKER_DEPLOYMENT"] == "flowcloud-worker"
    selector = dict(kv.split("=") for kv in config["FLOWCLOUD_API_CLUSTER_WORKER_SELECTOR"].split(","))
    worker_labels = one(objs, "Deployment", "worker")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= worker_labels.items()
    api_labels = one(objs, "Deployment", "api")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= api_labels.items()  # it selects the workers, not every pod


def test_off_means_no_rights_and_no_token() -> None:
    objs = render("--set", "api.clusterView.enabled=false")
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert not by_kind(objs, kind), kind
    api = one(objs, "Deployment", "api")
    assert pod_spec(api)["serviceAccountName"] == "flowcloud"
    assert not [m for c in containers(api) for m in c["volumeMounts"] if m["mountPath"] == TOKEN_DIR]
    config = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"] == "flowcloud-api")["data"]
    assert "FLOWCLOUD_API_CLUSTER_VIEW" not in config
