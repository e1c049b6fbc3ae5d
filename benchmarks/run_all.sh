#!/usr/bin/env bash
# Run every side-by-side benchmark in the benchmark environment, one after the other (never two at once: they
# share the cores), writing markdown tables to benchmarks/results/. Usage: bash benchmarks/run_all.sh [--quick]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${BENCH_PYTHON:-$ROOT/.venv-bench/bin/python}"
OUT="$ROOT/benchmarks/results"
mkdir -p "$OUT"
[ -x "$PY" ] || { echo "no benchmark environment: bash benchmarks/setup_env.sh" >&2; exit 2; }
[ -f "$ROOT/data/sample/manifest.jsonl" ] || "$PY" -m data_prep.sample_data --out "$ROOT/data/sample"
export PYTHONWARNINGS=ignore
for bench in tokenizer quantizer flops reconstruction; do
  echo "== $bench ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$PY" "$ROOT/benchmarks/bench_$bench.py" --markdown "$OUT/$bench.md" "$@"
done
if [ -f "$ROOT/benchmarks/bench_decoding.py" ]; then
  echo "== decoding ($(date -u +%H:%M:%S) UTC)" >&2
  "$PY" "$ROOT/benchmarks/bench_decoding.py" --markdown "$OUT/decoding.md" "$@" || echo "bench_decoding.py failed" >&2
fi
echo "tables in $OUT" >&2
