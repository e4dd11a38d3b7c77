"""A real second-language client: Node.js (@grpc/grpc-js + @grpc/proto-loader) from the .proto."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

NODE_DIR = Path(__file__).parent / "node"
PROTO = Path(__file__).parents[1] / "proto" / "bertstream" / "v1" / "embedder.proto"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="Node.js (node and npm) is not installed here")


@pytest.fixture(scope="module")
def node_client():
    """npm-installs the two gRPC packages (pinned in tests/node/package.json) once."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=NODE_DIR, check=True, timeout=600, capture_output=True)
    return NODE_DIR / "embed_client.js"


def test_node_client_agrees_with_python_client(server, client, node_client):
    texts = ["This is a sample sentence.", "Ünïcödé and emoji 🚀 travel as UTF-8.", "Hi"]
    run = subprocess.run(["node", str(node_client), server.target, str(PROTO), json.dumps(texts)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    # Unary asks for masked mean and normalize explicitly, the stream leaves both to the model:
    # all-MiniLM-L6-v2's own pipeline is exactly that.
    expected = client.embed(texts)
    np.testing.assert_allclose(np.array(result["unary"], dtype=np.float32), expected, atol=1e-5)
    assert [r["request_id"] for r in result["stream"]] == [f"node-{i}" for i in range(3)]
    streamed = np.array([r["vectors"][0] for r in result["stream"]], dtype=np.float32)
    np.testing.assert_allclose(streamed, expected, atol=1e-4)
