// The ops' CUDA implementations (ops.h; torch_bindings.cpp registers them): validate,
// allocate, take the device guard and the current stream, then call the torch-free launchers
// in the .cu files.
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "ops.h"
#include "ops_common.h"

namespace autoround_fast {
namespace {

// Every tensor input on one CUDA device: a call with tensors on two GPUs, or on a GPU and the
// CPU, is an error naming the devices, not a kernel reading another device's memory. Checked
// before the guard is taken; returns that device's index.
int32_t one_cuda_device(std::initializer_list<const Tensor*> ts, const char* op) {
  const Tensor& first = **ts.begin();
  STD_TORCH_CHECK(first.is_cuda(), op, ": expected CUDA tensors");
  for (const Tensor* t : ts) {
    STD_TORCH_CHECK(t->is_cuda() && t->get_device_index() == first.get_device_index(), op,
                    ": every tensor must be on the first input's device, cuda:", first.get_device_index(),
                    "; one is on ",
                    t->is_cuda() ? "cuda:" + std::to_string(t->get_device_index()) : std::string("the CPU"));
  }
  return first.get_device_index();
}

struct CudaContext {
  torch::stable::accelerator::DeviceGuard guard;
  cudaStream_t stream = nullptr;
  CudaContext(std::initializer_list<const Tensor*> ts, const char* op) : CudaContext(one_cuda_device(ts, op), op) {}
  CudaContext(int32_t index, const char* op) : guard(index) {
    void* s = nullptr;
    STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(index, &s) == AOTI_TORCH_SUCCESS, op,
                    ": could not get the current CUDA stream");
    stream = static_cast<cudaStream_t>(s);
  }
};

void check_launch(const char* err, const char* op) {
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err ? err : "");
}

}  // namespace

std::tuple<Tensor, Tensor> fake_quant_nvfp4_cuda(Tensor w, Tensor v, Tensor ms, Tensor gs) {
  const char* op = "fake_quant_nvfp4";
  CudaContext ctx({&w, &v, &ms, &gs}, op);
  Nvfp4Args a = nvfp4_args(w, v, ms, gs, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.rows, ceil_div(a.cols, kNvfp4Group), ScalarType::Float);
  check_launch(launch_fake_quant_nvfp4(a, out.mutable_data_ptr(),
                                       static_cast<float*>(scale.mutable_data_ptr()), ctx.stream),
               op);
  return {out, scale};
}

