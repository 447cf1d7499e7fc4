// The ops' CPU implementations (ops.h; torch_bindings.cpp registers them): validate, allocate,
// run the CPU kernels. Fake kernels and autograd live in python/autoround_fast/ops.py.
#include "cpu_kernels.h"
#include "ops.h"
#include "ops_common.h"

namespace autoround_fast {
namespace {

void check_cpu(const Tensor& t, const char* op) {
  STD_TORCH_CHECK(t.is_cpu(), op, ": expected CPU tensors");
}

void check_finite_count(int64_t bad, const char* op, const char* name) {
  STD_TORCH_CHECK(bad == 0, op, ": ", name, " has ", bad,
                  " non-finite values (NaN or Inf); refusing to quantize it");
}

// A given per-tensor maximum (fp8_args checked its shape): finite, and not below 0.
void check_weight_amax(const Fp8Args& a, const char* op) {
  if (!a.amax) return;
  check_finite_count(is_finite(*a.amax) ? 0 : 1, op, "weight_amax");
  STD_TORCH_CHECK(*a.amax >= 0.f, op, ": weight_amax must be >= 0 (a maximum of |W|), got ", *a.amax);
}

// The CPU's backward with the step: the backward's gradients, then the step on each tunable
// (the CUDA kernels do both in one pass; the bits are the same).
void step_with(const StepTargets& t, int64_t n_v, int64_t n_scales, const float* g_v, const float* g_mn,
               const float* g_mx) {
  cpu::sign_step(SignStepArgs{n_v, t.v, nullptr, g_v, t.improved, t.lr});
  if (t.min_scale) cpu::sign_step(SignStepArgs{n_scales, t.min_scale, t.best_min_scale, g_mn, t.improved, t.lr});
  cpu::sign_step(SignStepArgs{n_scales, t.max_scale, t.best_max_scale, g_mx, t.improved, t.lr});
}

}  // namespace

std::tuple<Tensor, Tensor> fake_quant_nvfp4_cpu(Tensor w, Tensor v, Tensor ms, Tensor gs) {
  const char* op = "fake_quant_nvfp4";
  check_cpu(w, op);
  Nvfp4Args a = nvfp4_args(w, v, ms, gs, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.rows, ceil_div(a.cols, kNvfp4Group), ScalarType::Float);
  check_finite_count(cpu::fake_quant_nvfp4(a, out.mutable_data_ptr(),
                                           static_cast<float*>(scale.mutable_data_ptr())),
                     op, "weight");
  return {out, scale};
}

std::tuple<Tensor, Tensor> fake_quant_nvfp4_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms,
                                                         Tensor gs) {
  const char* op = "fake_quant_nvfp4_backward";
  check_cpu(w, op);
  Nvfp4Args a = nvfp4_args(w, v, ms, gs, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  cpu::fake_quant_nvfp4_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                                 static_cast<float*>(gms.mutable_data_ptr()));
  return {gv, gms};
}

Tensor fake_quant_nvfp4_activation_cpu(Tensor x, Tensor gs) {
  const char* op = "fake_quant_nvfp4_activation";
  check_cpu(x, op);
  Nvfp4ActArgs a = nvfp4_act_args(x, gs, op);
  Tensor out = torch::stable::empty_like(x);
  check_finite_count(cpu::fake_quant_nvfp4_activation(a, out.mutable_data_ptr()), op, "x");
  return out;
}

Tensor fake_quant_nvfp4_activation_backward_cpu(Tensor grad, Tensor x, Tensor gs) {
  const char* op = "fake_quant_nvfp4_activation_backward";
  check_cpu(x, op);
  Nvfp4ActArgs a = nvfp4_act_args(x, gs, op);
  check_like(x, grad, op, "grad");
  Tensor gx = torch::stable::empty_like(x);
  cpu::fake_quant_nvfp4_activation_backward(a, grad.const_data_ptr(), gx.mutable_data_ptr());
  return gx;
}

std::tuple<Tensor, Tensor> fake_quant_fp8_cpu(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                std::optional<Tensor> amax) {
  const char* op = "fake_quant_fp8";
  check_cpu(w, op);
  Fp8Args a = fp8_args(w, v, ms, scale_dtype, amax, op);
  check_weight_amax(a, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.per_tensor ? 1 : a.rows, 1, ScalarType::Float);
  check_finite_count(cpu::fake_quant_fp8(a, out.mutable_data_ptr(), static_cast<float*>(scale.mutable_data_ptr())),
                     op, "weight");
  return {out, scale};
}

