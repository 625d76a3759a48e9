"""Generate the Python stubs for protos/ into clients/python/healthagent/v1.

Usage: python clients/python/generate_stubs.py [--check]

With --check, generates into a temporary directory and exits 1 if the committed stubs differ,
so a test (and CI) can prove that the stubs match protos/.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python"
PACKAGE_DIR = Path("healthagent") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) for every proto file; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.glob("healthagent/**/*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(
        p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def check() -> list[str]:
    """Return the names of generated files that differ from (or are missing in) the tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed_dir = OUT_ROOT / PACKAGE_DIR
        stale = [
            f.name
            for f in fresh
            if not (committed_dir / f.name).exists()
            or not filecmp.cmp(f, committed_dir / f.name, shallow=False)
        ]
        fresh_names = {f.name for f in fresh}
        stale += [
            p.name
            for p in committed_dir.iterdir()
            if p.name.endswith(GENERATED_SUFFIXES) and p.name not in fresh_names
        ]
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    options = parser.parse_args()
    if options.check:
        stale = check()
        if stale:
            print("stale generated stubs: " + ", ".join(stale), file=sys.stderr)
            print("run: python clients/python/generate_stubs.py", file=sys.stderr)
            return 1
        print("generated stubs match protos/")
        return 0
    for path in generate(OUT_ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
