// Host-side validation and argument packing shared by the CPU and CUDA op implementations.
// Messages name the op and the tensor at fault.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "dispatch.h"
#include "formats.h"
#include "launchers.h"

namespace autoround_fast {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// formats.h names the float dtypes by torch's own codes, which the ops' schemas carry as ints.
static_assert(kHalf == static_cast<int>(ScalarType::Half) && kFloat == static_cast<int>(ScalarType::Float) &&
                  kBFloat16 == static_cast<int>(ScalarType::BFloat16),
              "formats.h's dtype codes are c10::ScalarType's");

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    default: return "an unsupported dtype";
  }
}

inline int float_code(const Tensor& t, const char* op, const char* name) {
  ScalarType st = t.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::BFloat16 || st == ScalarType::Half,
                  op, ": ", name, " must be float32, bfloat16 or float16, got ", dtype_name(st));
  return static_cast<int>(st);
}

inline void check_same_device(const Tensor& ref, const Tensor& t, const char* op, const char* name) {
  STD_TORCH_CHECK(t.is_cuda() == ref.is_cuda() && t.get_device_index() == ref.get_device_index(),
                  op, ": ", name, " must be on the same device as the first input");
}

inline void check_fp32(const Tensor& ref, const Tensor& t, int64_t numel, const char* op,
                       const char* name) {
  check_same_device(ref, t, op, name);
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, op, ": ", name, " must be float32, got ",
                  dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", numel, " elements, got ",
                  t.numel());
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_weight(const Tensor& w, const char* op) {
  STD_TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D [out, in], got ", w.dim(), " dims");
  STD_TORCH_CHECK(w.is_contiguous(), op, ": weight must be contiguous");
  float_code(w, op, "weight");
}

inline void check_like(const Tensor& ref, const Tensor& t, const char* op, const char* name) {
  check_same_device(ref, t, op, name);
  STD_TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
                  dtype_name(ref.scalar_type()), ", got ", dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.numel() == ref.numel() && t.is_contiguous(), op, ": ", name,
                  " must be contiguous with ", ref.numel(), " elements");
}

// An NVFP4 global scale for `rows` rows, fp32: one element, or (where per_row_ok) one per row.
// Returns whether it is one per row.
inline bool check_global_scale(const Tensor& like, const Tensor& gs, int64_t rows, const char* op,
                               bool per_row_ok = true) {
  const bool per_row = per_row_ok && gs.numel() == rows && rows != 1;
  STD_TORCH_CHECK(!per_row_ok || per_row || gs.numel() == 1, op, ": global_scale must have 1 or ", rows,
                  " (one per row) elements, got ", gs.numel());
  check_fp32(like, gs, per_row ? rows : 1, op, "global_scale");
  return per_row;
}

inline Nvfp4Args nvfp4_args(const Tensor& w, const Tensor& v, const Tensor& ms, const Tensor& gs,
                            const char* op) {
  check_weight(w, op);
  const int64_t rows = w.size(0), cols = w.size(1);
  check_fp32(w, v, rows * cols, op, "v");
  check_fp32(w, ms, rows * ceil_div(cols, kNvfp4Group), op, "max_scale");
  const bool per_row = check_global_scale(w, gs, rows, op);
  return Nvfp4Args{float_code(w, op, "weight"), rows, cols, w.const_data_ptr(),
                   static_cast<const float*>(v.const_data_ptr()),
                   static_cast<const float*>(ms.const_data_ptr()),
                   static_cast<const float*>(gs.const_data_ptr()), per_row};
}

// x (named `name` in errors): contiguous with a non-empty last dimension, viewed as [rows, cols]
// (zero rows: an activation of no tokens, e.g. an MoE expert routed none); gs fp32, one or
// (where per_row_ok) one per row.
inline Nvfp4ActArgs nvfp4_act_args(const Tensor& x, const Tensor& gs, const char* op,
                                   const char* name = "x", bool per_row_ok = true) {
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) > 0, op, ": ", name,
                  " must have a non-empty last dimension");
  STD_TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  const int64_t cols = x.size(x.dim() - 1), rows = x.numel() / cols;
  const bool per_row = check_global_scale(x, gs, rows, op, per_row_ok);
  return Nvfp4ActArgs{float_code(x, op, name), rows, cols, x.const_data_ptr(),
                      static_cast<const float*>(gs.const_data_ptr()), per_row};
}

