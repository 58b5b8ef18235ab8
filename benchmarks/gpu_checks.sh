#!/usr/bin/env bash
# GPU checks for one short window on a GPU machine (one H100/H200: under 8 minutes).
#
#   bash benchmarks/gpu_checks.sh                 # on the GPU machine
#   bash benchmarks/gpu_checks.sh --dry-run       # anywhere: the same steps on the emulated
#                                                 # CUDA device and the Triton interpreter
#   bash benchmarks/gpu_checks.sh --only build,gpu_tests    # a subset (others: skipped)
#
# Steps, in order of value, each under its own time limit (`timeout`) and all under one
# budget (BUDGET_S, default 450 s on a GPU): a step that would start with less than
# MIN_STEP_S left is recorded as no_time.
#   env               versions, GPU and driver (nvidia-smi), tools
#   build             JIT build of the extension (ptxas register/spill report in the log),
#                     the cuda and triton backends available on the device
#   gpu_tests         pytest -m "$GPU_MARK": every test on the real GPU (the CUDA and Triton
#                     suites' cuda cases and the hardware-only tests)
#   contract          the shared contract suite on the device (-k "$CONTRACT_K")
#   bandwidth         benchmarks/bandwidth.py: fwd and fwd+bwd at 64M elements vs. copy
#   bench_gpu         benchmarks/bench_gpu.py --quick at the target sizes
#   terms             benchmarks/bench_terms.py: the prior KL, the IWAE log-weight terms and the
#                     Gaussian log density against eager PyTorch and torch.compile on the GPU
#   trainer           benchmarks/bench_trainer.py on the GPU: `fused-vae train` eager and
#                     --cuda-graphs against the plain loop (default run, IWAE net K = 5)
#   sanitizer_driver  benchmarks/sanitizer_driver.py alone (every path of the CUDA kernels,
#                     small sizes): seconds, and it proves the driver before the sanitizer
#   sanitizer_<tool>  the driver under compute-sanitizer memcheck / racecheck / synccheck /
#                     initcheck (cuda backend; SANITIZER_SHARDS processes per tool) and
#                     memcheck of the triton backend, all in parallel
#   ncu               Nsight Compute of bandwidth.py --profile (each kernel once)
#
# Output: $OUT (default benchmarks/results/gpu-checks-<UTC time>) holds exactly two files,
# rewritten after every step so that a run cut off at any point leaves valid ones:
#   gpu_checks_summary.json   per step: status, rc, seconds, limit, timed_out, log tail,
#                             key numbers; the environment (GPU, driver, torch, triton,
#                             CUDA, git commit, date)
#   gpu_checks_logs.tar.gz    every log and raw result file (gpu_checks/logs/*.log,
#                             bandwidth.json, bench_gpu.json, bench_terms.json, bench_trainer.json, junit XML,
#                             the ncu report)
# The logs are written under $GPU_CHECKS_WORK (default: a new folder in $TMPDIR or /tmp).
#
# --dry-run: FUSED_VAE_CUDA_EMULATE=1, TRITON_INTERPRET=1, CPU tensors, tiny sizes; the
# pytest steps only collect their selection (the tests run in CI anyway); nvidia-smi,
# compute-sanitizer and ncu are skipped and the summary says so (the drivers they would
# run still run alone: sanitizer_driver, sanitizer_memcheck_triton, ncu).
#
# Environment: OUT, GPU_CHECKS_WORK, BUDGET_S, MIN_STEP_S, LIMIT_<step> (whole seconds,
# e.g. LIMIT_build=300), GPU_TESTS (pytest paths), GPU_MARK, CONTRACT_K, PYTEST_WORKERS,
# PER_TEST_TIMEOUT, SANITIZER_SHARDS, GIT_COMMIT (for a copy without .git), PYTHON.
# Exit status: 0 when every step is ok (or skipped on purpose), 1 otherwise, 2 bad usage.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a comma list of steps}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  MODE=dry-run DEV=cpu SIZE=tiny
  export FUSED_VAE_CUDA_EMULATE=1 TRITON_INTERPRET=1
  BUDGET_S=${BUDGET_S:-1200}
else
  MODE=gpu DEV=cuda SIZE=full
  export FUSED_VAE_CUDA_EMULATE=0  # no emulated-device build or tests on the GPU machine
  unset TRITON_INTERPRET
  BUDGET_S=${BUDGET_S:-450}