std::tuple<Tensor, Tensor> fake_quant_nvfp4_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms,
                                                          Tensor gs) {
  const char* op = "fake_quant_nvfp4_backward";
  CudaContext ctx({&w, &grad, &v, &ms, &gs}, op);
  Nvfp4Args a = nvfp4_args(w, v, ms, gs, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  check_launch(launch_fake_quant_nvfp4_backward(a, grad.const_data_ptr(),
                                                static_cast<float*>(gv.mutable_data_ptr()),
                                                static_cast<float*>(gms.mutable_data_ptr()), ctx.stream),
               op);
  return {gv, gms};
}

Tensor fake_quant_nvfp4_activation_cuda(Tensor x, Tensor gs) {
  const char* op = "fake_quant_nvfp4_activation";
  CudaContext ctx({&x, &gs}, op);
  Nvfp4ActArgs a = nvfp4_act_args(x, gs, op);
  Tensor out = torch::stable::empty_like(x);
  check_launch(launch_fake_quant_nvfp4_activation(a, out.mutable_data_ptr(), ctx.stream), op);
  return out;
}

Tensor fake_quant_nvfp4_activation_backward_cuda(Tensor grad, Tensor x, Tensor gs) {
  const char* op = "fake_quant_nvfp4_activation_backward";
  CudaContext ctx({&x, &grad, &gs}, op);
  Nvfp4ActArgs a = nvfp4_act_args(x, gs, op);
  check_like(x, grad, op, "grad");
  Tensor gx = torch::stable::empty_like(x);
  check_launch(launch_fake_quant_nvfp4_activation_backward(a, grad.const_data_ptr(), gx.mutable_data_ptr(),
                                                           ctx.stream),
               op);
  return gx;
}

Tensor silu_mul_nvfp4_activation_cuda(Tensor gate, Tensor up, Tensor gs) {
  const char* op = "silu_mul_nvfp4_activation";
  CudaContext ctx({&gate, &up, &gs}, op);
  SiluMulActArgs a = silu_mul_act_args(gate, up, gs, op);
  Tensor out = torch::stable::empty_like(gate);
  check_launch(launch_silu_mul_nvfp4_activation(a, out.mutable_data_ptr(), ctx.stream), op);
  return out;
}

std::tuple<Tensor, Tensor> silu_mul_nvfp4_activation_backward_cuda(Tensor grad, Tensor gate, Tensor up, Tensor gs) {
  const char* op = "silu_mul_nvfp4_activation_backward";
  CudaContext ctx({&gate, &grad, &up, &gs}, op);
  SiluMulActArgs a = silu_mul_act_args(gate, up, gs, op);
  check_like(gate, grad, op, "grad");
  Tensor gg = torch::stable::empty_like(gate);
  Tensor gu = torch::stable::empty_like(up);
  check_launch(launch_silu_mul_nvfp4_activation_backward(a, grad.const_data_ptr(), gg.mutable_data_ptr(),
                                                         gu.mutable_data_ptr(), ctx.stream),
               op);
  return {gg, gu};
}

namespace {

// Scratch for the FP8 ops' reductions over a whole tensor (launchers.h).
Tensor fp8_scratch(const Tensor& like, int64_t numel) {
  return torch::stable::new_empty(like, std::vector<int64_t>{fp8_scratch_floats(numel)}, ScalarType::Float);
}

}  // namespace

std::tuple<Tensor, Tensor> fake_quant_fp8_cuda(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                std::optional<Tensor> amax) {
  const char* op = "fake_quant_fp8";
  Fp8Args a = fp8_args(w, v, ms, scale_dtype, amax, op);  // first: it names weight_amax on another device
  CudaContext ctx({&w, &v, &ms}, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.per_tensor ? 1 : a.rows, 1, ScalarType::Float);
  Tensor scratch = fp8_scratch(w, w.numel());
  check_launch(launch_fake_quant_fp8(a, out.mutable_data_ptr(), static_cast<float*>(scale.mutable_data_ptr()),
                                     static_cast<float*>(scratch.mutable_data_ptr()), ctx.stream),
               op);
  return {out, scale};
}

std::tuple<Tensor, Tensor> fake_quant_fp8_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                        std::optional<Tensor> amax) {
  const char* op = "fake_quant_fp8_backward";
  Fp8Args a = fp8_args(w, v, ms, scale_dtype, amax, op);  // first: it names weight_amax on another device
  CudaContext ctx({&w, &grad, &v, &ms}, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  Tensor scratch = fp8_scratch(w, w.numel());
  check_launch(launch_fake_quant_fp8_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                                              static_cast<float*>(gms.mutable_data_ptr()),
                                              static_cast<float*>(scratch.mutable_data_ptr()), ctx.stream),
               op);
  return {gv, gms};
}

std::tuple<Tensor, Tensor> fake_quant_fp8_block_cuda(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_block";
  CudaContext ctx({&w, &v, &ms}, op);
  Fp8BlockArgs a = fp8_block_args(w, v, ms, scale_dtype, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.grid_rows, a.grid_cols, ScalarType::Float);
  check_launch(launch_fake_quant_fp8_block(a, out.mutable_data_ptr(), static_cast<float*>(scale.mutable_data_ptr()),
                                           ctx.stream),
               op);
  return {out, scale};
}

std::tuple<Tensor, Tensor> fake_quant_fp8_block_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms,
                                                              int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_block_backward";
  CudaContext ctx({&w, &grad, &v, &ms}, op);
  Fp8BlockArgs a = fp8_block_args(w, v, ms, scale_dtype, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  check_launch(launch_fake_quant_fp8_block_backward(a, grad.const_data_ptr(),
                                                    static_cast<float*>(gv.mutable_data_ptr()),
                                                    static_cast<float*>(gms.mutable_data_ptr()), ctx.stream),
               op);
  return {gv, gms};
}

Tensor fake_quant_fp8_activation_cuda(Tensor x, Tensor act_max, Tensor ms, int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_activation";
  CudaContext ctx({&x, &act_max, &ms}, op);
  Fp8ActArgs a = fp8_act_args(x, act_max, ms, scale_dtype, op);
  Tensor out = torch::stable::empty_like(x);
  check_launch(launch_fake_quant_fp8_activation(a, out.mutable_data_ptr(), ctx.stream), op);
  return out;
}

