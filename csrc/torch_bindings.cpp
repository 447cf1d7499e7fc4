// The autoround_fast ops: each op's schema, and its CPU and CUDA implementations (ops.h).
// python/autoround_fast/ops.py registers the fake kernels and the autograd, and the CPU
// implementation of silu_mul_nvfp4_activation (PyTorch ops around the activation ops).
#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY(autoround_fast, m) {
  m.def("fake_quant_nvfp4(Tensor weight, Tensor v, Tensor max_scale, Tensor global_scale) -> (Tensor, Tensor)");
  m.def("fake_quant_nvfp4_backward(Tensor grad, Tensor weight, Tensor v, Tensor max_scale, Tensor global_scale) -> (Tensor, Tensor)");
  m.def("fake_quant_nvfp4_activation(Tensor x, Tensor global_scale) -> Tensor");
  m.def("fake_quant_nvfp4_activation_backward(Tensor grad, Tensor x, Tensor global_scale) -> Tensor");
  m.def("silu_mul_nvfp4_activation(Tensor gate, Tensor up, Tensor global_scale) -> Tensor");
  m.def("silu_mul_nvfp4_activation_backward(Tensor grad, Tensor gate, Tensor up, Tensor global_scale) -> (Tensor, Tensor)");
  m.def("fake_quant_fp8(Tensor weight, Tensor v, Tensor max_scale, int scale_dtype, Tensor? weight_amax=None) -> (Tensor, Tensor)");
  m.def("fake_quant_fp8_backward(Tensor grad, Tensor weight, Tensor v, Tensor max_scale, int scale_dtype, Tensor? weight_amax=None) -> (Tensor, Tensor)");
  m.def("fake_quant_fp8_block(Tensor weight, Tensor v, Tensor max_scale, int scale_dtype) -> (Tensor, Tensor)");
  m.def("fake_quant_fp8_block_backward(Tensor grad, Tensor weight, Tensor v, Tensor max_scale, int scale_dtype) -> (Tensor, Tensor)");
  m.def("fake_quant_fp8_activation(Tensor x, Tensor act_max, Tensor max_scale, int scale_dtype) -> Tensor");
  m.def("fake_quant_fp8_activation_backward(Tensor grad, Tensor x, Tensor act_max, Tensor max_scale, int scale_dtype) -> (Tensor, Tensor)");
  m.def("fake_quant_int(Tensor weight, Tensor v, Tensor min_scale, Tensor max_scale, int bits, int group_size, bool sym, int scale_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("fake_quant_int_backward(Tensor grad, Tensor weight, Tensor v, Tensor min_scale, Tensor max_scale, int bits, int group_size, bool sym, int scale_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("fake_quant_mx(Tensor weight, Tensor v, Tensor max_scale, int bits) -> (Tensor, Tensor)");
  m.def("fake_quant_mx_backward(Tensor grad, Tensor weight, Tensor v, Tensor max_scale, int bits) -> (Tensor, Tensor)");
  m.def("fake_quant_mx_activation(Tensor x, int bits) -> Tensor");
  m.def("fake_quant_mx_activation_backward(Tensor grad, Tensor x, int bits) -> Tensor");
  m.def("masked_mse_loss(Tensor pred, Tensor ref, Tensor? mask) -> Tensor");
  m.def("masked_mse_loss_backward(Tensor grad, Tensor pred, Tensor ref, Tensor? mask) -> Tensor");
  m.def("copy_if_(Tensor(a!) dst, Tensor src, Tensor flag) -> ()");
  m.def("sign_step_(Tensor(a!) param, Tensor(b!)? best, Tensor grad, Tensor improved, Tensor lr) -> ()");
  m.def("fake_quant_nvfp4_backward_step_(Tensor grad, Tensor weight, Tensor(a!) v, Tensor(b!) max_scale, Tensor global_scale, Tensor(c!) best_max_scale, Tensor improved, Tensor lr) -> ()");
  m.def("fake_quant_int_backward_step_(Tensor grad, Tensor weight, Tensor(a!) v, Tensor(b!) min_scale, Tensor(c!) max_scale, int bits, int group_size, bool sym, int scale_dtype, Tensor(d!) best_min_scale, Tensor(e!) best_max_scale, Tensor improved, Tensor lr) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(autoround_fast, CPU, m) {
  using namespace autoround_fast;
  m.impl("fake_quant_nvfp4", TORCH_BOX(&fake_quant_nvfp4_cpu));
  m.impl("fake_quant_nvfp4_backward", TORCH_BOX(&fake_quant_nvfp4_backward_cpu));
  m.impl("fake_quant_nvfp4_activation", TORCH_BOX(&fake_quant_nvfp4_activation_cpu));
  m.impl("fake_quant_nvfp4_activation_backward", TORCH_BOX(&fake_quant_nvfp4_activation_backward_cpu));
  m.impl("fake_quant_fp8", TORCH_BOX(&fake_quant_fp8_cpu));
  m.impl("fake_quant_fp8_backward", TORCH_BOX(&fake_quant_fp8_backward_cpu));
  m.impl("fake_quant_fp8_block", TORCH_BOX(&fake_quant_fp8_block_cpu));
  m.impl("fake_quant_fp8_block_backward", TORCH_BOX(&fake_quant_fp8_block_backward_cpu));
  m.impl("fake_quant_fp8_activation", TORCH_BOX(&fake_quant_fp8_activation_cpu));
  m.impl("fake_quant_fp8_activation_backward", TORCH_BOX(&fake_quant_fp8_activation_backward_cpu));
  m.impl("fake_quant_int", TORCH_BOX(&fake_quant_int_cpu));
  m.impl("fake_quant_int_backward", TORCH_BOX(&fake_quant_int_backward_cpu));
  m.impl("fake_quant_mx", TORCH_BOX(&fake_quant_mx_cpu));
  m.impl("fake_quant_mx_backward", TORCH_BOX(&fake_quant_mx_backward_cpu));
  m.impl("fake_quant_mx_activation", TORCH_BOX(&fake_quant_mx_activation_cpu));
  m.impl("fake_quant_mx_activation_backward", TORCH_BOX(&fake_quant_mx_activation_backward_cpu));
  m.impl("masked_mse_loss", TORCH_BOX(&masked_mse_loss_cpu));
  m.impl("masked_mse_loss_backward", TORCH_BOX(&masked_mse_loss_backward_cpu));
  m.impl("sign_step_", TORCH_BOX(&sign_step_cpu));
  m.impl("copy_if_", TORCH_BOX(&copy_if_cpu));
  m.impl("fake_quant_nvfp4_backward_step_", TORCH_BOX(&fake_quant_nvfp4_backward_step_cpu));
  m.impl("fake_quant_int_backward_step_", TORCH_BOX(&fake_quant_int_backward_step_cpu));
}

// CMake defines AUTOROUND_FAST_WITH_CUDA where it builds the CUDA kernels and ops_cuda.cpp.
#ifdef AUTOROUND_FAST_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(autoround_fast, CUDA, m) {
  using namespace autoround_fast;
  m.impl("fake_quant_nvfp4", TORCH_BOX(&fake_quant_nvfp4_cuda));
  m.impl("fake_quant_nvfp4_backward", TORCH_BOX(&fake_quant_nvfp4_backward_cuda));
  m.impl("fake_quant_nvfp4_activation", TORCH_BOX(&fake_quant_nvfp4_activation_cuda));
  m.impl("fake_quant_nvfp4_activation_backward", TORCH_BOX(&fake_quant_nvfp4_activation_backward_cuda));
  m.impl("silu_mul_nvfp4_activation", TORCH_BOX(&silu_mul_nvfp4_activation_cuda));
  m.impl("silu_mul_nvfp4_activation_backward", TORCH_BOX(&silu_mul_nvfp4_activation_backward_cuda));
  m.impl("fake_quant_fp8", TORCH_BOX(&fake_quant_fp8_cuda));
  m.impl("fake_quant_fp8_backward", TORCH_BOX(&fake_quant_fp8_backward_cuda));
  m.impl("fake_quant_fp8_block", TORCH_BOX(&fake_quant_fp8_block_cuda));
  m.impl("fake_quant_fp8_block_backward", TORCH_BOX(&fake_quant_fp8_block_backward_cuda));
  m.impl("fake_quant_fp8_activation", TORCH_BOX(&fake_quant_fp8_activation_cuda));
  m.impl("fake_quant_fp8_activation_backward", TORCH_BOX(&fake_quant_fp8_activation_backward_cuda));
  m.impl("fake_quant_int", TORCH_BOX(&fake_quant_int_cuda));
  m.impl("fake_quant_int_backward", TORCH_BOX(&fake_quant_int_backward_cuda));
  m.impl("fake_quant_mx", TORCH_BOX(&fake_quant_mx_cuda));
  m.impl("fake_quant_mx_backward", TORCH_BOX(&fake_quant_mx_backward_cuda));
  m.impl("fake_quant_mx_activation", TORCH_BOX(&fake_quant_mx_activation_cuda));
  m.impl("fake_quant_mx_activation_backward", TORCH_BOX(&fake_quant_mx_activation_backward_cuda));
  m.impl("masked_mse_loss", TORCH_BOX(&masked_mse_loss_cuda));
  m.impl("masked_mse_loss_backward", TORCH_BOX(&masked_mse_loss_backward_cuda));
  m.impl("sign_step_", TORCH_BOX(&sign_step_cuda));
  m.impl("copy_if_", TORCH_BOX(&copy_if_cuda));
  m.impl("fake_quant_nvfp4_backward_step_", TORCH_BOX(&fake_quant_nvfp4_backward_step_cuda));
  m.impl("fake_quant_int_backward_step_", TORCH_BOX(&fake_quant_int_backward_step_cuda));
}
#endif  // AUTOROUND_FAST_WITH_CUDA