fi
MIN_STEP_S=${MIN_STEP_S:-15}
GPU_TESTS=${GPU_TESTS:-tests}
GPU_MARK=${GPU_MARK:-gpu}
CONTRACT_K=${CONTRACT_K:-"cuda-$DEV or triton-$DEV or reference-$DEV"}
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-120}
SANITIZER_SHARDS=${SANITIZER_SHARDS:-2}
SANITIZER_TOOLS="memcheck racecheck synccheck initcheck"

SAN_STEPS=()
for tool in $SANITIZER_TOOLS; do
  for ((k = 1; k <= SANITIZER_SHARDS; k++)); do
    if [ "$SANITIZER_SHARDS" = 1 ]; then SAN_STEPS+=("sanitizer_$tool"); else SAN_STEPS+=("sanitizer_${tool}_${k}of$SANITIZER_SHARDS"); fi
  done
done
SAN_STEPS+=(sanitizer_memcheck_triton)
STEPS=(env build gpu_tests contract bandwidth bench_gpu terms trainer sanitizer_driver "${SAN_STEPS[@]}" ncu)
STEP_LIST=$(IFS=,; echo "${STEPS[*]}")
for name in ${ONLY//,/ }; do
  [[ ",$STEP_LIST," == *",$name,"* ]] || { echo "gpu_checks.sh: --only: no step $name (steps: $STEP_LIST)" >&2; exit 2; }
done

OUT=${OUT:-benchmarks/results/gpu-checks-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=${GPU_CHECKS_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-checks.XXXXXX")}
mkdir -p "$OUT" "$WORK/logs" || exit 2
SUMMARY=$OUT/gpu_checks_summary.json
ARCHIVE=$OUT/gpu_checks_logs.tar.gz
helper() {  # helper SUBCOMMAND [options]: benchmarks/gpu_checks.py on this run's files
  "$PY" benchmarks/gpu_checks.py "$1" --summary "$SUMMARY" --archive "$ARCHIVE" --work "$WORK" "${@:2}"
}

# pytest: plugins of the GPU machine's image when present; in a dry run only the selection.
PYTEST=("$PY" -m pytest -rfEs -p no:cacheprovider --durations=15)
if [ "$DRY" = 1 ]; then
  PYTEST+=(-q --collect-only)
else
  PYTEST+=(-v)  # one line per test: a run cut off at its limit still says what ran
  "$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n "$PYTEST_WORKERS")
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout "$PER_TEST_TIMEOUT" --timeout-method thread)
fi

NOTES=(--note "python: $PY")
[ "$DRY" = 1 ] && NOTES+=(--note "dry run: emulated CUDA device (FUSED_VAE_CUDA_EMULATE=1) and Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, tiny sizes; pytest steps only collect; nvidia-smi, compute-sanitizer and ncu skipped")
helper init --mode "$MODE" --budget "$BUDGET_S" --steps "$STEP_LIST" "${NOTES[@]}" || exit 2
DEADLINE=$((SECONDS + BUDGET_S))

record() {  # record NAME [helper record options]
  helper record --name "$@" || echo "gpu_checks: could not record $1" >&2
}

selected() {  # selected NAME: true when --only is unset or names NAME
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]
}

limit_for() {  # limit_for NAME DEFAULT: LIMIT_<NAME> or DEFAULT, cut to the budget left (seconds)
  local var="LIMIT_$1"
  local lim=${!var:-$2} left=$((DEADLINE - SECONDS))
  lim=$((lim < left ? lim : left))
  echo $((lim < 1 ? 1 : lim))  # timeout 0 would mean no limit
}

can_start() {  # can_start NAME: records skipped / no_time and fails when the step must not run
  if ! selected "$1"; then
    record "$1" --status skipped --reason "not selected (--only $ONLY)"
    return 1
  fi
  if [ $((DEADLINE - SECONDS)) -lt "$MIN_STEP_S" ]; then
    record "$1" --status no_time --reason "less than ${MIN_STEP_S}s of the ${BUDGET_S}s budget left"
    return 1
  fi
}

CURRENT=""
CURRENT_PID=""
CURRENT_T0=0
on_signal() {
  trap - TERM INT
  [ -n "$CURRENT_PID" ] && kill -TERM "$CURRENT_PID" 2>/dev/null
  for pid in "${!JOB_NAME[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  wait 2>/dev/null
  [ -n "$CURRENT" ] && record "$CURRENT" --status interrupted --rc 143 --seconds $((SECONDS - CURRENT_T0)) --reason "gpu_checks.sh was stopped"
  for pid in "${!JOB_NAME[@]}"; do record "${JOB_NAME[$pid]}" --status interrupted --reason "gpu_checks.sh was stopped"; done
  helper finish
  exit 1
}
declare -A JOB_NAME=() JOB_T0=() JOB_LIM=() JOB_CMD=()
trap on_signal TERM INT

step() {  # step NAME DEFAULT_LIMIT SKIPPED_TOOLS(-|a,b) CMD...: runs CMD under its limit, records it
  local name=$1 lim skipped=$3
  can_start "$name" || return 0
  lim=$(limit_for "$name" "$2")
  shift 3
  echo "== $name (limit ${lim}s)"
  CURRENT=$name CURRENT_T0=$SECONDS
  timeout -k 10 "$lim" "$@" >"$WORK/logs/$name.log" 2>&1 &
  CURRENT_PID=$!
  wait "$CURRENT_PID"
  local rc=$?
  local extra=()
  [ "$skipped" != - ] && extra=(--skipped-tools "$skipped")
  record "$name" --rc "$rc" --seconds $((SECONDS - CURRENT_T0)) --limit "$lim" --command "$*" "${extra[@]}"
  CURRENT="" CURRENT_PID=""
  tail -n 2 "$WORK/logs/$name.log" | cut -c1-200
  return 0
}

skip_tool_step() {  # skip_tool_step NAME TOOL REASON: a hardware tool's step in a dry run
  if selected "$1"; then
    record "$1" --status skipped --skipped-tools "$2" --reason "$3"
  else
    record "$1" --status skipped --reason "not selected (--only $ONLY)"
  fi
}

start_job() {  # start_job NAME DEFAULT_LIMIT CMD...: like step, in the background
  local name=$1 lim
  can_start "$name" || return 0
  lim=$(limit_for "$name" "$2")
  shift 2
  echo "== $name (limit ${lim}s, in parallel)"
  timeout -k 10 "$lim" "$@" >"$WORK/logs/$name.log" 2>&1 &
  JOB_NAME[$!]=$name JOB_T0[$!]=$SECONDS JOB_LIM[$!]=$lim JOB_CMD[$!]="$*"
}

wait_jobs() {  # records each background job as it ends
  local pid rc
  while [ ${#JOB_NAME[@]} -gt 0 ]; do
    if ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))); then
      wait -n -p pid "${!JOB_NAME[@]}"
      rc=$?
    else
      pid=$(printf '%s\n' "${!JOB_NAME[@]}" | sort -n | head -n 1)
      wait "$pid"
      rc=$?
    fi
    record "${JOB_NAME[$pid]}" --rc "$rc" --seconds $((SECONDS - JOB_T0[$pid])) --limit "${JOB_LIM[$pid]}" --command "${JOB_CMD[$pid]}"
    echo "   ${JOB_NAME[$pid]} rc=$rc"
    unset "JOB_NAME[$pid]" "JOB_T0[$pid]" "JOB_LIM[$pid]" "JOB_CMD[$pid]"
  done
}

