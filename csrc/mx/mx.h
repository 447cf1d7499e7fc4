// MX (MXFP4, MXFP8) fake quantization of one 32-element group, forward and backward.
//
// Forward (auto-round 0.15.1, data_type/mxfp.py quant_mx and quant_element; reference.py's
// _mx_groups and _mx_element), all in fp32, in this order:
//   m     = max|W_g| * max_scale_g
//   E     = clamp(floor(log2 m) - emax, -127, 127)     (m = 0: floor(log2 m) taken as 1)
//   scale = 2^E;  t = W / scale + V;  c = clamp(t, -max_norm, max_norm)
//   p     = max(floor(log2(|c| + (c == 0))), min_exp);  y = c / 2^p * 2^mbits
//   r     = floor(|y| + 0.5) - ((|y| - 0.5) mod 2 == 0)   (half to even, as auto-round writes it)
//   q     = clamp(sign(y) * r / 2^mbits * 2^p, -max_norm, max_norm);   Wq = q * scale
// A division by a power of two is a product with the exact reciprocal power: the same one
// rounding. The +V stays even when V is 0 (it turns -0 into +0, as auto-round's add does).
//
// floor(log2 .) is the exact binary exponent here (subnormals included). auto-round takes
// floor(torch.log2(.)), and the fp32 log2 of a value just below 2^k is k - (a few ulps of 1)
// / ln 2, which rounds to k itself where the ulp of k is coarser (k >= 3 or k <= -2): there
// auto-round picks the next exponent. On the CPU that happens for the 1 (k = 3, -2, -3) to
// 44 (|k| >= 64) fp32 values right below 2^k, about 0.35 |k| to 0.7 |k| of them. For m, its
// scale is then twice ours and the forwards differ; for an element's p, both forwards give
// 2^k (c is within half a grid step of it either way) and only the gradients differ.
//
// Backward: PyTorch's autograd through those ops, op by op in fp32 (derivatives.yaml), so
// that an element's gradient keeps autograd's bits, the sign of the small residual of two
// nearly cancelling paths (an element that rounds to 0) included: SignSGD steps by it. The
// max_scale gradient sums over the group in element order, on the CPU and the GPU alike
// (autograd's reduction adds in another order; the sum is itself a near cancellation, since
// q * scale barely moves with the scale). All-zero groups get a zero max_scale gradient
// (auto-round's is NaN: 0/0 in log2's backward; reference.py's where() gives 0).
#pragma once

#include <type_traits>

#include "../common/numerics.h"

