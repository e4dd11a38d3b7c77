#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA machine, in one go; writes gpu-check/ (logs and
# tables to paste into BENCHMARKS.md). CPU machines and CI never run it.
#   1. pooling on the device against copying hidden states to the host for the kernels (what
#      settles POOL_ON_DEVICE), and achieved TFLOPS for all-MiniLM-L6-v2 and a BERT-base-sized
#      random model, with a pass's fixed cost (what settles FREE_PADDING_FLOPS_BY_DEVICE),
#      float16 and bfloat16;
#   2. the throughput table on cuda, float16 and bfloat16;
#   3. the test suite with every test server on cuda (BERTSTREAM_TEST_DEVICE; PYTEST_ARGS
#      narrows it);
#   4. the host path with a stand-in forward pass, cut as on a GPU (this machine's CPU;
#      SKIP_HOST_PATH=1 leaves it out).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-gpu-check}
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu-check: torch sees no CUDA device (a CPU build of torch, or no GPU): nothing run" >&2
    exit 2
fi
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/device.txt" 2>&1
status=0
# Each step under its own time limit (a lent machine's command runs 10 minutes at most): the
# short measurements first, the test suite last, so a cut run still brings the figures back.
step() {  # step SECONDS LOG COMMAND...: run it, its output also into $OUT/LOG; a failure marks status
    local limit=$1 log=$2
    shift 2
    HF_HUB_OFFLINE=1 timeout "$limit" "$@" 2>&1 | tee "$OUT/$log" || status=1
}
for dtype in float16 bfloat16; do
    # pooling on the device against the kernels on the host (settles limits.POOL_ON_DEVICE)
    step 120 "pooling-$dtype.txt" "$PY" -m benchmarks.probes.gpu_pooling --dtype "$dtype"
    # achieved TFLOPS, MiniLM and a BERT-base-sized model; a pass's fixed cost (free padding)
    step 150 "flops-$dtype.txt" "$PY" -m benchmarks.gpu_flops --dtype "$dtype"
done
step 240 throughput.txt "$PY" -m benchmarks.bench_throughput --device cuda \
    --texts "${TEXTS:-3000}" --long-texts 0 --rounds "${ROUNDS:-3}"
BERTSTREAM_TEST_DEVICE=cuda step "${TESTS_S:-420}" tests.txt "$PY" -m pytest -q \
    -p no:cacheprovider ${PYTEST_ARGS:-}
if [ -z "${SKIP_HOST_PATH:-}" ]; then  # this machine's CPU only: no device time needed
    step 120 host-path.txt "$PY" -m benchmarks.host_path --texts "${TEXTS:-3000}" --gpu
fi
exit $status
