// CUDA launchers: raw pointers and a stream in, no torch types, so that the .cu files compile
// with nothing but the CUDA toolkit. Each returns nullptr on success or the CUDA error text.
// Dtype codes are c10::ScalarType codes (formats.h).
#pragma once

#include <cstdint>

#include "formats.h"

// cudaStream_t without the CUDA headers, which the CPU build has not: the typedef of CUDA's
// driver_types.h, which C++ lets this header repeat.
typedef struct CUstream_st* cudaStream_t;

namespace autoround_fast {

struct Nvfp4Args {
  int dtype;
  int64_t rows, cols;
  const void* weight;
  const float* v;          // [rows, cols]
  const float* max_scale;  // [rows, ceil(cols / kNvfp4Group)]
  const float* global_scale;  // [1], or per_row: [rows] (an MoE projection's experts stacked)
  bool per_row;
};

const char* launch_fake_quant_nvfp4(const Nvfp4Args& a, void* out, float* scale, cudaStream_t stream);
const char* launch_fake_quant_nvfp4_backward(const Nvfp4Args& a, const void* grad, float* grad_v,
                                             float* grad_max_scale, cudaStream_t stream);

struct Nvfp4ActArgs {
  int dtype;
  int64_t rows, cols;  // the activation viewed as [rows, cols], cols = last dimension
  const void* x;
  const float* global_scale;  // one, or one per row (the rows of MoE experts, each its own)
  bool per_row;
};
const char* launch_fake_quant_nvfp4_activation(const Nvfp4ActArgs& a, void* out, cudaStream_t stream);
const char* launch_fake_quant_nvfp4_activation_backward(const Nvfp4ActArgs& a, const void* grad,
                                                        void* grad_x, cudaStream_t stream);

// fake_quant_nvfp4_activation(T(T(silu(gate)) * up)), forward and backward, in one pass
// (silu_act_cuda.cu): gate and up are [rows, cols] of one dtype.
struct SiluMulActArgs {
  int dtype;
  int64_t rows, cols;
  const void* gate;
  const void* up;
  const float* global_scale;
};
const char* launch_silu_mul_nvfp4_activation(const SiluMulActArgs& a, void* out, cudaStream_t stream);
const char* launch_silu_mul_nvfp4_activation_backward(const SiluMulActArgs& a, const void* grad,
                                                      void* grad_gate, void* grad_up, cudaStream_t stream);

// FP8 (e4m3) weights: one scale for the whole tensor (per_tensor: max_scale has one element)
// or one per row; the per-tensor ops reduce over the tensor with `scratch`, at least
// fp8_scratch_floats(rows * cols) floats of device memory.
struct Fp8Args {
  int dtype;
  int64_t rows, cols;
  bool per_tensor;
  int scale_dtype;         // ScaleDtype code
  const void* weight;
  const float* v;          // [rows, cols]
  const float* max_scale;  // [1] (per tensor) or [rows]
  const float* amax;       // per tensor: max|W| as given [1], or nullptr to compute it
};
int64_t fp8_scratch_floats(int64_t numel);
// scale: [1] or [rows] fp32
const char* launch_fake_quant_fp8(const Fp8Args& a, void* out, float* scale, float* scratch, cudaStream_t stream);
const char* launch_fake_quant_fp8_backward(const Fp8Args& a, const void* grad, float* grad_v, float* grad_max_scale,
                                           float* scratch, cudaStream_t stream);

// FP8 (e4m3) weights with one scale per kFp8Block x kFp8Block block (FP8_BLOCK), the last
// row and column of blocks partial: one pass over the weight, a CUDA block per FP8 block.
struct Fp8BlockArgs {
  int dtype;
  int64_t rows, cols;
  int64_t grid_rows, grid_cols;  // blocks along each dimension: fp8_blocks(rows), fp8_blocks(cols)
  int scale_dtype;         // ScaleDtype code
  const void* weight;
  const float* v;          // [rows, cols]
  const float* max_scale;  // [grid_rows, grid_cols]
};
// scale: fp32, max_scale's grid
const char* launch_fake_quant_fp8_block(const Fp8BlockArgs& a, void* out, float* scale, cudaStream_t stream);
const char* launch_fake_quant_fp8_block_backward(const Fp8BlockArgs& a, const void* grad, float* grad_v,
                                                 float* grad_max_scale, cudaStream_t stream);

// FP8 activations under one static scale from act_max * max_scale (one fp32 each).
struct Fp8ActArgs {
  int dtype;
  int64_t numel;
  int scale_dtype;
  const void* x;
  const float* act_max;
  const float* max_scale;
};
const char* launch_fake_quant_fp8_activation(const Fp8ActArgs& a, void* out, cudaStream_t stream);
const char* launch_fake_quant_fp8_activation_backward(const Fp8ActArgs& a, const void* grad, void* grad_x,
                                                      float* grad_max_scale, float* scratch, cudaStream_t stream);

struct IntArgs {
  int dtype;
  int64_t rows, cols;
  int64_t group;  // elements per group (cols for one group per row)
  int64_t groups;  // groups per row, ceil(cols / group)
  int bits;
  bool sym;
  int scale_dtype;
  const void* weight;
  const float* v;
  const float* min_scale;  // [rows, ceil(cols / group)]
  const float* max_scale;
};
const char* launch_fake_quant_int(const IntArgs& a, void* out, void* scale, float* zero_point,
                                  cudaStream_t stream);
const char* launch_fake_quant_int_backward(const IntArgs& a, const void* grad, float* grad_v,
                                           float* grad_min_scale, float* grad_max_scale,
                                           cudaStream_t stream);

// MX weights (bits 4: MXFP4, 8: MXFP8) and activations, groups of kMxGroup along the row.
struct MxArgs {
  int dtype;
  int64_t rows, cols;
  int bits;
  const void* weight;
  const float* v;          // [rows, cols]
  const float* max_scale;  // [rows, ceil(cols / kMxGroup)]
};
// exps: the shared exponents, fp32 [rows, ceil(cols / kMxGroup)].
const char* launch_fake_quant_mx(const MxArgs& a, void* out, float* exps, cudaStream_t stream);
const char* launch_fake_quant_mx_backward(const MxArgs& a, const void* grad, float* grad_v,
                                          float* grad_max_scale, cudaStream_t stream);

struct MxActArgs {
  int dtype;
  int64_t rows, cols;  // the activation viewed as [rows, cols], cols = last dimension
  int bits;
  const void* x;
};
const char* launch_fake_quant_mx_activation(const MxActArgs& a, void* out, cudaStream_t stream);
const char* launch_fake_quant_mx_activation_backward(const MxActArgs& a, const void* grad, void* grad_x,
                                                     cudaStream_t stream);

struct LossArgs {
  int dtype;
  int64_t numel;
  int64_t hidden;  // elements per mask entry
  const void* pred;
  const void* ref;
  const float* mask;  // one per token, or nullptr
};
// partials: at least loss_partials_size() floats of scratch. loss: one float.
int64_t loss_partials_size();
const char* launch_masked_mse_loss(const LossArgs& a, float* partials, float* loss, cudaStream_t stream);
const char* launch_masked_mse_loss_backward(const LossArgs& a, const float* grad_loss,
                                            void* grad_pred, cudaStream_t stream);

// SignRound's step on one tuned tensor, in place, fused with the best-parameter copy:
//   if improved and best: best = param;   then param = param + (-1 * sign(grad)) * lr
// (sign(NaN) = 0, as torch.sign), equal bit for bit to torch.where(improved, param, best,
// out=best) followed by param.addcmul_(grad.sign(), lr, value=-1). best may be null (V's: the
// engine keeps the best fake-quantized weight, not V). improved (bool) and lr (float) are
// one-element device tensors, read by the kernel: a CUDA graph replays it.
struct SignStepArgs {
  int64_t numel;
  float* param;
  float* best;
  const float* grad;
  const bool* improved;
  const float* lr;
};
const char* launch_sign_step(const SignStepArgs& a, cudaStream_t stream);

// The best fake-quantized weight kept: if *flag, dst = src (bytes bytes; otherwise nothing is
// read or written). flag is a one-element device tensor, read by the kernel: a CUDA graph
// replays it, and an iteration that did not improve costs a launch, not a pass over memory.
struct CopyIfArgs {
  int64_t bytes;
  void* dst;
  const void* src;
  const bool* flag;
};
const char* launch_copy_if(const CopyIfArgs& a, cudaStream_t stream);

// The sign step taken inside a weight backward: where the backward would write the gradients
// of V and the scales, it steps each in place as launch_sign_step does with that gradient
// (the scales' best copied first when improved; V has no best copy, see SignStepArgs). The
// same bits as the backward followed by the steps, without the gradients' round trip through
// memory and V's second read (12 bytes per weight element). v, min_scale and max_scale are the
// Args' own tensors, written here; min_scale and its best are unused (nullptr) for NVFP4.
struct StepTargets {
  float* v;
  float* min_scale;
  float* best_min_scale;
  float* max_scale;
  float* best_max_scale;
  const bool* improved;
  const float* lr;
};
const char* launch_fake_quant_nvfp4_backward_step(const Nvfp4Args& a, const void* grad,
                                                  const StepTargets& t, cudaStream_t stream);
const char* launch_fake_quant_int_backward_step(const IntArgs& a, const void* grad,
                                                const StepTargets& t, cudaStream_t stream);

}  // namespace autoround_fast
