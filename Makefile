# Two entry points for a fresh machine: `make demo` (set up + run the main job) and `make test`.
# TORCH_SPEC / TORCH_INDEX select the torch build (README: Installation): the spec is installed from the index when
# one is given (e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build, .../whl/cu126 for CUDA),
# else from pip's usual sources. Changing either reinstalls torch on the next `make`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# One stamp per torch choice: a new TORCH_SPEC / TORCH_INDEX has no stamp yet, so its torch gets installed.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_SPEC) $(TORCH_INDEX)' | md5sum | cut -c1-12)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# Uninstall first: pip keeps an installed torch that satisfies the new spec (e.g. a CPU build for `torch`).
$(TORCH_STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	rm -f $(VENV)/.torch-*
	$(PY) -m pip uninstall -q -y torch 2>/dev/null || true
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	printf '%s\n' '$(TORCH_SPEC) $(TORCH_INDEX)' > $@

# Order-only on torch: the package's bare `torch` requirement is then already met by the chosen build.
$(VENV)/.installed: pyproject.toml | $(TORCH_STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/demo.sh

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n auto --dist loadfile tests

clean:
	rm -rf $(VENV) runs

# The GPU check (benchmarks/gpu_check.sh): demo training, exact resume, throughput and the peer on CUDA in ~10 minutes,
# a table in benchmarks/results/gpu_check.md; on a machine without CUDA one line. No `setup`: GPU machines may be offline.
.PHONY: gpu-check
gpu-check:
	bash benchmarks/gpu_check.sh
