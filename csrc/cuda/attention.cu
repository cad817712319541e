// Torch glue for the CUDA attention kernel: checks, strides, split workspace, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "cuda/attention_kernels.cuh"

namespace {

namespace dk = ddpm_fast::cuda;

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "ddpm_fast::attention (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "ddpm_fast::attention: ", name, " is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "ddpm_fast::attention: ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", q.scalar_type());
  TORCH_CHECK(t.dim() == q.dim(), "ddpm_fast::attention: ", name, " must have ", q.dim(), " dims like q, got shape ",
              t.sizes());
}

// The kernel needs unit stride along D; batch/head/sequence strides are free (views from the UNet).
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          std::optional<double> scale) {
  TORCH_CHECK(q_in.is_cuda(), "ddpm_fast::attention (CUDA): q must be a CUDA tensor, got device ", q_in.device());
  const auto st = q_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "ddpm_fast::attention: dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(q_in.dim() == 3 || q_in.dim() == 4,
              "ddpm_fast::attention: q must be (B, H, L, D) or (B, L, D), got shape ", q_in.sizes());
  check_operand(k_in, "k", q_in);
  check_operand(v_in, "v", q_in);
  const bool three_d = q_in.dim() == 3;
  at::Tensor q = three_d ? q_in.unsqueeze(1) : q_in;
  at::Tensor k = three_d ? k_in.unsqueeze(1) : k_in;
  at::Tensor v = three_d ? v_in.unsqueeze(1) : v_in;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && v.size(0) == B && v.size(1) == H,
              "ddpm_fast::attention: q, k, v must share batch and head sizes (no broadcasting), got q ", q_in.sizes(),
              ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(k.size(3) == D, "ddpm_fast::attention: q and k must share the head dim D, got q ", q_in.sizes(), ", k ",
              k_in.sizes());
  TORCH_CHECK(v.size(2) == S, "ddpm_fast::attention: k and v must have the same sequence length, got k ", k_in.sizes(),
              ", v ", v_in.sizes());
  TORCH_CHECK(D >= 1 && D <= dk::kAttnMaxD, "ddpm_fast::attention (CUDA): head dim D=", D,
              " is outside the supported range [1, ", dk::kAttnMaxD,
              "]; use torch.nn.functional.scaled_dot_product_attention for it");
  TORCH_CHECK(Dv >= 1 && Dv <= dk::kAttnMaxD, "ddpm_fast::attention (CUDA): v head dim ", Dv,
              " is outside the supported range [1, ", dk::kAttnMaxD,
              "]; use torch.nn.functional.scaled_dot_product_attention for it");
  TORCH_CHECK(B * H <= INT32_MAX, "ddpm_fast::attention: B*H too large");

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, H, L, Dv}, q.options());
  if (out.numel() == 0) return three_d ? out.squeeze(1) : out;
  TORCH_CHECK(S >= 1, "ddpm_fast::attention: k and v need at least one key (sequence length 0 given)");
  q = unit_last_stride(q);
  k = unit_last_stride(k);
  v = unit_last_stride(v);

  dk::AttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.q_sb = q.stride(0); a.q_sh = q.stride(1); a.q_ss = q.stride(2);
  a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_ss = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_ss = v.stride(2);
  a.H = static_cast<int>(H);
  a.BH = static_cast<int>(B * H);
  a.L = L;
  a.S = S;
  a.D = static_cast<int>(D);
  a.Dv = static_cast<int>(Dv);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  a.qk_scale = static_cast<float>(sc * 1.4426950408889634);  // log2(e)

  // 16-byte loads when every row start is 16-byte aligned.
  const int64_t vec = 16 / q.element_size();
  auto vec_tensor = [&](const at::Tensor& t) {
    return dk::is_aligned(t.data_ptr(), 16) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
           t.stride(2) % vec == 0;
  };
  a.vec_ok = D % vec == 0 && Dv % vec == 0 && vec_tensor(q) && vec_tensor(k) && vec_tensor(v);

  const int dev = q.get_device();
  dk::attn_plan(a, dk::device_attribute(cudaDevAttrMultiProcessorCount, dev, 80));
  const size_t smem = dk::attn_smem_bytes(a.ld);
  const size_t smem_max = dk::device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, 48 * 1024);
  TORCH_CHECK(smem <= smem_max, "ddpm_fast::attention (CUDA): head dims ", D, "/", Dv, " need ", smem,
              " bytes of shared memory per block, this GPU allows ", smem_max);
  at::Tensor part_o, part_ml;
  if (a.splits > 1) {
    part_o = at::empty({a.splits, B * H, L, Dv}, q.options().dtype(at::kFloat));
    part_ml = at::empty({a.splits, B * H, L, 2}, q.options().dtype(at::kFloat));
    a.part_o = part_o.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  cudaError_t err;
  switch (st) {
    case at::kFloat: err = dk::launch_attention<float>(a, stream); break;
    case at::kHalf: err = dk::launch_attention<__half>(a, stream); break;
    default: err = dk::launch_attention<__nv_bfloat16>(a, stream); break;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return three_d ? out.squeeze(1) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("attention", &attention_cuda);
}