std::tuple<Tensor, Tensor> fake_quant_fp8_activation_backward_cuda(Tensor grad, Tensor x, Tensor act_max, Tensor ms,
                                                                   int64_t scale_dtype) {
  const char* op = "fake_quant_fp8_activation_backward";
  CudaContext ctx({&x, &grad, &act_max, &ms}, op);
  Fp8ActArgs a = fp8_act_args(x, act_max, ms, scale_dtype, op);
  check_like(x, grad, op, "grad");
  Tensor gx = torch::stable::empty_like(x);
  Tensor gms = torch::stable::empty_like(ms);
  Tensor scratch = fp8_scratch(x, x.numel());
  check_launch(launch_fake_quant_fp8_activation_backward(a, grad.const_data_ptr(), gx.mutable_data_ptr(),
                                                         static_cast<float*>(gms.mutable_data_ptr()),
                                                         static_cast<float*>(scratch.mutable_data_ptr()),
                                                         ctx.stream),
               op);
  return {gx, gms};
}

std::tuple<Tensor, Tensor, Tensor> fake_quant_int_cuda(Tensor w, Tensor v, Tensor mn, Tensor mx,
                                                       int64_t bits, int64_t group_size, bool sym,
                                                       int64_t scale_dtype) {
  const char* op = "fake_quant_int";
  CudaContext ctx({&w, &v, &mn, &mx}, op);
  IntArgs a = int_args(w, v, mn, mx, bits, group_size, sym, scale_dtype, op);
  const int64_t groups = ceil_div(a.cols, a.group);
  Tensor out = torch::stable::empty_like(w);
  Tensor scale = scales_like(w, a.rows, groups, static_cast<ScalarType>(scale_dtype));
  Tensor zp = scales_like(w, a.rows, groups, ScalarType::Float);
  check_launch(launch_fake_quant_int(a, out.mutable_data_ptr(), scale.mutable_data_ptr(),
                                     static_cast<float*>(zp.mutable_data_ptr()), ctx.stream),
               op);
  return {out, scale, zp};
}

std::tuple<Tensor, Tensor, Tensor> fake_quant_int_backward_cuda(Tensor grad, Tensor w, Tensor v,
                                                                Tensor mn, Tensor mx, int64_t bits,
                                                                int64_t group_size, bool sym,
                                                                int64_t scale_dtype) {
  const char* op = "fake_quant_int_backward";
  CudaContext ctx({&w, &grad, &v, &mn, &mx}, op);
  IntArgs a = int_args(w, v, mn, mx, bits, group_size, sym, scale_dtype, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gmn = torch::stable::empty_like(mn);
  Tensor gmx = torch::stable::empty_like(mx);
  check_launch(launch_fake_quant_int_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                                              static_cast<float*>(gmn.mutable_data_ptr()),
                                              static_cast<float*>(gmx.mutable_data_ptr()), ctx.stream),
               op);
  return {gv, gmn, gmx};
}

std::tuple<Tensor, Tensor> fake_quant_mx_cuda(Tensor w, Tensor v, Tensor ms, int64_t bits) {
  const char* op = "fake_quant_mx";
  CudaContext ctx({&w, &v, &ms}, op);
  MxArgs a = mx_args(w, v, ms, bits, op);
  Tensor out = torch::stable::empty_like(w);
  Tensor exps = scales_like(w, a.rows, ceil_div(a.cols, kMxGroup), ScalarType::Float);
  check_launch(launch_fake_quant_mx(a, out.mutable_data_ptr(), static_cast<float*>(exps.mutable_data_ptr()),
                                    ctx.stream),
               op);
  return {out, exps};
}

std::tuple<Tensor, Tensor> fake_quant_mx_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t bits) {
  const char* op = "fake_quant_mx_backward";
  CudaContext ctx({&w, &grad, &v, &ms}, op);
  MxArgs a = mx_args(w, v, ms, bits, op);
  check_like(w, grad, op, "grad");
  Tensor gv = torch::stable::empty_like(v);
  Tensor gms = torch::stable::empty_like(ms);
  check_launch(launch_fake_quant_mx_backward(a, grad.const_data_ptr(), static_cast<float*>(gv.mutable_data_ptr()),
                                             static_cast<float*>(gms.mutable_data_ptr()), ctx.stream),
               op);
  return {gv, gms};
}

Tensor fake_quant_mx_activation_cuda(Tensor x, int64_t bits) {
  const char* op = "fake_quant_mx_activation";
  CudaContext ctx({&x}, op);
  MxActArgs a = mx_act_args(x, bits, op);
  Tensor out = torch::stable::empty_like(x);
  check_launch(launch_fake_quant_mx_activation(a, out.mutable_data_ptr(), ctx.stream), op);
  return out;
}

