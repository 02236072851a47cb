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
# The defaults are the shipped model's recipe. Knobs for experiments: TOKENIZER=FOLDER reuses a
# trained tokenizer and DYNAMICS=FOLDER a trained DiT (their training minutes count toward the
# budget); ROLLOUT_MINUTES and ROLLOUT_ARGS set the fine-tune on the model's own rollouts (minutes 0:
# none; the shipped one: 7.5 minutes, half its steps on rollouts); TRAIN_POLICY picks who plays
# the training recording (explore; babble: the explorer with bursts of random actions; still: the
# explorer with hands-off pauses; jitter: the explorer with a fresh mouse-yaw offset every step;
# the unseen-seed test play is always the explorer) and FINETUNE_POLICY who plays the
# fine-tune's (another recording, same seed, when it differs);
# DYN_MINUTES, DYN_ARGS (more `train dynamics` flags), SWEEP (sampler_sweep.py's grid) and LONG
# (long_horizon.py's sessions) change the full run's training, sweep and long sessions. The 2026-12-02 experiment (docs/history/results-2026-12.md):
# TRAIN_POLICY=babble DYN_MINUTES=8 DYN_ARGS="--ctx-noise 0.1 --action-dropout 0.1"
# SWEEP="--steps 2 --ctx-noise 0.1 --guidance 1 2 3 --windows 24 --horizon 16".
# WORLD_CACHE=H adds a last training stage (docs/world_cache.md): the model warm-started with the
# world cache, its tokenizer growing the depth channel for CACHE_TOK_STEPS steps (default 800: a
# minutes budget counts loading and compiling, which once left 23 steps of 90 s) and its
# DiT the view's input for CACHE_STEPS steps (default 1000) with `--world-cache H`. TRAIN_STEPS sets
# the recorded training frames (the cache's encoding renders a view per frame: about 1.2 ms each).
# Going on from the shipped model with the cache alone:
# TOKENIZER=worldgen/checkpoints/default DYNAMICS=worldgen/checkpoints/default ROLLOUT_MINUTES=0 WORLD_CACHE=4.
set -euo pipefail
work=${1:?usage: train_default.sh WORKDIR [smoke|full]}
scale=${2:-full}
mkdir -p "$work"
case "$scale" in
  smoke) train_steps=${TRAIN_STEPS:-4000} held_steps=3200 tok_budget="--steps 5 --batch-size 4" dyn_budget="--steps 5 --batch-size 2"
         rollout_budget="--steps 3 --batch-size 2"
         cache_tok="--steps 3 --batch-size 4" cache_dyn="--steps ${CACHE_STEPS:-3} --batch-size 2"
         play="--windows 2 --horizon 4 --batch 2"
         windows=4 sweep="--steps 1 2 --ctx-noise 0 0.1 --sinks 0 1 --windows 2 --horizon 4 --stability-frames 20 --stability-sessions 2 --play-windows 2"
         long="--frames 20 --sessions 2 --segment 10 --windows 2 --horizons 2 4 --settings 14,1,0.1 6,1,0.1"
         bench="--batch 1 2 --frames 3" envs="1,2 --steps 2 --warmup 1" recall="--per-event 2 --batch 4" ;;
  full)  train_steps=${TRAIN_STEPS:-220000} held_steps=16000 tok_budget="--minutes 4 --batch-size 64"
         dyn_budget="--minutes ${DYN_MINUTES:-13} --batch-size 128 --lr 5e-4" windows=64
         rollout_budget="--minutes ${ROLLOUT_MINUTES:-7.5} --batch-size 128 --lr 1e-4 --warmup 50 --ema-decay 0.99"
         cache_tok="--steps ${CACHE_TOK_STEPS:-800} --batch-size 64 --lr 2e-4 --warmup 100"
         cache_dyn="--steps ${CACHE_STEPS:-1000} --batch-size 128 --lr 2e-4 --warmup 100"
         play="--windows 64 --batch 64"
         sweep=${SWEEP:-"--steps 4 5 6 --ctx-noise 0.1 --shift 1 --sinks 0 1 --windows 16 --horizon 16"}  # + 8 x 10,000-frame sessions each
         long=${LONG:-"--frames 10000 --sessions 8 --windows 16 --horizons 16 64 256"}
         bench="--batch 1 8 32 64 --frames 100" envs="1,16,64 --steps 50" recall="--per-event 64" ;;
  *) echo "scale must be smoke or full" >&2; exit 2 ;;
esac
workers=$(nproc)
compile=${COMPILE:---compile}  # COMPILE=--no-compile for a CPU try-out
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$work/timings.txt"; }

log "host $(hostname) cores $workers gpu $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
t0=$(date +%s)
# Training maps E1M1-E1M8 (freedoom1.wad); held-out play uses other seeds on the same maps.
# A relaunch after a failure later on keeps finished recordings (marker files).
policy=${TRAIN_POLICY:-explore}
[ -f "$work/doom_train.done" ] || { worldgen record --env doom --out "$work/doom_train" --steps $train_steps --workers $workers --seed 1 --policy $policy --quiet --overwrite && touch "$work/doom_train.done"; }
t1=$(date +%s); log "recorded $train_steps train frames ($policy policy) in $((t1 - t0)) s with $workers workers"
[ -f "$work/doom_heldout.done" ] || { worldgen record --env doom --out "$work/doom_heldout" --steps $held_steps --workers $workers --seed 1000 --policy explore --quiet --overwrite && touch "$work/doom_heldout.done"; }
ft_policy=${FINETUNE_POLICY:-$policy} ft_data=$work/doom_train
if [ "$ft_policy" != "$policy" ]; then
  ft_data=$work/doom_finetune
  [ -f "$ft_data.done" ] || { worldgen record --env doom --out "$ft_data" --steps $train_steps --workers $workers --seed 1 --policy $ft_policy --quiet --overwrite && touch "$ft_data.done"; }
