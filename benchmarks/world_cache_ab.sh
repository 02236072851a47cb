#!/usr/bin/env bash
# The world cache against the shipped default on the same cases (docs/world_cache.md): one GPU
# session's job. Records play, trains an RGB-D tokenizer and a DiT conditioned on the world cache,
# then scores it and the shipped default on the same held-out windows and the same game branches:
# `worldgen eval` (plain), the play suite, and optionally the streaming bench.
#
#   bash benchmarks/world_cache_ab.sh WORKDIR [smoke|full]
#
# smoke: tiny budgets on any machine (a few minutes on a CPU), to catch errors. full: sized for one
# GPU session of 30 device-minutes, of which starting the machine may take ten: about 19 minutes of
# work on an H100 (2026-12-07: recording 22 s; the tokenizer's --minutes includes about a minute of
# compiling, then 23 steps/s; the DiT's encoding with cache views 2 min, compiling 1 min, then 13
# steps/s; the default's play suite 16 s of game replays and 61 s of play). The DiT gets a fixed
# step count, not --minutes, because a --minutes budget counts the cache views' rendering while the
# latents are encoded (docs/world_cache.md, "Training with the cache").
# Knobs: TRAIN_STEPS (frames recorded for training), TOK_MINUTES, DYN_STEPS, HISTORY (the H of
# --world-cache), WARM=MODEL warm-starts both from a trained RGB model (its tokenizer grows the depth
# channel, its DiT the cache view's input channels, both starting ignored: the A/B then asks what the
# cache adds to that model, not what a short run from scratch loses to it), NOCACHE=1 also trains
# the same DiT on the same tokenizer without the cache, last (the held-out loss of the pair is the
# A/B of the cache alone), FT_STEPS=N fine-tunes the cache model N steps on its own
# rollouts, its clouds built from the frames it played (as the default's recipe does without the
# cache; the fine-tuned model is then the one scored), BENCH=1 adds `worldgen bench` of both models.
# Everything lands in WORKDIR: datasets, runs, eval_*.json, play_*.json, timings.txt.
set -euo pipefail
work=${1:?usage: world_cache_ab.sh WORKDIR [smoke|full]}
scale=${2:-full}
mkdir -p "$work"
case "$scale" in
  smoke) train_steps=${TRAIN_STEPS:-1000} held_steps=1000 workers=2 tok="--steps 5 --batch-size 4"
         dyn="--steps ${DYN_STEPS:-5} --batch-size 2 --model tiny --eval-windows 4"
         ft_steps=${FT_STEPS:-2} ft="--batch-size 2 --lr 1e-4 --warmup 1 --ema-decay 0.99"
         plain="--windows 2 --horizon 4 --batch 2" play="--windows 2 --horizon 4 --batch 2 --workers 2"
         bench="--batch 1 --frames 3" compile=--no-compile ;;
  full)  train_steps=${TRAIN_STEPS:-100000} held_steps=16000 workers=16
         tok="--minutes ${TOK_MINUTES:-3.5} --batch-size 64"
         dyn="--steps ${DYN_STEPS:-2500} --batch-size 128 --lr 5e-4 --model M"
         ft_steps=${FT_STEPS:-0} ft="--batch-size 128 --lr 1e-4 --warmup 50 --ema-decay 0.99"
         plain="--windows 64" play="--windows 64 --batch 64 --workers 16"
         bench="--batch 1 64 --frames 100" compile=--compile ;;
  *) echo "scale must be smoke or full" >&2; exit 2 ;;
esac
history=${HISTORY:-4}
# A warm start goes on from trained weights: a gentler peak LR, so the first steps keep what it knows.
[ -n "${WARM:-}" ] && [ "$scale" = full ] && { tok="$tok --lr 2e-4 --warmup 100"; dyn="${dyn/--lr 5e-4/--lr 2e-4} --warmup 100"; }
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$work/timings.txt"; }
log "host $(hostname) gpu $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"

# Training play with seed 1 (as the default's), the unseen-seed test play with seed 1000 (HELDOUT).
[ -f "$work/train.done" ] || { worldgen record --env doom --out "$work/train" --steps "$train_steps" --workers $workers \
  --seed 1 --quiet --overwrite && touch "$work/train.done"; }
