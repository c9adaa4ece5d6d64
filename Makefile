# The two set-up commands. Each creates or reuses .venv and installs from the project's own files,
# pinned by constraints.txt, then does its job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp names the hash of what was installed, so editing pyproject.toml or constraints.txt reinstalls.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

.PHONY: demo test install clean-artifacts

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=24'
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

## make demo: register the example models in the local registry under artifacts/, build every recipe.
demo: $(STAMP)
	$(PY) -m examples.register
	$(VENV)/bin/kiln run recipes/

## make test: the whole suite, slow integration tests (real mlflow server, real models) included.
test: $(STAMP)
	$(PY) -m pytest

clean-artifacts:
	find artifacts -mindepth 1 ! -name README.md -exec rm -rf {} +
