"""Build hooks: cythonize the kernel and generate the protobuf/gRPC stubs.

Both run at build time (``pip install .`` or ``pip install -e .``); their outputs are
generated files, ignored by git and never edited by hand.
"""
from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent


def generate_stubs() -> None:
    """proto/**/*.proto -> top-level package ``reimburse`` (``reimburse/v1/*_pb2.py``, .pyi)."""
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    if not protos:
        return
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))
    for d in {(ROOT / p).parent for p in protos}:  # make every generated folder a package
        while d != ROOT:
            (d / "__init__.py").touch()
            d = d.parent


def extensions() -> list:
    pyx = ROOT / "engine" / "_kernel.pyx"
    if not pyx.exists():
        return []
    from Cython.Build import cythonize

    debug = os.environ.get("REIMBURSE_KERNEL_DEBUG") == "1"
    flags = ["-O3"] if not debug else ["-O0", "-g"]
    ext = [Extension("engine._kernel", ["engine/_kernel.pyx"], extra_compile_args=flags)]
    if (ROOT / "server" / "_wire.pyx").exists():   # the batch RPCs' codec (server.batch)
        ext.append(Extension("server._wire", ["server/_wire.pyx"], extra_compile_args=flags))
    if (ROOT / "server" / "_single.pyx").exists():   # the single-claim PreSettle's codec
        ext.append(Extension("server._single", ["server/_single.pyx"], extra_compile_args=flags))
    if (ROOT / "server" / "_logline.pyx").exists():   # the log line's JSON text
        ext.append(Extension("server._logline", ["server/_logline.pyx"],
                             extra_compile_args=flags))
    if (ROOT / "server" / "ledger" / "_journal.pyx").exists():   # a batch's journal rows
        ext.append(Extension("server.ledger._journal", ["server/ledger/_journal.pyx"],
                             extra_compile_args=flags))
    return cythonize(ext, language_level=3, include_path=[str(ROOT)],
                     compiler_directives={"boundscheck": debug, "wraparound": False,
                                          "cdivision": True, "initializedcheck": debug,
                                          "linetrace": debug})


generate_stubs()
setup(ext_modules=extensions())
