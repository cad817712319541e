#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace ddpm_fast {
namespace {

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

const char* device_name(c10::DeviceType d) { return d == c10::DeviceType::CUDA ? "CUDA" : "CPU"; }

void check_main(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, " (", device_name(device), "): ", name, " must be a ",
              device_name(device), " tensor, got device ", t.device());
  TORCH_CHECK(is_float(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
              "; expected float32, bfloat16 or float16");
}

void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), " (all tensors must be on one device)");
}

// Same device and dtype as ref.
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  check_device(op, name, t, ref_name, ref);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type(), " (dtypes must match)");
}

}  // namespace

void check_group_norm_silu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& temb,
                           c10::DeviceType device) {
  constexpr const char* op = "group_norm_silu";
  check_main(op, "x", x, device);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, op, ": channels (", C, ") must be divisible by num_groups (", num_groups, ")");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    check_device(op, name, p, "x", x);
    TORCH_CHECK(is_float(p.scalar_type()), op, ": ", name, " has dtype ", p.scalar_type(),
                "; expected float32, bfloat16 or float16");
    TORCH_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must have shape (", C, "), got ", p.sizes());
  }
  if (temb.has_value()) {
    check_device(op, "temb", *temb, "x", x);
    TORCH_CHECK(is_float(temb->scalar_type()), op, ": temb has dtype ", temb->scalar_type(),
                "; expected float32, bfloat16 or float16");
    TORCH_CHECK(temb->dim() == 2 && temb->size(0) == N && temb->size(1) == C, op, ": temb must have shape (", N,
                ", ", C, "), got ", temb->sizes());
  }
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::DeviceType device,
                     int64_t max_head_dim) {
  constexpr const char* op = "attention";
  check_main(op, "q", q, device);
  TORCH_CHECK(q.dim() == 4 || q.dim() == 3, op, ": q must be 4-D (B, H, L, D) or 3-D (B, L, D), got ", q.dim(),
              "-D shape ", q.sizes());
  check_like(op, "k", k, "q", q);
  check_like(op, "v", v, "q", q);
  TORCH_CHECK(k.dim() == q.dim() && v.dim() == q.dim(), op, ": q, k and v must have the same ndim, got ", q.dim(),
              ", ", k.dim(), " and ", v.dim());
  const int64_t lead = q.dim() - 2;  // batch (and head) dims
  for (int64_t i = 0; i < lead; ++i)
    TORCH_CHECK(k.size(i) == q.size(i) && v.size(i) == q.size(i), op,
                ": q, k and v must share batch and head sizes (no broadcasting), got q ", q.sizes(), ", k ", k.sizes(),
                ", v ", v.sizes());
  const int64_t L = q.size(-2), D = q.size(-1), S = k.size(-2), Dv = v.size(-1);
  TORCH_CHECK(k.size(-1) == D, op, ": k's last dim (head dim ", k.size(-1), ") must equal q's (", D, ")");
  TORCH_CHECK(v.size(-2) == S, op, ": v has ", v.size(-2), " keys but k has ", S, " (their sequence length must match)");
  TORCH_CHECK(D > 0, op, ": head dim D must be positive, got shape ", q.sizes());
  TORCH_CHECK(S > 0 || L == 0, op, ": k and v need at least one key (sequence length 0 given)");
  if (max_head_dim > 0)
    TORCH_CHECK(D <= max_head_dim && Dv >= 1 && Dv <= max_head_dim, op, " (", device_name(device), "): head dims D=", D,
                " and Dv=", Dv, " must be in [1, ", max_head_dim,
                "]; use torch.nn.functional.scaled_dot_product_attention (ddpm_fast.ops.attention falls back to it)");
}

void check_scheduler_step(const at::Tensor& model_output, const at::Tensor& sample,
                          const std::optional<at::Tensor>& noise, std::optional<double> clip_range,
                          c10::DeviceType device) {
  constexpr const char* op = "scheduler_step";
  check_main(op, "sample", sample, device);
  check_like(op, "model_output", model_output, "sample", sample);
  TORCH_CHECK(model_output.sizes() == sample.sizes(), op, ": model_output has shape ", model_output.sizes(),
              " but sample has shape ", sample.sizes());
  if (noise.has_value()) {
    check_like(op, "noise", *noise, "sample", sample);
    TORCH_CHECK(noise->sizes() == sample.sizes(), op, ": noise has shape ", noise->sizes(), " but sample has shape ",
                sample.sizes());
  }
  TORCH_CHECK(!clip_range.has_value() || *clip_range >= 0.0, op, ": clip_range must be >= 0, got ", *clip_range);
}

void check_conv3x3_winograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, double output_scale, c10::DeviceType device) {
  constexpr const char* op = "conv3x3_winograd";
  check_main(op, "x", x, device);
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x has dtype ", x.scalar_type(), "; only float32 is supported");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  check_like(op, "weight", weight, "x", x);
  TORCH_CHECK(weight.dim() == 3 && (weight.size(0) == 16 || weight.size(0) == 36) && weight.size(1) == x.size(1), op,
              ": weight must be the (16 or 36, C_in=", x.size(1), ", C_out) Winograd transform, got shape ",
              weight.sizes());
  const int64_t O = weight.size(2);
  if (bias.has_value()) {
    check_like(op, "bias", *bias, "x", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O, op, ": bias must have shape (", O, "), got ", bias->sizes());
  }
  if (residual.has_value()) {
    check_like(op, "residual", *residual, "x", x);
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == x.size(0) && residual->size(1) == O &&
                    residual->size(2) == x.size(2) && residual->size(3) == x.size(3),
                op, ": residual must have the output's shape (", x.size(0), ", ", O, ", ", x.size(2), ", ", x.size(3),
                "), got ", residual->sizes());
  }
  TORCH_CHECK(std::isfinite(output_scale) && output_scale != 0.0, op, ": output_scale must be finite and nonzero, got ",
              output_scale);
}

void fail(const std::string& message) { TORCH_CHECK(false, message); }

}  // namespace ddpm_fast
