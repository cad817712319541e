// Torch glue for the CUDA attention kernel: strides, split workspace, dtype dispatch, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "checks.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/cuda_glue.h"

namespace {

namespace dk = ddpm_fast::cuda;

// The kernel needs unit stride along D; batch/head/sequence strides are free (views from the UNet).
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          std::optional<double> scale) {
  // Every check throws from host-compiled code (checks.cpp); nothing in this file throws itself.
  ddpm_fast::check_attention(q_in, k_in, v_in, c10::DeviceType::CUDA, dk::kAttnMaxD);
  const auto st = q_in.scalar_type();
  const bool three_d = q_in.dim() == 3;
  at::Tensor q = three_d ? q_in.unsqueeze(1) : q_in;
  at::Tensor k = three_d ? k_in.unsqueeze(1) : k_in;
  at::Tensor v = three_d ? v_in.unsqueeze(1) : v_in;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  if (B * H > INT32_MAX) ddpm_fast::fail(c10::str("attention (CUDA): B*H = ", B * H, " is too large"));

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, H, L, Dv}, q.options());
  if (out.numel() == 0) return three_d ? out.squeeze(1) : out;
  q = unit_last_stride(q);
  k = unit_last_stride(k);
  v = unit_last_stride(v);

  dk::AttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.q_sb = q.stride(0); a.q_sh = q.stride(1); a.q_ss = q.stride(2);
  a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_ss = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_ss = v.stride(2);
  a.H = static_cast<int>(H);
  a.BH = static_cast<int>(B * H);
  a.L = L;
  a.S = S;
  a.D = static_cast<int>(D);
  a.Dv = static_cast<int>(Dv);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  a.qk_scale = static_cast<float>(sc * 1.4426950408889634);  // log2(e)

  // 16-byte loads when every row start is 16-byte aligned.
  const int64_t vec = 16 / q.element_size();
  auto vec_tensor = [&](const at::Tensor& t) {
    return dk::is_aligned(t.data_ptr(), 16) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
           t.stride(2) % vec == 0;
  };
  a.vec_ok = D % vec == 0 && Dv % vec == 0 && vec_tensor(q) && vec_tensor(k) && vec_tensor(v);

  const int dev = q.get_device();
  dk::attn_plan(a, dk::device_attribute(cudaDevAttrMultiProcessorCount, dev, 80));
  const size_t smem = dk::attn_smem_bytes(a.ld);
  const size_t smem_max = dk::device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, 48 * 1024);
  if (smem > smem_max)
    ddpm_fast::fail(c10::str("attention (CUDA): head dims ", D, "/", Dv, " need ", smem,
                             " bytes of shared memory per block, this GPU allows ", smem_max));
  at::Tensor part_o, part_ml;
  if (a.splits > 1) {
    part_o = at::empty({a.splits, B * H, L, Dv}, q.options().dtype(at::kFloat));
    part_ml = at::empty({a.splits, B * H, L, 2}, q.options().dtype(at::kFloat));
    a.part_o = part_o.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  cudaError_t err;
  switch (st) {
    case at::kFloat: err = dk::launch_attention<float>(a, stream); break;
    case at::kHalf: err = dk::launch_attention<__half>(a, stream); break;
    default: err = dk::launch_attention<__nv_bfloat16>(a, stream); break;
  }
  ddpm_fast::check_launch("attention", err != cudaSuccess ? err : cudaGetLastError());
  return three_d ? out.squeeze(1) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("attention", &attention_cuda);
}
