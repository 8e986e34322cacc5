#!/usr/bin/env bash
# The GPU benchmark suite in one call of a short device lease (issue 8): a fixed time budget,
# split over processes that each write their result before the next starts, so a step that runs
# out of time costs only itself.
#
#   OUT=<results dir> SUITE_BUDGET_S=540 bash benchmarks/device_suite.sh
#
# 1. inference: full VIPA forward, float32 / bfloat16, batch 1 and 8 (compile + latency);
# 2. memory+train: the paper's train step in bfloat16 at batch 16 (no remat) and batch 64
#    (remat) - does it fit 80 GB, and its throughput / MFU at those batches
#    (`--train-at-memory-targets`: one compile per step, no batch search);
# 3. profile: where the bfloat16 batch-1 forward spends its time;
# 4. profile-train: where the bfloat16 train step at batch 16 spends its time (MFU's profile);
# 5. if time is left: the float32 train step at batch 16 (no remat), merged into the result.
# Steps not in the default list:
# - `precompile`: compiles the programs of the steps after it in SUITE_STEPS in parallel
#   processes (`$VIPA_BENCH_COMPILE_ONLY`: compile into the persistent cache, run nothing; no GPU
#   preallocation), one process per program, for at most PRECOMPILE_MAX_S seconds (default 330;
#   unfinished compiles are killed, and their steps compile again). The steps after it then load
#   their programs instead of compiling them one after another. Each process's log tail goes
#   into the log. Measured on the H200 (2026-12-04): it does not pay there. One train-step
#   compile alone took 172 s; six of them in parallel had not finished after 330 s (XLA:GPU's
#   compile already uses the host's cores, and its autotuning shares the one GPU). Fewer
#   programs at a time are not measured: leave it out unless that is what a lease measures.
# - `memory-remat`: the batch-64 remat row alone (the last of MEMORY_TARGETS, "BATCH:on|off|
#   POLICY" rows of `benchmarks.run --memory-targets`, default "16:off 64:on": e.g.
#   MEMORY_TARGETS=64:dots_all times batch 64 with remat keeping every matmul output);
# - `attention`: Swin-B forward + backward under each window-attention variant (einsum with
#   the backend's `auto` q/k/v projection, einsum with separate ones, xla, cudnn; bfloat16,
#   batch 8: `benchmarks.attention`, one `attention-*.json`); ATTN_IMPLS (e.g. "einsum cudnn")
#   picks among `benchmarks.attention`'s named variants (default: its own defaults);
# - `train-ab`: the whole bfloat16 train step at batch 16 (no remat; the quick check: batch 2,
#   remat) under config variants, timed in alternating blocks (`benchmarks.train_ab`, one
#   `train_ab-*.json`); the variants are AB_VARIANTS (default "cudnn:model.swin.
#   attention_impl=cudnn": cuDNN's fused window attention, which a deviceless compile gives
#   30% less kernel I/O and 7 GiB less memory; "before:model.swin.qkv_projection=separate,
#   train.grad_norm=per_leaf" is the program the 2026-12-04 profile measured), beside the
#   base config, whose program is memory+train's row of that batch; AB_ROW=64:on runs them at
#   batch 64 with remat, AB_NO_BASE=1 without the base;
# - `input`: the training input pipeline's batches/s (`benchmarks.input_pipeline`: generated
#   640-px JPEGs decoded, resized to 480 and batched by 16) with each of INPUT_WORKERS grain
#   worker processes (default "0 8") and INPUT_THREADS read threads (default "2 8 16"), to set
#   beside the train step's images/s: no GPU, no compile, about a minute (one
#   `input_pipeline-*.json`).
# `COMPILE_PHASES=1` runs each step under `benchmarks.compile_phases`: XLA's compile time per
# pass, pipeline and phase (autotuning included) of every program named like
# COMPILE_PHASES_MODULE (default jit_train_step), one `compile_phases-*-<step>.json` per step.
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
SELF=${BASH_SOURCE[0]}
STEPS=${SUITE_STEPS:-inference memory+train profile profile-train train-float32}
AB_VARIANTS=${AB_VARIANTS:-cudnn:model.swin.attention_impl=cudnn}
# The float32 train step's extra XLA flags (F32_XLA_FLAGS; set it empty for none): GEMMs from
# cuBLAS only, no Triton GEMM autotuning. Its compile with Triton on outlasted 279 s on the
# H200 (2026-12-04) where bfloat16's took 172 s; deviceless (no autotuning) the two compile
# alike (144 vs 155 s), so autotuning is the difference. Recorded in the row (`xla_flags`).
F32_XLA_FLAGS_GPU=--xla_gpu_enable_triton_gemm=false
export PYTHONUNBUFFERED=1

