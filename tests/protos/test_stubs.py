"""The checked-in stubs are what protos/ generates, and they import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "pagedserve" / "protos" / "v1"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools (the dev extra) is not installed")
def test_checked_in_stubs_equal_a_fresh_generation(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
                   check=True)
    fresh = tmp_path / "pagedserve" / "protos" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in STUBS.iterdir() if p.name != "__init__.py"
                           and p.name != "__pycache__")
    for name in names:
        assert (fresh / name).read_text() == (STUBS / name).read_text(), name


def test_stubs_import_and_declare_the_services():
    from pagedserve.protos.v1 import coordinator_pb2_grpc, generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "pagedserve.v1"
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert [m.name for m in service.methods] == [
        "Generate", "GenerateStream", "Abort", "Tokenize", "Detokenize", "GetModelInfo",
        "GetServerLoad", "GetServerStatus"]
    assert hasattr(generation_pb2_grpc, "GenerationStub")
    assert hasattr(coordinator_pb2_grpc, "CoordinatorStub")
