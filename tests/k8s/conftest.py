"""Each overlay rendered once per session by a real kustomize (skipped without one, except in CI,
where $CI makes a missing kustomize a failure)."""

import pytest

from tests.k8s.manifests import K8S, OVERLAYS, render, require_or_skip


@pytest.fixture(scope="session")
def kustomize() -> list[str]:
    return require_or_skip()


@pytest.fixture(scope="session")
def rendered(kustomize) -> dict[str, list[dict]]:
    """overlay name -> its rendered documents."""
    return {name: render(K8S / "overlays" / name, kustomize) for name in OVERLAYS}
