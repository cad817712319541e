// Torch glue for the fused scheduler step (CUDA): layout handling, dtype dispatch, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/scheduler_step_kernels.cuh"

namespace {

using ddpm_fast::cuda::StepCoefs;

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
  // Every check throws from host-compiled code (checks.cpp); nothing in this file throws itself.
  ddpm_fast::check_scheduler_step(model_output, sample, noise, clip_range, c10::DeviceType::CUDA);
  const auto st = sample.scalar_type();

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
  ddpm_fast::check_launch("scheduler_step", cudaGetLastError());
  return {prev, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("scheduler_step", &scheduler_step_cuda);
}