Tensor fake_quant_mx_activation_backward_cuda(Tensor grad, Tensor x, int64_t bits) {
  const char* op = "fake_quant_mx_activation_backward";
  CudaContext ctx({&x, &grad}, op);
  MxActArgs a = mx_act_args(x, bits, op);
  check_like(x, grad, op, "grad");
  Tensor gx = torch::stable::empty_like(x);
  check_launch(launch_fake_quant_mx_activation_backward(a, grad.const_data_ptr(), gx.mutable_data_ptr(), ctx.stream),
               op);
  return gx;
}

Tensor masked_mse_loss_cuda(Tensor pred, Tensor ref, std::optional<Tensor> mask) {
  const char* op = "masked_mse_loss";
  CudaContext ctx(mask ? std::initializer_list<const Tensor*>{&pred, &ref, &*mask}
                       : std::initializer_list<const Tensor*>{&pred, &ref}, op);
  LossArgs a = loss_args(pred, ref, mask, op);
  Tensor partials = torch::stable::new_empty(pred, std::vector<int64_t>{loss_partials_size()}, ScalarType::Float);
  Tensor loss = torch::stable::new_empty(pred, std::vector<int64_t>{}, ScalarType::Float);
  check_launch(launch_masked_mse_loss(a, static_cast<float*>(partials.mutable_data_ptr()),
                                      static_cast<float*>(loss.mutable_data_ptr()), ctx.stream),
               op);
  return loss;
}

Tensor masked_mse_loss_backward_cuda(Tensor grad, Tensor pred, Tensor ref, std::optional<Tensor> mask) {
  const char* op = "masked_mse_loss_backward";
  CudaContext ctx(mask ? std::initializer_list<const Tensor*>{&grad, &pred, &ref, &*mask}
                       : std::initializer_list<const Tensor*>{&grad, &pred, &ref}, op);
  LossArgs a = loss_args(pred, ref, mask, op);
  check_fp32(pred, grad, 1, op, "grad");
  Tensor gp = torch::stable::empty_like(pred);
  check_launch(launch_masked_mse_loss_backward(a, static_cast<const float*>(grad.const_data_ptr()),
                                               gp.mutable_data_ptr(), ctx.stream),
               op);
  return gp;
}

void fake_quant_nvfp4_backward_step_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, Tensor gs, Tensor best_ms,
                                         Tensor improved, Tensor lr) {
  const char* op = "fake_quant_nvfp4_backward_step_";
  CudaContext ctx({&w, &grad, &v, &ms, &gs, &best_ms, &improved, &lr}, op);
  Nvfp4Args a = nvfp4_args(w, v, ms, gs, op);
  check_like(w, grad, op, "grad");
  StepTargets t = step_targets(v, nullptr, nullptr, ms, best_ms, improved, lr, op);
  check_launch(launch_fake_quant_nvfp4_backward_step(a, grad.const_data_ptr(), t, ctx.stream), op);
}

void fake_quant_int_backward_step_cuda(Tensor grad, Tensor w, Tensor v, Tensor mn, Tensor mx, int64_t bits,
                                       int64_t group_size, bool sym, int64_t scale_dtype, Tensor best_mn,
                                       Tensor best_mx, Tensor improved, Tensor lr) {
  const char* op = "fake_quant_int_backward_step_";
  CudaContext ctx({&w, &grad, &v, &mn, &mx, &best_mn, &best_mx, &improved, &lr}, op);
  IntArgs a = int_args(w, v, mn, mx, bits, group_size, sym, scale_dtype, op);
  check_like(w, grad, op, "grad");
  StepTargets t = step_targets(v, &mn, &best_mn, mx, best_mx, improved, lr, op);
  check_launch(launch_fake_quant_int_backward_step(a, grad.const_data_ptr(), t, ctx.stream), op);
}

void copy_if_cuda(Tensor dst, Tensor src, Tensor flag) {
  const char* op = "copy_if_";
  CudaContext ctx({&dst, &src, &flag}, op);
  check_launch(launch_copy_if(copy_if_args(dst, src, flag, op), ctx.stream), op);
}

void sign_step_cuda(Tensor param, std::optional<Tensor> best, Tensor grad, Tensor improved, Tensor lr) {
  const char* op = "sign_step_";
  CudaContext ctx({&param, &grad, &improved, &lr}, op);  // sign_step_args checks best's device
  check_launch(launch_sign_step(sign_step_args(param, best, grad, improved, lr, op), ctx.stream), op);
}

}  // namespace autoround_fast
