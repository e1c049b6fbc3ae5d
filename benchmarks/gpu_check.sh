#!/usr/bin/env bash
# The GPU check in one command (what it runs: benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh [--out FILE] [--parts demo,resume,throughput,peer] [--steps N] [--time-limit S]
# Python: $PYTHON if set, else the first of the checkout's .venv and python3 whose torch sees a GPU (a GPU image's
# own torch when the CPU-only .venv is not there), else the first that imports torch.
# Offline GPU machines: wheels in $WHEELS (default .whl/ in the checkout; `--fetch-wheels` fills it on a machine
# with PyPI) are installed without network into a temporary folder first: deepspeed, PyAV and magvit2-pytorch with
# what they need beyond a CUDA PyTorch image.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=${WHEELS:-$ROOT/.whl}

# The packages a CUDA PyTorch image lacks (checked against the image's package list of 2026-11-17, Python 3.12):
# deepspeed's and magvit's, then magvit2-pytorch and its dependencies.
FETCH="hjson pydantic pydantic-core annotated-types typing-inspection av webdataset braceexpand
  magvit2-pytorch beartype ema-pytorch pytorch-warmup gateloop-transformer kornia kornia-rs pytorch-custom-utils
  vector-quantize-pytorch taylor-series-linear-attention x-transformers rotary-embedding-torch optree einx
  loguru torch-einops-utils frozendict"
if [ "${1:-}" = "--fetch-wheels" ]; then  # after `make setup`: the project's .venv builds the deepspeed wheel
  WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}
  VENV_PY="$ROOT/.venv/bin/python"
  mkdir -p "$WHEELS"
  # deepspeed is a source package: built as a pure-Python wheel of the version the project runs (no compiled ops)
  DS_BUILD_OPS=0 "$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
    "deepspeed==$("$VENV_PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $FETCH
  du -sh "$WHEELS"
  exit 0
fi

if [ -z "${PYTHON:-}" ]; then  # one torch import per candidate: "gpu", "cpu" or nothing (no torch)
  fallback=""
  for py in "$ROOT/.venv/bin/python" "$(command -v python3 || true)"; do
    [ -x "$py" ] || continue
    case "$("$py" -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")' 2>/dev/null)" in
      gpu) PYTHON=$py; break ;;
      cpu) fallback=${fallback:-$py} ;;
    esac
  done
  PYTHON=${PYTHON:-${fallback:-python3}}
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d -t gpu_check_site.XXXXXX)
  trap 'rm -rf "$SITE"' EXIT
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" benchmarks/gpu_check.py "$@"