[ -f "$work/heldout.done" ] || { worldgen record --env doom --out "$work/heldout" --steps $held_steps --workers $workers \
  --seed 1000 --quiet --overwrite && touch "$work/heldout.done"; }
log "recorded"

warm=${WARM:+--init $WARM}
[ -f "$work/tok/ckpt/tokenizer.json" ] || worldgen train tokenizer --data "$work/train" --run "$work/tok" --depth $tok \
  $warm --export-dtype bf16 $compile
log "RGB-D tokenizer: $(python -c "import json; d = json.load(open('$work/tok/summary.json')); print(f\"held-out PSNR {d['heldout_psnr']:.2f} dB, {d['steps']} steps\")")"

train_dit() {  # arm (cache|nocache)
  local flag=""
  [ $1 = cache ] && flag="--world-cache $history"
  [ -f "$work/dyn_$1/ckpt/dynamics.json" ] || worldgen train dynamics --data "$work/train" --tokenizer "$work/tok" \
    --run "$work/dyn_$1" $flag $dyn $warm --window 16 --action-dropout 0 --export-dtype bf16 $compile
  log "DiT $1: $(python -c "import json; d = json.load(open('$work/dyn_$1/summary.json')); print(f\"held-out loss {d['heldout_loss']:.4f}, {d['steps']} steps, {d['train_wall_s']:.0f} s training\")")"
}
train_dit cache

model=$work/dyn_cache/ckpt
if [ "$ft_steps" != 0 ]; then
  [ -f "$work/ft_cache/ckpt/dynamics.json" ] || worldgen train dynamics --data "$work/train" --tokenizer "$work/tok" \
    --init "$model" --run "$work/ft_cache" --world-cache $history --steps "$ft_steps" $ft --window 16 \
    --rollout-frames 15 --rollout-share 0.5 --sample-steps 2 --ctx-noise 0.1 --action-dropout 0 --export-dtype bf16 $compile
  model=$work/ft_cache/ckpt
  log "fine-tune on own rollouts: $(python -c "import json; d = json.load(open('$work/ft_cache/summary.json')); print(f\"held-out loss {d['heldout_loss']:.4f}, {d['steps']} steps, {d['train_wall_s']:.0f} s training\")")"
fi

# The play suite first, the cache model before the default: it is the unknown, and a session that
# runs out of GPU time should lose the default's numbers (in RESULTS) rather than the new model's.
# The first call records the game's branches; the second plays the same ones. Both read camera
# motion off their frames with the same geometry head (the cache model has none of its own).
worldgen eval --suite play --checkpoint "$model" --data "$work/heldout" --split all $play \
  --branches "$work/branches" --geometry env/heads/default --json "$work/play_cache.json" --no-media
log "play suite of the cache model done"
worldgen eval --suite play --checkpoint default --data "$work/heldout" --split all $play \
  --branches "$work/branches" --geometry env/heads/default --json "$work/play_default.json" --no-media
log "play suite done"
worldgen eval --checkpoint default --data "$work/heldout" --split all $plain --json "$work/eval_default.json" --no-media
worldgen eval --checkpoint "$model" --data "$work/heldout" --split all $plain \
  --windows-from "$work/eval_default.json" --json "$work/eval_cache.json" --no-media
log "plain eval done"
if [ "${BENCH:-0}" = 1 ]; then
  for m in default "$model"; do
    worldgen bench --checkpoint "$m" $bench $compile --json "$work/bench_$(basename "$(dirname "$m")").json"
  done
  log "bench done"
fi

[ "${NOCACHE:-0}" = 1 ] && train_dit nocache

# Both models' headline tables, one after the other (the same windows and branches).
python - "$work" <<'EOF'
import importlib, json, sys
from pathlib import Path

plain, play = (importlib.import_module(f"worldgen.evaluation.{m}") for m in ("evaluate", "play"))

w = Path(sys.argv[1])
for name in ("default", "cache"):
    print(f"== {name}")
    print(plain.summary(json.loads((w / f"eval_{name}.json").read_text())))
    print(play.summary(json.loads((w / f"play_{name}.json").read_text())))
EOF
log "done"
