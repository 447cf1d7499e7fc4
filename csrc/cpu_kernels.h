// CPU kernels: the same per-group math as the CUDA kernels, looped over groups.
#pragma once

#include "launchers.h"

namespace autoround_fast::cpu {

// Each returns the number of non-finite inputs it met (the op turns that into an error).
int64_t fake_quant_nvfp4(const Nvfp4Args& a, void* out, float* scale);
void fake_quant_nvfp4_backward(const Nvfp4Args& a, const void* grad, float* grad_v,
                               float* grad_max_scale);
int64_t fake_quant_nvfp4_activation(const Nvfp4ActArgs& a, void* out);
void fake_quant_nvfp4_activation_backward(const Nvfp4ActArgs& a, const void* grad, void* grad_x);
int64_t fake_quant_fp8(const Fp8Args& a, void* out, float* scale);
void fake_quant_fp8_backward(const Fp8Args& a, const void* grad, float* grad_v, float* grad_max_scale);
int64_t fake_quant_fp8_block(const Fp8BlockArgs& a, void* out, float* scale);
void fake_quant_fp8_block_backward(const Fp8BlockArgs& a, const void* grad, float* grad_v, float* grad_max_scale);
int64_t fake_quant_fp8_activation(const Fp8ActArgs& a, void* out);
void fake_quant_fp8_activation_backward(const Fp8ActArgs& a, const void* grad, void* grad_x, float* grad_max_scale);
int64_t fake_quant_int(const IntArgs& a, void* out, void* scale, float* zero_point);
void fake_quant_int_backward(const IntArgs& a, const void* grad, float* grad_v,
                             float* grad_min_scale, float* grad_max_scale);
int64_t fake_quant_mx(const MxArgs& a, void* out, float* exps);
void fake_quant_mx_backward(const MxArgs& a, const void* grad, float* grad_v, float* grad_max_scale);
int64_t fake_quant_mx_activation(const MxActArgs& a, void* out);
void fake_quant_mx_activation_backward(const MxActArgs& a, const void* grad, void* grad_x);
float masked_mse_loss(const LossArgs& a);
void masked_mse_loss_backward(const LossArgs& a, float grad_loss, void* grad_pred);
void sign_step(const SignStepArgs& a);
void copy_if(const CopyIfArgs& a);

}  // namespace autoround_fast::cpu
