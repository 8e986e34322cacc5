#!/usr/bin/env bash
# The GPU benchmark suite in one call of a short device lease (issue 8): a fixed time budget,
# split over processes that each write their result before the next starts, so a step that runs
# out of time costs only itself.
#
#   OUT=<results dir> SUITE_BUDGET_S=540 bash benchmarks/device_suite.sh
#
# 1. inference: full VIPA forward, float32 / bfloat16, batch 1 and 8 (compile + latency);
# 2. memory + train: the paper's train step in bfloat16 at batch 16 (no remat) and batch 64
#    (remat) - does it fit 80 GB, and its throughput / MFU at those batches
#    (`--train-at-memory-targets`: one compile per step, no batch search);
# 3. profile: where the bfloat16 batch-1 forward spends its time;
# 4. profile-train: where the bfloat16 train step at batch 16 spends its time (MFU's profile);
# 5. if time is left: the float32 train step at batch 16 (no remat), merged into the result.
# Steps not in the default list: `memory-remat` (the batch-64 remat row alone) and `attention`
# (Swin-B forward + backward with each `swin.attention_impl`, einsum / xla / cudnn, bfloat16,
# batch 8: `benchmarks.attention`, one `attention-*.json`).
# `SUITE_STEPS` picks and orders the steps (default "inference memory+train profile
# profile-train train-float32"), so a later lease can measure what an earlier one did not.
# Steps 1, 2 and 5 write one `run-*.json` (the later ones merge the earlier sections), steps 3
# and 4 a `profile-*.json` each; the log is `device_suite.log`. Python packages the machine
# lacks travel as wheels in `.whl/` (installed to /tmp/site). Set `VIPA_GIT_COMMIT` (and
# `VIPA_GIT_DIRTY=0`) where the tree travels without .git, so the results name their commit.
# `SUITE_QUICK=1` runs the same steps on the tiny model on the CPU (to check this script).
# `SUITE_TIME_SCALE=N` multiplies every step's time limit and reserve, and the default budget
# (default 1, the GPU's timings): the CPU check on a slow or shared machine uses 2.
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
SCALE=${SUITE_TIME_SCALE:-1}
BUDGET=${SUITE_BUDGET_S:-$((540 * SCALE))}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/device_suite.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - ($(date +%s) - START))); }

if [[ ${SUITE_QUICK:-0} == 1 ]]; then
  DEV=(--device cpu --quick --no-torch)  # the GPU suite has no PyTorch comparison
  PROFILE_DEV=(--device cpu --quick)
  ATTN_DEV=(--device cpu --quick)
  TRAIN_BATCH=2
  PROFILE_TRAIN=(--remat)  # the quick memory row's step (batch 2, remat): loaded, not compiled
else
  DEV=(--device gpu)
  PROFILE_DEV=(--device gpu)
  ATTN_DEV=(--device gpu)
  TRAIN_BATCH=16
  PROFILE_TRAIN=()  # the memory row's batch-16 step without remat (compiled again: the
                    # profile turns XLA's command buffers off, which changes the cache key)
fi
# One persistent XLA compilation cache for the steps: a program compiled by an earlier step (or
# an earlier call of this script in the same lease) is loaded instead of compiled again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/vipa_jax-xla-cache}

# step NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD for at most MAX_SECONDS, and never into
# the last RESERVE_SECONDS of the budget (kept for the steps after it).
step() {
  local name=$1 max=$(($2 * SCALE)) reserve=$(($3 * SCALE))
  shift 3
  local t=$(($(left) - reserve))
  ((t < max)) && max=$t
  if ((max < 20)); then
    echo "== $name: skipped, $(left) s of the budget left"
    return
  fi
  echo "== $name: up to $max s ($(left) s of the budget left)"
  local t0=$(date +%s)
  timeout -k 10 "$max" "$@"
  echo "== $name: exit $? after $(($(date +%s) - t0)) s"
}

{
  echo "== device_suite $(date -u +%FT%TZ), budget $BUDGET s, commit ${VIPA_GIT_COMMIT:-from git}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1
  # H200 (2026-11-26): the four inference compiles took 181 s, one bfloat16 train-step compile
  # (batch 16) about 2 min, the batch-1 forward profile 60 s. MAX and RESERVE below follow.
  for name in ${SUITE_STEPS:-inference memory+train profile profile-train train-float32}; do
    case $name in
      inference)
        step inference 200 330 $PY -m benchmarks.run "${DEV[@]}" --no-memory --no-train \
          --out "$OUT" ;;
      memory+train)
        step memory+train 300 70 $PY -m benchmarks.run "${DEV[@]}" --no-infer \
          --memory-dtypes bfloat16 --train-at-memory-targets --out "$OUT" ;;
      memory-remat)  # the batch-64 remat row alone
        step memory-remat 400 70 $PY -m benchmarks.run "${DEV[@]}" --no-infer \
          --memory-dtypes bfloat16 --memory-targets 64:on --train-at-memory-targets \
          --out "$OUT" ;;
      attention)  # swin.attention_impl A/B: einsum / xla / cudnn, bfloat16 Swin-B, batch 8
        step attention 150 5 $PY -m benchmarks.attention "${ATTN_DEV[@]}" --train --out "$OUT" ;;
      profile)
        step profile 90 5 $PY -m benchmarks.profile "${PROFILE_DEV[@]}" --dtype bfloat16 \
          --out "$OUT" ;;
      profile-train)
        step profile-train 240 5 $PY -m benchmarks.profile "${PROFILE_DEV[@]}" --train \
          --dtype bfloat16 --batch "$TRAIN_BATCH" "${PROFILE_TRAIN[@]}" --out "$OUT" ;;
      train-float32)
        if (($(left) > 150 * SCALE)); then
          step train-float32 400 5 $PY -m benchmarks.run "${DEV[@]}" --no-infer --no-memory \
            --train-configs float32:off --no-search --train-batch 16 --out "$OUT"
        else
          echo "== train-float32: skipped, $(left) s of the budget left"
        fi ;;
      *) echo "== $name: unknown step (inference memory+train memory-remat attention" \
           "profile profile-train train-float32)"; exit 2 ;;
    esac
  done
  echo "== done after $(($(date +%s) - START)) s"
} 2>&1 | tee "$LOG"