// gate and up of a SiLU-gated MLP: one dtype, one shape, contiguous; viewed as [rows, cols].
inline SiluMulActArgs silu_mul_act_args(const Tensor& gate, const Tensor& up, const Tensor& gs,
                                        const char* op) {
  const Nvfp4ActArgs g = nvfp4_act_args(gate, gs, op, "gate", /*per_row_ok=*/false);
  STD_TORCH_CHECK(up.dim() == gate.dim(), op, ": up must have gate's shape");
  for (int64_t d = 0; d < gate.dim(); ++d)
    STD_TORCH_CHECK(up.size(d) == gate.size(d), op, ": up must have gate's shape");
  check_like(gate, up, op, "up");
  return SiluMulActArgs{g.dtype, g.rows, g.cols, g.x, up.const_data_ptr(), g.global_scale};
}

inline void check_scale_dtype(int64_t scale_dtype, const char* op) {
  STD_TORCH_CHECK(scale_dtype == kHalf || scale_dtype == kFloat || scale_dtype == kBFloat16, op,
                  ": scale_dtype must be float16, bfloat16 or float32 (code 5, 15 or 6), got ", scale_dtype);
}

// FP8 weights: max_scale has one element (one scale for the tensor) or one per row.
// amax: a per-tensor weight's max|W| as the caller knows it (fp32, one element; W unchanged
// between calls), which spares the kernels a pass over W; absent, the kernels compute it.
inline Fp8Args fp8_args(const Tensor& w, const Tensor& v, const Tensor& ms, int64_t scale_dtype,
                        const std::optional<Tensor>& amax, const char* op) {
  check_weight(w, op);
  check_scale_dtype(scale_dtype, op);
  const int64_t rows = w.size(0), cols = w.size(1);
  STD_TORCH_CHECK(rows * cols > 0, op, ": weight must be non-empty");
  check_fp32(w, v, rows * cols, op, "v");
  check_same_device(w, ms, op, "max_scale");
  STD_TORCH_CHECK(ms.scalar_type() == ScalarType::Float, op, ": max_scale must be float32, got ",
                  dtype_name(ms.scalar_type()));
  STD_TORCH_CHECK(ms.numel() == 1 || ms.numel() == rows, op,
                  ": max_scale must have 1 element (one scale for the tensor) or ", rows,
                  " (one per row), got ", ms.numel());
  STD_TORCH_CHECK(ms.is_contiguous(), op, ": max_scale must be contiguous");
  if (amax) {
    STD_TORCH_CHECK(ms.numel() == 1, op, ": weight_amax is for one scale per tensor, but max_scale has ",
                    ms.numel(), " elements");
    check_fp32(w, *amax, 1, op, "weight_amax");
  }
  return Fp8Args{float_code(w, op, "weight"), rows, cols, ms.numel() == 1, static_cast<int>(scale_dtype),
                 w.const_data_ptr(), static_cast<const float*>(v.const_data_ptr()),
                 static_cast<const float*>(ms.const_data_ptr()),
                 amax ? static_cast<const float*>(amax->const_data_ptr()) : nullptr};
}

// FP8 weights with one scale per kFp8Block x kFp8Block block: max_scale has one element per block.
inline Fp8BlockArgs fp8_block_args(const Tensor& w, const Tensor& v, const Tensor& ms, int64_t scale_dtype,
                                   const char* op) {
  check_weight(w, op);
  check_scale_dtype(scale_dtype, op);
  const int64_t rows = w.size(0), cols = w.size(1);
  STD_TORCH_CHECK(rows * cols > 0, op, ": weight must be non-empty");
  check_fp32(w, v, rows * cols, op, "v");
  check_fp32(w, ms, fp8_blocks(rows) * fp8_blocks(cols), op, "max_scale");
  return Fp8BlockArgs{float_code(w, op, "weight"), rows, cols, fp8_blocks(rows), fp8_blocks(cols),
                      static_cast<int>(scale_dtype), w.const_data_ptr(),
                      static_cast<const float*>(v.const_data_ptr()), static_cast<const float*>(ms.const_data_ptr())};
}