std::tuple<Tensor, Tensor> fake_quant_fp8_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                       std::optional<Tensor> amax) {
  const char* op = "fake_quant_fp8_backward";
  check_cpu(w, op);
  Fp8Args a = fp8_args(w, v, ms, scale_dtype, amax, op);
  check_weight_amax(a, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  cpu::fake_quant_fp8_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                               static_cast<float*>(gms.mutable_data_ptr()));
  return {gv, gms};
}

std::tuple<Tensor, Tensor> fake_quant_fp8_block_cpu(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_block";
  check_cpu(w, op);
  Fp8BlockArgs a = fp8_block_args(w, v, ms, scale_dtype, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.grid_rows, a.grid_cols, ScalarType::Float);
  check_finite_count(
      cpu::fake_quant_fp8_block(a, out.mutable_data_ptr(), static_cast<float*>(scale.mutable_data_ptr())), op,
      "weight");
  return {out, scale};
}

std::tuple<Tensor, Tensor> fake_quant_fp8_block_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms,
                                                             int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_block_backward";
  check_cpu(w, op);
  Fp8BlockArgs a = fp8_block_args(w, v, ms, scale_dtype, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  cpu::fake_quant_fp8_block_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                                     static_cast<float*>(gms.mutable_data_ptr()));
  return {gv, gms};
}

Tensor fake_quant_fp8_activation_cpu(Tensor x, Tensor act_max, Tensor ms, int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_activation";
  check_cpu(x, op);
  Fp8ActArgs a = fp8_act_args(x, act_max, ms, scale_dtype, op);
  check_finite_count(is_finite(*a.act_max) ? 0 : 1, op, "act_max");
  Tensor out = torch::stable::empty_like(x);
  check_finite_count(cpu::fake_quant_fp8_activation(a, out.mutable_data_ptr()), op, "x");
  return out;
}

std::tuple<Tensor, Tensor> fake_quant_fp8_activation_backward_cpu(Tensor grad, Tensor x, Tensor act_max, Tensor ms,
                                                                  int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_activation_backward";
  check_cpu(x, op);
  Fp8ActArgs a = fp8_act_args(x, act_max, ms, scale_dtype, op);
  check_like(x, grad, op, "grad");
  Tensor gx = torch::stable::empty_like(x);
  Tensor gms = torch::stable::empty_like(ms);
  cpu::fake_quant_fp8_activation_backward(a, grad.const_data_ptr(), gx.mutable_data_ptr(),
                                          static_cast<float*>(gms.mutable_data_ptr()));
  return {gx, gms};
}

std::tuple<Tensor, Tensor, Tensor> fake_quant_int_cpu(Tensor w, Tensor v, Tensor mn, Tensor mx,
                                                      int64_t bits, int64_t group_size, bool sym,
                                                      int64_t scale_dtype) {
  const char* op = "fake_quant_int";
  check_cpu(w, op);
  IntArgs a = int_args(w, v, mn, mx, bits, group_size, sym, scale_dtype, op);
  const int64_t groups = ceil_div(a.cols, a.group);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.rows, groups, static_cast<ScalarType>(scale_dtype));
  Tensor zp = scales_like(w, a.rows, groups, ScalarType::Float);
  check_finite_count(cpu::fake_quant_int(a, out.mutable_data_ptr(), scale.mutable_data_ptr(),
                                         static_cast<float*>(zp.mutable_data_ptr())),
                     op, "weight");
  return {out, scale, zp};
}

std::tuple<Tensor, Tensor, Tensor> fake_quant_int_backward_cpu(Tensor grad, Tensor w, Tensor v,
                                                               Tensor mn, Tensor mx, int64_t bits,
                                                               int64_t group_size, bool sym,
                                                               int64_t scale_dtype) {
  const char* op = "fake_quant_int_backward";
  check_cpu(w, op);
  IntArgs a = int_args(w, v, mn, mx, bits, group_size, sym, scale_dtype, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gmn = torch::stable::empty_like(mn);
  Tensor gmx = torch::stable::empty_like(mx);
  cpu::fake_quant_int_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                               static_cast<float*>(gmn.mutable_data_ptr()),
                               static_cast<float*>(gmx.mutable_data_ptr()));
  return {gv, gmn, gmx};
}

std::tuple<Tensor, Tensor> fake_quant_mx_cpu(Tensor w, Tensor v, Tensor ms, int64_t bits) {
  const char* op = "fake_quant_mx";
  check_cpu(w, op);
  MxArgs a = mx_args(w, v, ms, bits, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor exps = scales_like(w, a.rows, ceil_div(a.cols, kMxGroup), ScalarType::Float);
  check_finite_count(cpu::fake_quant_mx(a, out.mutable_data_ptr(), static_cast<float*>(exps.mutable_data_ptr())),
                     op, "weight");
  return {out, exps};
}

std::tuple<Tensor, Tensor> fake_quant_mx_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t bits) {
  const char* op = "fake_quant_mx_backward";
  check_cpu(w, op);
  MxArgs a = mx_args(w, v, ms, bits, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  cpu::fake_quant_mx_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                              static_cast<float*>(gms.mutable_data_ptr()));
  return {gv, gms};
}

