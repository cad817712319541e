// CPU 3x3 convolution (stride 1, padding 1) by Winograd F(2x2, 3x3) or F(4x4, 3x3): input transform, 16 or
// 36 GEMMs against a weight the caller transformed once (ddpm_fast.ops.winograd_weight; its first dimension
// says which), output transform with the bias, residual add, SiLU and output scale folded in. 2.25x (F2) or
// 4x (F4) fewer multiplies than the direct convolution, which at batch 1 is what bounds the UNet on a CPU;
// fp32 only. Tiles go in blocks so the transformed planes stay cache-sized whatever the image size.
#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/common.h"

namespace ddpm_fast::cpu {

static Tensor conv3x3_winograd_cpu(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const std::optional<Tensor>& residual, bool silu, double output_scale) {
  check_conv3x3_winograd(x_in, weight, bias, residual, output_scale, DeviceType::CPU);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), O = weight.size(2);
  auto channels_last = [](const Tensor& t) {
    return is_channels_last_contiguous(t) ? t : torch::stable::contiguous(t, MemoryFormat::ChannelsLast);
  };
  auto contiguous = [](const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); };
  const Tensor x = channels_last(x_in);
  Tensor y = alloc(x, {N, O, H, W}, MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const std::optional<Tensor> b = bias ? std::optional<Tensor>(contiguous(*bias)) : std::nullopt;
  const std::optional<Tensor> res = residual ? std::optional<Tensor>(channels_last(*residual)) : std::nullopt;
  const float* pb = b ? static_cast<const float*>(b->const_data_ptr()) : nullptr;
  const float* pr = res ? static_cast<const float*>(res->const_data_ptr()) : nullptr;
  float* py = static_cast<float*>(y.mutable_data_ptr());
  const float inv_scale = float(1.0 / output_scale);
  if (C == 0) {
    // No input channels: the convolution is the bias alone (then residual, SiLU, scale), pixel by pixel of the
    // channels_last output.
    for (int64_t i = 0; i < N * H * W; ++i)
      for (int64_t o = 0; o < O; ++o) {
        float v = (pb ? pb[o] : 0.f) + (pr ? pr[i * O + o] : 0.f);
        if (silu) v = v / (1.f + std::exp(-v));
        py[i * O + o] = output_scale != 1.0 ? v / float(output_scale) : v;
      }
    return y;
  }
  const Tensor w = contiguous(weight);
  const float* px = static_cast<const float*>(x.const_data_ptr());

  const int tile = weight.size(0) == 36 ? 4 : 2, planes = (tile + 2) * (tile + 2);
  const int64_t th = (H + tile - 1) / tile, tw = (W + tile - 1) / tile, T = N * th * tw;
  // 256 tiles per block for F2, 128 for F4's 36 planes: each GEMM keeps 128-256 rows while V and M stay within
  // L2/L3 (1024-tile blocks made a 64x64, 128-channel layer twice as slow as the direct convolution).
  const int64_t block = std::min<int64_t>(T, tile == 2 ? 256 : 128);
  const auto& k = kernels();
  Tensor V = alloc(x, {planes, block, C}), M = alloc(x, {planes, block, O});
  for (int64_t b0 = 0; b0 < T; b0 += block) {
    const int64_t nb = std::min(block, T - b0);
    // The last block may be shorter: (planes, nb, .) views of the same buffers.
    const Tensor Vb = nb == block ? V : strided_view(V, {planes, nb, C}, {nb * C, C, 1}, 0);
    const Tensor Mb = nb == block ? M : strided_view(M, {planes, nb, O}, {nb * O, O, 1}, 0);
    float* pv = static_cast<float*>(Vb.mutable_data_ptr());
    const int64_t grain = std::max<int64_t>(1, 2048 / C);
    parallel_for(b0, b0 + nb, grain, [&](int64_t t0, int64_t t1) {
      k.winograd_input(px, pv + (t0 - b0) * C, H, W, C, th, tw, t0, t1, nb * C, tile);
    });
    bmm_out_cpu(Mb, Vb, w);
    const float* pm = static_cast<const float*>(Mb.const_data_ptr());
    parallel_for(b0, b0 + nb, std::max<int64_t>(1, 2048 / O), [&](int64_t t0, int64_t t1) {
      k.winograd_output(pm + (t0 - b0) * O, py, pb, pr, H, W, O, th, tw, t0, t1, nb * O, silu, inv_scale, tile);
    });
  }
  return y;
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("conv3x3_winograd", TORCH_BOX(&ddpm_fast::cpu::conv3x3_winograd_cpu));
}
