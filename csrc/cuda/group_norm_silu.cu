// Torch glue for the fused GroupNorm(+temb)(+SiLU) CUDA kernels: memory format, dtype dispatch, launch.
#include <optional>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/group_norm_silu_kernels.cuh"
#include "kernel_limits.h"

namespace {

namespace dk = ddpm_fast::cuda;
using ddpm_fast::Tensor;

Tensor group_norm_silu_cuda(const Tensor& x_in, int64_t num_groups, const std::optional<Tensor>& weight,
                            const std::optional<Tensor>& bias, double eps, const std::optional<Tensor>& temb,
                            bool silu) {
  // Every check throws from host-compiled code (checks.cpp); nothing in this file throws itself.
  ddpm_fast::check_group_norm_silu(x_in, num_groups, weight, bias, eps, temb, ddpm_fast::DeviceType::CUDA);
  const int64_t N = x_in.size(0), C = x_in.size(1), cpg = C / num_groups;
  // The per-group channel tables live in shared memory (3 * cpg floats).
  constexpr int64_t kMaxCpg = ddpm_fast::limits::kCudaGroupNormMaxChannelsPerGroup;
  if (cpg > kMaxCpg)
    ddpm_fast::fail(ddpm_fast::str("group_norm_silu (CUDA): at most ", kMaxCpg,
                                   " channels per group are supported, got ", cpg));

  const int32_t dev = x_in.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  // NHWC kernel for channels_last 4-D input (unless also plain-contiguous); NCHW kernel for everything else.
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() && ddpm_fast::is_channels_last_contiguous(x_in);
  const Tensor x = nhwc || x_in.is_contiguous() ? x_in : torch::stable::contiguous(x_in);
  Tensor y = ddpm_fast::alloc_like(x, nhwc ? ddpm_fast::MemoryFormat::ChannelsLast
                                          : ddpm_fast::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const int64_t HW = x.numel() / (N * C);

  auto dense = [](const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); };
  const std::optional<Tensor> w = weight ? std::optional<Tensor>(dense(*weight)) : std::nullopt;
  const std::optional<Tensor> b = bias ? std::optional<Tensor>(dense(*bias)) : std::nullopt;
  dk::GNArgs a{};
  a.weight = w ? w->const_data_ptr() : nullptr;
  a.bias = b ? b->const_data_ptr() : nullptr;
  a.temb = temb ? temb->const_data_ptr() : nullptr;
  a.w_t = w ? ddpm_fast::kernel_dtype(w->scalar_type(), "group_norm_silu", "weight") : ddpm_fast::DType::F32;
  a.b_t = b ? ddpm_fast::kernel_dtype(b->scalar_type(), "group_norm_silu", "bias") : ddpm_fast::DType::F32;
  a.t_t = temb ? ddpm_fast::kernel_dtype(temb->scalar_type(), "group_norm_silu", "temb") : ddpm_fast::DType::F32;
  a.temb_sn = temb ? temb->stride(0) : 0;
  a.temb_sc = temb ? temb->stride(1) : 0;
  a.C = C;
  a.HW = HW;
  a.G = static_cast<int>(num_groups);
  a.cpg = static_cast<int>(cpg);
  a.eps = static_cast<float>(eps);
  a.silu = silu;
  a.nhwc = nhwc;

  const int sm = dk::device_attribute(cudaDevAttrMultiProcessorCount, dev, 80);
  auto stream = static_cast<cudaStream_t>(ddpm_fast::current_cuda_stream(dev));
  std::optional<Tensor> ws;  // keeps the partial-statistics workspace alive until the launches are queued
  auto ws_alloc = [&](int64_t n) {
    ws = ddpm_fast::alloc(x, {n}, ddpm_fast::MemoryFormat::Contiguous, ddpm_fast::ScalarType::Float);
    return static_cast<float*>(ws->mutable_data_ptr());
  };
  const void* px = x.const_data_ptr();
  void* py = y.mutable_data_ptr();
  switch (ddpm_fast::kernel_dtype(x.scalar_type(), "group_norm_silu", "x")) {
    case ddpm_fast::DType::F32:
      dk::launch_group_norm<float>(static_cast<const float*>(px), static_cast<float*>(py), a, N, sm, ws_alloc, stream);
      break;
    case ddpm_fast::DType::F16:
      dk::launch_group_norm<__half>(static_cast<const __half*>(px), static_cast<__half*>(py), a, N, sm, ws_alloc,
                                    stream);
      break;
    case ddpm_fast::DType::BF16:
      dk::launch_group_norm<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(px), static_cast<__nv_bfloat16*>(py), a,
                                           N, sm, ws_alloc, stream);
      break;
  }
  ddpm_fast::check_launch("group_norm_silu", cudaGetLastError());
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("group_norm_silu", TORCH_BOX(&group_norm_silu_cuda)); }
