#!/usr/bin/env bash
# Here, where the package index is reachable: what the project's lent CUDA machine (`device` tool,
# KINDS.md: Python 3.12 with torch, transformers, sentence-transformers, no network) lacks for
# `gpu_check.sh`, into .device/ (git-ignored; carried by the run, 64 MiB at most):
#   wheels/  the gRPC, protobuf, TLS and HTTP front-end packages at this venv's versions, for
#            CPython 3.12 (the hostile tests serve HTTP too)
#   model/   the packaged all-MiniLM-L6-v2 with its weights in float16 (the float32 file, 91 MB,
#            is over the carry limit); run.sh restores float32 there (exact for float16 and
#            bfloat16 forward passes; for float32, a model 1e-3 away from the reference, the
#            same for server and reference alike)
# Then, with the device tool:  run(command="bash benchmarks/device/run.sh", carry=[".device"])
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .device && mkdir -p .device/wheels .device/model
version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
wheels=()
for name in grpcio grpcio-tools protobuf grpcio-health-checking grpcio-reflection cryptography cffi \
        fastapi starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api \
        uvicorn orjson; do
    wheels+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 -d .device/wheels "${wheels[@]}"
"$PY" - <<'PYTHON'
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bertstream.server.engine import default_model_path

source, target = Path(default_model_path()), Path(".device/model")
for path in source.rglob("*"):
    if path.is_file() and path.name not in ("model.safetensors", "README.md", ".gitattributes"):
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.relative_to(source))
weights = load_file(str(source / "model.safetensors"))
save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(target / "model.safetensors"),
          metadata={"format": "pt"})
PYTHON
du -sh .device .device/*
