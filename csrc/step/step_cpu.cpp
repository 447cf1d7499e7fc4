// The fused SignSGD step and best-parameter copy, and the best weight's copy, on the CPU.
#include <cstring>

#include "cpu_kernels.h"
#include "step/step.h"

namespace autoround_fast::cpu {

void sign_step(const SignStepArgs& a) {
  const bool improved = *a.improved;
  const float lr = *a.lr;
  for (int64_t i = 0; i < a.numel; ++i) {
    const float p = a.param[i];
    if (improved && a.best) a.best[i] = p;
    a.param[i] = sign_step_value(p, a.grad[i], lr);
  }
}

void copy_if(const CopyIfArgs& a) {
  if (*a.flag) std::memcpy(a.dst, a.src, static_cast<size_t>(a.bytes));
}

}  // namespace autoround_fast::cpu
