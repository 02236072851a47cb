#!/usr/bin/env bash
# Frame memory (issue 23) on one GPU machine: fine-tune the shipped model with recalled frames,
# then the long-revisit table (benchmarks/revisit.py) against the real game.
#
#   bash benchmarks/memory_revisit.sh WORKDIR [smoke|full]
#
# smoke: tiny budgets, to catch errors in a few minutes. full: ~35 GPU-minutes on one H100
# (recording ~5, fine-tune 20, revisit ~5 for 4 variants of 32 windows x 192 steps).
# Knobs: TRAIN=FOLDER / HELDOUT=FOLDER reuse recordings (with poses, from `worldgen record`);
# MEM_MINUTES (fine-tune minutes), MEM_ARGS (more `train dynamics` flags), REVISIT_ARGS.
# WORLD_CACHE="LABEL=CKPT[,k=v...]" adds the world-cache variants once issue 22 is merged
# (repeat the variant flag in REVISIT_ARGS for "both").
set -euo pipefail
work=${1:?usage: memory_revisit.sh WORKDIR [smoke|full]}
scale=${2:-full}
mkdir -p "$work"
case "$scale" in
  smoke) train_steps=4000 held_steps=3200 budget="--steps 5 --batch-size 2" revisit="--windows 2 --out-frames 64 --out-of-view 8" ;;
  full)  train_steps=100000 held_steps=16000 budget="--minutes ${MEM_MINUTES:-20} --batch-size 128 --lr 1e-4 --warmup 50 --ema-decay 0.99"
         revisit="--windows 32 --out-frames 96 --out-of-view 64" ;;
  *) echo "scale must be smoke or full" >&2; exit 2 ;;
esac
workers=$(nproc)
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$work/timings.txt"; }

train=${TRAIN:-$work/doom_train}
held=${HELDOUT:-$work/doom_heldout}
[ -n "${TRAIN:-}" ] || [ -f "$train.done" ] || { worldgen record --env doom --out "$train" --steps $train_steps --workers $workers --seed 1 --quiet --overwrite && touch "$train.done"; }
[ -n "${HELDOUT:-}" ] || [ -f "$held.done" ] || { worldgen record --env doom --out "$held" --steps $held_steps --workers $workers --seed 1000 --quiet --overwrite && touch "$held.done"; }
log "recordings ready: $train, $held"

# The shipped model plus a fresh memory embedder, trained on windows with up to 4 frames from
# >= 32 frames earlier in the episode (a quarter of the steps without), in the shipped model's
# recipe (no action dropout, stabilisation 0.1, half the steps on its own rollouts, which run
# without memory).
worldgen train dynamics --data "$train" --tokenizer default --init default --out "$work/mem" \
  --memory-frames 4 --memory-gap 32 --memory-none 0.25 --memory-cap 256 --action-dropout 0 --ctx-noise 0.1 \
  --sample-steps 5 --rollout-frames 15 --rollout-share 0.5 $budget ${MEM_ARGS:-}
log "fine-tuned with memory -> $work/mem/ckpt"

# Every variant samples as the shipped model does (5 steps, shift 1, stabilisation 0.1).
same="steps=5,shift=1.0,ctx_noise=0.1"
variants=(--variant "shipped (no memory)=default,$same" --variant "fine-tuned, memory off=$work/mem/ckpt,memory_k=0,$same"
          --variant "frame bank=$work/mem/ckpt,$same")
[ -z "${WORLD_CACHE:-}" ] || variants+=(--variant "$WORLD_CACHE")
python benchmarks/revisit.py --data "$held" --device cuda $revisit "${variants[@]}" ${REVISIT_ARGS:-} \
  --json "$work/revisit.json" | tee "$work/revisit.md"
python benchmarks/revisit.py --data "$held" --device cuda $revisit --dead-reckon \
  --variant "frame bank, dead-reckoned cameras=$work/mem/ckpt,$same" --json "$work/revisit_dead_reckon.json" \
  | tee -a "$work/revisit.md"
log "revisit tables in $work/revisit.md"
