"""The installed distribution: one import name, generated stubs, compiled kernels."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import bertstream.ext
import bertstream.proto


def test_everything_installs_under_bertstream(tmp_path):
    """One import name: the distribution's only top-level name is `bertstream`, and outside the
    checkout no `server`, `client`, `ext` or `proto` module can be imported."""
    assert metadata.distribution("bertstream").read_text("top_level.txt").split() == ["bertstream"]
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; "
         "print([n for n in ('server', 'client', 'ext', 'proto') if u.find_spec(n)])"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    stubs = Path(bertstream.proto.__file__).parent
    for generated in ("embedder_pb2.py", "embedder_pb2.pyi", "embedder_pb2_grpc.py",
                      "embedder.proto"):  # the .proto ships too, for other languages' stubs
        assert (stubs / generated).is_file(), generated


def test_generated_modules_import_as_bertstream_proto():
    assert bertstream.proto.embedder_pb2.DESCRIPTOR.package == "bertstream.v1"
    service = bertstream.proto.embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]
    assert [m.name for m in service.methods] == ["Embed", "EmbedStream", "Tokenize", "Info",
                                                 "GetTokenizer", "ListModels", "Rerank",
                                                 "RerankStream", "Classify", "EmbedSparse",
                                                 "EmbedSparseStream"]
    assert bertstream.ext._kernels.__file__.endswith(".so")


def test_every_enum_value_has_its_label():
    """The names the client, the command line and the server use come from the .proto's
    `label` options: every value but UNSPECIFIED has one, and no two of an enum share one."""
    pb = bertstream.proto.embedder_pb2
    for enum in (pb.Pooling, pb.LayerCombine, pb.DType, pb.Priority):
        labels = bertstream.proto.labels(enum)
        assert sorted(labels.values()) == [v.number for v in enum.DESCRIPTOR.values if v.number]
    assert bertstream.proto.labels(pb.Pooling)["weightedmean"] == pb.POOLING_WEIGHTED_MEAN
