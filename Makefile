# Tessera: `make demo` and `make test` set everything up on a fresh machine, then run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
TORCH_CPU_VERSION ?= 2.13.0
# Where a CPU-only box gets that torch wheel: empty = pip's default index (PyPI). Without a local CPU
# wheel set it to PyTorch's CPU index, e.g. make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (GPU installs ignore it).
TORCH_INDEX_URL ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CEPH_PACKAGES := radosgw ceph-mon ceph-osd
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/tessera-torch-extensions

.PHONY: install system-deps demo test lint bench clean

install: $(STAMP)

# torch first: on a CPU-only box take the pinned CPU wheel, or deepspeed's dependency on torch pulls a
# multi-GB CUDA build. With a GPU (nvidia-smi present) pip resolves the CUDA torch as usual.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==$(TORCH_CPU_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); fi; fi
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps -c constraints.txt "DALL-E>=0.1,<0.2"  # pyproject's test-openai, no deps
	$(PY) -m cluster.environment  # DeepSpeed's CPU comm op, built once into TORCH_EXTENSIONS_DIR
	touch $(STAMP)

# Debian's Ceph packages give the tests a real S3 server (RADOS Gateway).
system-deps:
	@if ! command -v radosgw >/dev/null || ! command -v ceph-mon >/dev/null || ! command -v ceph-osd >/dev/null; then \
	  echo "installing $(CEPH_PACKAGES) (apt)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(CEPH_PACKAGES) >/dev/null; fi

demo: install
	$(VENV)/bin/tessera demo

test: install system-deps
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
