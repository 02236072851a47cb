#!/usr/bin/env bash
# Self Forcing of a Diffusion-Forcing model on one GPU machine (docs/distill.md): record real
# ViZDoom play, distil the teacher into a few-step student, pick the student's step count on the
# training recording's held-out episodes, then compare teacher and student on play recorded with
# unseen seeds (eval on the same windows, 10,000-frame stability) and on streaming speed in the
# same run (batch 1 and 64).
#
#   bash benchmarks/distill_default.sh WORKDIR [smoke|full]
#
# smoke: tiny budgets, to catch errors in a few minutes (COMPILE=--no-compile on a CPU).
# Knobs: TEACHER (default worldgen/checkpoints/default), DISTILL_MINUTES (20), DISTILL_ARGS (more
# `train distill` flags, e.g. "--ode-steps 200" for the ODE warm-up, "--teacher-guidance 2" for a
# teacher trained with action dropout), SWEEP and LONG (sampler_sweep.py's and long_horizon.py's
# arguments: shorter stability sessions fit the job into one 30-minute GPU session), NAME (the run's name, default distill: a second run with
# other flags in the same WORKDIR reuses the recordings and the teacher's results), DECODER
# ("WIDTHS:BLOCKS", e.g. "16,32,64,128:1": also a narrower decoder for the student, trained for
# DECODER_MINUTES (5) on its frozen encoder, in the eval and bench tables as NAME_dec).
# Everything lands in WORKDIR: datasets, the run, eval_*.json, long_horizon_*, bench_*, timings.txt.
set -euo pipefail
work=${1:?usage: distill_default.sh WORKDIR [smoke|full]}
scale=${2:-full}
teacher=${TEACHER:-worldgen/checkpoints/default}
name=${NAME:-distill}
mkdir -p "$work"
case "$scale" in
  smoke) train_steps=1000 held_steps=400 budget="--steps 3 --batch-size 2 --rollout-frames 16"
         sweep="--steps 1 2 --ctx-noise 0.1 --windows 2 --horizon 4 --stability-frames 20 --stability-sessions 2 --play-windows 2"
         eval="--windows 2 --horizon 8" long="--frames 20 --sessions 2 --windows 2 --horizons 2 4"
         bench="--batch 1 2 --frames 3" decoder_budget="--steps 3 --batch-size 4" ;;
  full)  train_steps=100000 held_steps=16000
         # 128 windows: a step's rollout plays frame by frame, so it is bound by passes, not by the
         # batch (the first run, at 32: 1.09 s a step, MFU 1.2%; docs/distill.md).
         budget="--minutes ${DISTILL_MINUTES:-20} --batch-size 128"
         sweep=${SWEEP:-"--steps 1 2 4 --ctx-noise 0.1 --sinks 0 --windows 16 --horizon 16"}  # + 8 x 10,000-frame sessions each
         eval="--windows 64 --horizon 64" long=${LONG:-"--frames 10000 --sessions 8 --windows 16 --horizons 16 64 256"}
         bench="--batch 1 64 --frames 100" decoder_budget="--minutes ${DECODER_MINUTES:-5} --batch-size 64" ;;
  *) echo "scale must be smoke or full" >&2; exit 2 ;;
esac
workers=$(nproc)
compile=${COMPILE:---compile}
on_gpu() { [ "$compile" = --compile ] && echo "$1" || echo "${2:-}"; }
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$work/timings.txt"; }

log "host $(hostname) cores $workers gpu $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
t0=$(date +%s)
[ -f "$work/doom_train.done" ] || { worldgen record --env doom --out "$work/doom_train" --steps $train_steps --workers $workers --seed 1 --quiet --overwrite && touch "$work/doom_train.done"; }
[ -f "$work/doom_heldout.done" ] || { worldgen record --env doom --out "$work/doom_heldout" --steps $held_steps --workers $workers --seed 1000 --quiet --overwrite && touch "$work/doom_heldout.done"; }
t1=$(date +%s); log "recorded $train_steps train and $held_steps unseen-seed frames in $((t1 - t0)) s"

