# The two set-up commands. Each creates or reuses .venv and installs from the project's own files,
# pinned by constraints.txt, then does its job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp names the hash of what was installed, so editing pyproject.toml or constraints.txt reinstalls.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

# nvidia-pytriton ships a real tritonserver (Python backend only). It needs numpy 1.26 and protobuf < 7, which
# cannot share .venv (numpy 2, protobuf 7), so it lives in .venv-triton; onnxruntime runs the ONNX model there.
TRITON_VENV := .venv-triton
TRITON_PKGS := nvidia-pytriton==0.7.0 numpy==1.26.4 protobuf==6.33.6 onnxruntime==1.32.0
TRITON_STAMP := $(TRITON_VENV)/.installed-$(shell echo '$(TRITON_PKGS)' | sha256sum | cut -c1-16)

# Optimum wants transformers 4.57, which cannot share .venv (transformers 5): its own venv; the benchmark times its
# .onnx outputs from .venv.
OPTIMUM_VENV := .venv-optimum
OPTIMUM_PKGS := torch==2.13.0 'optimum-onnx[onnxruntime]==0.1.0' optimum==2.1.0
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.installed-$(shell echo $(OPTIMUM_PKGS) | sha256sum | cut -c1-16)

# $(call side_venv,VENV,PACKAGES): a venv of its own holding exactly these packages (stamped by its target).
define side_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade 'pip>=24'
	$(1)/bin/python -m pip install -q $(2)
	rm -f $(1)/.installed-*
	touch $@
endef

.PHONY: demo test bench install clean-artifacts serving-env java browser

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=24'
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,dev,tf,ray,olive]'
	# tensorflow-serving-api's protos run on tensorflow-cpu; its dependency on the full tensorflow wheel would
	# put a second TensorFlow in the same folder, so it goes in without dependencies.
	$(PY) -m pip install -q -c constraints.txt --no-deps tensorflow-serving-api
	$(PY) -m pip install -q -c constraints.txt -e '.[serving]'
	rm -f $(VENV)/.installed-*
	touch $@

## make demo: register the example models in the local registry under artifacts/, build every recipe.
demo: $(STAMP)
	$(PY) -m examples.register
	$(VENV)/bin/kiln run recipes/ recipes/tuned/

## make bench: kiln side by side with the frameworks, torch.compile, ONNX Runtime, Olive and Optimum (slow, 26 min here;
## BENCH_ARGS="--models digits --repeats 1" for less). Tables, JSON and plot in benchmarks/results/.
bench: $(STAMP) $(OPTIMUM_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/compare.py $(BENCH_ARGS)

$(OPTIMUM_STAMP):
	$(call side_venv,$(OPTIMUM_VENV),$(OPTIMUM_PKGS))

## make test: the whole suite, slow integration tests (real mlflow server, real models) included.
test: $(STAMP) serving-env browser
	$(PY) -m pytest

## What the serving tests start besides .venv: a JDK for TorchServe, and Triton's server in its own venv.
serving-env: java $(TRITON_STAMP)

# TorchServe's frontend is Java (17+). Installed from the OS when missing and we may (CI: root on Debian);
# otherwise the TorchServe tests skip and say so.
java:
	@command -v java >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -q && apt-get install -y -q openjdk-17-jre-headless; } \
	  || echo "warning: no java and cannot install it; the TorchServe integration tests will be skipped"

# The HTML report test renders report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -q && apt-get install -y -q chromium; } \
	  || echo "warning: no chromium and cannot install it; the HTML report test will be skipped"

$(TRITON_STAMP):
	$(call side_venv,$(TRITON_VENV),$(TRITON_PKGS))

clean-artifacts:
	find artifacts -mindepth 1 ! -name README.md -exec rm -rf {} +
