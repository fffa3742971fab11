"""The committed stubs are exactly what protos/generate.py produces today."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    committed = ROOT / "client" / "gradgate" / "v1"
    assert fresh, "protoc produced nothing"
    assert sorted(p.name for p in fresh) == sorted(
        p.name for p in committed.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    stale = [p.name for p in fresh if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run python protos/generate.py and commit"