inline Fp8ActArgs fp8_act_args(const Tensor& x, const Tensor& act_max, const Tensor& ms, int64_t scale_dtype,
                               const char* op) {
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) > 0, op, ": x must have a non-empty last dimension");
  STD_TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_scale_dtype(scale_dtype, op);
  check_fp32(x, act_max, 1, op, "act_max");
  check_fp32(x, ms, 1, op, "max_scale");
  return Fp8ActArgs{float_code(x, op, "x"), x.numel(), static_cast<int>(scale_dtype), x.const_data_ptr(),
                    static_cast<const float*>(act_max.const_data_ptr()),
                    static_cast<const float*>(ms.const_data_ptr())};
}

inline IntArgs int_args(const Tensor& w, const Tensor& v, const Tensor& mn, const Tensor& mx,
                        int64_t bits, int64_t group_size, bool sym, int64_t scale_dtype,
                        const char* op) {
  check_weight(w, op);
  STD_TORCH_CHECK(bits >= 2 && bits <= 8, op, ": bits must be in 2..8, got ", bits);
  STD_TORCH_CHECK(group_size == kIntGroupPerRow || group_size > 0, op,
                  ": group_size must be -1 (per row) or positive, got ", group_size);
  STD_TORCH_CHECK(scale_dtype == kHalf || scale_dtype == kFloat || scale_dtype == kBFloat16, op,
                  ": scale_dtype must be float16, bfloat16 or float32");
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t group = int_group(cols, group_size);
  const int64_t groups = ceil_div(cols, group), n_scales = rows * groups;
  check_fp32(w, v, rows * cols, op, "v");
  check_fp32(w, mn, n_scales, op, "min_scale");
  check_fp32(w, mx, n_scales, op, "max_scale");
  return IntArgs{float_code(w, op, "weight"), rows, cols, group, groups, static_cast<int>(bits), sym,
                 static_cast<int>(scale_dtype), w.const_data_ptr(),
                 static_cast<const float*>(v.const_data_ptr()),
                 static_cast<const float*>(mn.const_data_ptr()),
                 static_cast<const float*>(mx.const_data_ptr())};
}

inline void check_mx_bits(int64_t bits, const char* op) {
  STD_TORCH_CHECK(mx_bits_supported(bits), op, ": bits must be 4 (MXFP4) or 8 (MXFP8), got ", bits);
}

inline MxArgs mx_args(const Tensor& w, const Tensor& v, const Tensor& ms, int64_t bits, const char* op) {
  check_weight(w, op);
  check_mx_bits(bits, op);
  const int64_t rows = w.size(0), cols = w.size(1);
  check_fp32(w, v, rows * cols, op, "v");
  check_fp32(w, ms, rows * ceil_div(cols, kMxGroup), op, "max_scale");
  return MxArgs{float_code(w, op, "weight"), rows, cols, static_cast<int>(bits), w.const_data_ptr(),
                static_cast<const float*>(v.const_data_ptr()), static_cast<const float*>(ms.const_data_ptr())};
}

// x: contiguous with a non-empty last dimension, viewed as [rows, cols] (zero rows allowed).
inline MxActArgs mx_act_args(const Tensor& x, int64_t bits, const char* op) {
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) > 0, op, ": x must have a non-empty last dimension");
  STD_TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_mx_bits(bits, op);
  const int64_t cols = x.size(x.dim() - 1);
  return MxActArgs{float_code(x, op, "x"), x.numel() / cols, cols, static_cast<int>(bits), x.const_data_ptr()};
}

