// Torch glue for the CUDA attention kernels: strides, split workspace, kernel choice, dtype dispatch, launch.
//
// Kernel choice: fp32 always runs the CUDA-core kernel (attention_kernels.cuh). fp16 / bf16 run it too, unless
// the environment variable DDPM_FAST_CUDA_ATTENTION is "mma" when this library makes its first attention call
// (read once) and the GPU is sm_80 or newer: then they run the tensor-core kernel (attention_mma_kernels.cuh),
// which has not run on a GPU yet. python/ddpm_fast/ops.py reads the same variable (once, at import) to send
// half-precision attention to this op instead of SDPA.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "checks.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/attention_mma_kernels.cuh"
#include "cuda/cuda_glue.h"

namespace {

namespace dk = ddpm_fast::cuda;

using ddpm_fast::Tensor;

// The kernel needs unit stride along D; batch/head/sequence strides are free (views from the UNet). 3-D
// (B, S, D) operands are read as (B, 1, S, D) through their strides (no view needed).
Tensor unit_last_stride(const Tensor& t) {
  return t.stride(t.dim() - 1) == 1 ? t : torch::stable::contiguous(t);
}

struct Strides3 {
  int64_t b, h, s;
};
Strides3 bhs_strides(const Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), 0, t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

bool mma_requested() {
  static const bool on = [] {
    const char* v = std::getenv("DDPM_FAST_CUDA_ATTENTION");
    return v != nullptr && std::strcmp(v, "mma") == 0;
  }();
  return on;
}

Tensor attention_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, std::optional<double> scale) {
  // Every check throws from host-compiled code (checks.cpp); nothing in this file throws itself.
  ddpm_fast::check_attention(q_in, k_in, v_in, ddpm_fast::DeviceType::CUDA, dk::kAttnMaxD);
  const auto st = ddpm_fast::dtype_of(q_in);
  const bool three_d = q_in.dim() == 3;
  const int64_t nd = q_in.dim();
  const int64_t B = q_in.size(0), H = three_d ? 1 : q_in.size(1), L = q_in.size(nd - 2), D = q_in.size(nd - 1),
                S = k_in.size(nd - 2), Dv = v_in.size(nd - 1);
  if (B * H > INT32_MAX) ddpm_fast::fail(ddpm_fast::str("attention (CUDA): B*H = ", B * H, " is too large"));

  const int32_t dev = q_in.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  const std::vector<int64_t> out_sizes = three_d ? std::vector<int64_t>{B, L, Dv} : std::vector<int64_t>{B, H, L, Dv};
  Tensor out = ddpm_fast::alloc(q_in, out_sizes);
  if (out.numel() == 0) return out;
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Strides3 qs = bhs_strides(q), ks = bhs_strides(k), vs = bhs_strides(v);

  dk::AttnArgs a{};
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.q_sb = qs.b; a.q_sh = qs.h; a.q_ss = qs.s;
  a.k_sb = ks.b; a.k_sh = ks.h; a.k_ss = ks.s;
  a.v_sb = vs.b; a.v_sh = vs.h; a.v_ss = vs.s;
  a.H = static_cast<int>(H);
  a.BH = static_cast<int>(B * H);
  a.L = L;
  a.S = S;
  a.D = static_cast<int>(D);
  a.Dv = static_cast<int>(Dv);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  a.qk_scale = static_cast<float>(sc * 1.4426950408889634);  // log2(e)

  // 16-byte loads when every row start is 16-byte aligned.
  const int64_t vec = 16 / static_cast<int64_t>(q.element_size());
  auto vec_tensor = [&](const Tensor& t, const Strides3& s) {
    return dk::is_aligned(t.const_data_ptr(), 16) && s.b % vec == 0 && s.h % vec == 0 && s.s % vec == 0;
  };
  a.vec_ok = D % vec == 0 && Dv % vec == 0 && vec_tensor(q, qs) && vec_tensor(k, ks) && vec_tensor(v, vs);
  const ddpm_fast::DType kdt = ddpm_fast::kernel_dtype(st, "attention", "q");
  const int sms = dk::device_attribute(cudaDevAttrMultiProcessorCount, dev, 80);
  const bool mma = kdt != ddpm_fast::DType::F32 && mma_requested() &&
                   dk::device_attribute(cudaDevAttrComputeCapabilityMajor, dev, 0) >= 8;
  if (mma) {
    dk::attn_mma_plan(a, sms, dk::device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev, 0));
    if (static_cast<int64_t>(a.q_tiles) * a.BH > INT32_MAX)
      ddpm_fast::fail(ddpm_fast::str("attention (CUDA): B*H = ", B * H, " with L = ", L, " is too large"));
  } else {
    dk::attn_plan(a, sms);
  }
  const size_t smem = mma ? dk::attn_mma_smem_bytes(a) : dk::attn_smem_bytes(a.ld);
  const size_t smem_max = dk::device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, 48 * 1024);
  if (smem > smem_max)
    ddpm_fast::fail(ddpm_fast::str("attention (CUDA): head dims ", D, "/", Dv, " need ", smem,
                                   " bytes of shared memory per block, this GPU allows ", smem_max));
  // Keep the split workspace alive until the launches are queued (the caching allocator reuses it only
  // after work queued on this stream).
  std::optional<Tensor> part_o, part_ml;
  if (a.splits > 1) {
    part_o = ddpm_fast::alloc(q, {a.splits, B * H, L, Dv}, ddpm_fast::MemoryFormat::Contiguous,
                                  ddpm_fast::ScalarType::Float);
    part_ml = ddpm_fast::alloc(q, {a.splits, B * H, L, 2}, ddpm_fast::MemoryFormat::Contiguous,
                                   ddpm_fast::ScalarType::Float);
    a.part_o = static_cast<float*>(part_o->mutable_data_ptr());
    a.part_ml = static_cast<float*>(part_ml->mutable_data_ptr());
  }

  auto stream = static_cast<cudaStream_t>(ddpm_fast::current_cuda_stream(dev));
  cudaError_t err = cudaSuccess;
  switch (kdt) {
    case ddpm_fast::DType::F32: err = dk::launch_attention<float>(a, stream); break;
    case ddpm_fast::DType::F16:
      err = mma ? dk::launch_attention_mma<__half>(a, stream) : dk::launch_attention<__half>(a, stream);
      break;
    case ddpm_fast::DType::BF16:
      err = mma ? dk::launch_attention_mma<__nv_bfloat16>(a, stream) : dk::launch_attention<__nv_bfloat16>(a, stream);
      break;
  }
  ddpm_fast::check_launch("attention", err != cudaSuccess ? err : cudaGetLastError());
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("attention", TORCH_BOX(&attention_cuda)); }
