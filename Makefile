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
	@# the workflow report's test opens it in Debian's chromium (driven by playwright)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "note: no chromium (apt-get install chromium); the report's browser test will be skipped"
	touch $(STAMP)

# The whole job on the built-in sample: train a denoiser and a segmenter on it, denoise, segment,
# embed, score against its ground truth, and write an HTML report (workflows/lightsheet.yaml).
# Running it again resumes (finished: nothing to do); `make clean` starts afresh.
demo: $(STAMP)
	test -e demo/lightsheet.ome.zarr || $(VENV)/bin/tilewise -q sample lightsheet demo/lightsheet.ome.zarr --shape 32,256,256 --chunks 16,128,128
	$(VENV)/bin/tilewise run workflows/lightsheet.yaml demo/lightsheet.ome.zarr demo/result.ome.zarr

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo .pytest_cache
