"""manifests/: a kustomize base and overlays whose every object validates against the
Kubernetes schemas (kubernetes-validate, offline), and whose DaemonSet and ConfigMap are
what the daemon accepts."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from proxy.config import parse_args

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.32"
KUSTOMIZATIONS = [
    "",
    "overlays/userspace",
    "overlays/node-local-dns",
    "overlays/reduced-privileges",
]


def render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (`.ci/setup test` installs it)"
    p = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_every_object_validates(where: str) -> None:
    docs = render(MANIFESTS / where)
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "ServiceAccount",
    ]
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_the_validation_catches_mistakes() -> None:
    ds = by_kind(render(MANIFESTS))["DaemonSet"]
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurg"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_daemonset_and_config_work_together(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    objs = by_kind(render(MANIFESTS / where))
    ds, cm = objs["DaemonSet"], objs["ConfigMap"]
    spec = ds["spec"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "kube-proxy-py"
    (c,) = pod["containers"]
    assert c["image"] == "localhost/kube-proxy-py:latest"
    assert "ports" not in c  # with hostNetwork they would be hostPorts: no surge pod
    # The volume names the generated (hash-suffixed) ConfigMap, mounted where --config reads.
    vol = next(v for v in pod["volumes"] if v["name"] == "config")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")["mountPath"]
    (config_arg,) = [a for a in c["command"] if a.startswith("--config=")]
    config_path = Path(config_arg.removeprefix("--config="))
    assert config_path.parent == Path(mount) and config_path.name in cm["data"]
    # The daemon accepts the command line and the file, with no warning.
    (tmp_path / config_path.name).write_text(cm["data"][config_path.name])
    argv = [a.replace("$(NODE_NAME)", "node-a") for a in c["command"][1:]]
    argv = [f"--config={tmp_path / config_path.name}" if a == config_arg else a for a in argv]
    caplog.set_level(logging.INFO, "proxy.config")
    cfg = parse_args(argv)
    assert not caplog.records, caplog.text
    assert cfg.hostname == "node-a"
    want_mode = "userspace" if where.endswith("userspace") else "iptables"
    assert cfg.proxy_mode == want_mode
    if where.endswith("node-local-dns"):
        assert cfg.dns_bind == ("169.254.20.10", 53) and cfg.dns_node_local
    else:
        assert cfg.dns_bind is None


def test_rbac_is_read_only() -> None:
    objs = by_kind(render(MANIFESTS))
    verbs = {v for rule in objs["ClusterRole"]["rules"] for v in rule["verbs"]}
    assert verbs == {"list", "watch"}
    binding = objs["ClusterRoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kube-proxy-py", "namespace": "kube-system"}
    ]


def test_image_is_set_with_kustomize_images(tmp_path: Path) -> None:
    # A user's overlay: the base plus their registry's image.
    overlay = tmp_path / "mine"
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../manifests]\n"
        "images:\n"
        "- {name: localhost/kube-proxy-py, newName: registry.example.com/kube-proxy-py,"
        ' newTag: "0.1.0"}\n'
    )
    ds = by_kind(render(overlay))["DaemonSet"]
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/kube-proxy-py:0.1.0"


def test_reduced_privileges_overlay_runs_init_only_first(tmp_path: Path) -> None:
    """The privileged set-up in an init container (--init-only, the daemon's own flags and
    config), then the daemon without privileges, with NET_ADMIN and NET_RAW only (what
    tests/e2e/test_semantics.py::test_init_only_then_a_daemon_without_privileges runs)."""
    objs = by_kind(render(MANIFESTS / "overlays/reduced-privileges"))
    pod = objs["DaemonSet"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (c,) = pod["containers"]
    assert init["image"] == c["image"] and init["securityContext"] == {"privileged": True}
    assert init["command"] == [c["command"][0], "--init-only", *c["command"][1:]]
    assert init["volumeMounts"][0] == next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert c["securityContext"] == {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
    }
    config = tmp_path / "config.yaml"
    config.write_text(objs["ConfigMap"]["data"]["config.yaml"])
    argv = [
        f"--config={config}" if a.startswith("--config=") else a.replace("$(NODE_NAME)", "n")
        for a in init["command"][1:]
    ]
    cfg = parse_args(argv)
    assert cfg.init_only and cfg.proxy_mode == "iptables"
