#!/usr/bin/env bash
# CI step: compile and link the whole extension (CPU + CUDA sources) against the CUDA 13.0 build of torch 2.14.1
# on a machine without a GPU. Nothing is executed on a GPU here; this proves the CUDA code builds and links.
#
#   bash .ci/build_cuda.sh
#
# Environment (all optional):
#   CUDA_CI_VENV    venv to create/reuse       (default /tmp/ddpm_fast-ci-venv-cuda)
#   CUDA_CI_BUILD   CMake build dir, wiped     (default /tmp/ddpm_fast-ci-cuda-build)
#   CUDA_CI_TK      assembled toolkit dir      (default /tmp/ddpm_fast-ci-cuda-tk)
#   CUDA_CI_JOBS    ninja -j                   (default 2)
#   TORCH_CUDA_ARCH_LIST                       (default "8.0;9.0")
#   NVCC                                       (default /usr/local/cuda/bin/nvcc)
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
venv=${CUDA_CI_VENV:-/tmp/ddpm_fast-ci-venv-cuda}
build=${CUDA_CI_BUILD:-/tmp/ddpm_fast-ci-cuda-build}
tk=${CUDA_CI_TK:-/tmp/ddpm_fast-ci-cuda-tk}
jobs=${CUDA_CI_JOBS:-2}
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}

fail() {
  echo "build_cuda: FAILED after $(( $(date +%s) - start )) s: $*" >&2
  exit 1
}
step() { echo "== build_cuda [$(( $(date +%s) - start )) s] $*"; }

# The shared tools sit beside the clone in CI (../shared) and at /work/shared on the dev machine.
shared=""
for cand in "$repo/../shared" "$repo/shared" /work/shared; do
  if [ -x "$cand/tools/cuda-toolkit-from-wheels.sh" ] || [ -f "$cand/tools/cuda-toolkit-from-wheels.sh" ]; then
    shared=$(cd "$cand" && pwd)
    break
  fi
done
[ -n "$shared" ] || fail "cannot find shared/tools/cuda-toolkit-from-wheels.sh (looked in ../shared, ./shared, /work/shared)"
[ -x "$nvcc" ] || fail "nvcc not found at $nvcc (set NVCC)"

step "venv $venv (torch 2.14.1, CUDA build)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || fail "python3 -m venv $venv"
fi
"$venv/bin/python" -m pip install -q torch==2.14.1 pybind11 scikit-build-core cmake ninja numpy \
  || fail "pip install torch==2.14.1 pybind11 scikit-build-core cmake ninja numpy"
torch_cuda=$("$venv/bin/python" -c "import torch; print(torch.version.cuda or '')") || fail "import torch"
[ -n "$torch_cuda" ] || fail "torch in $venv is a CPU-only build"
step "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), CUDA $torch_cuda"

step "assembling CUDA toolkit at $tk"
bash "$shared/tools/cuda-toolkit-from-wheels.sh" "$venv/bin/python" "$tk" >/dev/null || fail "toolkit assembly"

step "configure ($build, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
rm -rf "$build"
PATH="$venv/bin:$PATH" "$venv/bin/cmake" -S "$repo" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" \
  -DPython_EXECUTABLE="$venv/bin/python" \
  -DCUDAToolkit_ROOT="$tk" -DCUDA_TOOLKIT_ROOT_DIR="$tk" \
  -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DDDPM_FAST_CUDA=ON >"$build.configure.log" 2>&1 \
  || { tail -40 "$build.configure.log" >&2; fail "cmake configure (log: $build.configure.log)"; }
grep -q "building CUDA kernels" "$build.configure.log" || fail "configure did not enable the CUDA kernels"

ncu=$(ls "$repo"/csrc/cuda/*.cu 2>/dev/null | wc -l)
step "build with ninja -j$jobs ($ncu CUDA sources)"
"$venv/bin/ninja" -C "$build" -j"$jobs" || fail "compile/link"

so=$(ls "$build"/_C*.so 2>/dev/null | head -1)
[ -n "$so" ] || fail "no _C*.so in $build"
step "checking $so"

# 1. Every CUDA source was compiled in.
for f in "$repo"/csrc/cuda/*.cu; do
  obj=$(find "$build" -name "$(basename "$f").o" | head -1)
  [ -n "$obj" ] || fail "$(basename "$f") was not compiled (no object file)"
done
# 2. The device code of every kernel family is in the binary (the module is stripped of local symbols, so look
#    for the kernel names in its embedded fatbinaries).
strings "$so" >"$build.strings.txt"  # (not piped into grep -q: with pipefail, SIGPIPE would fail the check)
for sym in attention_kernel attention_combine_kernel gn_apply_kernel gn_partial_stats_kernel scheduler_step_kernel; do
  grep -q "$sym" "$build.strings.txt" || fail "device code of $sym missing from $so"
done
# 3. No unresolved ddpm_fast symbol, and every undefined symbol resolves against the libraries it links.
undef_own=$(nm -D --undefined-only "$so" | c++filt | grep -i ddpm_fast || true)
[ -z "$undef_own" ] || fail "undefined ddpm_fast symbols: $undef_own"
torch_lib=$("$venv/bin/python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
nv_libs=$(find "$tk/lib64/" -maxdepth 1 -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
missing=$(LD_LIBRARY_PATH="$torch_lib:$nv_libs${LD_LIBRARY_PATH:-}" ldd "$so" | grep "not found" | grep -v "libcuda.so" || true)
[ -z "$missing" ] || fail "unresolved shared libraries: $missing"
# Resolve each undefined symbol of the module against the exported symbols of its direct dependencies
# (and the Python runtime for Py* / _Py*), so a missing template instantiation or a wrong torch ABI shows here.
deps=$(LD_LIBRARY_PATH="$torch_lib:$nv_libs${LD_LIBRARY_PATH:-}" ldd "$so" | awk '/=> \//{print $3} /ld-linux/ && !/=>/{print $1}')
nm -D --defined-only $deps 2>/dev/null | awk '{print $3}' | sed 's/@.*//' | sort -u >"$build.defined.txt"
# Only strong references ("U"): a weak one ("w", e.g. the TLS init function of a thread_local in libc10)
# may legitimately stay unresolved and reads as null at run time.
nm -D --undefined-only "$so" | awk '$1 == "U" {print $2}' | sed 's/@.*//' | sort -u >"$build.undefined.txt"
unresolved=$(comm -23 "$build.undefined.txt" "$build.defined.txt" | grep -v -E '^(_?Py|_Py|__gmon_start__|_ITM_|__cxa_finalize|_Jv_)' || true)
[ -z "$unresolved" ] || fail "symbols not exported by any linked library: $(echo "$unresolved" | head -20 | c++filt | tr '\n' ' ')"

# 4. The CUDA glue runs here up to its argument checks: each op's CUDA kernel, handed CPU tensors, must raise a
#    RuntimeError naming the argument (an exception thrown from the glue must not crash the process).
"$venv/bin/python" "$repo/.ci/cuda_glue_errors.py" "$so" \
  || fail "calling the CUDA kernels' argument checks"

echo "build_cuda: OK: $(basename "$so") compiled and linked with $ncu CUDA sources for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST against torch 2.14.1+cu$torch_cuda in $(( $(date +%s) - start )) s (kernels not run: no GPU here)"
