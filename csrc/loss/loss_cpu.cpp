#include <mutex>
#include <vector>

#include <torch/csrc/stable/ops.h>

#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "loss.h"

namespace autoround_fast::cpu {

float masked_mse_loss(const LossArgs& a) {
  double total = 0.0;
  std::mutex mu;
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    const T* p = static_cast<const T*>(a.pred);
    const T* r = static_cast<const T*>(a.ref);
    torch::stable::parallel_for(0, a.numel, 1 << 16, [&](int64_t begin, int64_t end) {
      double acc = 0.0;
      for (int64_t i = begin; i < end; ++i) {
        float m = a.mask ? a.mask[i / a.hidden] : 1.f;
        float d = sub_rn(masked_value(p[i], m), masked_value(r[i], m));
        acc += static_cast<double>(d) * d;
      }
      std::lock_guard<std::mutex> lock(mu);
      total += acc;
    });
  });
  return static_cast<float>(total / static_cast<double>(a.numel));
}

void masked_mse_loss_backward(const LossArgs& a, float grad_loss, void* grad_pred) {
  const float norm = static_cast<float>(2.0 / static_cast<double>(a.numel));
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    const T* p = static_cast<const T*>(a.pred);
    const T* r = static_cast<const T*>(a.ref);
    T* out = static_cast<T*>(grad_pred);
    torch::stable::parallel_for(0, a.numel, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float m = a.mask ? a.mask[i / a.hidden] : 1.f;
        out[i] = masked_mse_grad(p[i], r[i], m, norm, grad_loss);
      }
    });
  });
}

}  // namespace autoround_fast::cpu
