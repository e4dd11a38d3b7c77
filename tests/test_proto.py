"""The contract as teams in other languages consume it: `buf lint` (the rules kept off are justified
in proto/buf.yaml) and `buf breaking` against the first commit's proto (there is no tagged release
yet): generated code (FILE, one deliberate exception written down in buf.yaml) and, with no
exception, the wire and JSON (WIRE_JSON). buf comes from npm, pinned in tests/node/package.json."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed here")


@pytest.fixture(scope="module")
def buf() -> str:
    if not BUF.exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=NODE_DIR, check=True, timeout=600)
    return str(BUF)


def run(buf: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([buf, *args], cwd=ROOT / "proto", capture_output=True, text=True,
                          timeout=120)


def baseline() -> str:
    """The proto of the last tagged release, else of the first commit, as a buf input."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if git("rev-parse", "--git-dir").returncode:
        pytest.skip("no git history here to compare the contract with")
    tag = git("describe", "--tags", "--abbrev=0").stdout.strip()
    ref = tag or git("rev-list", "--max-parents=0", "HEAD").stdout.split()[0]
    return f"{ROOT / '.git'}#ref={ref},subdir=proto"


def test_buf_lint(buf):
    done = run(buf, "lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_breaking_change_to_generated_code(buf):
    done = run(buf, "breaking", "--against", baseline())
    assert done.returncode == 0, done.stdout + done.stderr


def test_wire_and_json_compatible_without_exception(buf):
    done = run(buf, "breaking", "--against", baseline(),
               "--config", '{"version": "v2", "breaking": {"use": ["WIRE_JSON"]}}')
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_breaking_catches_a_breaking_change(buf, tmp_path):
    """The check can fail: renumbering a field is caught."""
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy)
    contract = copy / "bertstream" / "v1" / "embedder.proto"
    contract.write_text(contract.read_text().replace("repeated string texts = 2;",
                                                     "repeated string texts = 20;"))
    done = subprocess.run([buf, "breaking", "--against", str(ROOT / "proto")], cwd=copy,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "texts" in done.stdout
