"""The committed generated code matches the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "protos" / "govshare" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "govshare" / "v1").glob("*_pb2*")}
    committed = {p.name: p.read_bytes() for p in GENERATED.glob("*_pb2*")}
    assert fresh, "the generator wrote nothing"
    assert sorted(fresh) == sorted(committed), "generated files differ from the committed set"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"stale generated code, run 'make protos': {stale}"


def test_every_proto_has_generated_code() -> None:
    for proto in GENERATED.glob("*.proto"):
        assert (GENERATED / f"{proto.stem}_pb2.py").exists(), proto.name
        assert (GENERATED / f"{proto.stem}_pb2_grpc.pyi").exists(), proto.name
