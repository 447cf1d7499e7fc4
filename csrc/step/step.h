// The SignSGD step with the best-parameter copy, one element: shared by the CPU and CUDA kernels.
#pragma once

#include "common/numerics.h"

namespace autoround_fast {

// addcmul_(sign(g), lr, value=-1), that is param + (-1 * sign(g)) * lr with torch.sign's
// sign (+1, -1, or 0 for zeros and NaN), one rounding: the product is exact (-lr, +lr or
// -0 * lr). Written as three cases, not as a multiply by a selected -1 / +1 / -0: ptxas 13.0
// turned the selection of 1.0 or -0.0 into FSET.BF, which gives +0.0 (sm_90a SASS; the GPU's
// step then wrote +0.0 where torch writes -0.0 for a -0.0 parameter with a zero gradient).
AF_HD float sign_step_value(float p, float g, float lr) {
  if (g > 0.f) return p - lr;
  if (g < 0.f) return p + lr;
  return p + (-0.f * lr);
}

}  // namespace autoround_fast
