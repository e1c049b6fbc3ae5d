# Two entry points for a fresh machine: `make demo` (set up + run the main job) and `make test`.
# TORCH_SPEC selects the torch build; the default is the CPU build. On a GPU machine use e.g. TORCH_SPEC=torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/demo.sh

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
