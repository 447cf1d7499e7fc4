// The block loss as auto-round computes it: MSE(pred * mask, ref * mask) in fp32, mean over
// every element (masked ones count as zeros). The mask multiplies in the prediction's dtype.
#pragma once

#include "../common/numerics.h"

namespace autoround_fast {

template <typename T>
AF_HD float masked_value(T v, float m) {
  return round_through<T>(mul_rn(to_f32(v), m));
}

// d loss / d pred for one element: norm * (a - b) * g in fp32, rounded to T (the .float()
// cast's backward), then times the mask in T.
template <typename T>
AF_HD T masked_mse_grad(T p, T r, float m, float norm, float g) {
  float d = sub_rn(masked_value(p, m), masked_value(r, m));
  float gf = round_through<T>(mul_rn(mul_rn(norm, d), g));
  return from_f32<T>(mul_rn(gf, m));
}

// Without a mask (m = 1) the products by m and the roundings through T above are exact
// (pred and ref hold values of T; a value rounded to T rounds to itself), so the same values
// come from fewer operations: the GPU kernels, bound by instruction issue, use these.
AF_HD float unmasked_sq_diff(float p, float r) {
  const float d = sub_rn(p, r);
  return mul_rn(d, d);
}
template <typename T>
AF_HD T unmasked_mse_grad(float p, float r, float norm, float g) {
  return from_f32<T>(mul_rn(mul_rn(norm, sub_rn(p, r)), g));
}

}  // namespace autoround_fast
