// Argument checks shared by the CPU and CUDA implementations of every op, so both raise the same message
// naming the argument (Python sees a RuntimeError). They are defined in checks.cpp, built by the host C++
// compiler into both libraries (the CPU one and the CUDA one): the CUDA glue (.cu, built through nvcc)
// never throws itself but calls these, or `fail` for limits only it has.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "kernel_types.h"
#include "stable_compat.h"

namespace ddpm_fast {

// Raises `message`, unchanged, as a RuntimeError (std::runtime_error; torch translates it).
[[noreturn]] void fail(const std::string& message);

// DDPM_FAST_CHECK(cond, parts...): fail(str(parts...)) unless cond. Unlike STD_TORCH_CHECK it does not put
// the C++ function, file and line in front of the message a Python user reads.
#define DDPM_FAST_CHECK(cond, ...)                                  \
  do {                                                              \
    if (!(cond)) ::ddpm_fast::fail(::ddpm_fast::str(__VA_ARGS__)); \
  } while (0)

// The kernel element type for a torch dtype; raises "<op>: <name> has dtype D; expected float32, bfloat16 or
// float16" for any other (no kernel ever falls back to a default type).
DType kernel_dtype(ScalarType t, const char* op, const char* name);

// group_norm_silu: x is (N, C, ...) on `device` with a float dtype; C divisible by num_groups; weight / bias
// (C,) and temb (N, C) of any float dtype on x's device; eps >= 0.
void check_group_norm_silu(const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight,
                           const std::optional<Tensor>& bias, double eps, const std::optional<Tensor>& temb,
                           DeviceType device);
void check_group_norm_silu_cat(const Tensor& x, const Tensor& skip, int64_t num_groups,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                               DeviceType device);

// attention: q, k, v all 3-D or all 4-D on one `device`, one float dtype, matching batch / head / key
// sizes, D >= 1, at least one key unless there is no query. max_head_dim > 0 also bounds D and Dv.
void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, DeviceType device, int64_t max_head_dim = 0);

// scheduler_step: model_output, sample (and noise) on one `device`, one float dtype, one shape; clip_range >= 0.
void check_scheduler_step(const Tensor& model_output, const Tensor& sample, const std::optional<Tensor>& noise,
                          std::optional<double> clip_range, DeviceType device);

// scheduler_step_table: scheduler_step's checks, plus coefs a (T >= 1, 6) float32 table and index a
// one-element int64 tensor, both on sample's device. The index's value is checked by the caller where it
// can be read (the CPU), see check_step_table_index.
void check_scheduler_step_table(const Tensor& model_output, const Tensor& sample, const std::optional<Tensor>& noise,
                                const Tensor& coefs, const Tensor& index, std::optional<double> clip_range,
                                DeviceType device);

// scheduler_step_table (CPU): 0 <= index < T.
void check_step_table_index(int64_t index, int64_t rows);

// conv3x3_winograd: x (N, C, H, W) float32 on `device`; weight (16 or 36, C, O) for F(2x2) / F(4x4) (on the
// CPU also as (16 or 36, O / 16, C, 16) column panels),
// bias (O), residual (N, O, H, W), all float32 on x's device; output_scale finite and nonzero.
void check_conv3x3_winograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& residual, double output_scale, DeviceType device);

// panel_linear: x (M, K) float32 on `device` with unit column stride; weight (P, K, 16) float32 contiguous from
// ddpm_fast.ops.panel_weight (N = 16 P outputs); bias (N), other (M, N), float32 on x's device.
void check_panel_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        const std::optional<Tensor>& other, DeviceType device);

// conv3x3_panels: x (N, C, H, W) float32 on `device`; weight (P, 9 C, 16) float32 from
// ddpm_fast.ops.conv3x3_panel_weight (O = 16 P outputs); bias (O), residual (N, O, H, W), float32 on x's device.
void check_conv3x3_panels(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& residual, DeviceType device);

}  // namespace ddpm_fast