inline LossArgs loss_args(const Tensor& pred, const Tensor& ref, const std::optional<Tensor>& mask,
                          const char* op) {
  STD_TORCH_CHECK(pred.numel() > 0 && pred.dim() >= 1, op, ": pred must be a non-empty tensor");
  STD_TORCH_CHECK(pred.is_contiguous(), op, ": pred must be contiguous");
  float_code(pred, op, "pred");
  check_like(pred, ref, op, "ref");
  const int64_t hidden = pred.size(pred.dim() - 1);
  const float* m = nullptr;
  if (mask.has_value()) {
    check_fp32(pred, *mask, pred.numel() / hidden, op, "mask (one float32 per token)");
    m = static_cast<const float*>(mask->const_data_ptr());
  }
  return LossArgs{static_cast<int>(pred.scalar_type()), pred.numel(), hidden, pred.const_data_ptr(),
                  ref.const_data_ptr(), m};
}

inline SignStepArgs sign_step_args(Tensor& param, std::optional<Tensor>& best, const Tensor& grad,
                                   const Tensor& improved, const Tensor& lr, const char* op) {
  STD_TORCH_CHECK(param.scalar_type() == ScalarType::Float && param.is_contiguous(), op,
                  ": param must be a contiguous float32 tensor");
  if (best.has_value()) check_fp32(param, *best, param.numel(), op, "best");
  check_fp32(param, grad, param.numel(), op, "grad");
  check_fp32(param, lr, 1, op, "lr");
  check_same_device(param, improved, op, "improved");
  STD_TORCH_CHECK(improved.scalar_type() == ScalarType::Bool && improved.numel() == 1, op,
                  ": improved must be one bool");
  return SignStepArgs{param.numel(), static_cast<float*>(param.mutable_data_ptr()),
                      best.has_value() ? static_cast<float*>(best->mutable_data_ptr()) : nullptr,
                      static_cast<const float*>(grad.const_data_ptr()),
                      static_cast<const bool*>(improved.const_data_ptr()),
                      static_cast<const float*>(lr.const_data_ptr())};
}

inline CopyIfArgs copy_if_args(Tensor& dst, const Tensor& src, const Tensor& flag, const char* op) {
  check_like(dst, src, op, "src");
  STD_TORCH_CHECK(dst.is_contiguous(), op, ": dst must be contiguous");
  check_same_device(dst, flag, op, "flag");
  STD_TORCH_CHECK(flag.scalar_type() == ScalarType::Bool && flag.numel() == 1, op, ": flag must be one bool");
  return CopyIfArgs{dst.numel() * static_cast<int64_t>(dst.element_size()), dst.mutable_data_ptr(),
                    src.const_data_ptr(), static_cast<const bool*>(flag.const_data_ptr())};
}

// The tensors a backward steps in place (launchers.h's StepTargets), checked: each best like
// its tunable, improved one bool, lr one float32, all on the tunables' device. min_scale and
// its best are null for NVFP4.
inline StepTargets step_targets(Tensor& v, Tensor* mn, Tensor* best_mn, Tensor& mx, Tensor& best_mx,
                                const Tensor& improved, const Tensor& lr, const char* op) {
  if (mn) check_fp32(*mn, *best_mn, mn->numel(), op, "best_min_scale");
  check_fp32(mx, best_mx, mx.numel(), op, "best_max_scale");
  check_fp32(v, lr, 1, op, "lr");
  check_same_device(v, improved, op, "improved");
  STD_TORCH_CHECK(improved.scalar_type() == ScalarType::Bool && improved.numel() == 1, op,
                  ": improved must be one bool");
  auto ptr = [](Tensor* t) { return t ? static_cast<float*>(t->mutable_data_ptr()) : nullptr; };
  return StepTargets{ptr(&v), ptr(mn), ptr(best_mn), ptr(&mx), ptr(&best_mx),
                     static_cast<const bool*>(improved.const_data_ptr()),
                     static_cast<const float*>(lr.const_data_ptr())};
}

inline Tensor scales_like(const Tensor& w, int64_t rows, int64_t groups, ScalarType dtype) {
  return torch::stable::new_empty(w, std::vector<int64_t>{rows, groups}, dtype);
}

}  // namespace autoround_fast
