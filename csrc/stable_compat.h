// Everything the op glue needs from torch that the LibTorch stable ABI does not offer as such, solved once,
// here. The glue (csrc/ops.cpp, csrc/checks.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu) includes torch only through
// this header; the kernels (csrc/cpu/kernels/, csrc/cuda/*.cuh) include no torch header at all.
//
// The stable ABI (torch/csrc/stable, torch/headeronly and the aoti_torch_* C shims) is what lets one build
// load on every torch >= TORCH_TARGET_VERSION: the binary calls only C functions that torch keeps, never a
// C++ symbol of c10 or ATen. CMakeLists.txt sets TORCH_TARGET_VERSION (torch 2.10, in the encoding of
// torch/headeronly/version.h), so the compiler refuses any API newer than 2.10.
//
// What is missing there, and what we use instead:
//   - ATen's at::vec (refuses TORCH_TARGET_VERSION): csrc/cpu/kernels/simd.h, our own.
//   - Messages: STD_TORCH_CHECK prefixes function, file and line to every message, and sizes, devices and
//     dtypes have no operator<<. str() / sizes_str() / device_str() below format them like torch does
//     ("[2, 3]", "cuda:0", "Float"); checks.h's DDPM_FAST_CHECK raises the bare message as RuntimeError.
//   - Tensor::is_contiguous() takes no memory format: is_channels_last_contiguous() and
//     is_non_overlapping_and_dense() below compute them from sizes and strides, as c10 does.
//   - at::empty / empty_like with a memory format or a dtype, at::empty_strided: alloc(), alloc_like() and
//     alloc_strided() below, through aoti_torch_empty_strided (the C shim AOTInductor allocates with).
//   - No add / mm / bmm wrappers: mm_out_cpu() and bmm_out_cpu() call the C shims aoti_torch_cpu_mm_out /
//     aoti_torch_cpu_bmm_out, which run torch's CPU GEMM (MKL / oneDNN / OpenBLAS) directly.
//   - No c10::InferenceMode guard: none is needed. The attention's worker threads (torch_parallel_for) do
//     not inherit the caller's inference mode, and the dispatcher would refuse at::mm_out into an inference
//     tensor there; the aoti_torch_cpu_* shims call the CPU kernel itself (at::cpu::mm_out), below the
//     dispatcher's autograd and inplace-or-view keys, so the GEMM writes into inference tensors from any
//     thread (tests/test_inference_mode.py runs it with 2 threads). Views for those GEMMs come from
//     strided_view() (aoti_torch__reinterpret_tensor), which does not dispatch either; cpu_float_blob()
//     (aoti_torch_create_tensor_from_blob) wraps a kernel's own scratch memory for them without a copy.
//   - torch::stable::parallel_for (torch_parallel_for) gives no AT_PARALLEL_OPENMP and no guarantee that
//     its chunks run at the same time, so no kernel may wait on another chunk (group_norm_silu uses two
//     parallel regions for that reason).
//   - The current CUDA stream: Stream::nativeHandle() only exists from torch 2.13, so current_cuda_stream()
//     uses the C shim aoti_torch_get_current_cuda_stream (built with USE_CUDA, in the CUDA library only).
#pragma once

#ifndef TORCH_TARGET_VERSION
#error "TORCH_TARGET_VERSION must be set (CMakeLists.txt passes it): the glue targets the LibTorch stable ABI"
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/csrc/stable/version.h>
#include <torch/headeronly/core/MemoryFormat.h>
#include <torch/headeronly/core/ScalarType.h>

