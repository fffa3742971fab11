"""Regenerate the committed Python stubs: python protos/generate.py [OUT_DIR].

OUT_DIR defaults to client/ (stubs land in client/gradgate/v1/). The stub
freshness test calls generate() into a temp dir and byte-compares.
"""
from __future__ import annotations

import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent


def generate(out_dir: Path = ROOT / "client") -> list[Path]:
    """Run protoc on every protos/gradgate/v1/*.proto; return the written files."""
    from grpc_tools import protoc  # build-time only dependency

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "gradgate" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    out = str(out_dir)
    rc = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", *sources])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    stubs = Path(out_dir) / "gradgate" / "v1"
    return sorted(p for p in stubs.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client"):
        print(path)