echo "gpu_checks: $MODE, budget ${BUDGET_S}s, results in $OUT, logs in $WORK"
if [ "$DRY" = 1 ]; then
  step env 120 nvidia-smi "$PY" benchmarks/gpu_checks.py env --out "$WORK/environment.json" --no-hardware
else
  step env 60 - "$PY" benchmarks/gpu_checks.py env --out "$WORK/environment.json"
fi

# The build prints ptxas's register / spill report of each kernel (nvcc -Xptxas -v). A dry
# run in a fresh checkout builds the CPU extension and the emulated device (minutes).
step build $((DRY ? 600 : 240)) - env FUSED_VAE_VERBOSE_BUILD=1 NVCC_APPEND_FLAGS="-Xptxas -v" \
  "$PY" benchmarks/gpu_checks.py build --device "$DEV" --backends cuda,triton
if [ -f "$WORK/logs/build.log" ] && ! grep -q "^extension loaded: yes" "$WORK/logs/build.log"; then
  # Every later process would try the build again (and wait on the lock file of a build
  # killed at its limit): the steps after this one run without the extension (the triton
  # and reference backends still run; the cuda backend's tests and drivers fail).
  find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -path '*fused_vae_ext*' -name lock -delete 2>/dev/null
  export FUSED_VAE_DISABLE_EXTENSION=1
  helper note "the extension did not load in step build: later steps ran with FUSED_VAE_DISABLE_EXTENSION=1"
