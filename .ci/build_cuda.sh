#!/usr/bin/env bash
# CI step: compile and link both libraries (the CPU one, _C, and the CUDA one, libddpm_fast_cuda.so) from the
# same sources against the CUDA 13.0 build of torch 2.14.1, on a machine without a GPU. Nothing runs on a GPU
# here; this proves the CUDA code builds, links against the stable ABI only, and registers what the sources say.
#
#   bash .ci/build_cuda.sh
#
# Environment (all optional):
#   CUDA_CI_VENV    venv to create/reuse       (default /tmp/ddpm_fast-ci-venv-cuda; .ci/run passes the
#                                              torch 2.14.1 venv .ci/wheel_check.sh made)
#   CUDA_CI_BUILD   CMake build dir, wiped     (default /tmp/ddpm_fast-ci-cuda-build)
#   CUDA_CI_JOBS    ninja -j                   (default 2)
#   TORCH_CUDA_ARCH_LIST                       (default "8.0;9.0")
#   NVCC                                       (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
venv=${CUDA_CI_VENV:-/tmp/ddpm_fast-ci-venv-cuda}
build=${CUDA_CI_BUILD:-/tmp/ddpm_fast-ci-cuda-build}
jobs=${CUDA_CI_JOBS:-2}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}

fail() {
  echo "build_cuda: FAILED after $(( $(date +%s) - start )) s: $*" >&2
  exit 1
}
step() { echo "== build_cuda [$(( $(date +%s) - start )) s] $*"; }

[ -x "$nvcc" ] || fail "nvcc not found at $nvcc (set NVCC)"

step "venv $venv (torch 2.14.1, CUDA build)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || fail "python3 -m venv $venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 pybind11 scikit-build-core \
  "cmake>=3.26" ninja numpy || fail "pip install torch==2.14.1 pybind11 scikit-build-core cmake ninja numpy"
torch_cuda=$("$venv/bin/python" -c "import torch; print(torch.version.cuda or '')") || fail "import torch"
[ -n "$torch_cuda" ] || fail "torch in $venv is a CPU-only build"
step "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), CUDA $torch_cuda"

# No assembled toolkit: without find_package(Torch) the build needs only nvcc and cudart (no cuBLAS & co.).
step "configure ($build, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
rm -rf "$build"
PATH="$venv/bin:$PATH" "$venv/bin/cmake" -S "$repo" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" \
  -DPython_EXECUTABLE="$venv/bin/python" \
  -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DDDPM_FAST_CUDA=ON >"$build.configure.log" 2>&1 \
  || { tail -40 "$build.configure.log" >&2; fail "cmake configure (log: $build.configure.log)"; }
grep -q "building CUDA kernels" "$build.configure.log" || fail "configure did not enable the CUDA kernels"