if [[ ${SUITE_QUICK:-0} == 1 ]]; then
  DEV=(--device cpu --quick --no-torch)  # the GPU suite has no PyTorch comparison
  F32_XLA_FLAGS_GPU=
  PROFILE_DEV=(--device cpu --quick)
  ATTN_DEV=(--device cpu --quick)
  INPUT_ARGS=(--batch 2 --steps 2 --images 12 --source-size 96 --image-size 64 --workers 0)
  TRAIN_BATCH=2
  INFER_BATCHES=(1)
  MEM_TARGETS=(2:on)
  PROFILE_TRAIN=(--remat)  # the quick memory row's step (batch 2, remat)
  AB_ROW=2:on  # train-ab's base: that step too
else
  DEV=(--device gpu)
  PROFILE_DEV=(--device gpu)
  ATTN_DEV=(--device gpu)
  read -r -a INPUT_ARGS <<<"--steps 30 --workers ${INPUT_WORKERS:-0 8} --threads ${INPUT_THREADS:-2 8 16}"
  TRAIN_BATCH=16
  INFER_BATCHES=(1 8)
  read -r -a MEM_TARGETS <<<"${MEMORY_TARGETS:-16:off 64:on}"
  PROFILE_TRAIN=()  # the memory row's batch-16 step without remat (compiled again: the
                    # profile turns XLA's command buffers off, which changes the cache key)
  # train-ab's base: the memory row's batch-16 step (the same program); AB_ROW=64:on times the
  # variants at batch 64 with remat (the MFU row) instead
  AB_ROW=${AB_ROW:-16:off}
