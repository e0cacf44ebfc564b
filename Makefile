# make train [ARGS="key=value ..."]   make test   (each sets up .venv and data/ when missing)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest's workers for make test (pytest-xdist; 0: one process)
WORKERS ?= 2
# A folder holding the four MNIST .gz files to copy into data/ (offline machines).
MNIST_RAW ?= $(wildcard ../shared/data/MNIST/raw)

.PHONY: install data train test lint
install: $(VENV)/.installed
# uv installs what pip would, several times faster. It reads no pip.conf, so pip's own
# settings (index, find-links, constraints) are passed on as flags, with pip's choice of the
# best version across all indexes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(PY) -m pip config list \
	  | sed -nE "s/^[^.]+\.(index-url|extra-index-url|find-links|constraint)='(.*)'$$/\1 \2/p" \
	  | while read -r key values; do for v in $$values; do echo "--$$key=$$v"; done; done \
	  > $(VENV)/pip-settings
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode --native-tls \
	  --index-strategy unsafe-best-match $$(cat $(VENV)/pip-settings) \
	  -e '.[dev]' --config-settings editable_mode=compat
	touch $@

data: install
	$(PY) -m mnist_cnn.data $(if $(MNIST_RAW),--from $(MNIST_RAW))

train: data
	$(PY) -m mnist_cnn.train $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: data lint
	$(PY) -m pytest -n $(WORKERS) --dist loadfile $(ARGS)
