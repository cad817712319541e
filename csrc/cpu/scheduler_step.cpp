// CPU scheduler step: both outputs written in one pass over model_output, sample and noise.
// scheduler_step takes its six coefficients as arguments, scheduler_step_table reads them from row index[0]
// of a (T, 6) table; both run the same kernel.
#include <optional>
#include <tuple>

#include "cpu/common.h"

namespace ddpm_fast::cpu {

// noise_layout: whether noise (when given) takes part in the layout decision. scheduler_step drops it when
// noise_scale == 0, scheduler_step_table keeps it (its noise_scale is data, which its fake kernel cannot
// see); ops.py's fake kernels mirror both rules.
static std::tuple<Tensor, Tensor> run_step(const Tensor& model_output, const Tensor& sample,
                                           const std::optional<Tensor>& noise, bool noise_layout,
                                           const StepCoefs& coefs) {
  // Work on the storage directly when all inputs share one contiguous or channels_last layout; otherwise
  // fall back to contiguous copies.
  Tensor eps = model_output, x = sample;
  std::optional<Tensor> nz = coefs.has_noise ? noise : std::nullopt;
  const bool dense = x.is_contiguous() || is_channels_last_contiguous(x);
  const bool same_layout = dense && eps.strides() == x.strides() &&
                           (!(noise_layout ? noise.has_value() : coefs.has_noise) || noise->strides() == x.strides());
  if (!same_layout) {
    if (!x.is_contiguous()) x = torch::stable::contiguous(x);
    if (!eps.is_contiguous()) eps = torch::stable::contiguous(eps);
    if (nz && !nz->is_contiguous()) nz = torch::stable::contiguous(*nz);
  }
  const std::vector<int64_t> strides = x.strides().vec();
  Tensor prev = alloc_strided(x, x.sizes(), strides), x0 = alloc_strided(x, x.sizes(), strides);
  const int64_t n = x.numel();
  if (n == 0) return {prev, x0};

  const DType dt = kernel_dtype(x.scalar_type(), "scheduler_step", "sample");
  const int64_t es = static_cast<int64_t>(x.element_size());
  const char* pe = static_cast<const char*>(eps.const_data_ptr());
  const char* px = static_cast<const char*>(x.const_data_ptr());
  const char* pn = nz ? static_cast<const char*>(nz->const_data_ptr()) : nullptr;
  char* pp = static_cast<char*>(prev.mutable_data_ptr());
  char* p0 = static_cast<char*>(x0.mutable_data_ptr());
  const auto& k = kernels();
  parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    k.scheduler_step(dt, pe + b * es, px + b * es, pn ? pn + b * es : nullptr, pp + b * es, p0 + b * es, e - b,
                     coefs);
  });
  return {prev, x0};
}

static std::tuple<Tensor, Tensor> scheduler_step_cpu(const Tensor& model_output, const Tensor& sample,
                                                     const std::optional<Tensor>& noise, double a_x, double a_e,
                                                     double c0, double c1, double c2, double noise_scale,
                                                     std::optional<double> clip_range) {
  check_scheduler_step(model_output, sample, noise, clip_range, DeviceType::CPU);
  const StepCoefs c{float(a_x),         float(a_e), float(c0), float(c1), float(c2), float(noise_scale),
                    float(clip_range.value_or(0.0)), clip_range.has_value(), noise.has_value() && noise_scale != 0.0};
  return run_step(model_output, sample, noise, /*noise_layout=*/false, c);
}

static std::tuple<Tensor, Tensor> scheduler_step_table_cpu(const Tensor& model_output, const Tensor& sample,
                                                           const std::optional<Tensor>& noise, const Tensor& coefs,
                                                           const Tensor& index, std::optional<double> clip_range) {
  check_scheduler_step_table(model_output, sample, noise, coefs, index, clip_range, DeviceType::CPU);
  const int64_t i = *static_cast<const int64_t*>(index.const_data_ptr());
  check_step_table_index(i, coefs.size(0));
  const float* row = static_cast<const float*>(coefs.const_data_ptr());
  const int64_t s0 = coefs.stride(0), s1 = coefs.stride(1);
  auto col = [&](int j) { return row[i * s0 + j * s1]; };
  const float noise_scale = col(kTabNoiseScale);
  const StepCoefs c{col(kTabAx), col(kTabAe), col(kTabC0), col(kTabC1), col(kTabC2), noise_scale,
                    float(clip_range.value_or(0.0)), clip_range.has_value(), noise.has_value() && noise_scale != 0.f};
  return run_step(model_output, sample, noise, /*noise_layout=*/true, c);
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("scheduler_step", TORCH_BOX(&ddpm_fast::cpu::scheduler_step_cpu));
  m.impl("scheduler_step_table", TORCH_BOX(&ddpm_fast::cpu::scheduler_step_table_cpu));
}
