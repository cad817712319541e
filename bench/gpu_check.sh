#!/usr/bin/env bash
# One-shot GPU check (H100/H200): build from source, CUDA tests, kernel benchmark, sampling benchmark hook.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Designed to run once on a lent machine with little device time: every step is guarded by `timeout` and a global
# deadline (GPU_CHECK_BUDGET seconds, default 470), a failing step never stops the later ones, progress is printed
# as it goes, and at most 8 files are written under OUT_DIR:
#   env.txt build.log tests.log kernels.log kernels.json sample_speed.log sample_speed.json summary.md
# Exit status: 0 when the build succeeded and every test passed, 1 otherwise.
set -u

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
# Seconds a step may take: min(wanted, what is left of the budget minus a reserve for the summary).
allow() {
  local want=$1 left=$(( BUDGET - $(elapsed) - 15 ))
  [ "$left" -lt "$want" ] && want=$left
  echo "$want"
}

build_status="not run"; tests_status="not run"; other_tests_status="not run"; bench_status="not run"
sample_status="not run"; fail=0

# ---------------------------------------------------------------------------------------------------- 1. build
{
  echo "date: $(date -u +%FT%TZ)"
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  timeout 60 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -1
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Build for this GPU's architecture only (fast); fall back to 9.0.
cap=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
case "$cap" in [0-9]*.[0-9]*) ;; *) cap=9.0 ;; esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST_OVERRIDE:-$cap}
export MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 DDPM_FAST_CUDA=ON
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

log "building with TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (log: build.log)"
t=$(allow 300)
if timeout "$t" "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  # Import from outside the repo so the installed package (with _C) is the one found.
  if (cd /tmp && timeout 60 "$PY" -c "import torch, ddpm_fast._C as C; assert C.with_cuda, 'built without CUDA'; print('ddpm_fast._C', C.torch_version, 'with_cuda', C.with_cuda)") >>"$OUT/build.log" 2>&1; then
    build_status="ok ($(elapsed)s)"
  else
    build_status="FAILED: installed but ddpm_fast._C does not import with CUDA (see build.log tail)"
    fail=1
  fi
else
  rc=$?
  build_status="FAILED (rc=$rc$([ $rc = 124 ] && echo ', timed out'))"
  fail=1