ncu=$(ls "$repo"/csrc/cuda/*.cu 2>/dev/null | wc -l)
step "build with ninja -j$jobs ($ncu CUDA sources)"
"$venv/bin/ninja" -C "$build" -j"$jobs" || fail "compile/link"

c_so=$(ls "$build"/_C*.so 2>/dev/null | head -1)
cuda_so="$build/libddpm_fast_cuda.so"
[ -n "$c_so" ] || fail "no _C*.so in $build"
[ -f "$cuda_so" ] || fail "no libddpm_fast_cuda.so in $build"
step "checking $(basename "$c_so") and $(basename "$cuda_so")"

# 1. Every CUDA source was compiled in.
for f in "$repo"/csrc/cuda/*.cu; do
  obj=$(find "$build" -name "$(basename "$f").o" | head -1)
  [ -n "$obj" ] || fail "$(basename "$f") was not compiled (no object file)"
done
# 2. The device code of every kernel the sources define (each `__global__ void [__launch_bounds__(..)] NAME(`
#    in csrc/cuda), for every architecture asked for, is in the library's fatbinary (its .nv_fatbin section,
#    where the device ELF images carry the kernel names and their sm_XY targets).
kernels=$(cat "$repo"/csrc/cuda/*.cuh "$repo"/csrc/cuda/*.cu | tr '\n' ' ' \
  | grep -oE '__global__[[:space:]]+void[[:space:]]+(__launch_bounds__\([^)]*\)[[:space:]]+)?[A-Za-z_][A-Za-z0-9_]*' \
  | awk '{print $NF}' | sort -u)
[ -n "$kernels" ] || fail "no __global__ kernels found in csrc/cuda"
objcopy -O binary --only-section=.nv_fatbin "$cuda_so" "$build.fatbin" || fail "no .nv_fatbin section in $(basename "$cuda_so")"
strings "$build.fatbin" >"$build.fatbin.txt"  # (not piped into grep -q: with pipefail, SIGPIPE would fail the check)
for sym in $kernels; do
  grep -q "$sym" "$build.fatbin.txt" || fail "device code of $sym missing from $(basename "$cuda_so")"
done
for arch in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' '); do
  sm="sm_$(echo "${arch%+PTX}" | tr -d .)"
  grep -q "$sm" "$build.fatbin.txt" || fail "no $sm device code in $(basename "$cuda_so") (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
done
step "device code for $(echo $TORCH_CUDA_ARCH_LIST | tr ';' ' '): $(echo $kernels)"
# 3. The stable ABI only: neither library imports a C++ symbol of torch (c10::, at::, torch::), and every
#    undefined symbol resolves against the libraries it links (so a missing template instantiation or a
#    shim newer than the libtorch shows here).
torch_lib=$("$venv/bin/python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
nv_libs=$("$venv/bin/python" -c "import nvidia, os, glob; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, '**', 'lib*.so*'), recursive=True)})))")
cuda_lib=$(dirname "$(dirname "$(readlink -f "$nvcc")")")/lib64
for so in "$c_so" "$cuda_so"; do
  cxx_torch=$(nm -D --undefined-only "$so" | c++filt | grep -E 'c10::|at::|torch::|caffe2::' || true)
  [ -z "$cxx_torch" ] || fail "$(basename "$so") imports C++ torch symbols (not the stable ABI): $(echo "$cxx_torch" | head -5)"
  undef_own=$(nm -D --undefined-only "$so" | c++filt | grep -i ddpm_fast || true)
  [ -z "$undef_own" ] || fail "undefined ddpm_fast symbols in $(basename "$so"): $undef_own"
  ldpath="$torch_lib:$nv_libs:$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  missing=$(LD_LIBRARY_PATH="$ldpath" ldd "$so" | grep "not found" | grep -v "libcuda.so" || true)
  [ -z "$missing" ] || fail "unresolved shared libraries of $(basename "$so"): $missing"
  deps=$(LD_LIBRARY_PATH="$ldpath" ldd "$so" | awk '/=> \//{print $3} /ld-linux/ && !/=>/{print $1}')
  nm -D --defined-only $deps 2>/dev/null | awk '{print $3}' | sed 's/@.*//' | sort -u >"$build.defined.txt"
  # Only strong references ("U"): a weak one ("w") may legitimately stay unresolved and reads as null.
  nm -D --undefined-only "$so" | awk '$1 == "U" {print $2}' | sed 's/@.*//' | sort -u >"$build.undefined.txt"
  unresolved=$(comm -23 "$build.undefined.txt" "$build.defined.txt" | grep -v -E '^(_?Py|_Py|__gmon_start__|_ITM_|__cxa_finalize|_Jv_)' || true)
  [ -z "$unresolved" ] || fail "$(basename "$so"): symbols not exported by any linked library: $(echo "$unresolved" | head -20 | c++filt | tr '\n' ' ')"
  step "$(basename "$so"): $(nm -D --undefined-only "$so" | grep -cE ' (aoti_torch|torch)_') torch C-shim imports, no C++ torch symbol, all resolved"
done

# 4. Registrations match the sources (schemas in ops.cpp, m.impl in cpu/*.cpp and cuda/*.cu), and the CUDA
#    glue of every CUDA op, handed CPU tensors, raises a RuntimeError naming the argument (not a crash).
"$venv/bin/python" "$repo/.ci/cuda_glue_errors.py" "$build" "$repo/csrc" \
  || fail "registrations / the CUDA kernels' argument checks"

echo "build_cuda: OK: $(basename "$c_so") and $(basename "$cuda_so") compiled and linked with $ncu CUDA sources for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST against torch 2.14.1+cu$torch_cuda in $(( $(date +%s) - start )) s (kernels not run: no GPU here)"
