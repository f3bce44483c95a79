# Two entry points: `make demo` and `make test`. Both create or reuse .venv, install the pinned
# CPU torch FIRST (an unpinned torch would pull several GB of CUDA wheels), install ddkit with its
# test extras, fetch the data they need, and run. Every step is a file target, so a second run
# reuses what is there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DDKIT := $(PY) -m ddkit
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.ddkit-installed
DATA_ROOT := $(or $(DDKIT_DATA),$(HOME)/.cache/ddkit)
DEMO := runs/demo
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test setup data clean-demo

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -e '.[test]'
	touch $(STAMP)

# A fresh machine may lack apt's package lists; refresh them once (as root) and retry.
$(DATA_ROOT)/%/.fetched: | $(STAMP)
	$(DDKIT) data fetch $* --quiet || { [ "$*" = fashion-mnist ] && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && $(DDKIT) data fetch $* --quiet; }
	touch $@

data: $(DATA_ROOT)/fashion-mnist/.fetched $(DATA_ROOT)/mnist/.fetched

# The demo: DM at the quick tier on Fashion-MNIST IPC 10, next to the random real subset of the same
# size, both judged by the quick hard-label protocol (one run). Where a C++ compiler is found, the
# networks run through torch.compile (--compile: the same computation, about 1.5x faster per step).
COMPILE := $(shell command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || \
             command -v clang++ >/dev/null 2>&1 && echo --compile)
$(DEMO)/random-fmnist-ipc10/manifest.json: | $(DATA_ROOT)/fashion-mnist/.fetched
	$(DDKIT) baseline random --dataset fashion-mnist --ipc 10 --out $(DEMO)/random-fmnist-ipc10

$(DEMO)/dm-fmnist-ipc10/manifest.json: | $(DATA_ROOT)/fashion-mnist/.fetched
	$(DDKIT) distill dm --dataset fashion-mnist --ipc 10 --preset quick --out $(DEMO)/dm-fmnist-ipc10 $(COMPILE)

demo: $(DEMO)/random-fmnist-ipc10/manifest.json $(DEMO)/dm-fmnist-ipc10/manifest.json
	@echo "== random real subset, 10 images per class =="
	@$(DDKIT) eval $(DEMO)/random-fmnist-ipc10 --protocol hard --preset quick --runs 1 --reuse $(COMPILE)
	@echo "== DM, 10 synthetic images per class =="
	@$(DDKIT) eval $(DEMO)/dm-fmnist-ipc10 --protocol hard --preset quick --runs 1 --reuse $(COMPILE)
	@echo "images: $(DEMO)/dm-fmnist-ipc10/grid.png (DM) and $(DEMO)/random-fmnist-ipc10/grid.png (random)"

test: data
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO)
