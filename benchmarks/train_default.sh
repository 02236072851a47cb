#!/usr/bin/env bash
# The whole default-model job on one GPU machine: record real ViZDoom play, train the tokenizer
# and the DiT, evaluate on episodes recorded with unseen seeds, benchmark the tokenizer.
#
#   bash benchmarks/train_default.sh WORKDIR [smoke|full]
#
# smoke: tiny budgets, to catch errors in a minute or two. full: the shipped default model
# (>= 200k training frames, <= 25 GPU-minutes of tokenizer + dynamics training).
# Everything lands in WORKDIR: datasets, runs, eval.json, logs, timings.txt.
set -euo pipefail
work=${1:?usage: train_default.sh WORKDIR [smoke|full]}
scale=${2:-full}
mkdir -p "$work"
case "$scale" in
  smoke) train_steps=4000 held_steps=3200 tok_budget="--steps 5 --batch-size 4" dyn_budget="--steps 5 --batch-size 2" windows=4 ;;
  full)  train_steps=220000 held_steps=16000 tok_budget="--minutes 5 --batch-size 64" dyn_budget="--minutes 12 --batch-size 32" windows=64 ;;
  *) echo "scale must be smoke or full" >&2; exit 2 ;;
esac
workers=$(nproc)
compile=${COMPILE:---compile}  # COMPILE=--no-compile for a CPU try-out
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$work/timings.txt"; }

log "host $(hostname) cores $workers gpu $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
t0=$(date +%s)
# Training maps E1M1-E1M8 (freedoom1.wad); held-out play uses other seeds on the same maps.
# A relaunch after a failure later on keeps finished recordings (marker files).
[ -f "$work/doom_train.done" ] || { worldgen record --env doom --out "$work/doom_train" --steps $train_steps --workers $workers --seed 1 --quiet --overwrite && touch "$work/doom_train.done"; }
t1=$(date +%s); log "recorded $train_steps train frames in $((t1 - t0)) s with $workers workers"
[ -f "$work/doom_heldout.done" ] || { worldgen record --env doom --out "$work/doom_heldout" --steps $held_steps --workers $workers --seed 1000 --quiet --overwrite && touch "$work/doom_heldout.done"; }
t2=$(date +%s); log "recorded $held_steps held-out frames in $((t2 - t1)) s"

worldgen train tokenizer --data "$work/doom_train" --run "$work/tok" $tok_budget \
  --export-dtype bf16 $compile
t3=$(date +%s); log "tokenizer trained in $((t3 - t2)) s"
worldgen train dynamics --data "$work/doom_train" --tokenizer "$work/tok" --run "$work/dyn" \
  $dyn_budget --model S --window 16 --export-dtype bf16 $compile
t4=$(date +%s); log "dynamics trained in $((t4 - t3)) s"

worldgen eval --checkpoint "$work/dyn/ckpt" --data "$work/doom_heldout" --split all \
  --windows $windows --json "$work/eval.json" --no-media  # no ffmpeg on the GPU image: media made elsewhere
t5=$(date +%s); log "evaluated in $((t5 - t4)) s"
python benchmarks/tokenizer_bench.py --device cuda --dtype bf16 --batch 1 64 256 \
  --checkpoint "$work/dyn/ckpt" > "$work/tokenizer_bench.md" 2>&1 || log "tokenizer bench failed"
log "done in $(( $(date +%s) - t0 )) s"
