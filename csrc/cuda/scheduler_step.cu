// Torch glue for the fused scheduler step (CUDA): layout handling, dtype dispatch, launch. scheduler_step takes
// its coefficients by value, scheduler_step_table hands the kernel a device table and index (no host sync).
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/scheduler_step_kernels.cuh"

namespace {

using ddpm_fast::StepCoefs;
using ddpm_fast::Tensor;
using ddpm_fast::cuda::StepTable;

// noise_layout: whether noise (when given) takes part in the layout decision (scheduler_step: only when
// noise_scale != 0; scheduler_step_table: always, its noise_scale being device data). use_noise: whether the
// kernel gets the noise pointer at all.
std::tuple<Tensor, Tensor> run_step(const Tensor& model_output, const Tensor& sample, const std::optional<Tensor>& noise,
                                    bool noise_layout, bool use_noise, const StepCoefs& k, const StepTable* table) {
  const int32_t dev = sample.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  // Elementwise: any dense layout works as long as every operand shares it; otherwise fall back to contiguous.
  const bool same_layout = ddpm_fast::is_non_overlapping_and_dense(sample) && model_output.strides() == sample.strides() &&
                           (!(noise && noise_layout) || noise->strides() == sample.strides());
  auto dense = [&](const Tensor& t) {
    return same_layout || t.is_contiguous() ? t : torch::stable::contiguous(t);
  };
  const Tensor s = dense(sample), e = dense(model_output);
  std::optional<Tensor> n;
  if (use_noise) n = dense(*noise);

  const std::vector<int64_t> strides = s.strides().vec();
  Tensor prev = ddpm_fast::alloc_strided(s, s.sizes(), strides);
  Tensor x0 = ddpm_fast::alloc_strided(s, s.sizes(), strides);
  if (s.numel() == 0) return {prev, x0};

  const int sm = ddpm_fast::cuda::device_attribute(cudaDevAttrMultiProcessorCount, dev, 80);
  auto stream = static_cast<cudaStream_t>(ddpm_fast::current_cuda_stream(dev));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    ddpm_fast::cuda::launch_scheduler_step<T>(
        static_cast<const T*>(e.const_data_ptr()), static_cast<const T*>(s.const_data_ptr()),
        n ? static_cast<const T*>(n->const_data_ptr()) : nullptr, static_cast<T*>(prev.mutable_data_ptr()),
        static_cast<T*>(x0.mutable_data_ptr()), s.numel(), k, table, sm, stream);
  };
  switch (ddpm_fast::kernel_dtype(s.scalar_type(), "scheduler_step", "sample")) {
    case ddpm_fast::DType::F32: launch(float{}); break;
    case ddpm_fast::DType::F16: launch(__half{}); break;
    case ddpm_fast::DType::BF16: launch(__nv_bfloat16{}); break;
  }
  ddpm_fast::check_launch(table ? "scheduler_step_table" : "scheduler_step", cudaGetLastError());
  return {prev, x0};
}

std::tuple<Tensor, Tensor> scheduler_step_cuda(const Tensor& model_output, const Tensor& sample,
                                               const std::optional<Tensor>& noise, double a_x, double a_e, double c0,
                                               double c1, double c2, double noise_scale,
                                               std::optional<double> clip_range) {
  // Every check throws from host-compiled code (checks.cpp); nothing in this file throws itself.
  ddpm_fast::check_scheduler_step(model_output, sample, noise, clip_range, ddpm_fast::DeviceType::CUDA);
  // Like the CPU kernel and the Python composite: a zero noise_scale drops the noise term entirely.
  const bool has_noise = noise.has_value() && noise_scale != 0.0;
  const StepCoefs k{static_cast<float>(a_x), static_cast<float>(a_e), static_cast<float>(c0), static_cast<float>(c1),
                    static_cast<float>(c2), static_cast<float>(noise_scale),
                    clip_range ? static_cast<float>(*clip_range) : 0.f, clip_range.has_value(), has_noise};
  return run_step(model_output, sample, noise, /*noise_layout=*/has_noise, /*use_noise=*/has_noise, k, nullptr);
}

std::tuple<Tensor, Tensor> scheduler_step_table_cuda(const Tensor& model_output, const Tensor& sample,
                                                     const std::optional<Tensor>& noise, const Tensor& coefs,
                                                     const Tensor& index, std::optional<double> clip_range) {
  ddpm_fast::check_scheduler_step_table(model_output, sample, noise, coefs, index, clip_range,
                                        ddpm_fast::DeviceType::CUDA);
  // The row (and whether it has a noise term) is read by the kernel; an out-of-range index gives NaN outputs.
  const StepTable table{static_cast<const float*>(coefs.const_data_ptr()),
                        static_cast<const int64_t*>(index.const_data_ptr()), coefs.size(0), coefs.stride(0),
                        coefs.stride(1)};
  const StepCoefs k{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, clip_range ? static_cast<float>(*clip_range) : 0.f,
                    clip_range.has_value(), noise.has_value()};
  return run_step(model_output, sample, noise, /*noise_layout=*/true, /*use_noise=*/noise.has_value(), k, &table);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("scheduler_step", TORCH_BOX(&scheduler_step_cuda));
  m.impl("scheduler_step_table", TORCH_BOX(&scheduler_step_table_cuda));
}
