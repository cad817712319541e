// Torch glue for the fused GroupNorm(+temb)(+SiLU) CUDA kernels: memory format, dtype dispatch, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/group_norm_silu_kernels.cuh"

namespace {

namespace dk = ddpm_fast::cuda;

dk::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return dk::DType::kFloat16;
    case at::kBFloat16: return dk::DType::kBFloat16;
    default: return dk::DType::kFloat32;
  }
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps,
                                const std::optional<at::Tensor>& temb, bool silu) {
  // Every check throws from host-compiled code (checks.cpp); nothing in this file throws itself.
  ddpm_fast::check_group_norm_silu(x_in, num_groups, weight, bias, eps, temb, c10::DeviceType::CUDA);
  const int64_t N = x_in.size(0), C = x_in.size(1), cpg = C / num_groups;
  // The per-group channel tables live in shared memory (3 * cpg floats).
  if (cpg > 4096)
    ddpm_fast::fail(c10::str("group_norm_silu (CUDA): at most 4096 channels per group are supported, got ", cpg));

  c10::cuda::CUDAGuard guard(x_in.device());
  // NHWC kernel for channels_last 4-D input (unless also plain-contiguous); NCHW kernel for everything else.
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const int64_t HW = x.numel() / (N * C);

  at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  dk::GNArgs a{};
  a.weight = weight ? w.data_ptr() : nullptr;
  a.bias = bias ? b.data_ptr() : nullptr;
  a.temb = temb ? temb->data_ptr() : nullptr;
  a.w_t = weight ? to_dtype(w.scalar_type()) : dk::DType::kFloat32;
  a.b_t = bias ? to_dtype(b.scalar_type()) : dk::DType::kFloat32;
  a.t_t = temb ? to_dtype(temb->scalar_type()) : dk::DType::kFloat32;
  a.temb_sn = temb ? temb->stride(0) : 0;
  a.temb_sc = temb ? temb->stride(1) : 0;
  a.C = C;
  a.HW = HW;
  a.G = static_cast<int>(num_groups);
  a.cpg = static_cast<int>(cpg);
  a.eps = static_cast<float>(eps);
  a.silu = silu;
  a.nhwc = nhwc;

  const int sm = dk::device_attribute(cudaDevAttrMultiProcessorCount, x.get_device(), 80);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  at::Tensor ws;  // keeps the partial-statistics workspace alive until the launches are queued
  auto ws_alloc = [&](int64_t n) {
    ws = at::empty({n}, x.options().dtype(at::kFloat));
    return ws.data_ptr<float>();
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      dk::launch_group_norm<float>(x.data_ptr<float>(), y.data_ptr<float>(), a, N, sm, ws_alloc, stream);
      break;
    case at::kHalf:
      dk::launch_group_norm<__half>(reinterpret_cast<const __half*>(x.data_ptr()),
                                    reinterpret_cast<__half*>(y.data_ptr()), a, N, sm, ws_alloc, stream);
      break;
    default:
      dk::launch_group_norm<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                                           reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), a, N, sm, ws_alloc, stream);
      break;
  }
  ddpm_fast::check_launch("group_norm_silu", cudaGetLastError());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
}
