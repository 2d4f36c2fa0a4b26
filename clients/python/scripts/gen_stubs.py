#!/usr/bin/env python3
"""Generates credbroker/v1/credbroker_pb2.py and .pyi from the repository's
proto/ with grpcio-tools (no system protoc), or with --check verifies that
the committed ones match what proto/ generates today (CI runs this).

The generator is pinned (GENERATOR, installed from PyPI into a cache folder,
never into the caller's environment) so every machine generates the same
bytes, and old enough that the stubs run on protobuf 6.31 and 7.x alike.
"""

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

GENERATOR = ("grpcio-tools==1.75.1", "protobuf==6.31.1")

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))
PACKAGE = os.path.normpath(os.path.join(HERE, "..", "src", "credbroker", "v1"))
FILES = ("credbroker_pb2.py", "credbroker_pb2.pyi")


def generator() -> str:
    """A folder holding the pinned grpcio-tools (installed once)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    where = os.path.join(cache, "credbroker-stubgen", "-".join(GENERATOR))
    if not os.path.exists(os.path.join(where, "grpc_tools")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                where,
                *GENERATOR,
            ],
            check=True,
        )
    return where


def generate(out: str) -> None:
    where = generator()
    well_known = os.path.join(where, "grpc_tools", "_proto")
    env = dict(os.environ, PYTHONPATH=where)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            os.path.join(PROTO_ROOT, "credbroker", "v1", "credbroker.proto"),
        ],
        check=True,
        env=env,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        made = os.path.join(tmp, "credbroker", "v1")
        if args.check:
            stale = [
                f
                for f in FILES
                if not filecmp.cmp(os.path.join(made, f), os.path.join(PACKAGE, f), shallow=False)
            ]
            if stale:
                print(
                    f"{', '.join(stale)} no longer match proto/: run python3 clients/python/scripts/gen_stubs.py",
                    file=sys.stderr,
                )
                return 1
            print("the committed stubs match proto/")
            return 0
        for f in FILES:
            shutil.copyfile(os.path.join(made, f), os.path.join(PACKAGE, f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
