#include "checks.h"

#include <cmath>
#include <stdexcept>

namespace ddpm_fast {
namespace {

bool is_float(ScalarType t) { return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half; }

const char* device_name(DeviceType d) { return d == DeviceType::CUDA ? "CUDA" : "CPU"; }

void check_main(const char* op, const char* name, const Tensor& t, DeviceType device) {
  DDPM_FAST_CHECK(device_type_of(t) == device, op, " (", device_name(device), "): ", name, " must be a ",
                  device_name(device), " tensor, got device ", device_str(t.device()));
  DDPM_FAST_CHECK(is_float(dtype_of(t)), op, ": ", name, " has dtype ", dtype_str(dtype_of(t)),
                  "; expected float32, bfloat16 or float16");
}

void check_device(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  DDPM_FAST_CHECK(same_device(t, ref), op, ": ", name, " is on ", device_str(t.device()), " but ", ref_name,
                  " is on ", device_str(ref.device()), " (all tensors must be on one device)");
}

// Same device and dtype as ref.
void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  check_device(op, name, t, ref_name, ref);
  DDPM_FAST_CHECK(dtype_of(t) == dtype_of(ref), op, ": ", name, " has dtype ", dtype_str(dtype_of(t)),
                  " but ", ref_name, " has dtype ", dtype_str(dtype_of(ref)), " (dtypes must match)");
}

// The fp32-only ops' main input: x on `device`, float32, of rank `dim` (described as `shape`); weight like x.
void check_float32_input(const char* op, const Tensor& x, int64_t dim, const char* shape, const Tensor& weight,
                         DeviceType device) {
  check_main(op, "x", x, device);
  DDPM_FAST_CHECK(dtype_of(x) == ScalarType::Float, op, ": x has dtype ", dtype_str(dtype_of(x)),
                  "; only float32 is supported");
  DDPM_FAST_CHECK(x.dim() == dim, op, ": x must be ", shape, ", got shape ", sizes_str(x.sizes()));
  check_like(op, "weight", weight, "x", x);
}

// An optional per-output-channel bias: like x, shape (n).
void check_bias(const char* op, const std::optional<Tensor>& bias, const Tensor& x, int64_t n) {
  if (!bias.has_value()) return;
  check_like(op, "bias", *bias, "x", x);
  DDPM_FAST_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape (", n, "), got ",
                  sizes_str(bias->sizes()));
}

// A 3x3 convolution's optional residual: like x, of the output's shape (N, O, H, W).
void check_conv_residual(const char* op, const std::optional<Tensor>& residual, const Tensor& x, int64_t O) {
  if (!residual.has_value()) return;
  check_like(op, "residual", *residual, "x", x);
  DDPM_FAST_CHECK(residual->dim() == 4 && residual->size(0) == x.size(0) && residual->size(1) == O &&
                      residual->size(2) == x.size(2) && residual->size(3) == x.size(3),
                  op, ": residual must have the output's shape (", x.size(0), ", ", O, ", ", x.size(2), ", ",
                  x.size(3), "), got ", sizes_str(residual->sizes()));
}

// The checks scheduler_step and scheduler_step_table share.
void check_step_tensors(const char* op, const Tensor& model_output, const Tensor& sample,
                        const std::optional<Tensor>& noise, std::optional<double> clip_range, DeviceType device) {
  check_main(op, "sample", sample, device);
  check_like(op, "model_output", model_output, "sample", sample);
  DDPM_FAST_CHECK(model_output.sizes() == sample.sizes(), op, ": model_output has shape ",
                  sizes_str(model_output.sizes()), " but sample has shape ", sizes_str(sample.sizes()));
  if (noise.has_value()) {
    check_like(op, "noise", *noise, "sample", sample);
    DDPM_FAST_CHECK(noise->sizes() == sample.sizes(), op, ": noise has shape ", sizes_str(noise->sizes()),
                    " but sample has shape ", sizes_str(sample.sizes()));
  }
  DDPM_FAST_CHECK(!clip_range.has_value() || *clip_range >= 0.0, op, ": clip_range must be >= 0, got ",
                  clip_range.value_or(0.0));
}

}  // namespace

void fail(const std::string& message) { throw std::runtime_error(message); }

DType kernel_dtype(ScalarType t, const char* op, const char* name) {
  switch (t) {
    case ScalarType::Float: return DType::F32;
    case ScalarType::BFloat16: return DType::BF16;
    case ScalarType::Half: return DType::F16;
    default:
      fail(str(op, ": ", name, " has dtype ", dtype_str(t), "; expected float32, bfloat16 or float16"));
  }
}

