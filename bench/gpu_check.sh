#!/usr/bin/env bash
# One prepared GPU check (H100/H200): build from source against the machine's own torch, the CUDA tests, the kernel
# benchmark and the UNet / sampling benchmarks, a short summary table.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Made to run once on a lent machine with little device time: everything sits under one global deadline
# (GPU_CHECK_BUDGET seconds, default 460, so the whole check ends within about 8 minutes), every step is guarded by
# `timeout` and gets at most what is left, a failing step never stops the later ones, and progress is printed as it
# goes. Written under OUT_DIR:
#   env.txt build.log bad_input.log tests.log kernels.{log,json} unet.{log,json} sample.{log,json}
#   tests_attention_mma.log kernels_attention_mma.{log,json} unet_compile.{log,json} summary.md
# The opt-in tensor-core attention (DDPM_FAST_CUDA_ATTENTION=mma, csrc/cuda/attention_mma_kernels.cuh, never run on a
# GPU before): after the sampling benchmark, the attention tests of tests/test_ops_cuda.py run again with the variable
# set (every fp16/bf16 raw-op case then goes through that kernel) and the attention rows of the kernel benchmark are
# timed again with it (kernels_attention_mma.json, next to kernels.json's CUDA-core / SDPA figures), so that the next
# session can decide whether it becomes the default. It comes before the torch.compile step because that one takes
# whatever time is left; GPU_CHECK_MMA=0 skips it. Its failures are reported, not counted in the exit status (the
# default paths do not use that kernel).
# Per-step limits (seconds) and arguments can be overridden from the environment: GPU_CHECK_T_BUILD, _T_TESTS,
# _T_OTHER_TESTS, _T_KERNELS, _T_UNET, _T_SAMPLE, _T_MMA_TESTS, _T_MMA_KERNELS, _T_COMPILE, and
# GPU_CHECK_KERNELS_ARGS, _UNET_ARGS, _SAMPLE_ARGS, _MMA_KERNELS_ARGS, _COMPILE_ARGS (replace the defaults below).
# Exit status: 0 when the build succeeded and every test passed, 1 otherwise (benchmark figures never fail it).
set -u

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}
RESERVE=15  # kept for the summary
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
# Seconds a step may take: min(wanted, what is left of the budget minus the summary's reserve), at least 0.
allow() {
  local want=$1 left=$(( BUDGET - $(elapsed) - RESERVE ))
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 0 ] && want=0
  echo "$want"
}
status_of() {  # rc, seconds -> words
  case $1 in
    0) echo "ok ($2 s)" ;;
    124) echo "TIMED OUT after $2 s" ;;
    139) echo "CRASHED (segfault, rc=139)" ;;
    134) echo "CRASHED (abort, rc=134)" ;;
    *) echo "FAILED (rc=$1)" ;;
  esac
}
# Run a benchmark subcommand from /tmp (so the installed package is the one imported): label, wanted seconds,
# log and JSON base name, then its arguments. Sets $bench_status.
bench_step() {
  local label=$1 want=$2 name=$3; shift 3
  local t; t=$(allow "$want")
  if [ "$t" -lt 30 ]; then bench_status="skipped (no time left)"; log "$label: $bench_status"; return; fi
  log "$label, up to ${t}s (log: $name.log)"
  local s0; s0=$(date +%s)
  # --budget: stop starting new rows with time left to write the JSON; timeout: the hard stop.
  (cd /tmp && timeout "$t" "$PY" -m ddpm_fast.bench "$@" --budget $(( t * 3 / 4 )) --json "$OUT/$name.json") \
    >"$OUT/$name.log" 2>&1
  local rc=$?
  bench_status=$(status_of $rc $(( $(date +%s) - s0 )))
  [ "$rc" = 1 ] && bench_status="ran, with errors in some rows (see $name.log)"
  grep -E "^ *[a-z0-9-]+ +(fp|bf)[0-9]+ b|^target|ERROR" "$OUT/$name.log" | head -40
  log "$label: $bench_status"
}

build_status="not run"; import_status="not run"; bad_input_status="not run"; tests_status="not run"
other_tests_status="not run"; kernels_status="not run"; unet_status="not run"; sample_status="not run"
mma_tests_status="not run"; mma_kernels_status="not run"; compile_status="not run"; fail=0

