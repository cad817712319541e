// Argument checks shared by the CPU and CUDA implementations of every op, so both raise the same message
// naming the argument. They are defined in checks.cpp, built by the host C++ compiler: the CUDA glue
// (.cu, built through nvcc) never throws itself but calls these, or `fail` for limits only it has.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <string>

namespace ddpm_fast {

// group_norm_silu: x is (N, C, ...) on `device` with a float dtype; C divisible by num_groups; weight / bias
// (C,) and temb (N, C) of any float dtype on x's device; eps >= 0.
void check_group_norm_silu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& temb,
                           c10::DeviceType device);

// attention: q, k, v all 3-D or all 4-D on one `device`, one float dtype, matching batch / head / key
// sizes, D >= 1, at least one key unless there is no query. max_head_dim > 0 also bounds D and Dv.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::DeviceType device,
                     int64_t max_head_dim = 0);

// scheduler_step: model_output, sample (and noise) on one `device`, one float dtype, one shape.
void check_scheduler_step(const at::Tensor& model_output, const at::Tensor& sample,
                          const std::optional<at::Tensor>& noise, std::optional<double> clip_range,
                          c10::DeviceType device);

// conv3x3_winograd: x (N, C, H, W) float32 on `device`; weight (16 or 36, C, O) for F(2x2) / F(4x4),
// bias (O), residual (N, O, H, W), all float32 on x's device; output_scale finite and nonzero.
void check_conv3x3_winograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, double output_scale, c10::DeviceType device);

// Raises `message` as a RuntimeError (c10::Error).
[[noreturn]] void fail(const std::string& message);

}  // namespace ddpm_fast
