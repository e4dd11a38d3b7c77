"""Build: compiles the Cython kernels in ext/ and generates the Python gRPC stubs from proto/.

Installed, everything lives under one import name:
    server/ -> bertstream.server    client/ -> bertstream.client    ext/ -> bertstream.ext
    proto/bertstream/v1/embedder.proto -> bertstream.proto.embedder_pb2{,_grpc} (+ .pyi), generated here
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO = Path("proto/bertstream/v1/embedder.proto")
GENERATED = Path("build/generated")  # relative: setuptools wants relative package_dir paths

# Every Cython directive in one place. BERTSTREAM_BOUNDSCHECK=1 turns checks on for debugging.
_checks = os.environ.get("BERTSTREAM_BOUNDSCHECK") == "1"
CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": _checks,
    "wraparound": False,
    "initializedcheck": _checks,
    "cdivision": True,
    "embedsignature": True,
}


def openmp_flags() -> list[str]:
    """-fopenmp if the C compiler takes it; otherwise build serially and say so loudly."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp.c")
        src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        probe = subprocess.run([cc, "-fopenmp", str(src), "-o", str(Path(tmp, "omp"))],
                               capture_output=True)
    if probe.returncode == 0:
        return ["-fopenmp"]
    print("*" * 72 + "\nWARNING: the C compiler has no OpenMP; bertstream.ext kernels will run on "
          "ONE thread.\n" + "*" * 72, file=sys.stderr)
    return []


def generate_stubs() -> None:
    """proto/ -> build/generated/bertstream/proto/*_pb2*.py(i).

    The include path maps the .proto to the virtual path bertstream/proto/embedder.proto, so the
    generated *_grpc module imports `bertstream.proto.embedder_pb2` without any editing.
    """
    from grpc_tools import protoc

    out = ROOT / GENERATED
    shutil.rmtree(out, ignore_errors=True)
    (out / "bertstream" / "proto").mkdir(parents=True)
    args = ["grpc_tools.protoc", f"-Ibertstream/proto={ROOT / PROTO.parent}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            f"bertstream/proto/{PROTO.name}"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    package = out / "bertstream" / "proto"
    (package / "__init__.py").write_text(textwrap.dedent('''\
        """Generated from proto/bertstream/v1/embedder.proto at build time; never edit by hand."""
        from bertstream.proto import embedder_pb2, embedder_pb2_grpc  # noqa: F401


        def labels(enum) -> dict[str, int]:
            """An enum's values by their `label` option ("mean" -> POOLING_MEAN): the names
            the client, the command line and the server use, defined once, in the .proto."""
            return {value.GetOptions().Extensions[embedder_pb2.label]: value.number
                    for value in enum.DESCRIPTOR.values
                    if value.GetOptions().HasExtension(embedder_pb2.label)}
        '''))
    shutil.copy(ROOT / PROTO, package / PROTO.name)  # shipped, for other languages' stub generators


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


if not (ROOT / GENERATED / "bertstream" / "proto").exists():
    generate_stubs()  # package discovery below needs the folder to exist

omp = openmp_flags()
extensions = [
    Extension(
        "bertstream.ext._kernels",
        ["ext/_kernels.pyx"],
        extra_compile_args=["-O3", *omp],
        extra_link_args=omp,
    )
]

setup(
    packages=["bertstream.server", "bertstream.client", "bertstream.ext", "bertstream.proto"],
    package_dir={
        "bertstream.server": "server",
        "bertstream.client": "client",
        "bertstream.ext": "ext",
        "bertstream.proto": str(GENERATED / "bertstream" / "proto"),
    },
    package_data={"bertstream.proto": ["*.pyi", "*.proto"]},
    ext_modules=cythonize(extensions, compiler_directives=CYTHON_DIRECTIVES),
    cmdclass={"build_py": BuildPyWithStubs},
)
