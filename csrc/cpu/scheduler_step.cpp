// CPU scheduler step: both outputs written in one pass over model_output, sample and noise.
#include <optional>
#include <tuple>

#include "cpu/common.h"

namespace ddpm_fast::cpu {

static std::tuple<at::Tensor, at::Tensor> scheduler_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                            const std::optional<at::Tensor>& noise, double a_x,
                                                            double a_e, double c0, double c1, double c2,
                                                            double noise_scale, std::optional<double> clip_range) {
  check_scheduler_step(model_output, sample, noise, clip_range, c10::DeviceType::CPU);
  const bool has_noise = noise.has_value() && noise_scale != 0.0;

  // Work on the storage directly when all inputs share one contiguous or channels_last layout; otherwise
  // fall back to contiguous copies (the fake kernel in ops.py mirrors this rule).
  at::Tensor eps = model_output, x = sample, nz = has_noise ? *noise : at::Tensor();
  const bool dense = x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  const bool same_layout = dense && eps.strides() == x.strides() &&
                           (!has_noise || nz.strides() == x.strides());
  if (!same_layout) {
    x = x.contiguous();
    eps = eps.contiguous();
    if (has_noise) nz = nz.contiguous();
  }
  at::Tensor prev = at::empty_like(x), x0 = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {prev, x0};

  StepCoefs c{float(a_x), float(a_e), float(c0), float(c1), float(c2), float(noise_scale),
              float(clip_range.value_or(0.0)), clip_range.has_value(), has_noise};
  const DType dt = to_kernel_dtype(x.scalar_type());
  const int64_t es = x.element_size();
  const char* pe = static_cast<const char*>(eps.const_data_ptr());
  const char* px = static_cast<const char*>(x.const_data_ptr());
  const char* pn = has_noise ? static_cast<const char*>(nz.const_data_ptr()) : nullptr;
  char* pp = static_cast<char*>(prev.mutable_data_ptr());
  char* p0 = static_cast<char*>(x0.mutable_data_ptr());
  const auto& k = kernels();
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    k.scheduler_step(dt, pe + b * es, px + b * es, pn ? pn + b * es : nullptr, pp + b * es, p0 + b * es, e - b, c);
  });
  return {prev, x0};
}

}  // namespace ddpm_fast::cpu

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("scheduler_step", &ddpm_fast::cpu::scheduler_step_cpu); }