namespace autoround_fast {

constexpr float kLn2f = 0.6931471805599453f;  // fp32(ln 2): log2's and pow's backward factor

// formats.h's element format for a bit width, as scalar constants (which device code reads).
template <int kBits>
struct MxFormat {
  static constexpr MxElement kElement = mx_element(kBits);
  static constexpr float kMaxNorm = kElement.max_norm;
  static constexpr int kMbits = kElement.mbits, kMinExp = kElement.min_exp, kEmax = kElement.emax;
  static constexpr float kUnit = static_cast<float>(1 << kMbits);  // 2^mbits
  static constexpr float kInvUnit = 1.0f / kUnit;
};

// The shared scale of a group.
struct MxScale {
  float m;      // amax * max_scale
  float e;      // E, clamped: the stored shared exponent
  float scale;  // 2^E
  float inv;    // 2^-E
  bool pass;    // floor(log2 m) - emax within [-127, 127]: the clamp passes E's gradient
};

template <int kBits>
AF_HD MxScale mx_group_scale(float amax, float max_scale) {
  using F = MxFormat<kBits>;
  MxScale s;
  s.m = mul_rn(amax, max_scale);
  float lg;  // floor(log2 m), as torch.where(m == 0, 1, floor(log2(m)))
  if (s.m == 0.f) {
    lg = 1.0f;
  } else if (s.m > 0.f && is_finite(s.m)) {
    lg = static_cast<float>(floor_log2(s.m));
  } else {  // inf (an overflowing product), or NaN from a negative or NaN max_scale, as log2
    lg = s.m > 0.f ? s.m : bits_to_float(0x7fc00000u);
  }
  const float es = sub_rn(lg, static_cast<float>(F::kEmax));
  constexpr float kBound = static_cast<float>(kE8m0ExpMax);
  s.pass = es >= -kBound && es <= kBound;
  s.e = clamp_(es, -kBound, kBound);
  if (s.e == s.e) {
    const int ei = static_cast<int>(s.e);
    s.scale = exp2_int(ei);
    s.inv = exp2_int(-ei);
  } else {
    s.scale = s.inv = s.e;
  }
  return s;
}

// One element's forward, with what its backward needs.
struct MxElem {
  float t;      // x / scale + v
  float c;      // clamp(t, -max_norm, max_norm)
  int p;        // the element's exponent, max(floor(log2(|c| + (c == 0))), min_exp)
  bool normal;  // floor(log2(...)) >= min_exp: the clip passes p's gradient
  float y;      // c / 2^p * 2^mbits
  float y2;     // sign(y) * r
  float qb;     // y2 / 2^mbits * 2^p, before the final clamp
  float q;      // the element's value on the grid (Wq = q * scale)
};

// |c| + (c == 0): log2's argument.
AF_HD float mx_log_arg(float c) { return c == 0.f ? 1.0f : fabs_(c); }

// kNoV (activations): V is 0, whose add only turns a t of -0 into +0; a c of -0 gives every
// field but t, c and y (zeros of either sign) the same value as +0, and so the same q and the
// same gradient (mx_element_grad: sign(y) = sign(c) = 0 zero every path through them), so the add
// is skipped.
template <int kBits, bool kNoV = false>
AF_HD MxElem mx_element_forward(float x, float v, const MxScale& sc) {
  using F = MxFormat<kBits>;
  MxElem e;
  e.t = kNoV ? mul_rn(x, sc.inv) : add_rn(mul_rn(x, sc.inv), v);
  e.c = clamp_(e.t, -F::kMaxNorm, F::kMaxNorm);
  // the exponent field: exact for normal values; a subnormal (field 0) is below 2^-126, far
  // under min_exp, where p is min_exp and the clip gate closed either way
  const int lp = static_cast<int>(float_to_bits(mx_log_arg(e.c)) >> 23) - 127;
  e.normal = lp >= F::kMinExp;
  e.p = e.normal ? lp : F::kMinExp;
  // c / 2^p is exact (in [1, 2), or a scaling up by 2^-min_exp), and so is * 2^mbits
  e.y = mul_rn(e.c, exp2_normal(F::kMbits - e.p));
  const float a = fabs_(e.y);
  const float d = sub_rn(a, 0.5f);
  const float half = mul_rn(d, 0.5f);                      // exact: d is never subnormal
  const float tie = floor_(half) == half ? 1.0f : 0.0f;    // (a - 0.5) % 2 == 0
  const float r = sub_rn(floor_(add_rn(a, 0.5f)), tie);
  e.y2 = e.y < 0.f ? -r : r;  // sign(y) * r: r >= 0, and r = +0 where y = +-0
  e.qb = mul_rn(e.y2, exp2_normal(e.p - F::kMbits));            // exact: y2 is a small integer
  // the clamp never binds: max_norm is on the grid, so |c| <= max_norm rounds to |qb| <= max_norm
  // (FP4: |c| in [4, 6] gives |y| in [2, 3], r <= 3, |qb| <= 6; FP8: |c| in [256, 448] gives |y|
  // in [8, 14], r <= 14, |qb| <= 448; a smaller p bounds |qb| by 2^(p+1)), and a NaN stays NaN
  e.q = e.qb;
  return e;
}

// The fp32 value of one element before the cast to the dtype.
template <int kBits, bool kNoV = false>
AF_HD float mx_qdq(float x, float v, const MxScale& sc) {
  return mul_rn(mx_element_forward<kBits, kNoV>(x, v, sc).q, sc.scale);
}

// d(loss)/d(t) through the clamp of t: V's gradient (the activations': times 1/scale). g is
// the upstream gradient of Wq (fp32).
template <int kBits>
AF_HD float mx_element_grad(const MxElem& e, float g, const MxScale& sc) {
  using F = MxFormat<kBits>;
  constexpr float kK = F::kUnit, kInvK = F::kInvUnit;
  const float P = exp2_normal(e.p), invP = exp2_normal(-e.p);  // |p| <= 8
  // Wq = q * scale; q = clamp(qb), bounds inclusive
  const float g3 = (e.qb >= -F::kMaxNorm && e.qb <= F::kMaxNorm) ? mul_rn(g, sc.scale) : 0.f;
  // qb = (y2 / K) * P
  const float dt2 = mul_rn(mul_rn(g3, P), kInvK);
  const float dP3 = mul_rn(g3, mul_rn(e.y2, kInvK));
  // y2 = sign(y) * (floor_ste(|y| + 0.5) - tie); sign's backward adds a zero to y's
  // gradient, which turns -0 into +0
  const float sy = sign_of(e.y);
  const float dy = add_rn(mul_rn(mul_rn(dt2, sy), sy), 0.0f);
  // y = (c / P) * K
  const float dq = mul_rn(dy, kK);
  const float dc_direct = mul_rn(dq, invP);
  const float dP1 = mul_rn(-dq, mul_rn(mul_rn(e.c, invP), invP));  // -grad * ((c / P) / P)
  // P = 2^p twice (two pow nodes): grad * (P * ln 2) each; p = clip(floor_ste(log2(|c| + ...)))
  const float pl = mul_rn(P, kLn2f);
  const float dA = add_rn(mul_rn(dP3, pl), mul_rn(dP1, pl));
  const float dL = e.normal ? dA : 0.f;
  const float dc_log = mul_rn(div_rn(dL, mul_rn(mx_log_arg(e.c), kLn2f)), sign_of(e.c));
  const float dc = add_rn(dc_direct, dc_log);
  // c = clamp(t), bounds inclusive
  return (e.t >= -F::kMaxNorm && e.t <= F::kMaxNorm) ? dc : 0.f;
}

// mx_element_grad with fewer operations, and the same bits wherever mx_grad_fast_ok holds: c is
// not NaN and g3 = g * scale is 0 or within [2^-100, 2^100]. There
//  - q = qb: |qb| <= max_norm for every finite c (max_norm is on the grid), so the gate on qb
//    passes and g3 is mx_element_grad's;
//  - c = 0 or g3 = 0: every term is a zero, and dc = dc_direct + dc_log = +0 + (+-0) = +0;
//  - otherwise y != 0 (c scaled by a power of two, exactly), sign(y)^2 = 1, and the chain g3 ->
//    dt2 -> dy -> dq -> dc_direct only scales by powers of two (P, 1/K, K, 1/P, all within
//    [2^-9, 2^8]) inside the normal range: every step is exact, dc_direct = g3 and dq = g3 * P.
//    dP1 = -dq * ((c / P) / P) then rounds the same real number as -g3 * (c / P), where c / P =
//    y / K exactly; and (dL / (|c| ln 2)) * sign(c) = dL / (c ln 2), since rounding commutes
//    with a change of sign (signed zeros and infinities included).
// (tests: the CPU kernels run this path against the oracle bit for bit.)
AF_HD bool mx_grad_fast_ok(const MxElem& e, float g3) {
  const float a = fabs_(g3);  // & and |, not && and ||: no branches
  return (e.c == e.c) & ((a == 0.f) | ((a >= 0x1p-100f) & (a <= 0x1p100f)));
}

template <int kBits>
AF_HD float mx_element_grad_fast(const MxElem& e, float g3) {
  using F = MxFormat<kBits>;
  const float pl = mul_rn(exp2_normal(e.p), kLn2f);
  const float dP3 = mul_rn(g3, mul_rn(e.y2, F::kInvUnit));
  const float dP1 = mul_rn(-g3, mul_rn(e.y, F::kInvUnit));  // y / K = c / P, exactly
  const float dA = add_rn(mul_rn(dP3, pl), mul_rn(dP1, pl));
  const float dL = e.normal ? dA : 0.f;
  const float dc = add_rn(g3, div_rn(dL, mul_rn(e.c, kLn2f)));
  const bool live = e.t >= -F::kMaxNorm && e.t <= F::kMaxNorm && e.c != 0.f && g3 != 0.f;
  return live ? dc : 0.f;
}

// mx_element_grad by the shorter path where it gives the same bits.
template <int kBits>
AF_HD float mx_element_grad_any(const MxElem& e, float g, const MxScale& sc) {
  const float g3 = mul_rn(g, sc.scale);
  return mx_grad_fast_ok(e, g3) ? mx_element_grad_fast<kBits>(e, g3) : mx_element_grad<kBits>(e, g, sc);
}

// The group's sums of the scale's gradient, in element order.
struct MxGroupSums {
  float out = 0.f;  // from Wq = q * scale: sum of g * q
  float div = 0.f;  // from x / scale: sum of -gt * ((x / scale) / scale)
  // an element's terms of the two sums
  static AF_HD float out_term(float g, float q) { return mul_rn(g, q); }
  static AF_HD float div_term(float x, float gt, const MxScale& sc) {
    return mul_rn(-gt, mul_rn(mul_rn(x, sc.inv), sc.inv));
  }
  AF_HD void add_terms(float a, float b) {
    out = add_rn(out, a);
    div = add_rn(div, b);
  }
  AF_HD void add(float x, float g, float gt, float q, const MxScale& sc) {
    add_terms(out_term(g, q), div_term(x, gt, sc));
  }
  // d(loss)/d(m), m = amax * max_scale: scale = 2^E, E = clamp(floor_ste(lg) - emax),
  // lg = where(m == 0, 1, log2(where(m == 0, 1, m)))
  AF_HD float g_m(const MxScale& sc) const {
    const float g_scale = add_rn(out, div);
    const float g_e = sc.pass ? mul_rn(g_scale, mul_rn(sc.scale, kLn2f)) : 0.f;
    return sc.m == 0.f ? 0.f : div_rn(g_e, mul_rn(sc.m, kLn2f));
  }
};

// Backward for one group of n elements. x: weight values (fp32), v: offsets, g: upstream
// gradient (fp32, read from the output dtype). Writes V's gradient per element, returns
// d(loss)/d(m); max_scale's gradient is that times amax.
template <int kBits>
AF_HD float mx_group_backward(const float* x, const float* v, const float* g, int n, const MxScale& sc,
                              float* gv) {
  MxGroupSums sums;
  for (int j = 0; j < n; ++j) {
    const MxElem e = mx_element_forward<kBits>(x[j], v[j], sc);
    gv[j] = mx_element_grad_any<kBits>(e, g[j], sc);
    sums.add(x[j], g[j], gv[j], e.q, sc);
  }
  return sums.g_m(sc);
}

// Gradient of one activation element: the path through x / scale plus the path through
// max|x| (m = amax * 1), which max's backward scatters to the group's first argmax and zeros
// elsewhere, times sgn(x); autograd adds the two in fp32 (both reach the fp32 copy of x),
// and the .to(float32) cast's backward rounds the sum once into the dtype T.
// mx_act_grad_fp32 is the sum before that rounding, given the max path's term m: g_m * sgn(x)
// at the argmax (mx_act_max_term), and elsewhere 0 * sgn(x), which is -0 for x < 0, else +0.
AF_HD float mx_act_max_term(float g_m, float x, bool is_argmax) {
  return is_argmax ? mul_rn(g_m, sign_of(x)) : (x < 0.f ? -0.0f : 0.0f);
}
AF_HD float mx_act_grad_fp32(float gt, const MxScale& sc, float m) { return add_rn(mul_rn(gt, sc.inv), m); }
template <typename T>
AF_HD float mx_act_grad(float gt, const MxScale& sc, float g_m, float x, bool is_argmax) {
  return round_through<T>(mx_act_grad_fp32(gt, sc, mx_act_max_term(g_m, x, is_argmax)));
}

// Calls f(std::integral_constant<int, bits>) for a supported bit width (4 or 8; the ops
// refuse others). Host code.
template <typename F>
inline void with_mx_bits(int bits, F&& f) {
  if (bits == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

}  // namespace autoround_fast