# The student: the teacher's tokenizer, cache and stabilisation; 2 Euler steps by default, trained at 1, 2 and 4.
worldgen train distill --data "$work/doom_train" --teacher "$teacher" --run "$work/$name" $budget \
  ${DISTILL_ARGS:-} --export-dtype bf16
student=$work/$name/ckpt
t2=$(date +%s); log "$name: distilled in $((t2 - t1)) s (${DISTILL_ARGS:-})"

# Its step count, on the training recording's held-out episodes (never the test's); --apply stores it.
python benchmarks/sampler_sweep.py --checkpoint "$student" --data "$work/doom_train" $sweep \
  $(on_gpu --compile) --json "$work/sampler_sweep_$name.json" --apply > "$work/sampler_sweep_$name.md" 2>&1 \
  || log "sampler sweep failed"
t3=$(date +%s); log "student's sampler sweep in $((t3 - t2)) s"

# The decoder runs on every played frame, nearly half a step at batch 64 (docs/distill.md): a
# narrower one for the same latents, its PSNR cost and its speed in the same tables.
dec=""
if [ -n "${DECODER:-}" ]; then
  worldgen train tokenizer --data "$work/doom_train" --init "$student" --decoder-only --out "$work/${name}_dec" \
    --dec-channels "${DECODER%%:*}" --dec-blocks "${DECODER##*:}" $decoder_budget $(on_gpu --compile --no-compile) \
    && dec=$work/${name}_dec/ckpt || log "decoder ($DECODER) failed"
  log "decoder $DECODER trained in $(( $(date +%s) - t3 )) s"; t3=$(date +%s)
fi

# Teacher and student on the same unseen-seed windows (the student's eval reuses the teacher's picks).
[ -f "$work/eval_teacher.json" ] || worldgen eval --checkpoint "$teacher" --data "$work/doom_heldout" --split all $eval \
  --json "$work/eval_teacher.json" --no-media || log "teacher eval failed"
for s in 1 2 4; do
  worldgen eval --checkpoint "$student" --data "$work/doom_heldout" --split all $eval --steps $s \
    --json "$work/eval_${name}_${s}step.json" --windows-from "$work/eval_teacher.json" --no-media || log "$name eval ($s steps) failed"
done
[ -z "$dec" ] || worldgen eval --checkpoint "$dec" --data "$work/doom_heldout" --split all $eval \
  --json "$work/eval_${name}_dec.json" --windows-from "$work/eval_teacher.json" --no-media || log "${name}_dec eval failed"
t4=$(date +%s); log "evaluated in $((t4 - t3)) s"

# Speed, teacher and student in the same run on the same GPU (the teacher again: another lease, another speed),
# before the long sessions (both GPU runs so far ran out of device time in the benches).
for who in ${name}_1step teacher ${name}_2step ${dec:+${name}_dec}; do
  case $who in
    teacher) m=$teacher extra="" ;;
    *_dec) m=$dec extra="" ;;  # at the student's picked steps
    *_2step) m=$student extra="--steps 2" ;;
    *) m=$student extra="--steps 1" ;;
  esac
  worldgen bench --checkpoint "$m" $bench $extra $(on_gpu --compile --no-compile) --json "$work/bench_$who.json" \
    > "$work/bench_$who.md" 2>&1 || log "bench ($who) failed"
done
t5=$(date +%s); log "benches in $((t5 - t4)) s"

for who in $name teacher; do  # the student's first: the teacher's are in RESULTS if time runs out
  m=$([ $who = teacher ] && echo "$teacher" || echo "$student")
  [ $who = teacher ] && [ -f "$work/long_horizon_teacher.json" ] && continue
  python benchmarks/long_horizon.py --checkpoint "$m" --data "$work/doom_heldout" $long $(on_gpu --compile) \
    --json "$work/long_horizon_$who.json" --plot "$work/long_horizon_$who.png" \
    > "$work/long_horizon_$who.md" 2> "$work/long_horizon_$who.log" || log "long horizon ($who) failed"
done
log "long horizon in $(( $(date +%s) - t5 )) s"

log "done in $(( $(date +%s) - t0 )) s"
