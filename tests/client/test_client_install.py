"""The SDK wheel alone: built from this checkout, installed in a fresh venv with only grpcio and
protobuf, it imports without torch/transformers/ray/numpy and talks to the fake gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 150.0
HEAVY = ("torch", "transformers", "ray", "numpy")

CHECK = """
import importlib.metadata, importlib.util, json, sys
import pagedserve, pagedserve.client
from pagedserve.client import Client
c = Client('127.0.0.1:1')
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
assert not heavy, heavy
assert getattr(pagedserve, '__file__', None) is None, 'pagedserve should be a namespace package'
assert importlib.util.find_spec('pagedserve.llm') is None, 'the engine must not be installed'
with Client({address!r}) as client:
    result = client.generate('hi', temperature=0, max_tokens=4)
    events = list(client.generate_stream('hi'))
print(json.dumps(dict(
    version=importlib.metadata.version('pagedserve-client'),
    location=list(pagedserve.__path__),
    text=result.outputs[0].text,
    finish=events[-1].finish_reasons,
)))
"""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def run(self, *args, **kwargs) -> subprocess.CompletedProcess:
        left = self.deadline - time.monotonic()
        if left <= 1:
            pytest.fail(f"the install test ran past its {BUDGET_S:.0f} s budget")
        return subprocess.run(args, capture_output=True, text=True, timeout=left, **kwargs)


def build_wheel(budget: Budget, out: Path) -> Path:
    """pip wheel, without build isolation (this venv has setuptools; no index needed)."""
    done = budget.run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "-q", str(ROOT / "clients" / "python"), "-w", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("pagedserve_client-*.whl")
    return wheel


def test_client_imports_no_heavy_module():
    code = ("import sys, pagedserve.client; pagedserve.client.Client('127.0.0.1:1'); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_wheel_contents(tmp_path):
    wheel = build_wheel(Budget(BUDGET_S), tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("pagedserve/errors.py", "pagedserve/client/__init__.py",
                     "pagedserve/client/sync_client.py", "pagedserve/client/async_client.py",
                     "pagedserve/protos/__init__.py", "pagedserve/protos/v1/__init__.py",
                     "pagedserve/protos/v1/generation_pb2.py",
                     "pagedserve/protos/v1/generation_pb2_grpc.py"):
        assert required in names, required
    shipped = {n.split("/")[1] for n in names if n.startswith("pagedserve/")}
    assert shipped == {"client", "protos", "errors.py"}, shipped  # no __init__.py, no engine
    version = metadata.version("pagedserve")
    assert wheel.name.startswith(f"pagedserve_client-{version}-")
    meta = zipfile.ZipFile(wheel).read(
        f"pagedserve_client-{version}.dist-info/METADATA").decode()
    requires = sorted(line.split(": ", 1)[1] for line in meta.splitlines()
                      if line.startswith("Requires-Dist:"))
    assert requires == ["grpcio>=1.84.0", "protobuf>=7.35.1"]


@pytest.mark.slow
@pytest.mark.timeout(int(BUDGET_S) + 30)
def test_sdk_installs_alone(tmp_path, server):
    budget = Budget(BUDGET_S)
    wheel = build_wheel(budget, tmp_path / "dist")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    pins = [f"grpcio=={metadata.version('grpcio')}", f"protobuf=={metadata.version('protobuf')}"]
    tries = []
    for dependencies in (pins, ["grpcio>=1.84.0", "protobuf>=7.35.1"]):
        done = budget.run(python, "-m", "pip", "install", "-q", str(wheel), *dependencies,
                          cwd=tmp_path)
        tries.append(done.stderr[-1500:])
        if done.returncode == 0:
            break
    else:
        pytest.skip("no package index or cached wheels could provide grpcio/protobuf: "
                    + " | ".join(tries))
    listed = budget.run(python, "-m", "pip", "list", "--format=json", cwd=tmp_path)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "pagedserve-client" in installed and "pagedserve" not in installed
    assert not installed & set(HEAVY), installed
    # -I: isolated (no cwd, no PYTHONPATH, no user site): only the venv's packages are seen.
    done = budget.run(python, "-I", "-c", CHECK.format(heavy=HEAVY, address=server.address),
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["version"] == metadata.version("pagedserve")
    assert all(str(env_dir) in p for p in report["location"]), report
    assert report["text"] == "Hello" and report["finish"] == ["stop", "length"]
