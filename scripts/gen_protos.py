"""Regenerates the committed Python code of every .proto under protos/gradserve/:
gradserve/v1 (gradserve's own Trainer service) and gradserve/inference (the
vendored Open Inference Protocol, see protos/gradserve/inference/README.md),
into client/gradserve/<package>/*_pb2*.py.

    python scripts/gen_protos.py [--out DIR]

The generated code is committed; tests/test_protos.py regenerates into a
temporary directory and fails when the committed files are stale. Needs
grpcio-tools at the version the `test` extra pins: an old one on purpose.
protoc stamps its own protobuf version into every _pb2.py as the lowest
runtime it accepts (``ValidateProtobufRuntimeVersion``), and grpcio-tools
stamps its version into every _pb2_grpc.py as the lowest grpcio. Generating
with grpcio-tools 1.80.0 (protoc gencode 6.31.1) lets the code load on every
protobuf we declare (>=6.31.1,<8: a 7.x runtime accepts 6.x gencode with a
warning) and so beside tritonclient, which needs protobuf<7.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGES = ("v1", "inference")  # directories under protos/gradserve/ and client/gradserve/
GENERATOR = "1.80.0"  # grpcio-tools; keep equal to the `test` extra's pin


def proto_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (PROTO_ROOT / "gradserve" / package).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) and returns the files it wrote."""
    from importlib.metadata import version

    import grpc_tools
    from grpc_tools import protoc

    if version("grpcio-tools") != GENERATOR:
        raise SystemExit(f"grpcio-tools {version('grpcio-tools')} is installed; the committed code comes "
                         f"from {GENERATOR} (pip install grpcio-tools=={GENERATOR}), see this script's docstring")
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for package in PACKAGES for p in (out / "gradserve" / package).glob("*_pb2*.py*"))


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
