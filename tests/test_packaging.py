"""The installed distribution: one import name, generated stubs, compiled kernels."""

from importlib import metadata
from pathlib import Path

import bertstream.ext
import bertstream.proto


def installed_files() -> list[str]:
    """The RECORD of the distribution in the site-packages the package imports from (not the
    egg-info a build leaves in the source tree)."""
    site_packages = Path(bertstream.ext.__file__).parents[2]
    [dist] = [d for d in metadata.distributions(path=[str(site_packages)])
              if d.metadata["Name"] == "bertstream"]
    return [str(f) for f in dist.files]


def test_everything_installs_under_bertstream():
    files = installed_files()
    top_level = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert top_level == {"bertstream", f"bertstream-{metadata.version('bertstream')}.dist-info"}
    for generated in ("bertstream/proto/embedder_pb2.py", "bertstream/proto/embedder_pb2.pyi",
                      "bertstream/proto/embedder_pb2_grpc.py", "bertstream/proto/embedder.proto"):
        assert generated in files
    assert any(f.startswith("bertstream/ext/_kernels") and f.endswith(".so") for f in files)


def test_generated_modules_import_as_bertstream_proto():
    assert bertstream.proto.embedder_pb2.DESCRIPTOR.package == "bertstream.v1"
    service = bertstream.proto.embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]
    assert [m.name for m in service.methods] == ["Embed", "EmbedStream", "Tokenize", "Info"]
    assert bertstream.ext._kernels.__file__.endswith(".so")