namespace {

// What group_norm_silu and group_norm_silu_cat check alike, for C channels (x's, or x's and skip's together).
void check_group_norm_params(const char* op, const Tensor& x, int64_t C, int64_t num_groups,
                             const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                             const std::optional<Tensor>& temb) {
  const int64_t N = x.size(0);
  DDPM_FAST_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  DDPM_FAST_CHECK(C % num_groups == 0, op, ": channels (", C, ") must be divisible by num_groups (", num_groups,
                  ")");
  DDPM_FAST_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const Tensor& p = **t;
    check_device(op, name, p, "x", x);
    DDPM_FAST_CHECK(is_float(dtype_of(p)), op, ": ", name, " has dtype ", dtype_str(dtype_of(p)),
                    "; expected float32, bfloat16 or float16");
    DDPM_FAST_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must have shape (", C, "), got ",
                    sizes_str(p.sizes()));
  }
  if (temb.has_value()) {
    check_device(op, "temb", *temb, "x", x);
    DDPM_FAST_CHECK(is_float(dtype_of(*temb)), op, ": temb has dtype ", dtype_str(dtype_of(*temb)),
                    "; expected float32, bfloat16 or float16");
    DDPM_FAST_CHECK(temb->dim() == 2 && temb->size(0) == N && temb->size(1) == C, op, ": temb must have shape (",
                    N, ", ", C, "), got ", sizes_str(temb->sizes()));
  }
}

}  // namespace

void check_group_norm_silu(const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight,
                           const std::optional<Tensor>& bias, double eps, const std::optional<Tensor>& temb,
                           DeviceType device) {
  constexpr const char* op = "group_norm_silu";
  check_main(op, "x", x, device);
  DDPM_FAST_CHECK(x.dim() >= 2, op, ": x must be (N, C, H, W), got shape ", sizes_str(x.sizes()));
  check_group_norm_params(op, x, x.size(1), num_groups, weight, bias, eps, temb);
}

void check_group_norm_silu_cat(const Tensor& x, const Tensor& skip, int64_t num_groups,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                               DeviceType device) {
  constexpr const char* op = "group_norm_silu_cat";
  check_main(op, "x", x, device);
  check_like(op, "skip", skip, "x", x);
  DDPM_FAST_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D shape ", sizes_str(x.sizes()));
  DDPM_FAST_CHECK(skip.dim() == 4 && skip.size(0) == x.size(0) && skip.size(2) == x.size(2) &&
                      skip.size(3) == x.size(3),
                  op, ": skip must be (N, C_skip, H, W) with x's N, H and W ", sizes_str(x.sizes()), ", got ",
                  sizes_str(skip.sizes()));
  check_group_norm_params(op, x, x.size(1) + skip.size(1), num_groups, weight, bias, eps, std::nullopt);
}

void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, DeviceType device, int64_t max_head_dim) {
  constexpr const char* op = "attention";
  check_main(op, "q", q, device);
  DDPM_FAST_CHECK(q.dim() == 4 || q.dim() == 3, op, ": q must be 4-D (B, H, L, D) or 3-D (B, L, D), got ", q.dim(),
                  "-D shape ", sizes_str(q.sizes()));
  check_like(op, "k", k, "q", q);
  check_like(op, "v", v, "q", q);
  DDPM_FAST_CHECK(k.dim() == q.dim() && v.dim() == q.dim(), op, ": q, k and v must have the same ndim, got ",
                  q.dim(), ", ", k.dim(), " and ", v.dim());
  const int64_t nd = q.dim(), lead = nd - 2;  // batch (and head) dims
  for (int64_t i = 0; i < lead; ++i)
    DDPM_FAST_CHECK(k.size(i) == q.size(i) && v.size(i) == q.size(i), op,
                    ": q, k and v must share batch and head sizes (no broadcasting), got q ", sizes_str(q.sizes()),
                    ", k ", sizes_str(k.sizes()), ", v ", sizes_str(v.sizes()));
  const int64_t L = q.size(nd - 2), D = q.size(nd - 1), S = k.size(nd - 2), Dv = v.size(nd - 1);
  DDPM_FAST_CHECK(k.size(nd - 1) == D, op, ": k's last dim (head dim ", k.size(nd - 1), ") must equal q's (", D,
                  ")");
  DDPM_FAST_CHECK(v.size(nd - 2) == S, op, ": v has ", v.size(nd - 2), " keys but k has ", S,
                  " (their sequence length must match)");
  DDPM_FAST_CHECK(D > 0, op, ": head dim D must be positive, got shape ", sizes_str(q.sizes()));
  DDPM_FAST_CHECK(S > 0 || L == 0, op, ": k and v need at least one key (sequence length 0 given)");
  if (max_head_dim > 0)
    DDPM_FAST_CHECK(D <= max_head_dim && Dv >= 1 && Dv <= max_head_dim, op, " (", device_name(device),
                    "): head dims D=", D, " and Dv=", Dv, " must be in [1, ", max_head_dim,
                    "]; use torch.nn.functional.scaled_dot_product_attention (ddpm_fast.ops.attention falls back "
                    "to it)");
}

