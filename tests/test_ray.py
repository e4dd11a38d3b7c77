"""bertstream.client.ray against a local Ray instance and two real server replicas (of
all-MiniLM-L6-v2 itself: on a model a sixth as costly, a kill would less often find work left).

300 corpus paragraphs as Parquet shards: every row once, in input order, with its id, equal to
Client.embed within 1e-5; still every row once and exact by id when a Ray actor dies mid-run and
when a replica is killed with SIGKILL mid-run (that replica stays dead for the tests after it).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ray
import ray.data

from bertstream.client import Client
from bertstream.client.ray import embed
from tests.conftest import serve_processes
from tests.corpus import stdlib_paragraphs

ROWS, SHARDS = 300, 6


@pytest.fixture(scope="module")
def replicas():
    servers = serve_processes(2, "--threads", "1", "--log-level", "WARNING")
    yield servers
    for process, _ in servers:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's debug lines drown a failure
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """ROWS paragraphs with ids, as SHARDS Parquet files; the texts in id order."""
    texts = list(stdlib_paragraphs()[:ROWS])
    folder = tmp_path_factory.mktemp("paragraphs")
    per = ROWS // SHARDS
    for shard in range(SHARDS):
        rows = range(shard * per, (shard + 1) * per)
        pq.write_table(pa.table({"id": pa.array(rows, pa.int64()),
                                 "text": [texts[i] for i in rows]}),
                       folder / f"part-{shard:03}.parquet")
    return folder, texts


@pytest.fixture(scope="module")
def reference(replicas, shards):
    """Client.embed on the same texts, the model's default embedding (over both replicas)."""
    _, texts = shards
    with Client([target for _, target in replicas], timeout=300) as client:
        return np.concatenate(list(client.stream(texts, batch_size=250, window=4)))


def read(shards, rows: int | None = None):
    folder, _ = shards
    dataset = ray.data.read_parquet(str(folder), override_num_blocks=SHARDS)
    return dataset.limit(rows) if rows else dataset


def run_killing(dataset, out: Path, kill) -> None:
    """Writes `dataset` to Parquet in `out`; calls kill() once the first output file is there
    and asserts that the job was still running then."""
    failures = []

    def write():
        try:
            dataset.write_parquet(str(out))
        except Exception as error:  # noqa: BLE001 - re-raised on the test's thread
            failures.append(error)

    job = threading.Thread(target=write)
    job.start()
    while job.is_alive() and not (out.exists() and any(out.iterdir())):
        time.sleep(0.02)
    assert job.is_alive(), "the job ended before anything could be killed"
    kill()
    job.join(timeout=600)
    assert not job.is_alive() and not failures, failures


def check_exact(out: Path, reference: np.ndarray, rows: int = ROWS) -> None:
    """Every row once, with its id, and its vector equal to the reference's for that id. Not
    the order: after an actor dies or a task is retried, Ray may emit batches out of order
    (seen here; Ray guarantees no order for actor pools, ray-project/ray#64883)."""
    table = pq.read_table(out)
    ids = table.column("id").to_numpy()
    assert len(ids) == rows and np.array_equal(np.sort(ids), np.arange(rows)), \
        "rows missing or doubled"
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(rows, -1)
    assert np.abs(vectors - reference[ids]).max() <= 1e-5


def test_every_embedding_option_reaches_the_servers(replicas, local_ray, shards):
    """Three stages in one pipeline, each with other options, against Client on the same texts
    (an actor each: six would not fit in the two CPUs beside the read tasks); the first
    tokenizes in its actor (tokenize_locally)."""
    targets = [target for _, target in replicas]
    texts = shards[1][:60]
    options = dict(prompt="query: ", dimensions=128, normalize=True)
    pipeline = embed(read(shards, 60), targets, concurrency=1, tokenize_locally=True, **options)
    pipeline = embed(pipeline, targets, concurrency=1, dtype="int8", output_column="q")
    pipeline = embed(pipeline, targets, concurrency=1, pooling="none", layers=[-2],
                     output_column="tokens")
    table = pa.concat_tables(ray.get(pipeline.to_arrow_refs()))
    assert table.column("id").to_pylist() == list(range(60))
    with Client(targets[0], timeout=120) as client:
        assert table.column("embedding").type == pa.list_(pa.float32(), 128)
        got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        assert np.abs(got - client.embed(texts, **options)).max() <= 1e-5

        q = np.stack(table.column("q").to_numpy(zero_copy_only=False))
        assert q.dtype == np.int8
        scales = table.column("q_scale").to_numpy()
        expected = client.embed(texts, dtype="int8")
        # float noise of another batch composition may round a value to the next step
        assert np.all(np.abs(q.astype(int) - expected.q) <= 1)
        assert np.abs(scales - expected.scales).max() <= 1e-5 * scales.max()

        expected = client.embed_tokens(texts, layers=[-2])
        for row, want in zip(table.column("tokens").to_pylist(), expected):
            assert np.abs(np.array(row, dtype=np.float32) - want).max() <= 1e-5