fi
AB_ARGS=(--batch "${AB_ROW%%:*}")
[[ $AB_ROW == *:on ]] && AB_ARGS+=(--remat)
# AB_NO_BASE=1: only the AB_VARIANTS, no base program (its compile, 172-274 s on the H200,
# would take most of a call)
[[ ${AB_NO_BASE:-0} == 1 ]] && AB_ARGS+=(--no-base)
# One persistent XLA compilation cache for the steps: a program compiled by an earlier step,
# `precompile` or an earlier call of this script in the same lease is loaded, not compiled.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/vipa_jax-xla-cache}
# And one cache of XLA:GPU's per-fusion autotuning results: programs that share most fusions
# (the batch-16 train step with and without command buffers, or under an A/B variant) tune
# each fusion once. GPU only: the flag is part of the compilation cache key, and the quick CPU
# check shares its cache with the tests' quick runs. The suite starts the cache from the
# tarball AUTOTUNE_SEED (default benchmarks/results/autotune-<GPU>.tgz, if there) and leaves
# it as $OUT/autotune-cache.tgz: commit that as the seed, and the next lease on the same GPU
# and jax version skips the autotuning it did (results for other fusions are just not used).
# Both flags name the folder: XLA's newer autotuner (jax 0.11.2 on the H200 lease) reads and
# writes only `xla_gpu_experimental_autotuner_cache_dir`, and left the per-fusion folder empty.
AUTOTUNE_DIR=${AUTOTUNE_CACHE_DIR:-/tmp/vipa_jax-autotune}
if [[ ${SUITE_QUICK:-0} != 1 ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE_DIR"
  XLA_FLAGS+=" --xla_gpu_experimental_autotuner_cache_dir=$AUTOTUNE_DIR"
fi

# cmd NAME [ARGS...]: exec the step's command (with ARGS appended); `bash $SELF __cmd NAME` runs
# it in its own process, so that `timeout` can stop it.
cmd() {
  local name=$1
  shift
  local py=($PY)
  if [[ ${COMPILE_PHASES:-0} == 1 ]]; then  # XLA's compile time per pass and phase, per step
    py=($PY -m benchmarks.compile_phases --module "${COMPILE_PHASES_MODULE:-jit_train_step}"
        --out "$OUT" --tag "${name//+/-}" --log-out "/tmp/compile_phases-${name//+/-}.log" -- $PY)
  fi
  case $name in
    inference) exec "${py[@]}" -m benchmarks.run "${DEV[@]}" --no-memory --no-train \
      --out "$OUT" "$@" ;;
    memory+train) exec "${py[@]}" -m benchmarks.run "${DEV[@]}" --no-infer \
      --memory-dtypes bfloat16 --memory-targets "${MEM_TARGETS[@]}" --train-at-memory-targets \
      --out "$OUT" "$@" ;;
    memory-remat) cmd memory+train --memory-targets "${MEM_TARGETS[-1]}" "$@" ;;  # the last wins
    attention) exec "${py[@]}" -m benchmarks.attention "${ATTN_DEV[@]}" --train \
      ${ATTN_IMPLS:+--impls $ATTN_IMPLS} --out "$OUT" "$@" ;;
    profile) exec "${py[@]}" -m benchmarks.profile "${PROFILE_DEV[@]}" --dtype bfloat16 \
      --out "$OUT" "$@" ;;
    profile-train) exec "${py[@]}" -m benchmarks.profile "${PROFILE_DEV[@]}" --train \
      --dtype bfloat16 --batch "$TRAIN_BATCH" "${PROFILE_TRAIN[@]}" --out "$OUT" "$@" ;;
    train-float32) XLA_FLAGS="${XLA_FLAGS:-} ${F32_XLA_FLAGS-$F32_XLA_FLAGS_GPU}" \
      exec "${py[@]}" -m benchmarks.run "${DEV[@]}" --no-infer --no-memory \
      --train-configs float32:off --no-search --train-batch 16 --out "$OUT" "$@" ;;
    input) exec $PY -m benchmarks.input_pipeline "${INPUT_ARGS[@]}" --out "$OUT" "$@" ;;
    train-ab) exec "${py[@]}" -m benchmarks.train_ab "${PROFILE_DEV[@]}" --dtype bfloat16 \
      "${AB_ARGS[@]}" --out "$OUT" "$@" ;;
    *) echo "unknown command $name" >&2; exit 2 ;;
  esac
}

# precompile STEP...: one compile-only process per program of each step, in parallel; wait.
precompile() {
  local pids=() names=() name arg v
  rm -f /tmp/precompile-*.log
  launch() {  # launch LABEL STEP [ARGS...]
    local label=$1
    shift
    VIPA_BENCH_COMPILE_ONLY=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
      bash "$SELF" __cmd "$@" >"/tmp/precompile-$label.log" 2>&1 &
    pids+=($!)
    names+=("$label")
  }
  for name in "$@"; do
    case $name in
      inference)
        for v in float32 bfloat16; do
          for arg in "${INFER_BATCHES[@]}"; do
            launch "inference-$v-b$arg" inference --dtypes "$v" --infer-batch "$arg"
          done
        done ;;
      memory+train)
        for arg in "${MEM_TARGETS[@]}"; do
          launch "memory-${arg/:/-}" memory+train --memory-targets "$arg"
        done ;;
      memory-remat) [[ " $* " == *" memory+train "* ]] || launch memory-remat memory-remat ;;
      attention | profile | profile-train | train-float32) launch "$name" "$name" ;;
      train-ab)  # the base is memory+train's batch-16 row where that step runs too
        [[ ${AB_NO_BASE:-0} == 1 ||
           " $* " == *" memory+train "* && " ${MEM_TARGETS[*]} " == *" $AB_ROW "* ]] ||
          launch ab-base train-ab
        for v in $AB_VARIANTS; do
          launch "ab-${v%%:*}" train-ab --no-base --variant "$v"
        done ;;
    esac
  done
  echo "precompile: ${#pids[@]} processes: ${names[*]}"
  local i rc
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    echo "-- precompile ${names[$i]}: exit $rc"
    grep -E "compiled only|Error|error" "/tmp/precompile-${names[$i]}.log" | tail -n 4
  done
}

