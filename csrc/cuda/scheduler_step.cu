// Torch glue for the fused scheduler step (CUDA): argument checks, layout handling, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/scheduler_step_kernels.cuh"

namespace {

using ddpm_fast::cuda::StepCoefs;

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "ddpm_fast::scheduler_step (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "ddpm_fast::scheduler_step: ", name, " is on ", t.device(),
              " but sample is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ddpm_fast::scheduler_step: ", name, " has dtype ", t.scalar_type(),
              " but sample has dtype ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "ddpm_fast::scheduler_step: ", name, " has shape ", t.sizes(),
              " but sample has shape ", ref.sizes());
}

template <typename T>
void run(const at::Tensor& e, const at::Tensor& s, const std::optional<at::Tensor>& n, at::Tensor& prev, at::Tensor& x0,
         const StepCoefs& k, cudaStream_t stream) {
  const int sm = ddpm_fast::cuda::device_attribute(cudaDevAttrMultiProcessorCount, s.get_device(), 80);
  ddpm_fast::cuda::launch_scheduler_step<T>(
      reinterpret_cast<const T*>(e.data_ptr()), reinterpret_cast<const T*>(s.data_ptr()),
      n ? reinterpret_cast<const T*>(n->data_ptr()) : nullptr, reinterpret_cast<T*>(prev.data_ptr()),
      reinterpret_cast<T*>(x0.data_ptr()), s.numel(), k, sm, stream);
}

std::tuple<at::Tensor, at::Tensor> scheduler_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                       const std::optional<at::Tensor>& noise, double a_x, double a_e,
                                                       double c0, double c1, double c2, double noise_scale,
                                                       std::optional<double> clip_range) {
  TORCH_CHECK(sample.is_cuda(), "ddpm_fast::scheduler_step (CUDA): sample must be a CUDA tensor, got device ",
              sample.device());
  const auto st = sample.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "ddpm_fast::scheduler_step: sample dtype must be float32, float16 or bfloat16, got ", st);
  check_operand(model_output, "model_output", sample);
  if (noise) check_operand(*noise, "noise", sample);
  if (clip_range) TORCH_CHECK(*clip_range >= 0.0, "ddpm_fast::scheduler_step: clip_range must be >= 0, got ", *clip_range);

  c10::cuda::CUDAGuard guard(sample.device());
  // Elementwise: any dense layout works as long as every operand shares it; otherwise fall back to contiguous.
  bool same_layout = sample.is_non_overlapping_and_dense() && model_output.strides() == sample.strides() &&
                     (!noise || noise_scale == 0.0 || noise->strides() == sample.strides());
  at::Tensor s = same_layout ? sample : sample.contiguous();
  at::Tensor e = same_layout ? model_output : model_output.contiguous();
  // Like the CPU kernel and the Python composite: a zero noise_scale drops the noise term entirely.
  const bool has_noise = noise.has_value() && noise_scale != 0.0;
  std::optional<at::Tensor> n;
  if (has_noise) n = same_layout ? *noise : noise->contiguous();

  at::Tensor prev = at::empty_strided(s.sizes(), s.strides(), s.options());
  at::Tensor x0 = at::empty_strided(s.sizes(), s.strides(), s.options());
  if (s.numel() == 0) return {prev, x0};

  StepCoefs k{static_cast<float>(a_x), static_cast<float>(a_e), static_cast<float>(c0), static_cast<float>(c1),
              static_cast<float>(c2), static_cast<float>(noise_scale),
              clip_range ? static_cast<float>(*clip_range) : 0.f, clip_range.has_value()};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  switch (st) {
    case at::kFloat: run<float>(e, s, n, prev, x0, k, stream); break;
    case at::kHalf: run<__half>(e, s, n, prev, x0, k, stream); break;
    default: run<__nv_bfloat16>(e, s, n, prev, x0, k, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {prev, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("scheduler_step", &scheduler_step_cuda);
}
