// x / s correctly rounded (IEEE division, bit for bit) with s's reciprocal taken once, for
// the kernels that divide many values by one scale (docs/design.md#fast-division).
//
// Markstein's division (divide_fast): y = RN(1 / s); q0 = RN(x * y) is within an ulp of x / s;
// the remainder x - s * q0 is exact in one FMA (scaled by 2^64, which keeps it off the
// subnormal range); and RN(q0 + r * y) is the quotient correctly rounded. It holds for
// 2^-24 <= |s| <= 2^16 and x = 0 or 2^-80 <= |x| <= 2^40 |s| (tests/ops/native/division_check.cpp).
// A kernel takes it from kFastMin = 2^-60 up, which keeps a second division of a quotient
// (t = x / s >= 2^-76) in that range. divide_fast has no reciprocal instruction and no
// slow-path branch, which the IEEE division (div.rn, ~11 instructions) has; divide() still
// branches to the IEEE division for an x outside the domain.
#pragma once

#include "numerics.h"

namespace autoround_fast {

constexpr float kFastMin = 0x1p-60f;          // the smallest nonzero |x| a kernel divides this way
constexpr float kRemainderScale = 0x1p64f;    // the remainder's scaling, off the subnormal range

struct Divider {
  float s;       // the divisor
  float y;       // RN(1 / s)
  float sh, yl;  // s * 2^64, y * 2^-64
  float xmax;    // 2^40 |s|, the largest |x| divide_fast takes; -1 where s is outside its range
};

AF_HD Divider make_divider(float s) {
  const float as = fabs_(s), y = div_rn(1.f, s);
  const bool ok = as >= 0x1p-24f && as <= 0x1p16f;
  return Divider{s, y, mul_rn(s, kRemainderScale), mul_rn(y, 1.f / kRemainderScale), ok ? mul_rn(as, 0x1p40f) : -1.f};
}

// Whether divide takes the fast division for x (never for a zero, an infinity or a NaN).
AF_HD bool in_fast_domain(float x, const Divider& d) {
  const float a = fabs_(x);
  return a >= kFastMin && a <= d.xmax;
}

// x / s for x = 0 or 2^-80 <= |x| <= d.xmax. kZero: x may be +-0, for which q0 is already the
// signed zero x / s is (the correction would turn -0 into +0); without it the caller
// guarantees x != 0.
template <bool kZero = true>
AF_HD float divide_fast(float x, const Divider& d) {
  const float q0 = mul_rn(x, d.y);
  const float q = fma_rn(fma_rn(-d.sh, q0, mul_rn(x, kRemainderScale)), d.yl, q0);
  if constexpr (kZero) return x == 0.f ? q0 : q;
  return q;
}

// x / s for any x, chosen per element (the FP8 kernels): on the GPU the fast division where
// in_fast_domain, else the IEEE division; on the CPU the IEEE division. The INT kernels choose
// once per group instead (int_quant.h), on the CPU as on the GPU.
AF_HD float divide(float x, const Divider& d) {
#if defined(__CUDA_ARCH__)
  return in_fast_domain(x, d) ? divide_fast<false>(x, d) : div_rn(x, d.s);
#else
  return div_rn(x, d.s);
#endif
}

}  // namespace autoround_fast
