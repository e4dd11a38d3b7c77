#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA machine, in one go; writes gpu-check/ (logs and
# tables to paste into BENCHMARKS.md). CPU machines and CI never run it.
#   1. the test suite with every test server on cuda (BERTSTREAM_TEST_DEVICE);
#   2. the throughput table on cuda, float16 and bfloat16;
#   3. pooling on the device against copying hidden states to the host for the kernels, and
#      achieved TFLOPS for all-MiniLM-L6-v2 and a BERT-base-sized random model, with a pass's
#      fixed cost (what settles FREE_PADDING_FLOPS_BY_DEVICE), float16 and bfloat16;
#   4. the host path with a stand-in forward pass, cut as on a GPU (this machine's CPU).
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
HF_HUB_OFFLINE=1 BERTSTREAM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.txt" || status=1
for dtype in float16 bfloat16; do
    HF_HUB_OFFLINE=1 "$PY" -m benchmarks.probes.gpu_pooling --dtype "$dtype" 2>&1 \
        | tee "$OUT/pooling-$dtype.txt" || status=1
    # achieved TFLOPS, MiniLM and a BERT-base-sized model; a pass's fixed cost (free padding)
    HF_HUB_OFFLINE=1 "$PY" -m benchmarks.gpu_flops --dtype "$dtype" 2>&1 \
        | tee "$OUT/flops-$dtype.txt" || status=1
done
HF_HUB_OFFLINE=1 "$PY" -m benchmarks.bench_throughput --device cuda --texts "${TEXTS:-3000}" \
    --long-texts 0 --rounds "${ROUNDS:-3}" 2>&1 | tee "$OUT/throughput.txt" || status=1
HF_HUB_OFFLINE=1 "$PY" -m benchmarks.host_path --texts "${TEXTS:-3000}" --gpu \
    2>&1 | tee "$OUT/host-path.txt" || status=1
exit $status
