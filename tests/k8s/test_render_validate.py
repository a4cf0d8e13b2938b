"""Every overlay renders with a real kustomize, and every rendered document validates offline:
built-in kinds with kubernetes-validate (strict: unknown fields refused) for Kubernetes 1.33,
ray.io kinds against KubeRay's CRD schema with unknown fields refused (crd_schema.py)."""

import kubernetes_validate
import pytest

from tests.k8s import crd_schema
from tests.k8s.manifests import K8S, OVERLAYS, render

pytestmark = pytest.mark.timeout(120)

KUBERNETES_VERSION = "1.33"
EXPECTED_KINDS = {
    "dev-cpu": ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "NetworkPolicy",
                "PodDisruptionBudget", "PodDisruptionBudget", "PodDisruptionBudget",
                "RayCluster", "Secret", "Secret", "Service"],
}
for _name in ("gpu-8b", "70b-tp2", "70b-tp8"):
    # + the TLS Secret and the checkpoints' PersistentVolumeClaim (the two components)
    EXPECTED_KINDS[_name] = sorted([*EXPECTED_KINDS["dev-cpu"], "Secret",
                                    "PersistentVolumeClaim"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_resources(rendered, overlay):
    assert sorted(doc["kind"] for doc in rendered[overlay]) == EXPECTED_KINDS[overlay]
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in rendered[overlay]]
    assert len(names) == len(set(names)), names


def test_base_renders_alone(kustomize):
    kinds = sorted(doc["kind"] for doc in render(K8S / "base", kustomize))
    assert kinds == EXPECTED_KINDS["dev-cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_strictly(rendered, overlay):
    builtin = [doc for doc in rendered[overlay] if "ray.io" not in doc["apiVersion"]]
    assert builtin
    for doc in builtin:
        # Raises kubernetes_validate.ValidationError (with every problem) on a bad document.
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) \
            == KUBERNETES_VERSION, doc["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_kinds_validate_against_the_crd(rendered, overlay):
    custom = [doc for doc in rendered[overlay] if doc["apiVersion"].startswith("ray.io/")]
    assert [doc["kind"] for doc in custom] == ["RayCluster"]
    for doc in custom:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_schema.errors(doc) == [], doc["metadata"]["name"]


def test_kubernetes_validate_has_no_schema_for_ray_kinds(rendered):
    """Why the CRD route exists: kubernetes-validate knows built-in kinds only."""
    cluster = next(d for d in rendered["gpu-8b"] if d["kind"] == "RayCluster")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(cluster, KUBERNETES_VERSION, strict=True)
