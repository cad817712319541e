// Limits of the kernels that callers must know (plain constants, no torch or CUDA header): the CUDA kernels
// use them, and ops.cpp exposes them to Python as ddpm_fast._C.limits (read by ddpm_fast._native.limits()),
// so that no Python code repeats a number.
#pragma once

namespace ddpm_fast::limits {

// attention (CUDA): q/k head dim D and v head dim Dv must be in [1, this] (shared-memory tiles are sized
// for it); larger heads go to torch's scaled_dot_product_attention.
constexpr int kCudaAttentionMaxHeadDim = 512;

// group_norm_silu (CUDA): at most this many channels per group (3 float tables of that size live in
// shared memory).
constexpr int kCudaGroupNormMaxChannelsPerGroup = 4096;

}  // namespace ddpm_fast::limits