if [[ ${1:-} == __cmd ]]; then
  shift
  cmd "$@"
elif [[ ${1:-} == __precompile ]]; then
  shift
  precompile "$@"
  exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/device_suite.log"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

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

for name in $STEPS; do  # check the names before anything runs
  case $name in
    precompile | inference | memory+train | memory-remat | attention | profile | \
      profile-train | train-float32 | train-ab | input) ;;
    *) echo "== $name: unknown step (precompile inference memory+train memory-remat" \
         "attention profile profile-train train-float32 train-ab input)"; exit 2 ;;
  esac
done

{
  echo "== device_suite $(date -u +%FT%TZ), budget $BUDGET s, commit ${VIPA_GIT_COMMIT:-from git}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1
  if [[ ${SUITE_QUICK:-0} != 1 ]]; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 |
          tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '_')
    seed=${AUTOTUNE_SEED:-benchmarks/results/autotune-${gpu:-gpu}.tgz}
    mkdir -p "$AUTOTUNE_DIR"
    if [[ -f $seed ]] && tar -xzf "$seed" -C "$AUTOTUNE_DIR"; then
      echo "autotune cache: $(find "$AUTOTUNE_DIR" -type f | wc -l) results from $seed"
    else
      echo "autotune cache: empty (no seed at $seed)"
    fi
  fi
  # H200 (2026-11-26): the four inference compiles took 181 s, one bfloat16 train-step compile
  # (batch 16) about 2 min, the batch-1 forward profile 60 s. MAX and RESERVE below follow.
  rest=$STEPS
  for name in $STEPS; do
    rest=${rest#"$name"}
    rest=${rest# }
    case $name in
      precompile)
        step precompile "${PRECOMPILE_MAX_S:-330}" 60 bash "$SELF" __precompile $rest
        for f in /tmp/precompile-*.log; do  # killed at the time limit: say which
          [[ -e $f ]] && ! grep -q "compiled only" "$f" && echo "-- precompile: no program" \
            "cached by $(basename "$f" .log) ($(tail -n 1 "$f" | cut -c1-150))"
        done ;;
      inference) step inference 200 330 bash "$SELF" __cmd inference ;;
      memory+train) step memory+train 300 70 bash "$SELF" __cmd memory+train ;;
      memory-remat) step memory-remat 400 70 bash "$SELF" __cmd memory-remat ;;
      attention) step attention 400 5 bash "$SELF" __cmd attention ;;  # 4 Swin-B programs
      profile) step profile 90 5 bash "$SELF" __cmd profile ;;
      input) step input 150 5 bash "$SELF" __cmd input ;;
      profile-train) step profile-train 240 5 bash "$SELF" __cmd profile-train ;;
      # the base and each variant: 172 s per train-step compile on the H200 (2026-12-04)
      train-ab) step train-ab 540 5 bash "$SELF" __cmd train-ab \
        $(for v in $AB_VARIANTS; do printf -- '--variant %s ' "$v"; done) ;;
      train-float32)
        if (($(left) > 150 * SCALE)); then
          step train-float32 560 5 bash "$SELF" __cmd train-float32
        else
          echo "== train-float32: skipped, $(left) s of the budget left"
        fi ;;
    esac
  done
  if [[ ${SUITE_QUICK:-0} != 1 && -d $AUTOTUNE_DIR ]] &&
       tar -czf "$OUT/autotune-cache.tgz" -C "$AUTOTUNE_DIR" .; then
    echo "autotune cache: $(find "$AUTOTUNE_DIR" -type f | wc -l) results," \
         "$(du -k "$OUT/autotune-cache.tgz" | cut -f1) KiB in $OUT/autotune-cache.tgz"
  fi
  echo "== done after $(($(date +%s) - START)) s"
} 2>&1 | tee "$LOG"
