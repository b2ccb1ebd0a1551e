"""The Kubernetes manifests in deploy/: schema-valid for a pinned Kubernetes, and consistent with tidal itself
(ports, probes, the drain budget, selectors, and the metric the autoscaler scales on)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from live_server import ServerProcess, scrape
from tidal.transport.server import LIVENESS_SERVICE

K8S_VERSION = "1.33.0"  # the oldest release with native sidecars (restartPolicy: Always init containers) GA
ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ("standalone", "autoscaling", "sidecar")
SHUTDOWN_MARGIN_S = 3  # exit linger, process start-up of the signal handler, kubelet slack


def render(folder: Path) -> list[dict[str, Any]]:
    """What `kustomize build` gives for kustomizations that only list resources (all of deploy/'s do)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "a kustomize feature this renderer lacks"
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def flags(container: dict[str, Any]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


def tidal_container(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == "tidal"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_for_the_pinned_kubernetes(overlay: str) -> None:
    for doc in render(ROOT / overlay):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_what_the_tests_check(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run([kubectl, "kustomize", str(ROOT / overlay)], capture_output=True, text=True, check=True)
    key = lambda doc: json.dumps(doc, sort_keys=True)  # noqa: E731
    assert sorted(map(key, yaml.safe_load_all(built.stdout))) == sorted(map(key, render(ROOT / overlay)))


def test_standalone_probes_ports_and_drain_budget() -> None:
    docs = render(ROOT / "standalone")
    deployment = only(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = tidal_container(deployment)
    args = flags(container)
    port = int(args["grpc-port"])
    assert args["grpc-address"] == "0.0.0.0"
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": ""}
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}
    shutdown_s = (
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
        + float(args["drain-delay-s"])
        + float(args["drain-grace-s"])
    )
    assert pod["terminationGracePeriodSeconds"] >= shutdown_s + SHUTDOWN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] <= shutdown_s + 3 * SHUTDOWN_MARGIN_S  # not a blind guess either
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port, "metrics": int(args["metrics-port"]), "http": int(args["http-port"])}
    service = {p["name"]: (p["port"], p["targetPort"]) for p in only(docs, "Service")["spec"]["ports"]}
    assert service == {name: (number, name) for name, number in ports.items()}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert only(docs, "Service")["spec"]["selector"] == labels
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_sidecar_shares_the_socket_and_probes_it() -> None:
    deployment = only(render(ROOT / "sidecar"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = tidal_container(deployment)
    assert container["restartPolicy"] == "Always"  # a native sidecar: stopped after the application
    address = flags(container)["grpc-address"]
    socket_dir = str(Path(address.removeprefix("unix://")).parent)
    everyone = [container, *pod["containers"]]
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in everyone}
    assert mounts["tidal"]["tidal-socket"] == mounts["app"]["tidal-socket"] == socket_dir
    (app,) = pod["containers"]
    assert {"name": "TIDAL_URL", "value": address} in app["env"]
    assert container["startupProbe"]["exec"]["command"] == ["tidal", "health", "-u", address]
    assert container["livenessProbe"]["exec"]["command"][-2:] == ["--service", LIVENESS_SERVICE]
    assert pod["terminationGracePeriodSeconds"] >= float(flags(container)["drain-grace-s"]) + SHUTDOWN_MARGIN_S


def test_autoscaler_scales_the_deployment_on_a_metric_tidal_serves(server: ServerProcess) -> None:
    docs = render(ROOT / "autoscaling")
    hpa = only(docs, "HorizontalPodAutoscaler")
    deployment = only(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] + 1
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(only(docs, "ConfigMap")["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert re.match(r"\w+", rule["seriesQuery"]).group(0) == name
    # The server-wide series the adapter rule selects (model="") is in a live server's exposition.
    served = {key for key in scrape(server) if key.startswith(name + "{")}
    assert any('model=""' in key for key in served), sorted(served)
