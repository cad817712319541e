#!/usr/bin/env bash
# Build and run the CPU model of the tensor-core attention kernel (attention_mma_emu.cpp): g++ and the CUDA
# headers only (no GPU, no torch, no nvcc). Takes a minute or two on 2 cores.
#
#   bash csrc/cuda/emu/run.sh [case-filter]        e.g.  bash csrc/cuda/emu/run.sh "D=512"
#
# Environment: CXX (default g++), CUDA_HOME (default /usr/local/cuda), EMU_SANITIZE=1 adds -fsanitize=undefined.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
csrc=$(cd "$here/../.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
out=${TMPDIR:-/tmp}/ddpm_fast_attention_mma_emu
flags=(-std=c++17 -O2 -g -Wall -Wno-attributes -Wno-unknown-pragmas -Wno-unused-function -I"$csrc" -I"$csrc/cuda" -I"$cuda/include")
[ "${EMU_SANITIZE:-0}" = 1 ] && flags+=(-fsanitize=undefined -fno-sanitize-recover=all)
"${CXX:-g++}" "${flags[@]}" "$here/attention_mma_emu.cpp" -o "$out"
exec "$out" "$@"
