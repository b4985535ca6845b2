"""Regenerates client/gradserve/v1/*_pb2*.py from protos/gradserve/v1/*.proto.

    python scripts/gen_protos.py [--out DIR]

The generated code is committed; tests/test_protos.py regenerates into a
temporary directory and fails when the committed files are stale. Needs
grpcio-tools (the `test` extra pins the version the committed code came from).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "gradserve" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) and returns the files it wrote."""
    from grpc_tools import protoc
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "gradserve" / "v1").glob("*_pb2*.py*"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "client",
                        help="output root (default: the client distribution's source root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
