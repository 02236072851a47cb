#!/usr/bin/env bash
# The whole default-model job on one GPU machine: record real ViZDoom play, train the tokenizer
# and the DiT, pick the sampler settings on validation windows, evaluate on episodes recorded
# with unseen seeds, benchmark streaming and the tokenizer.
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
  smoke) train_steps=4000 held_steps=3200 tok_budget="--steps 5 --batch-size 4" dyn_budget="--steps 5 --batch-size 2"
         windows=4 sweep="--steps 1 2 --ctx-noise 0 0.1 --windows 2 --horizon 4" bench="--batch 1 2 --frames 3" ;;
  full)  train_steps=220000 held_steps=16000 tok_budget="--minutes 4 --batch-size 64"
         dyn_budget="--minutes 13 --batch-size 128 --lr 5e-4" windows=64
         sweep="--steps 2 4 8 --ctx-noise 0 0.05 0.1 --windows 16 --horizon 16" bench="--batch 1 8 32 64 --frames 100" ;;
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
  $dyn_budget --model M --window 16 --export-dtype bf16 $compile
t4=$(date +%s); log "dynamics trained in $((t4 - t3)) s"

# Sampler settings chosen on the training recording's held-out episodes, never on the test data.
python benchmarks/sampler_sweep.py --checkpoint "$work/dyn/ckpt" --data "$work/doom_train" $sweep \
  --json "$work/sampler_sweep.json" --apply > "$work/sampler_sweep.md" 2>&1 || log "sampler sweep failed"
log "sampler sweep done"
worldgen eval --checkpoint "$work/dyn/ckpt" --data "$work/doom_heldout" --split all \
  --windows $windows --json "$work/eval.json" --no-media \
  || log "eval failed"  # (no ffmpeg on the GPU image: media are made elsewhere from the JSON)
t5=$(date +%s); log "evaluated in $((t5 - t4)) s"
worldgen bench --checkpoint "$work/dyn/ckpt" $bench $([ "$compile" = --compile ] && echo --compile || echo --no-compile) \
  --json "$work/bench.json" > "$work/bench.md" 2>&1 || log "streaming bench failed"
log "streaming bench done"
python benchmarks/tokenizer_bench.py --device cuda --dtype bf16 --batch 1 64 256 \
  --checkpoint "$work/dyn/ckpt" > "$work/tokenizer_bench.md" 2>&1 || log "tokenizer bench failed"
log "done in $(( $(date +%s) - t0 )) s"