def ray_actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"_Embedder" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_exact_when_a_ray_actor_dies_mid_run(replicas, local_ray, shards, reference, tmp_path):
    """Ray restarts the actor and runs its batches again; the output is still every row once."""
    targets = [target for _, target in replicas]
    killed = []

    def kill_an_actor():
        pids = ray_actor_pids()
        assert pids, "no embedding actor found"
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    run_killing(embed(read(shards, 200), targets, batch_size=25), tmp_path / "out",
                kill_an_actor)
    assert killed[0] not in ray_actor_pids()
    check_exact(tmp_path / "out", reference, 200)


def test_exact_when_a_replica_is_killed_mid_run(replicas, local_ray, shards, reference, tmp_path):
    (doomed, doomed_target), (_, survivor) = replicas
    run_killing(embed(read(shards), [doomed_target, survivor], batch_size=25),
                tmp_path / "out", lambda: doomed.send_signal(signal.SIGKILL))
    assert doomed.wait(timeout=10) == -signal.SIGKILL
    with Client(doomed_target, timeout=2) as client, pytest.raises(grpc.RpcError):
        client.info()  # it really is gone: the rest of the run went to the survivor
    check_exact(tmp_path / "out", reference)


def test_the_readme_example_runs_as_written(replicas, local_ray, shards, tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Beyond one machine"):readme.index("## How it works")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    folder, texts = shards
    (tmp_path / "paragraphs").mkdir()  # one shard, 500 rows
    (tmp_path / "paragraphs" / "part-000.parquet").write_bytes(
        (folder / "part-000.parquet").read_bytes())
    code = code.replace("ray.init()", "pass").replace('["127.0.0.1:50051"]', repr(replicas[1][1]))
    code = code.replace("s3://corpus/", f"{tmp_path}/")
    exec(compile(code, "README.md", "exec"), {})
    table = pq.read_table(tmp_path / "vectors")
    assert table.column_names == ["id", "text", "embedding"]
    assert table.column("id").to_pylist() == list(range(ROWS // SHARDS))
    assert table.column("text").to_pylist() == texts[:ROWS // SHARDS]


# Last in the module: after a pipeline failed, the next one's first output came about 15 s
# later than without it (Ray seems to hold on to the failed pipeline's actors a while).


def test_a_bad_option_or_text_stops_the_job_with_the_servers_message(replicas, local_ray,
                                                                      shards):
    targets = [replicas[1][1]]  # the replica still alive
    with pytest.raises(TypeError):
        embed(read(shards), targets, polling="mean")  # a typo fails before any work starts
    too_long = ray.data.from_items([{"id": 0, "text": "word " * 5_000}])
    with pytest.raises(Exception, match="INVALID_ARGUMENT|tokens"):
        embed(too_long, targets, truncate=False).materialize()
    nulls = ray.data.from_arrow(pa.table({"id": [0, 1], "text": ["fine", None]}))
    with pytest.raises(Exception, match="1 null texts"):
        embed(nulls, targets).materialize()


def test_a_passing_failure_is_retried_by_ray_then_given_up(local_ray):
    """A fleet that answers UNAVAILABLE: a TransientEmbedError, which Ray runs again (the count
    in the message shows the second try), until task_retries tries in a row failed. The fleet
    here is one server going down that tells gRPC not to retry (grpc-retry-pushback-ms -1): the
    client's own resends then take milliseconds, where a port nobody listens on costs each batch
    7 s of gRPC's reconnect backoff (the same path, only slower)."""
    from concurrent import futures

    from bertstream.proto import embedder_pb2_grpc as pb_grpc

    class GoingDown(pb_grpc.EmbedderServicer):
        def Embed(self, request, context):
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is going down")

    down = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_EmbedderServicer_to_server(GoingDown(), down)
    port = down.add_insecure_port("127.0.0.1:0")
    down.start()
    texts = ray.data.from_items([{"id": 0, "text": "nobody answers"}])
    try:
        with pytest.raises(Exception, match="2 batches in a row failed, the last with "
                                            "UNAVAILABLE: the server is going down"):
            embed(texts, [f"127.0.0.1:{port}"], concurrency=1, task_retries=1).materialize()
    finally:
        down.stop(0)
