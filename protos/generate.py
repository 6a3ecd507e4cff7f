"""Generate govshare's protobuf and gRPC code and typing stubs from protos/govshare/v1/*.proto.

    python protos/generate.py            # regenerate in place
    python protos/generate.py --out DIR  # write to DIR (the staleness test compares)

The generated modules import each other as ``govshare.v1.*``, which setuptools maps to
``protos/govshare/v1``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
SOURCE = PROTOS / "govshare" / "v1"


def generate(out: Path) -> list[Path]:
    """Write generated files for every .proto into ``out/govshare/v1`` and return them."""
    protos = sorted(SOURCE.glob("*.proto"))
    plugin_dir = Path(sys.executable).parent
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTOS)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "govshare" / "v1").glob("*_pb2*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="write here instead of in place")
    options = parser.parse_args()
    if options.out:
        generate(options.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, SOURCE / path.name)


if __name__ == "__main__":
    main()