Tensor fake_quant_mx_activation_cpu(Tensor x, int64_t bits) {
  const char* op = "fake_quant_mx_activation";
  check_cpu(x, op);
  MxActArgs a = mx_act_args(x, bits, op);
  Tensor out = torch::stable::empty_like(x);
  check_finite_count(cpu::fake_quant_mx_activation(a, out.mutable_data_ptr()), op, "x");
  return out;
}

Tensor fake_quant_mx_activation_backward_cpu(Tensor grad, Tensor x, int64_t bits) {
  const char* op = "fake_quant_mx_activation_backward";
  check_cpu(x, op);
  MxActArgs a = mx_act_args(x, bits, op);
  check_like(x, grad, op, "grad");
  Tensor gx = torch::stable::empty_like(x);
  cpu::fake_quant_mx_activation_backward(a, grad.const_data_ptr(), gx.mutable_data_ptr());
  return gx;
}

Tensor masked_mse_loss_cpu(Tensor pred, Tensor ref, std::optional<Tensor> mask) {
  const char* op = "masked_mse_loss";
  check_cpu(pred, op);
  LossArgs a = loss_args(pred, ref, mask, op);
  Tensor loss = torch::stable::new_empty(pred, std::vector<int64_t>{}, ScalarType::Float);
  *static_cast<float*>(loss.mutable_data_ptr()) = cpu::masked_mse_loss(a);
  return loss;
}

Tensor masked_mse_loss_backward_cpu(Tensor grad, Tensor pred, Tensor ref, std::optional<Tensor> mask) {
  const char* op = "masked_mse_loss_backward";
  check_cpu(pred, op);
  LossArgs a = loss_args(pred, ref, mask, op);
  check_fp32(pred, grad, 1, op, "grad");
  Tensor gp = torch::stable::empty_like(pred);
  cpu::masked_mse_loss_backward(a, *static_cast<const float*>(grad.const_data_ptr()),
                                gp.mutable_data_ptr());
  return gp;
}

void fake_quant_nvfp4_backward_step_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, Tensor gs, Tensor best_ms,
                                        Tensor improved, Tensor lr) {
  const char* op = "fake_quant_nvfp4_backward_step_";
  check_cpu(w, op);
  nvfp4_args(w, v, ms, gs, op);  // checked under this op's name; the backward checks again
  check_like(w, grad, op, "grad");
  StepTargets t = step_targets(v, nullptr, nullptr, ms, best_ms, improved, lr, op);
  auto [gv, gms] = fake_quant_nvfp4_backward_cpu(grad, w, v, ms, gs);
  step_with(t, v.numel(), ms.numel(), static_cast<const float*>(gv.const_data_ptr()), nullptr,
            static_cast<const float*>(gms.const_data_ptr()));
}

void fake_quant_int_backward_step_cpu(Tensor grad, Tensor w, Tensor v, Tensor mn, Tensor mx, int64_t bits,
                                      int64_t group_size, bool sym, int64_t scale_dtype, Tensor best_mn,
                                      Tensor best_mx, Tensor improved, Tensor lr) {
  const char* op = "fake_quant_int_backward_step_";
  check_cpu(w, op);
  int_args(w, v, mn, mx, bits, group_size, sym, scale_dtype, op);  // as for NVFP4
  check_like(w, grad, op, "grad");
  StepTargets t = step_targets(v, &mn, &best_mn, mx, best_mx, improved, lr, op);
  auto [gv, gmn, gmx] = fake_quant_int_backward_cpu(grad, w, v, mn, mx, bits, group_size, sym, scale_dtype);
  step_with(t, v.numel(), mn.numel(), static_cast<const float*>(gv.const_data_ptr()),
            static_cast<const float*>(gmn.const_data_ptr()), static_cast<const float*>(gmx.const_data_ptr()));
}

void sign_step_cpu(Tensor param, std::optional<Tensor> best, Tensor grad, Tensor improved, Tensor lr) {
  const char* op = "sign_step_";
  check_cpu(param, op);
  cpu::sign_step(sign_step_args(param, best, grad, improved, lr, op));
}

void copy_if_cpu(Tensor dst, Tensor src, Tensor flag) {
  const char* op = "copy_if_";
  check_cpu(dst, op);
  cpu::copy_if(copy_if_args(dst, src, flag, op));
}

}  // namespace autoround_fast