# ---------------------------------------------------------------------------------------------------- 1. build
{
  echo "date: $(date -u +%FT%TZ)"
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  timeout 60 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -1
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "cpus: $(nproc)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Build for this GPU's architecture only (fast); fall back to 9.0.
cap=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
case "$cap" in [0-9]*.[0-9]*) ;; *) cap=9.0 ;; esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST_OVERRIDE:-$cap}
export MAX_JOBS=${MAX_JOBS:-16} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} DDPM_FAST_CUDA=ON
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

log "building against this machine's torch, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (log: build.log)"
s0=$(date +%s)
timeout "$(allow "${GPU_CHECK_T_BUILD:-240}")" "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
rc=$?
build_status=$(status_of $rc $(( $(date +%s) - s0 )))
[ "$rc" = 0 ] || { fail=1; tail -40 "$OUT/build.log"; }
log "build: $build_status"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  log "installing the carried wheels from .whl/ (--no-deps) into /tmp/site: $(ls .whl | tr '\n' ' ')"
  if timeout "$(allow 90)" "$PY" -m pip install --no-deps --no-index --target /tmp/site .whl/*.whl >>"$OUT/build.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    log "wheel install failed (see build.log)"
  fi
fi

# The package's two libraries: ddpm_fast._C (schemas, CPU kernels) and the CUDA library ddpm_fast._native loads.
# Imported from /tmp so the installed package is the one found, not the checkout.
if [ "$rc" = 0 ]; then
  if (cd /tmp && timeout "$(allow 60)" "$PY" -c "
import torch, ddpm_fast, ddpm_fast._native as n
assert n.available(), n.load_error()
print('ddpm_fast from', ddpm_fast.__file__, '| cpu isa', n.cpu_isa(), '| cuda kernels', n.has_cuda(), n.cuda_error() or '')
assert n.has_cuda(), 'CUDA kernels not loaded: %s' % n.cuda_error()
") >>"$OUT/build.log" 2>&1; then
    import_status="ok: $(tail -1 "$OUT/build.log")"
  else
    import_status="FAILED: $(tail -1 "$OUT/build.log")"
    fail=1
  fi
  log "import: $import_status"
fi
built=0; [ "$fail" = 0 ] && built=1

# ---------------------------------------------------------------------------------------------------- 2. tests
# The raw-op bad-input call that once crashed the process on an H200, alone in a child first: a crash here is
# reported, not the end of the run. DEV selects the device (DEV=cpu runs the same check on a CPU).
BAD_INPUT_PY='
import os, sys, torch, ddpm_fast.ops
x = torch.randn(2, 64, 4, 4, device=os.environ.get("DEV", "cuda"))
try:
    torch.ops.ddpm_fast.group_norm_silu(x, 3, None, None, 1e-5, None, True)
except RuntimeError as e:
    assert "divisible" in str(e), e
    print("raised:", str(e).splitlines()[0])
else:
    sys.exit("no error raised for C=64 with 3 groups")
'
if [ "$built" = 1 ]; then
  (cd /tmp && DEV=cuda timeout "$(allow 60)" "$PY" -c "$BAD_INPUT_PY") >"$OUT/bad_input.log" 2>&1
  rc=$?
  bad_input_status="$(status_of $rc 0 | sed 's/ (0 s)//'): $(tail -1 "$OUT/bad_input.log")"
  [ "$rc" = 0 ] || fail=1
  log "raw-op bad input: $bad_input_status"
fi

run_tests() {  # label, wanted seconds, pytest args...  (--maxfail, not -x: one run shows every broken case)
  local label=$1 want=$2; shift 2
  local t; t=$(allow "$want")
  local logf=${TESTS_LOG:-$OUT/tests.log}
  if [ "$t" -lt 20 ]; then echo "===== $label: skipped (no time left)" >>"$logf"; return 3; fi
  echo "===== $label: $PY -m pytest $*" >>"$logf"
  timeout "$t" "$PY" -m pytest -q -rfE --tb=short --maxfail=30 -p no:cacheprovider "$@" >>"$logf" 2>&1
}
: >"$OUT/tests.log"
if [ "$built" = 1 ]; then
  log "CUDA op tests (log: tests.log)"
  run_tests "tests/test_ops_cuda.py" "${GPU_CHECK_T_TESTS:-150}" tests/test_ops_cuda.py
  rc=$?
  line=$(grep -E "(passed|failed|error|skipped)" "$OUT/tests.log" | tail -1)
  case $rc in
    0) tests_status="ok: $line" ;;
    3) tests_status="skipped (no time left)"; fail=1 ;;
    *) tests_status="$(status_of $rc 0 | sed 's/ (0 s)//'): $line"; fail=1 ;;
  esac
  log "test_ops_cuda: $tests_status"
  [ "$rc" != 0 ] && grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30

  others=$(grep -l -E "mark\.cuda" tests/*.py 2>/dev/null | grep -v "tests/test_ops_cuda.py" | tr '\n' ' ')
  if [ -n "$others" ]; then
    log "other CUDA-marked tests: $others"
    # shellcheck disable=SC2086
    run_tests "-m cuda" "${GPU_CHECK_T_OTHER_TESTS:-90}" -m cuda $others
    rc=$?
    line=$(grep -E "(passed|failed|error|skipped|deselected)" "$OUT/tests.log" | tail -1)
    case $rc in
      0) other_tests_status="ok: $line" ;;
      5) other_tests_status="none collected" ;;
      3) other_tests_status="skipped (no time left)" ;;
      *) other_tests_status="$(status_of $rc 0 | sed 's/ (0 s)//'): $line"; fail=1 ;;
    esac
    log "other CUDA tests: $other_tests_status"
  else
    other_tests_status="none found"
  fi
else
  tests_status="skipped (build or import failed)"
fi

# ---------------------------------------------------------------------------------------------------- 3. benchmarks
# Defaults sized for the lease; the targets' rows first. Kernels: every op at the UNets' shapes in fp16/bf16/fp32.
# unet/sample: no torch.compile (fast); then, with what is left, the compile peer the 256-px target names.
KERNELS_ARGS=${GPU_CHECK_KERNELS_ARGS:-"--rounds 5 --min-time 0.005"}
UNET_ARGS=${GPU_CHECK_UNET_ARGS:-"--dtypes fp16 --configs cifar10-32:1,cifar10-32:64,256px:8 --variants diffusers_eager,diffusers_channels_last,ddpm_fast --rounds 7 --timeout 60"}
SAMPLE_ARGS=${GPU_CHECK_SAMPLE_ARGS:-"--dtypes fp16 --configs cifar10-32:1,cifar10-32:64,256px:8 --variants diffusers_eager,ddpm_fast_nograph,ddpm_fast --rounds 3 --timeout 60"}
COMPILE_ARGS=${GPU_CHECK_COMPILE_ARGS:-"--dtypes fp16 --configs 256px:8 --variants diffusers_eager,ddpm_fast,diffusers_compile_max_autotune --rounds 5"}
MMA_KERNELS_ARGS=${GPU_CHECK_MMA_KERNELS_ARGS:-"--dtypes fp16,bf16 --rounds 5 --min-time 0.005"}
if [ "$built" = 1 ]; then
  # shellcheck disable=SC2086
  bench_step "kernel benchmark" "${GPU_CHECK_T_KERNELS:-110}" kernels kernels --device cuda $KERNELS_ARGS
  kernels_status=$bench_status
  # shellcheck disable=SC2086
  bench_step "UNet forward benchmark" "${GPU_CHECK_T_UNET:-60}" unet unet --device cuda $UNET_ARGS
  unet_status=$bench_status
  # shellcheck disable=SC2086
  bench_step "sampling benchmark" "${GPU_CHECK_T_SAMPLE:-60}" sample sample --device cuda $SAMPLE_ARGS
  sample_status=$bench_status

  # The opt-in tensor-core attention: its tests, then the attention rows, with DDPM_FAST_CUDA_ATTENTION=mma (read
  # once per process by ddpm_fast.ops and by the CUDA library, so both run in fresh processes). The mma-specific
  # tests start their own children and already ran above; the rest of the attention tests (and the graph capture)
  # now go through that kernel for every fp16/bf16 call of the raw op.
  if [ "${GPU_CHECK_MMA:-1}" = 1 ]; then
    log "attention tests with DDPM_FAST_CUDA_ATTENTION=mma (log: tests_attention_mma.log)"
    : >"$OUT/tests_attention_mma.log"
    export DDPM_FAST_CUDA_ATTENTION=mma
    TESTS_LOG="$OUT/tests_attention_mma.log" run_tests "attention tests, DDPM_FAST_CUDA_ATTENTION=mma" \
      "${GPU_CHECK_T_MMA_TESTS:-60}" tests/test_ops_cuda.py -k "(attention or capture) and not mma_ and not variable"
    rc=$?
    line=$(grep -E "(passed|failed|error|skipped|deselected)" "$OUT/tests_attention_mma.log" | tail -1)
    case $rc in
      0) mma_tests_status="ok: $line" ;;
      3) mma_tests_status="skipped (no time left)" ;;
      *) mma_tests_status="$(status_of $rc 0 | sed 's/ (0 s)//'): $line"
         grep -E "^(FAILED|ERROR)" "$OUT/tests_attention_mma.log" | head -20 ;;
    esac
    log "attention tests (mma): $mma_tests_status"
    # shellcheck disable=SC2086
    bench_step "attention benchmark, DDPM_FAST_CUDA_ATTENTION=mma" "${GPU_CHECK_T_MMA_KERNELS:-50}" \
      kernels_attention_mma kernels --device cuda --ops attention $MMA_KERNELS_ARGS
    mma_kernels_status=$bench_status
    unset DDPM_FAST_CUDA_ATTENTION
  else
    mma_tests_status="skipped (GPU_CHECK_MMA=0)"; mma_kernels_status=$mma_tests_status
  fi
  t=$(allow "${GPU_CHECK_T_COMPILE:-300}")
  # shellcheck disable=SC2086
  bench_step "UNet forward against torch.compile max-autotune" "$t" unet_compile unet --device cuda $COMPILE_ARGS \
    --timeout $(( t > 40 ? t - 20 : 20 ))
  compile_status=$bench_status
else
  kernels_status="skipped (build or import failed)"; unet_status=$kernels_status; sample_status=$kernels_status
  mma_tests_status=$kernels_status; mma_kernels_status=$kernels_status; compile_status=$kernels_status
fi

# ---------------------------------------------------------------------------------------------------- 4. summary
{
  echo "# GPU check ($(sed -n 2p "$OUT/env.txt"))"
  echo
  echo "| step | result |"
  echo "| --- | --- |"
  echo "| build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) | $build_status |"
  echo "| import (ddpm_fast._native: CPU + CUDA libraries) | $import_status |"
  echo "| raw-op bad input in a child process | $bad_input_status |"
  echo "| tests/test_ops_cuda.py | $tests_status |"
  echo "| other -m cuda tests | $other_tests_status |"
  echo "| kernels --device cuda | $kernels_status |"
  echo "| unet --device cuda | $unet_status |"
  echo "| sample --device cuda | $sample_status |"
  echo "| attention tests, DDPM_FAST_CUDA_ATTENTION=mma (not in the exit status) | $mma_tests_status |"
  echo "| kernels --ops attention, DDPM_FAST_CUDA_ATTENTION=mma | $mma_kernels_status |"
  echo "| unet vs torch.compile max-autotune | $compile_status |"
  echo "| total time | $(elapsed) s |"
  files=()
  for f in kernels kernels_attention_mma unet sample unet_compile; do [ -s "$OUT/$f.json" ] && files+=("$OUT/$f.json"); done
  if [ "${#files[@]}" -gt 0 ]; then
    echo
    (cd /tmp && timeout 30 "$PY" -m ddpm_fast.bench summary "${files[@]}" 2>&1)
  fi
} >"$OUT/summary.md" 2>&1
echo
head -c 20000 "$OUT/summary.md"
echo
log "done: $([ "$fail" = 0 ] && echo PASS || echo FAIL); files: $(ls "$OUT" | tr '\n' ' ')"
exit "$fail"