fi
t2=$(date +%s); log "recorded $held_steps held-out frames (and the fine-tune's, $ft_policy policy) in $((t2 - t1)) s"

tok=${TOKENIZER:-$work/tok}
if [ -z "${TOKENIZER:-}" ]; then
  worldgen train tokenizer --data "$work/doom_train" --run "$work/tok" $tok_budget --export-dtype bf16 $compile
fi
t3=$(date +%s); log "tokenizer trained in $((t3 - t2)) s (${TOKENIZER:+reused $TOKENIZER})"
dyn=${DYNAMICS:-$work/dyn/ckpt}
if [ -z "${DYNAMICS:-}" ]; then
  worldgen train dynamics --data "$work/doom_train" --tokenizer "$tok" --run "$work/dyn" \
    $dyn_budget --model M --window 16 ${DYN_ARGS:---action-dropout 0} --export-dtype bf16 $compile
fi
t4=$(date +%s); log "dynamics trained in $((t4 - t3)) s (${DYNAMICS:+reused $DYNAMICS})"
# Then on its own rollouts (worldgen/training/dynamics.py): windows that end in up to 15 frames
# the model generated itself with the inference sampler, trained towards the real frames after.
model=$dyn
if [ "${ROLLOUT_MINUTES:-7.5}" != 0 ]; then
  worldgen train dynamics --data "$ft_data" --tokenizer "$tok" --init "$dyn" --run "$work/rollout" \
    $rollout_budget --window 16 --rollout-frames 15 --sample-steps 2 --ctx-noise 0.1 \
    ${ROLLOUT_ARGS:---action-dropout 0 --rollout-share 0.5} --export-dtype bf16 $compile
  model=$work/rollout/ckpt
fi
t4b=$(date +%s); log "rollout fine-tune in $((t4b - t4)) s"
if [ -n "${WORLD_CACHE:-}" ]; then
  worldgen train tokenizer --data "$work/doom_train" --run "$work/tok_rgbd" --init "$model" --depth $cache_tok \
    --export-dtype bf16 $compile
  worldgen train dynamics --data "$work/doom_train" --tokenizer "$work/tok_rgbd" --init "$model" --run "$work/cache" \
    --world-cache "$WORLD_CACHE" $cache_dyn --window 16 --action-dropout 0 --export-dtype bf16 $compile
  model=$work/cache/ckpt
  log "world-cache warm start in $(( $(date +%s) - t4b )) s"
fi

# Sampler settings chosen on the training recording's held-out episodes, never on the test data:
# of those whose long sessions stay in the real frames' range, the best on PSNR and control.
python benchmarks/sampler_sweep.py --checkpoint "$model" --data "$work/doom_train" $sweep \
  $([ "$compile" = --compile ] && echo --compile) --json "$work/sampler_sweep.json" --apply > "$work/sampler_sweep.md" 2>&1 || log "sampler sweep failed"
log "sampler sweep done"
worldgen eval --checkpoint "$model" --data "$work/doom_heldout" --split all \
  --windows $windows --json "$work/eval.json" --no-media \
  || log "eval failed"  # (no ffmpeg on the GPU image: media are made elsewhere from the JSON)
# The play suite (docs/evaluation.md): the same unseen-seed play, the game's branches beside the model's.
worldgen eval --suite play --checkpoint "$model" --data "$work/doom_heldout" --split all $play --workers $workers \
  --branches "$work/branches" --json "$work/play.json" --no-media || log "play suite failed"
# Whether its frames show the game's events where the game has them (docs/agents.md), read by the shipped reward head.
python benchmarks/event_recall.py --checkpoint "$model" --reward env/heads/default --data "$work/doom_heldout" --split all \
  --lead 4 $recall --json "$work/event_recall.json" > "$work/event_recall.md" 2>&1 || log "event recall failed"
t5=$(date +%s); log "evaluated in $((t5 - t4)) s"
# Long-horizon stability (per-frame stats over 10,000 frames) and the cache-settings table.
python benchmarks/long_horizon.py --checkpoint "$model" --data "$work/doom_heldout" $long \
  $([ "$compile" = --compile ] && echo --compile) --json "$work/long_horizon.json" --plot "$work/long_horizon.png" \
  > "$work/long_horizon.md" 2> "$work/long_horizon.log" || log "long-horizon benchmark failed"
log "long-horizon benchmark done in $(( $(date +%s) - t5 )) s"
# Speed depends on the config alone: BENCH=0 skips these when the architecture is unchanged.
[ "${BENCH:-1}" = 0 ] && { log "done in $(( $(date +%s) - t0 )) s (benchmarks skipped)"; exit 0; }
# The Gymnasium vector env over this model, its reward head in the loop (issue 6).
python benchmarks/env_bench.py --device $([ "$compile" = --compile ] && echo cuda || echo cpu) \
  --checkpoint "$model" --reward env/heads/default --envs $envs $([ "$compile" = --compile ] && echo --compile) \
  --json "$work/env_bench.json" > "$work/env_bench.md" 2>&1 || log "env bench failed"
log "env bench done"
worldgen bench --checkpoint "$model" $bench $([ "$compile" = --compile ] && echo --compile || echo --no-compile) \
  --json "$work/bench.json" > "$work/bench.md" 2>&1 || log "streaming bench failed"
log "streaming bench done"
python benchmarks/tokenizer_bench.py --device cuda --dtype bf16 --batch 1 64 256 \
  --checkpoint "$model" > "$work/tokenizer_bench.md" 2>&1 || log "tokenizer bench failed"
log "done in $(( $(date +%s) - t0 )) s"