#if TORCH_TARGET_VERSION < TORCH_VERSION_2_10_0
#error "ddpm_fast needs TORCH_TARGET_VERSION >= 2.10 (mutable_data_ptr, parallel_for, torch_call_dispatcher)"
#endif

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace ddpm_fast {

using torch::headeronly::IntHeaderOnlyArrayRef;
using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::DeviceType;
using torch::stable::Tensor;

// ------------------------------------------------------------------------------------------------ messages

// "[2, 12, 4, 4]", as c10 prints an IntArrayRef.
inline std::string sizes_str(IntHeaderOnlyArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline const char* device_type_name(DeviceType t) {
  switch (t) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda";
    case DeviceType::Meta: return "meta";
    case DeviceType::XPU: return "xpu";
    case DeviceType::MPS: return "mps";
    case DeviceType::HIP: return "hip";
    case DeviceType::PrivateUse1: return "privateuseone";
    default: return "unknown";
  }
}

// "cpu", "cuda:0", "meta": as torch prints a device.
inline std::string device_str(const Device& d) {
  std::string out = device_type_name(d.type());
  if (d.has_index()) out += ":" + std::to_string(d.index());
  return out;
}

// "Float", "BFloat16", "Int": as c10 prints a ScalarType.
inline const char* dtype_str(ScalarType t) { return torch::headeronly::toString(t); }

// Concatenates anything std::ostream prints (use sizes_str / device_str / dtype_str for torch types).
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// ------------------------------------------------------------------------------------ dtype and device
// Tensor::scalar_type() and device() translate torch's codes into the headers' enums through a chain of up to
// ~20 shim calls each; the checks ask for them for every argument of every call (several hundred ns per op
// on a 10 us op). These read the codes once and compare them with the few we use.

struct ShimCodes {
  int32_t f32, bf16, f16, i64, cpu, cuda;
};
inline const ShimCodes& shim_codes() {
  static const ShimCodes codes{aoti_torch_dtype_float32(), aoti_torch_dtype_bfloat16(), aoti_torch_dtype_float16(),
                               aoti_torch_dtype_int64(),   aoti_torch_device_type_cpu(), aoti_torch_device_type_cuda()};
  return codes;
}

inline ScalarType dtype_of(const Tensor& t) {
  int32_t code = 0;
  STD_TORCH_CHECK(aoti_torch_get_dtype(t.get(), &code) == AOTI_TORCH_SUCCESS, "aoti_torch_get_dtype failed");
  const ShimCodes& c = shim_codes();
  if (code == c.f32) return ScalarType::Float;
  if (code == c.bf16) return ScalarType::BFloat16;
  if (code == c.f16) return ScalarType::Half;
  if (code == c.i64) return ScalarType::Long;
  return t.scalar_type();
}

inline DeviceType device_type_of(const Tensor& t) {
  int32_t code = 0;
  STD_TORCH_CHECK(aoti_torch_get_device_type(t.get(), &code) == AOTI_TORCH_SUCCESS, "aoti_torch_get_device_type failed");
  const ShimCodes& c = shim_codes();
  if (code == c.cpu) return DeviceType::CPU;
  if (code == c.cuda) return DeviceType::CUDA;
  return t.device().type();
}

// Same device type and index.
inline bool same_device(const Tensor& a, const Tensor& b) {
  int32_t ta = 0, tb = 0, ia = 0, ib = 0;
  STD_TORCH_CHECK(aoti_torch_get_device_type(a.get(), &ta) == AOTI_TORCH_SUCCESS &&
                      aoti_torch_get_device_type(b.get(), &tb) == AOTI_TORCH_SUCCESS &&
                      aoti_torch_get_device_index(a.get(), &ia) == AOTI_TORCH_SUCCESS &&
                      aoti_torch_get_device_index(b.get(), &ib) == AOTI_TORCH_SUCCESS,
                  "reading a tensor's device failed");
  return ta == tb && ia == ib;
}

// --------------------------------------------------------------------------------------- memory formats

// c10's is_contiguous(at::MemoryFormat::ChannelsLast) for a 4-D tensor: strides of an (N, H, W, C) layout,
// dims of size 1 ignored.
inline bool is_channels_last_contiguous(const Tensor& t) {
  if (t.dim() != 4) return false;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t expected = 1;
  for (const int d : {1, 3, 2, 0}) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// c10's is_non_overlapping_and_dense: some permutation of the dims is contiguous.
inline bool is_non_overlapping_and_dense(const Tensor& t) {
  const int64_t n = t.dim();
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  if (n == 1) return sizes[0] < 2 || strides[0] == 1;
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  // By stride, dims of size 0 or 1 last.
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    if (sizes[a] < 2) return false;
    if (sizes[b] < 2) return true;
    return strides[a] < strides[b];
  });
  int64_t required = 1;
  for (const int64_t d : perm) {
    if (sizes[d] < 2) return true;
    if (strides[d] != required) return false;
    required *= sizes[d];
  }
  return true;
}

// Strides of a dense tensor of `sizes` in memory format `fmt` (Contiguous, or ChannelsLast for 4-D), written
// to st[0..sizes.size()).
inline void dense_strides(IntHeaderOnlyArrayRef sizes, MemoryFormat fmt, int64_t* st) {
  const size_t n = sizes.size();
  auto step = [](int64_t s) { return std::max<int64_t>(s, 1); };
  if (fmt == MemoryFormat::ChannelsLast && n == 4) {
    st[1] = 1;
    st[3] = step(sizes[1]);
    st[2] = st[3] * step(sizes[3]);
    st[0] = st[2] * step(sizes[2]);
    return;
  }
  int64_t acc = 1;
  for (size_t i = n; i-- > 0;) {
    st[i] = acc;
    acc *= step(sizes[i]);
  }
}

// ----------------------------------------------------------------------------------------- allocation

inline int32_t shim_dtype(ScalarType t) {
  return torch::stable::detail::to<int32_t>(torch::stable::detail::from(t));
}