fi

# shellcheck disable=SC2086  # GPU_TESTS is a list of paths
step gpu_tests 150 - "${PYTEST[@]}" $GPU_TESTS -m "$GPU_MARK" --junitxml="$WORK/gpu_tests.xml"
# shellcheck disable=SC2086
step contract 150 - "${PYTEST[@]}" $GPU_TESTS -m "not ($GPU_MARK)" -k "$CONTRACT_K" --junitxml="$WORK/contract.xml"

step bandwidth 60 - "$PY" benchmarks/bandwidth.py --device "$DEV" --size "$SIZE" --out "$WORK/bandwidth.json"
if [ "$DRY" = 1 ]; then
  step bench_gpu 120 - "$PY" benchmarks/bench_gpu.py --device cpu --tiny --backends cuda,triton --out "$WORK/bench_gpu.json"
else
  step bench_gpu 100 - "$PY" benchmarks/bench_gpu.py --quick --sizes "128x32;8x16x128x128;256x16x128x128" \
    --backends cuda,triton --out "$WORK/bench_gpu.json"
fi

if [ "$DRY" = 1 ]; then
  step terms 240 - "$PY" benchmarks/bench_terms.py --device cpu --quick --threads 1 --out "$WORK/bench_terms.json"
else
  step terms 100 - "$PY" benchmarks/bench_terms.py --device cuda --min-run-time 0.3 --rounds 1 --out "$WORK/bench_terms.json"
fi

if [ "$DRY" = 1 ]; then  # the same script on the CPU: one short round of the default run
  step trainer 240 - "$PY" benchmarks/bench_trainer.py --device cpu --configs default --variants eager --rounds 1 \
    --steps 100 --out "$WORK/bench_trainer.json"
else
  step trainer 150 - "$PY" benchmarks/bench_trainer.py --device cuda --configs default,iwae-iwae-K5 \
    --variants eager,cuda-graphs --compiled-configs default,iwae-iwae-K5 --rounds 1 --steps 400 \
    --out "$WORK/bench_trainer.json"
fi

DRIVER=("$PY" benchmarks/sanitizer_driver.py --device "$DEV" --size "$SIZE")
step sanitizer_driver 45 - "${DRIVER[@]}" --backends cuda
NO_SANITIZER="compute-sanitizer is a hardware tool (dry run); the driver ran alone in step sanitizer_driver"
i=0
for tool in $SANITIZER_TOOLS; do
  for ((k = 1; k <= SANITIZER_SHARDS; k++)); do
    name=${SAN_STEPS[$i]}
    i=$((i + 1))
    if [ "$DRY" = 1 ]; then
      skip_tool_step "$name" compute-sanitizer "$NO_SANITIZER"
    else
      start_job "$name" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "${DRIVER[@]}" --backends cuda --shard "$k/$SANITIZER_SHARDS"
    fi
  done
done
if [ "$DRY" = 1 ]; then  # no other step runs the driver's triton cases: they run alone here
  step sanitizer_memcheck_triton 120 compute-sanitizer "${DRIVER[@]}" --backends triton
else
  start_job sanitizer_memcheck_triton 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 9 "${DRIVER[@]}" --backends triton
  wait_jobs
fi

PROFILE=("$PY" benchmarks/bandwidth.py --device "$DEV" --size "$SIZE" --profile --backends "cuda,triton")
if [ "$DRY" = 1 ]; then
  step ncu 120 ncu "${PROFILE[@]}"
else
  # shellcheck disable=SC2016  # $0 and $@ belong to the inner bash
  step ncu 90 - bash -c 'ncu --clock-control none --kernel-name "regex:(_fwd|_bwd|_rowsum|_total|row_pass)_kernel" \
      --launch-count 64 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      -f -o "$0/ncu_bandwidth" "${@}" && ncu --import "$0/ncu_bandwidth.ncu-rep" --page details' "$WORK" "${PROFILE[@]}"
fi

helper finish
