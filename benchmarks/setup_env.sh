#!/usr/bin/env bash
# Separate benchmark environment (.venv-bench): the peers (magvit2-pytorch, vector-quantize-pytorch, phenaki-pytorch) pull
# torchvision and a newer torch than the test environment, so both sides of every comparison run here, on the
# same torch. Usage: bash benchmarks/setup_env.sh [VENV_DIR]   (default: .venv-bench at the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-bench}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch + torchvision pinned together (torchvision from PyPI only imports beside its matching torch).
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
# The project without deepspeed (the benchmarks train in one process); transformers builds the BERT transformer.
$PIP install -q --no-deps -e "$ROOT"
$PIP install -q einops safetensors numpy scipy pyyaml tqdm pillow matplotlib opencv-python-headless av decord \
    scikit-video "transformers>=4.40"
# The peers. The installed torch satisfies their ranges, so pip keeps it.
# phenaki-pytorch (bench_mnist.py's generation peer) brings accelerate, beartype, ema-pytorch, sentencepiece,
# torchtyping; it runs without text there (its T5 weights would be downloaded at run time).
$PIP install -q magvit2-pytorch vector-quantize-pytorch "phenaki-pytorch==0.5.0"
"$VENV/bin/python" - <<'PY'
import torch, magvit2_pytorch, vector_quantize_pytorch, phenaki_pytorch, magvit  # noqa: F401
from importlib.metadata import version
print("benchmark env ready:", "torch", torch.__version__, "| magvit2-pytorch", version("magvit2-pytorch"),
      "| vector-quantize-pytorch", version("vector-quantize-pytorch"), "| phenaki-pytorch", version("phenaki-pytorch"))
PY
