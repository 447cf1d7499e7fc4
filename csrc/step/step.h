// The SignSGD step with the best-parameter copy, one element: shared by the CPU and CUDA kernels.
#pragma once

#include "common/numerics.h"

namespace autoround_fast {

// -1 * sign(g) as torch.sign computes sign: +1, -1, or 0 for zeros and NaN.
AF_HD float neg_sign(float g) { return g > 0.f ? -1.f : (g < 0.f ? 1.f : -0.f); }

// addcmul_(sign(g), lr, value=-1): param + (-1 * sign(g)) * lr, one rounding (the product is
// exact: +-lr or a signed zero).
AF_HD float sign_step_value(float p, float g, float lr) { return p + neg_sign(g) * lr; }

}  // namespace autoround_fast
