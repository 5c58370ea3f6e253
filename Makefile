# Every target does its own set-up on a fresh machine: it creates .venv and installs as needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A tested CPU build of torch, so CPU machines do not download multi-GB CUDA wheels.
# The package itself asks for a range (pyproject.toml), so GPU users keep their CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tilewise sample lightsheet demo/lightsheet.ome.zarr --shape 64,384,384 --overwrite
	$(VENV)/bin/tilewise info demo/lightsheet.ome.zarr

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo .pytest_cache
