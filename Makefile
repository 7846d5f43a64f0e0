# Two set-up commands on a fresh machine: `make serve` and `make test`. Each creates .venv and
# installs what it needs. EXTRA=gpu selects faiss-gpu/onnxruntime-gpu instead of the cpu extra.
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install install-dev serve test lint data bench docker-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so the project's torch range never pulls a multi-GB CUDA build here.
$(VENV)/.installed-$(EXTRA): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRA),serve]"
	touch $@

# torchattacks (test-only cross-check of our PGD/APGD) without its torchvision dependency, which does
# not import beside torch 2.13; it needs only torch, numpy and scipy.
$(VENV)/.installed-dev: $(VENV)/.installed-$(EXTRA)
	$(BIN)/pip install -q -e ".[$(EXTRA),serve,train,ray,dev]"
	$(BIN)/pip install -q --no-deps "torchattacks==3.5.1"
	touch $@

install: $(VENV)/.installed-$(EXTRA)
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/satml-serve

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# the code is wrapped by hand at 120 columns (ruff check enforces the width and import order); `ruff format` would
# rewrap 135 files, so it is not part of lint
lint: install-dev
	$(BIN)/ruff check . && $(BIN)/mypy

# Materialise CIFAR-10 from ../shared/data/cifar10 into data/ (official python layout).
data:
	$(BIN)/python ../shared/data/cifar10/materialize.py data

# Serving benchmark (needs wrk: apt-get install -y wrk); results in benchmarks/results/.
bench: install-dev
	$(BIN)/python benchmarks/serve_bench.py $(BENCH_ARGS)

# Build the cpu image and run it with compose (Docker engine via docker/local/ on Debian machines).
docker-test: install-dev
	bash docker/local/install-tools.sh
	$(BIN)/python -m pytest -m docker -s tests/docker