fi
log "build: $build_status"
[ "$fail" = 1 ] && tail -40 "$OUT/build.log"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  log "installing carried wheels from .whl/ into /tmp/site"
  if timeout "$(allow 90)" "$PY" -m pip install --no-deps --no-index --target /tmp/site .whl/*.whl >>"$OUT/build.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    log "wheel install failed (see build.log)"
  fi
fi

# ---------------------------------------------------------------------------------------------------- 2. tests
# --maxfail instead of -x: one run has to show every broken case, not only the first.
run_tests() {  # label, timeout, pytest args...
  local label=$1 want=$2; shift 2
  local t; t=$(allow "$want")
  if [ "$t" -lt 20 ]; then echo "skipped (no time left)"; return 3; fi
  echo "===== $label: $PY -m pytest $*" >>"$OUT/tests.log"
  (cd "$PWD" && timeout "$t" "$PY" -m pytest -q -rfE --tb=short --maxfail=30 -p no:cacheprovider "$@") >>"$OUT/tests.log" 2>&1
}
: >"$OUT/tests.log"
if [ "$fail" = 0 ]; then
  log "CUDA op tests (log: tests.log)"
  run_tests "tests/test_ops_cuda.py" "${GPU_CHECK_T_TESTS:-180}" tests/test_ops_cuda.py
  rc=$?
  line=$(grep -E "(passed|failed|error|skipped)" "$OUT/tests.log" | tail -1)
  case $rc in
    0) tests_status="ok: $line" ;;
    124) tests_status="TIMED OUT: $line"; fail=1 ;;
    *) tests_status="FAILED (rc=$rc): $line"; fail=1 ;;
  esac
  log "test_ops_cuda: $tests_status"
  [ "$rc" != 0 ] && grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30

  others=$(grep -l -E "mark\.cuda|pytest\.mark\.cuda" tests/*.py 2>/dev/null | grep -v "tests/test_ops_cuda.py" | tr '\n' ' ')
  if [ -n "$others" ]; then
    log "other CUDA-marked tests: $others"
    run_tests "-m cuda" "${GPU_CHECK_T_OTHER_TESTS:-150}" -m cuda $others
    rc=$?
    line=$(grep -E "(passed|failed|error|skipped|deselected)" "$OUT/tests.log" | tail -1)
    case $rc in
      0) other_tests_status="ok: $line" ;;
      5) other_tests_status="none collected" ;;
      *) other_tests_status="FAILED (rc=$rc): $line"; fail=1 ;;
    esac
    log "other CUDA tests: $other_tests_status"
  else
    other_tests_status="none found"
  fi
else
  tests_status="skipped (build failed)"
fi

# ---------------------------------------------------------------------------------------------------- 3. kernel bench
if [ "$build_status" != "${build_status#ok}" ]; then
  log "kernel benchmark (log: kernels.log, results: kernels.json)"
  t=$(allow "${GPU_CHECK_T_KERNELS:-150}")
  if [ "$t" -ge 20 ]; then
    (cd /tmp && timeout "$t" "$PY" "$OLDPWD/bench/gpu_bench.py" --json "$OUT/kernels.json") >"$OUT/kernels.log" 2>&1
    rc=$?
    case $rc in 0) bench_status="ok" ;; 124) bench_status="TIMED OUT" ;; *) bench_status="FAILED (rc=$rc)" ;; esac
    grep -v "^\s" "$OUT/kernels.log" | grep -E "^(group_norm|attention|scheduler)" | head -40
  else
    bench_status="skipped (no time left)"
  fi
  log "kernel bench: $bench_status"
else
  bench_status="skipped (build failed)"
fi

# ---------------------------------------------------------------------------------------------------- 4. sampling bench hook
if [ -f bench/sample_speed.py ] && [ "$build_status" != "${build_status#ok}" ]; then
  t=$(allow 240)
  if [ "$t" -ge 30 ]; then
    log "sampling benchmark, up to ${t}s (log: sample_speed.log)"
    extra=()  # let it stop starting new rows in time to write its JSON, when it supports that
    timeout 60 "$PY" bench/sample_speed.py --help 2>/dev/null | grep -q -- "--total-timeout" && extra=(--total-timeout $(( t * 2 / 3 )))
    # fp16 first (the targets), few timed calls per variant: the lease is short.
    timeout "$t" "$PY" bench/sample_speed.py --device cuda --dtypes fp16,fp32,bf16 --runs 3 --timeout 60 \
      --json "$OUT/sample_speed.json" ${extra[@]+"${extra[@]}"} \
      >"$OUT/sample_speed.log" 2>&1
    rc=$?
    case $rc in 0) sample_status="ok" ;; 124) sample_status="TIMED OUT after ${t}s" ;; *) sample_status="FAILED (rc=$rc)" ;; esac
    tail -15 "$OUT/sample_speed.log"
  else
    sample_status="skipped (no time left)"
  fi
elif [ ! -f bench/sample_speed.py ]; then
  sample_status="skipped (bench/sample_speed.py not present)"
else
  sample_status="skipped (build failed)"
fi
log "sample speed: $sample_status"

# ---------------------------------------------------------------------------------------------------- 5. summary
{
  echo "# GPU check ($(head -2 "$OUT/env.txt" | tail -1))"
  echo
  echo "| step | result |"
  echo "| --- | --- |"
  echo "| build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) | $build_status |"
  echo "| tests/test_ops_cuda.py | $tests_status |"
  echo "| other -m cuda tests | $other_tests_status |"
  echo "| kernel bench | $bench_status |"
  echo "| sample_speed.py | $sample_status |"
  echo "| total time | $(elapsed) s |"
  if [ -s "$OUT/kernels.json" ]; then
    echo
    timeout 30 "$PY" - "$OUT/kernels.json" <<'EOF' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
print(f"Kernels on {r['device']} (torch {r['torch']}), median per call:\n")
print("| op | shape | dtype | ours us | torch us | speedup | GB/s | max diff |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for x in r["results"]:
    if "error" in x:
        print(f"| {x['op']} | {x['shape']} | {x['dtype']} | ERROR: {x['error'][:80]} | | | | |")
    else:
        print(f"| {x['op']} | {x['shape']} | {x['dtype']} | {x['ours_us']} | {x['torch_us']} | {x['speedup']} | {x['ours_gbps']} | {x['max_diff']} |")
EOF
  fi
  if [ -s "$OUT/sample_speed.json" ]; then
    echo
    echo "sample_speed.json: $(head -c 600 "$OUT/sample_speed.json" | tr '\n' ' ')"
  fi
} >"$OUT/summary.md" 2>&1
echo
cat "$OUT/summary.md"
echo
log "done: $([ "$fail" = 0 ] && echo PASS || echo FAIL); files: $(ls "$OUT" | tr '\n' ' ')"
exit "$fail"
