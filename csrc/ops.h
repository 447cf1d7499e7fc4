// The ops' host functions, one per op and device: <op>_cpu in ops_cpu.cpp, <op>_cuda in
// ops_cuda.cpp (built with CUDA only). torch_bindings.cpp registers them under the schemas it
// defines; each validates its inputs, allocates its outputs and runs the kernels.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <torch/csrc/stable/tensor.h>

namespace autoround_fast {

using torch::stable::Tensor;

std::tuple<Tensor, Tensor> fake_quant_nvfp4_cpu(Tensor w, Tensor v, Tensor ms, Tensor gs);
std::tuple<Tensor, Tensor> fake_quant_nvfp4_cuda(Tensor w, Tensor v, Tensor ms, Tensor gs);
std::tuple<Tensor, Tensor> fake_quant_nvfp4_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, Tensor gs);
std::tuple<Tensor, Tensor> fake_quant_nvfp4_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, Tensor gs);
void fake_quant_nvfp4_backward_step_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, Tensor gs, Tensor best_ms,
                                        Tensor improved, Tensor lr);
void fake_quant_nvfp4_backward_step_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, Tensor gs, Tensor best_ms,
                                         Tensor improved, Tensor lr);

Tensor fake_quant_nvfp4_activation_cpu(Tensor x, Tensor gs);
Tensor fake_quant_nvfp4_activation_cuda(Tensor x, Tensor gs);
Tensor fake_quant_nvfp4_activation_backward_cpu(Tensor grad, Tensor x, Tensor gs);
Tensor fake_quant_nvfp4_activation_backward_cuda(Tensor grad, Tensor x, Tensor gs);

// On the CPU, silu_mul_nvfp4_activation is PyTorch's silu and multiply around the activation
// ops (python/autoround_fast/ops.py); only the GPU has a fused kernel.
Tensor silu_mul_nvfp4_activation_cuda(Tensor gate, Tensor up, Tensor gs);
std::tuple<Tensor, Tensor> silu_mul_nvfp4_activation_backward_cuda(Tensor grad, Tensor gate, Tensor up, Tensor gs);

// FP8 (e4m3): weights with one scale per tensor or per row, or per 128 x 128 block (FP8_BLOCK);
// static per-tensor activations.
std::tuple<Tensor, Tensor> fake_quant_fp8_cpu(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                std::optional<Tensor> amax);
std::tuple<Tensor, Tensor> fake_quant_fp8_cuda(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                std::optional<Tensor> amax);
std::tuple<Tensor, Tensor> fake_quant_fp8_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                         std::optional<Tensor> amax);
std::tuple<Tensor, Tensor> fake_quant_fp8_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t scale_dtype,
                                                         std::optional<Tensor> amax);
std::tuple<Tensor, Tensor> fake_quant_fp8_block_cpu(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype);
std::tuple<Tensor, Tensor> fake_quant_fp8_block_cuda(Tensor w, Tensor v, Tensor ms, int64_t scale_dtype);
std::tuple<Tensor, Tensor> fake_quant_fp8_block_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms,
                                                             int64_t scale_dtype);
std::tuple<Tensor, Tensor> fake_quant_fp8_block_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms,
                                                              int64_t scale_dtype);
Tensor fake_quant_fp8_activation_cpu(Tensor x, Tensor act_max, Tensor ms, int64_t scale_dtype);
Tensor fake_quant_fp8_activation_cuda(Tensor x, Tensor act_max, Tensor ms, int64_t scale_dtype);
std::tuple<Tensor, Tensor> fake_quant_fp8_activation_backward_cpu(Tensor grad, Tensor x, Tensor act_max, Tensor ms,
                                                                  int64_t scale_dtype);
std::tuple<Tensor, Tensor> fake_quant_fp8_activation_backward_cuda(Tensor grad, Tensor x, Tensor act_max, Tensor ms,
                                                                   int64_t scale_dtype);

std::tuple<Tensor, Tensor, Tensor> fake_quant_int_cpu(Tensor w, Tensor v, Tensor mn, Tensor mx, int64_t bits,
                                                      int64_t group_size, bool sym, int64_t scale_dtype);
std::tuple<Tensor, Tensor, Tensor> fake_quant_int_cuda(Tensor w, Tensor v, Tensor mn, Tensor mx, int64_t bits,
                                                       int64_t group_size, bool sym, int64_t scale_dtype);
std::tuple<Tensor, Tensor, Tensor> fake_quant_int_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor mn, Tensor mx,
                                                               int64_t bits, int64_t group_size, bool sym,
                                                               int64_t scale_dtype);
std::tuple<Tensor, Tensor, Tensor> fake_quant_int_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor mn,
                                                                Tensor mx, int64_t bits, int64_t group_size,
                                                                bool sym, int64_t scale_dtype);
void fake_quant_int_backward_step_cpu(Tensor grad, Tensor w, Tensor v, Tensor mn, Tensor mx, int64_t bits,
                                      int64_t group_size, bool sym, int64_t scale_dtype, Tensor best_mn,
                                      Tensor best_mx, Tensor improved, Tensor lr);
void fake_quant_int_backward_step_cuda(Tensor grad, Tensor w, Tensor v, Tensor mn, Tensor mx, int64_t bits,
                                       int64_t group_size, bool sym, int64_t scale_dtype, Tensor best_mn,
                                       Tensor best_mx, Tensor improved, Tensor lr);

std::tuple<Tensor, Tensor> fake_quant_mx_cpu(Tensor w, Tensor v, Tensor ms, int64_t bits);
std::tuple<Tensor, Tensor> fake_quant_mx_cuda(Tensor w, Tensor v, Tensor ms, int64_t bits);
std::tuple<Tensor, Tensor> fake_quant_mx_backward_cpu(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t bits);
std::tuple<Tensor, Tensor> fake_quant_mx_backward_cuda(Tensor grad, Tensor w, Tensor v, Tensor ms, int64_t bits);
Tensor fake_quant_mx_activation_cpu(Tensor x, int64_t bits);
Tensor fake_quant_mx_activation_cuda(Tensor x, int64_t bits);
Tensor fake_quant_mx_activation_backward_cpu(Tensor grad, Tensor x, int64_t bits);
Tensor fake_quant_mx_activation_backward_cuda(Tensor grad, Tensor x, int64_t bits);

Tensor masked_mse_loss_cpu(Tensor pred, Tensor ref, std::optional<Tensor> mask);
Tensor masked_mse_loss_cuda(Tensor pred, Tensor ref, std::optional<Tensor> mask);
Tensor masked_mse_loss_backward_cpu(Tensor grad, Tensor pred, Tensor ref, std::optional<Tensor> mask);
Tensor masked_mse_loss_backward_cuda(Tensor grad, Tensor pred, Tensor ref, std::optional<Tensor> mask);

void copy_if_cpu(Tensor dst, Tensor src, Tensor flag);
void copy_if_cuda(Tensor dst, Tensor src, Tensor flag);
void sign_step_cpu(Tensor param, std::optional<Tensor> best, Tensor grad, Tensor improved, Tensor lr);
void sign_step_cuda(Tensor param, std::optional<Tensor> best, Tensor grad, Tensor improved, Tensor lr);

}  // namespace autoround_fast
