"""The README's own overlay (k8s/README.md, "Deploy"): read from the README, rendered against
the real gpu-8b overlay, it fills the three Secrets (placeholders gone, names kept, so every
reference still resolves) and puts everything in its namespace; the result still validates."""

import base64
import os
import re

import kubernetes_validate
import pytest
import yaml

from tests.k8s import crd_schema
from tests.k8s.manifests import K8S, every, one, pod_templates, render

pytestmark = pytest.mark.timeout(120)

README = K8S / "README.md"
MARKER = "# my-deploy/kustomization.yaml"
API_KEYS = "first-token\nsecond-token\n"
RAY_TOKEN = "0123456789abcdef0123456789abcdef"


def readme_overlay() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    [block] = [b for b in blocks if b.startswith(MARKER)]
    return block


def test_the_readme_overlay_fills_the_secrets(kustomize, tmp_path):
    overlay = yaml.safe_load(readme_overlay())
    assert overlay["resources"] == ["../pagedserve/k8s/overlays/gpu-8b"]
    overlay["resources"] = [os.path.relpath(K8S / "overlays" / "gpu-8b", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    (tmp_path / "api-keys").write_text(API_KEYS)
    (tmp_path / "ray-token.env").write_text(f"auth_token={RAY_TOKEN}\n")
    (tmp_path / "tls.crt").write_text("CERTIFICATE")
    (tmp_path / "tls.key").write_text("KEY")

    docs = render(tmp_path, kustomize)

    assert {doc["metadata"].get("namespace") for doc in docs} == {"llm"}
    secrets = {s["metadata"]["name"]: s for s in every(docs, "Secret")}
    decoded = {name: {key: base64.b64decode(value).decode()
                      for key, value in s["data"].items()} for name, s in secrets.items()}
    assert decoded == {"pagedserve-api-keys": {"api-keys": API_KEYS},
                       "pagedserve-ray-token": {"auth_token": RAY_TOKEN},
                       "pagedserve-tls": {"tls.crt": "CERTIFICATE", "tls.key": "KEY"}}
    # stringData would win over data at apply time: the empty placeholders must be gone.
    assert all("stringData" not in s for s in secrets.values())
    assert secrets["pagedserve-tls"]["type"] == "kubernetes.io/tls"
    gateway = pod_templates(docs)["gateway"]["spec"]
    assert {v["secret"]["secretName"] for v in gateway["volumes"] if "secret" in v} \
        == {"pagedserve-api-keys", "pagedserve-tls"}
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            assert crd_schema.errors(doc) == []
        else:
            kubernetes_validate.validate(doc, "1.33", strict=True)
    assert one(docs, "RayCluster")["metadata"]["namespace"] == "llm"