void check_scheduler_step(const Tensor& model_output, const Tensor& sample, const std::optional<Tensor>& noise,
                          std::optional<double> clip_range, DeviceType device) {
  check_step_tensors("scheduler_step", model_output, sample, noise, clip_range, device);
}

void check_scheduler_step_table(const Tensor& model_output, const Tensor& sample, const std::optional<Tensor>& noise,
                                const Tensor& coefs, const Tensor& index, std::optional<double> clip_range,
                                DeviceType device) {
  constexpr const char* op = "scheduler_step_table";
  check_step_tensors(op, model_output, sample, noise, clip_range, device);
  check_device(op, "coefs", coefs, "sample", sample);
  DDPM_FAST_CHECK(dtype_of(coefs) == ScalarType::Float, op, ": coefs has dtype ", dtype_str(dtype_of(coefs)),
                  "; expected float32");
  DDPM_FAST_CHECK(coefs.dim() == 2 && coefs.size(0) >= 1 && coefs.size(1) == kStepTableCols, op,
                  ": coefs must be a (T, ", int(kStepTableCols),
                  ") table of (a_x, a_e, c0, c1, c2, noise_scale) rows with T >= 1, got shape ",
                  sizes_str(coefs.sizes()));
  check_device(op, "index", index, "sample", sample);
  DDPM_FAST_CHECK(dtype_of(index) == ScalarType::Long, op, ": index has dtype ", dtype_str(dtype_of(index)),
                  "; expected int64");
  DDPM_FAST_CHECK(index.numel() == 1, op, ": index must have exactly one element, got shape ",
                  sizes_str(index.sizes()));
}

void check_step_table_index(int64_t index, int64_t rows) {
  DDPM_FAST_CHECK(index >= 0 && index < rows, "scheduler_step_table: index ", index, " is out of range for a coefs ",
                  "table of ", rows, " rows");
}

void check_conv3x3_winograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& residual, double output_scale, DeviceType device) {
  constexpr const char* op = "conv3x3_winograd";
  check_float32_input(op, x, 4, "4-D (N, C, H, W)", weight, device);
  const bool planes_ok = weight.dim() >= 1 && (weight.size(0) == 16 || weight.size(0) == 36);
  const bool panels = weight.dim() == 4 && device == DeviceType::CPU;  // column panels (CPU only)
  DDPM_FAST_CHECK(planes_ok && ((weight.dim() == 3 && weight.size(1) == x.size(1)) ||
                                (panels && weight.size(2) == x.size(1) && weight.size(3) == 16)),
                  op, ": weight must be the (16 or 36, C_in=", x.size(1), ", C_out) transform from ",
                  "ddpm_fast.ops.winograd_weight (or its (16 or 36, C_out / 16, C_in=", x.size(1),
                  ", 16) panels on the CPU), got shape ", sizes_str(weight.sizes()));
  const int64_t O = panels ? 16 * weight.size(1) : weight.size(2);
  check_bias(op, bias, x, O);
  check_conv_residual(op, residual, x, O);
  DDPM_FAST_CHECK(std::isfinite(output_scale) && output_scale != 0.0, op,
                  ": output_scale must be finite and nonzero, got ", output_scale);
}

void check_panel_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        const std::optional<Tensor>& other, DeviceType device) {
  constexpr const char* op = "panel_linear";
  check_float32_input(op, x, 2, "2-D (M, K)", weight, device);
  DDPM_FAST_CHECK(weight.dim() == 3 && weight.size(1) == x.size(1) && weight.size(2) == 16, op,
                  ": weight must be the (N / 16, K=", x.size(1), ", 16) panels from ddpm_fast.ops.panel_weight, got shape ",
                  sizes_str(weight.sizes()));
  const int64_t N = 16 * weight.size(0);
  check_bias(op, bias, x, N);
  if (other.has_value()) {
    check_like(op, "other", *other, "x", x);
    DDPM_FAST_CHECK(other->dim() == 2 && other->size(0) == x.size(0) && other->size(1) == N, op,
                    ": other must have the output's shape (", x.size(0), ", ", N, "), got ", sizes_str(other->sizes()));
  }
}

void check_conv3x3_panels(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& residual, DeviceType device) {
  constexpr const char* op = "conv3x3_panels";
  check_float32_input(op, x, 4, "4-D (N, C, H, W)", weight, device);
  DDPM_FAST_CHECK(weight.dim() == 3 && weight.size(1) == 9 * x.size(1) && weight.size(2) == 16, op,
                  ": weight must be the (C_out / 16, 9 C_in=", 9 * x.size(1),
                  ", 16) panels from ddpm_fast.ops.conv3x3_panel_weight, got shape ", sizes_str(weight.sizes()));
  const int64_t O = 16 * weight.size(0);
  check_bias(op, bias, x, O);
  check_conv_residual(op, residual, x, O);
}

}  // namespace ddpm_fast
