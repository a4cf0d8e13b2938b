"""Regenerate the checked-in stubs under pagedserve/protos/v1/ from the .proto files here.

    python protos/generate.py [OUTPUT_ROOT]

Needs grpcio-tools 1.84.0 exactly (the dev extra pins it): stubs from a newer generator refuse
the grpcio 1.84.0 of the GPU image at import.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = sorted(PROTO_ROOT.glob("pagedserve/protos/v1/*.proto"))


def generate(output_root: Path) -> None:
    from grpc_tools import protoc

    output_root.mkdir(parents=True, exist_ok=True)
    arguments = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={output_root}",
                 f"--pyi_out={output_root}", f"--grpc_python_out={output_root}",
                 *map(str, SOURCES)]
    if protoc.main(arguments) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent)
