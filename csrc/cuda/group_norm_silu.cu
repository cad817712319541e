// Torch glue for the fused GroupNorm(+temb)(+SiLU) CUDA kernels: checks, memory format, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/group_norm_silu_kernels.cuh"

namespace {

namespace dk = ddpm_fast::cuda;

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

dk::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return dk::DType::kFloat16;
    case at::kBFloat16: return dk::DType::kBFloat16;
    default: return dk::DType::kFloat32;
  }
}

// weight / bias / temb: any of the three float types (fp32 parameters with fp16 activations are common).
at::Tensor check_side(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), "ddpm_fast::group_norm_silu: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(is_float_type(t.scalar_type()), "ddpm_fast::group_norm_silu: ", name,
              " dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "ddpm_fast::group_norm_silu: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  return t;
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps,
                                const std::optional<at::Tensor>& temb, bool silu) {
  TORCH_CHECK(x_in.is_cuda(), "ddpm_fast::group_norm_silu (CUDA): x must be a CUDA tensor, got device ",
              x_in.device());
  TORCH_CHECK(is_float_type(x_in.scalar_type()),
              "ddpm_fast::group_norm_silu: x dtype must be float32, float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 2, "ddpm_fast::group_norm_silu: x must be (N, C, ...) with at least 2 dims, got shape ",
              x_in.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(num_groups > 0, "ddpm_fast::group_norm_silu: num_groups must be positive, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, "ddpm_fast::group_norm_silu: channels (", C, ") must be divisible by num_groups (",
              num_groups, ")");
  TORCH_CHECK(eps >= 0.0, "ddpm_fast::group_norm_silu: eps must be >= 0, got ", eps);
  const int64_t cpg = C / num_groups;
  // The per-group channel tables live in shared memory (3 * cpg floats).
  TORCH_CHECK(cpg <= 4096, "ddpm_fast::group_norm_silu (CUDA): at most 4096 channels per group are supported, got ",
              cpg);
  if (weight) check_side(*weight, "weight", x_in, {C});
  if (bias) check_side(*bias, "bias", x_in, {C});
  if (temb) check_side(*temb, "temb", x_in, {N, C});

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
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
}