// Uninitialised tensor with the given sizes and strides on `ref`'s device, of `dtype` (default: ref's).
inline Tensor alloc_strided(const Tensor& ref, IntHeaderOnlyArrayRef sizes, IntHeaderOnlyArrayRef strides,
                                std::optional<ScalarType> dtype = std::nullopt) {
  int32_t dt = 0, device_type = 0, device_index = 0;
  if (dtype.has_value()) dt = shim_dtype(*dtype);
  else STD_TORCH_CHECK(aoti_torch_get_dtype(ref.get(), &dt) == AOTI_TORCH_SUCCESS, "aoti_torch_get_dtype failed");
  STD_TORCH_CHECK(aoti_torch_get_device_type(ref.get(), &device_type) == AOTI_TORCH_SUCCESS &&
                      aoti_torch_get_device_index(ref.get(), &device_index) == AOTI_TORCH_SUCCESS,
                  "reading a tensor's device failed");
  AtenTensorHandle out = nullptr;
  STD_TORCH_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), dt,
                                           device_type, device_index, &out) == AOTI_TORCH_SUCCESS,
                  "aoti_torch_empty_strided failed for sizes ", sizes_str(sizes));
  return Tensor(out);
}

// Uninitialised dense tensor on `ref`'s device in memory format `fmt`, of `dtype` (default: ref's).
inline Tensor alloc(const Tensor& ref, IntHeaderOnlyArrayRef sizes, MemoryFormat fmt = MemoryFormat::Contiguous,
                        std::optional<ScalarType> dtype = std::nullopt) {
  int64_t small[8];
  std::vector<int64_t> large(sizes.size() > 8 ? sizes.size() : 0);
  int64_t* st = sizes.size() > 8 ? large.data() : small;
  dense_strides(sizes, fmt, st);
  return alloc_strided(ref, sizes, IntHeaderOnlyArrayRef(st, sizes.size()), dtype);
}

// Same sizes, device and dtype as t, in memory format `fmt`.
inline Tensor alloc_like(const Tensor& t, MemoryFormat fmt) { return alloc(t, t.sizes(), fmt); }

// ---------------------------------------------------------------------------------------- views, GEMMs

// A view of base's storage with these sizes and strides, starting `offset` elements after base's first
// element (aoti_torch__reinterpret_tensor: no dispatch, no autograd view tracking).
inline Tensor strided_view(const Tensor& base, IntHeaderOnlyArrayRef sizes, IntHeaderOnlyArrayRef strides,
                           int64_t offset) {
  AtenTensorHandle out = nullptr;
  STD_TORCH_CHECK(aoti_torch__reinterpret_tensor(base.get(), static_cast<int64_t>(sizes.size()), sizes.data(),
                                                 strides.data(), offset, &out) == AOTI_TORCH_SUCCESS,
                  "aoti_torch__reinterpret_tensor failed");
  return Tensor(out);
}

}  // namespace ddpm_fast

// The CPU GEMM shims (c_shim_cpu.h; exported by libtorch_cpu).
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

namespace ddpm_fast {

// out = a @ b (2-D, fp32 here), into out's storage.
inline void mm_out_cpu(const Tensor& out, const Tensor& a, const Tensor& b) {
  STD_TORCH_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()) == AOTI_TORCH_SUCCESS,
                  "aoti_torch_cpu_mm_out failed for ", sizes_str(a.sizes()), " @ ", sizes_str(b.sizes()));
}

// A CPU float32 tensor over memory we own (a kernel's scratch buffer), with these sizes and strides, for the GEMM
// shims (aoti_torch_create_tensor_from_blob: no allocation, no copy; the memory must outlive the tensor).
inline Tensor cpu_float_blob(float* data, IntHeaderOnlyArrayRef sizes, IntHeaderOnlyArrayRef strides) {
  AtenTensorHandle out = nullptr;
  STD_TORCH_CHECK(aoti_torch_create_tensor_from_blob(data, static_cast<int64_t>(sizes.size()), sizes.data(),
                                                     strides.data(), 0, aoti_torch_dtype_float32(),
                                                     aoti_torch_device_type_cpu(), 0, &out) == AOTI_TORCH_SUCCESS,
                  "aoti_torch_create_tensor_from_blob failed for sizes ", sizes_str(sizes));
  return Tensor(out);
}

// out = a @ b per batch (3-D), into out's storage.
inline void bmm_out_cpu(const Tensor& out, const Tensor& a, const Tensor& b) {
  STD_TORCH_CHECK(aoti_torch_cpu_bmm_out(out.get(), a.get(), b.get()) == AOTI_TORCH_SUCCESS,
                  "aoti_torch_cpu_bmm_out failed for ", sizes_str(a.sizes()), " @ ", sizes_str(b.sizes()));
}

#ifdef USE_CUDA
// The stream torch's current-stream machinery gives for this device (torch.cuda.current_stream(), a capture
// stream inside torch.cuda.graph), as a cudaStream_t.
inline void* current_cuda_stream(int32_t device_index) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
                  "aoti_torch_get_current_cuda_stream failed");
  return stream;
}
#endif

}  // namespace ddpm_fast
