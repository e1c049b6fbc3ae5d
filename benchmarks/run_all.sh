#!/usr/bin/env bash
# Run every side-by-side benchmark in the benchmark environment, one after the other (never two at once: they
# share the cores), writing markdown tables to benchmarks/results/. Usage: bash benchmarks/run_all.sh [--quick]
# The reconstruction runs take about 25 minutes (design choices) + 45 minutes (ours vs magvit2-pytorch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${BENCH_PYTHON:-$ROOT/.venv-bench/bin/python}"
OUT="$ROOT/benchmarks/results"
mkdir -p "$OUT"
[ -x "$PY" ] || { echo "no benchmark environment: bash benchmarks/setup_env.sh" >&2; exit 2; }
[ -f "$ROOT/data/sample/manifest.jsonl" ] || "$PY" -m data_prep.sample_data --out "$ROOT/data/sample"
export PYTHONWARNINGS=ignore
stamp() { echo "== $1 ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))" >&2; }
# The recommended tokenizer (peers.RECOMMENDED = v2-lfq) at base width 30 has ~5.4M parameters, like the peer's.
stamp tokenizer
"$PY" "$ROOT/benchmarks/bench_tokenizer.py" --base-channels 30 --markdown "$OUT/tokenizer.md" "$@"
for bench in quantizer flops; do
  stamp "$bench"
  "$PY" "$ROOT/benchmarks/bench_$bench.py" --markdown "$OUT/$bench.md" "$@"
done
# Reconstruction: the design choices (which choose peers.RECOMMENDED), then the recommended tokenizer against
# magvit2-pytorch for 20 minutes per side, evaluated at 5 and 20 minutes (and the curve points between).
recon() {
  local name="$1"; shift
  stamp "reconstruction $name"
  "$PY" "$ROOT/benchmarks/bench_reconstruction.py" --markdown "$OUT/reconstruction$name.md" "$@"
}
# One interleaved run answers both design questions: v1-lfq vs v2-lfq (blocks, same quantizer) and v2-vq vs v2-lfq
# vs v2-fsq (quantizers at ~2^10 codes, same blocks).
recon _design --sides v1-lfq,v2-lfq,v2-vq,v2-fsq --budget 300 --report-at 300 --eval-at 60,120,180,240 \
  --title "design choices: v1 vs v2 blocks; VQ vs LFQ vs FSQ at ~2^10 codes" "$@"
recon "" --sides ours,magvit2 --base-channels 30 --budget 1200 --report-at 300,1200 --eval-at 120,600,900 \
  --title "recommended tokenizer vs magvit2-pytorch" "$@"
if [ -f "$ROOT/benchmarks/bench_decoding.py" ]; then
  stamp decoding
  "$PY" "$ROOT/benchmarks/bench_decoding.py" --markdown "$OUT/decoding.md" "$@" || echo "bench_decoding.py failed" >&2
fi
[ -f "$ROOT/runs/demo/tokenizer/export/config.json" ] && { stamp priors; "$PY" "$ROOT/benchmarks/bench_priors.py" --budget 180 --report-at 60 --markdown "$OUT/priors.md" "$@"; }
# Moving MNIST frame prediction: our tokenizer + masked transformer against phenaki-pytorch, 300 s per system (~15 min)
stamp mnist
"$PY" "$ROOT/benchmarks/bench_mnist.py" --markdown "$OUT/mnist.md" "$@"
echo "tables in $OUT" >&2
