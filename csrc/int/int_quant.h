// Integer fake quantization of one group, forward and backward (auto-round 0.15.1,
// data_type/int.py: quant_tensor_sym "full range" and quant_tensor_asym).
//
// sym:  maxq = 2^(b-1); A = -(wmin * min_scale), B = wmax * max_scale (wmin <= 0 <= wmax)
//       s = cast(sign * max(A, B) / maxq), sign = +1 if B < A else -1; |s| floored at 1e-5
//       Wq = s * clamp(round(W / s + V), -maxq, maxq - 1)
// asym: maxq = 2^b - 1; s = max(cast((max_scale*wmax - min_scale*wmin) / maxq), 1e-5)
//       zp = round(-min_scale*wmin / s); Wq = s * (clamp(round(W / s + V) + zp, 0, maxq) - zp)
// cast() rounds to the scale's dtype (fp16 in auto-round; the stored dtype here), and the
// scale's gradient is rounded through that dtype too, as autograd does.
//
// Elements are spread over 32 lanes in chunks of 4 (element j on lane (j / 4) % 32); each
// lane sums its elements in order and the lanes combine by an xor butterfly. The CUDA kernel
// runs one warp per group, the CPU kernel replays the same order: both give the same bits.
#pragma once

#include "../common/division.h"
#include "../common/numerics.h"

namespace autoround_fast {

constexpr int kLanes = 32;
constexpr int kChunk = 4;
constexpr float kScaleFloor = 1e-5f;

AF_HD int lane_of(int j) { return (j / kChunk) % kLanes; }

struct IntParams {
  int bits;
  bool sym;
  int scale_dtype;  // ScaleDtype code
  int quot_dtype;   // dtype W / s is rounded to: PyTorch promotes bf16/bf16 and fp16/fp16
                    // to the 16-bit type, anything else to fp32
};

// IntParams with sym and the quotient's dtype fixed at compile time. The functions below take
// either (a template parameter P); the GPU kernels pass these, so that no element's code
// branches on sym or tests the quotient's dtype (Nsight Compute: two branches and a
// predicated conversion per element of the INT backward came from those two run-time values).
template <bool kSym, int kQuot>
struct FixedIntParams {
  int bits;
  int scale_dtype;
  static constexpr bool sym = kSym;
  static constexpr int quot_dtype = kQuot;
};

AF_HD int quotient_dtype(int weight_dtype, int scale_dtype) {
  return weight_dtype == scale_dtype ? scale_dtype : static_cast<int>(kFloat);
}

struct IntScale {
  float s_raw;  // scale in its dtype before the 1e-5 floor
  float s;      // scale used
  float zp;     // zero point (asym), 0 for sym
  float A, B;   // sym: -(wmin*min_scale), wmax*max_scale; asym: wmin*min_scale, wmax*max_scale
  float maxq;
  Divider div;  // x / s with the reciprocal taken once per group (int_divide)
  bool fast;    // the group's largest magnitude is in the fast division's domain
};

// The fast division (common/division.h) per group: the group's scale and largest magnitude are
// checked once against its range (IntScale::fast); elements below kFastMin take the IEEE
// division instead (a zero or a tiny weight sends its lane there), which also keeps the
// backward's second division t / s (t = x / s rounded, zero or >= 2^-76) in the range.
AF_HD bool int_fast_element(float x) { return fabs_(x) >= kFastMin; }

AF_HD void int_divider(IntScale& r, float wmin, float wmax) {
  r.div = make_divider(r.s);
  r.fast = fmax_(-wmin, wmax) <= r.div.xmax;
}

// Whether the backward's second division (t / s, t = x / s in the quotient's dtype) stays in
// the domain for every element of the group: |t| <= 2^40 |s| (t's magnitude is at most that of
// the largest element's quotient, rounding being monotone).
template <typename P>
AF_HD bool int_second_division_fast(const IntScale& sc, float wmin, float wmax, const P& p) {
  const float tmax = round_to_scale_dtype(div_rn(fmax_(-wmin, wmax), fabs_(sc.s)), p.quot_dtype);
  return sc.fast && tmax <= sc.div.xmax;
}

// x / s, correctly rounded (IEEE division, bit for bit). kFast: the group's fast division, for
// x in its domain or (kZero) +-0; without kZero the caller guarantees x != 0.
template <bool kFast, bool kZero = true>
AF_HD float int_divide(float x, const IntScale& sc) {
  if constexpr (kFast) {
    return divide_fast<kZero>(x, sc.div);
  } else {
    return div_rn(x, sc.s);
  }
}

// min(W, 0) or max(W, 0) of a group, as the kernels use it: a zero as +0. Which signed zero a
// min or max keeps depends on the order it meets them (and, on the GPU, on the instruction),
// so every kernel reduces in its own order with the fastest min and max, then takes this.
// auto-round's clamp(min(W), max=0) may give -0; the sign reaches only the zero point's and
// the scale gradients' zeros, never a quantized weight or a scale.
AF_HD float group_extreme(float v) { return add_rn(v, 0.f); }

// Group gi's scale s stored in the scale dtype (a ScaleDtype code): one store per group, so a
// branch on the dtype, not a kernel (or a dispatch) per dtype.
AF_HD void int_store_scale(void* scale, int64_t gi, float s, int dtype) {
  if (dtype == kHalf) static_cast<f16_t*>(scale)[gi] = from_f32<f16_t>(s);
  else if (dtype == kBFloat16) static_cast<bf16_t*>(scale)[gi] = from_f32<bf16_t>(s);
  else static_cast<float*>(scale)[gi] = s;
}

AF_HD float int_floor_scale(float s_raw, float floor_value, bool sym) {
  if (sym && s_raw < 0.f) return s_raw > -floor_value ? -floor_value : s_raw;
  return s_raw < floor_value ? floor_value : s_raw;
}

// 1 / maxq of the symmetric scheme, 2^-(bits-1), built from its exponent (bits in 2..8).
AF_HD float sym_inv_maxq(int bits) { return bits_to_float(static_cast<uint32_t>(128 - bits) << 23); }

template <typename P>
AF_HD IntScale int_group_scale(float wmin, float wmax, float min_scale, float max_scale, const P& p) {
  IntScale r;
  float floor_value = round_to_scale_dtype(kScaleFloor, p.scale_dtype);
  if (p.sym) {
    r.maxq = static_cast<float>(1 << (p.bits - 1));
    r.A = -mul_rn(wmin, min_scale);
    r.B = mul_rn(wmax, max_scale);
    float mv = (r.B < r.A ? 1.f : -1.f) * fmax_(r.B, r.A);
    // mv / maxq, maxq = 2^(bits-1): the product by 2^-(bits-1) is the same correctly rounded
    // value (subnormal results included) without a division
    r.s_raw = round_to_scale_dtype(mul_rn(mv, sym_inv_maxq(p.bits)), p.scale_dtype);
    r.s = int_floor_scale(r.s_raw, floor_value, true);
    r.zp = 0.f;
  } else {
    r.maxq = static_cast<float>((1 << p.bits) - 1);
    r.A = mul_rn(wmin, min_scale);
    r.B = mul_rn(wmax, max_scale);
    r.s_raw = round_to_scale_dtype(div_rn(sub_rn(r.B, r.A), r.maxq), p.scale_dtype);
    r.s = int_floor_scale(r.s_raw, floor_value, false);
    r.zp = round_even(div_rn(-r.A, r.s));
  }
  int_divider(r, wmin, wmax);
  return r;
}

// W / s in the quotient's dtype, for x != 0. kFast: x is in the fast division's domain
// (sc.fast and int_fast_element(x)).
template <bool kFast, typename P>
AF_HD float int_quotient(float x, const IntScale& sc, const P& p) {
  return round_to_scale_dtype(int_divide<kFast, false>(x, sc), p.quot_dtype);
}

// round_even(t) for |t| <= 2^22, with a zero result as +0: t + 1.5 * 2^23 lies where the fp32
// grid is 1, so the add rounds t to an integer, ties to even (1.5 * 2^23 is even); the
// subtraction is exact and gives +0, not -0. auto-round's round_ste ((round(t) - t) + t)
// turns -0 into +0 the same way. Two adds, where rint is a conversion-pipe instruction.
AF_HD float round_even_small(float t) {
  return sub_rn(add_rn(t, 12582912.0f), 12582912.0f);
}

template <bool kFast, typename P>
AF_HD float int_qdq(float x, float v, const IntScale& sc, const P& p) {
  if (p.sym) {
    // round(clamp(t)) == clamp(round(t)) for integer bounds (rounding is monotone and keeps
    // integers), so clamp first: |t| <= 2^7 for round_even_small. The bounds are never zero
    // (bits >= 2): min_num/max_num clamp as the ternaries do, NaN included (either way it
    // lands on -maxq).
    const float t = add_rn(int_quotient<kFast>(x, sc, p), v);
    return mul_rn(sc.s, round_even_small(min_num(max_num(t, -sc.maxq), sc.maxq - 1.f)));
  }
  float iw = round_even(add_rn(int_quotient<kFast>(x, sc, p), v));
  float q = fmin_(fmax_(add_rn(iw, sc.zp), 0.f), sc.maxq);
  return mul_rn(sc.s, sub_rn(q, sc.zp));
}

// Per-lane partial sums of the backward.
struct IntPartials {
  float a;   // sum g * q (sym) or g * (q - zp) (asym): d/ds through Wq = s * ...
  float b;   // sum -dV * ((W / s) / s): d/ds through W / s
  float zc;  // asym: sum dV (zp through the clamp's input)
  float zs;  // asym: sum -(g * s) (zp through q - zp)
};

// kFast: x is in the fast division's domain and so is t / s (int_second_division_fast).
template <bool kFast, typename P>
AF_HD void int_element_backward(float x, float v, float g, const IntScale& sc, const P& p,
                                float* gv, IntPartials& acc) {
  float t = int_quotient<kFast>(x, sc, p);
  float iw = round_even(add_rn(t, v));
  float gs = mul_rn(g, sc.s);
  float dv;
  if (p.sym) {
    bool pass = iw >= -sc.maxq && iw <= sc.maxq - 1.f;
    float q = min_num(max_num(iw, -sc.maxq), sc.maxq - 1.f);
    dv = pass ? gs : 0.f;
    acc.a = add_rn(acc.a, mul_rn(g, q));
  } else {
    float w = add_rn(iw, sc.zp);
    bool pass = w >= 0.f && w <= sc.maxq;
    float q = fmin_(fmax_(w, 0.f), sc.maxq);
    dv = pass ? gs : 0.f;
    acc.a = add_rn(acc.a, mul_rn(g, sub_rn(q, sc.zp)));
    acc.zc = add_rn(acc.zc, dv);
    acc.zs = add_rn(acc.zs, -gs);
  }
  *gv = dv;
  // d/ds of W / s: -g_t * ((W / s) / s), all in the quotient's dtype (fp16/fp16 stays fp16).
  float g_t = round_to_scale_dtype(dv, p.quot_dtype);
  const float tq = round_to_scale_dtype(int_divide<kFast>(t, sc), p.quot_dtype);  // t may be +-0
  acc.b = add_rn(acc.b, round_to_scale_dtype(mul_rn(-g_t, tq), p.quot_dtype));
}

AF_HD void int_partials_add(IntPartials& x, const IntPartials& y) {
  x.a = add_rn(x.a, y.a);
  x.b = add_rn(x.b, y.b);
  x.zc = add_rn(x.zc, y.zc);
  x.zs = add_rn(x.zs, y.zs);
}

// From the group's summed partials to the gradients of min_scale and max_scale.
template <typename P>
AF_HD void int_group_scale_backward(const IntPartials& t, float wmin, float wmax,
                                    const IntScale& sc, const P& p,
                                    float* g_min_scale, float* g_max_scale) {
  float floor_value = round_to_scale_dtype(kScaleFloor, p.scale_dtype);
  // Each contribution to the scale's gradient is rounded to the scale dtype, and they are
  // accumulated in that dtype, as autograd accumulates into an fp16 tensor.
  float gs = round_to_scale_dtype(add_rn(round_to_scale_dtype(t.a, p.scale_dtype),
                                         round_to_scale_dtype(t.b, p.scale_dtype)),
                                  p.scale_dtype);
  float g_zp = 0.f;
  if (!p.sym) {
    g_zp = add_rn(t.zc, t.zs);
    float neg_a = -sc.A;  // zp = round(-A / s)
    float g_s_zp = round_to_scale_dtype(mul_rn(-g_zp, div_rn(div_rn(neg_a, sc.s), sc.s)),
                                        p.scale_dtype);
    gs = round_to_scale_dtype(add_rn(gs, g_s_zp), p.scale_dtype);
  }
  bool floor_pass = (p.sym && sc.s_raw < 0.f) ? sc.s_raw <= -floor_value : sc.s_raw >= floor_value;
  float g_raw = floor_pass ? gs : 0.f;
  // s = cast(mv / maxq); sym: maxq a power of two, so the product by 1 / maxq is the same value
  float g_q = p.sym ? mul_rn(g_raw, sym_inv_maxq(p.bits)) : div_rn(g_raw, sc.maxq);
  if (p.sym) {
    float g_mv = mul_rn(g_q, sc.B < sc.A ? 1.f : -1.f);
    float gB, gA;  // torch.maximum's backward splits ties evenly
    if (sc.B == sc.A) {
      gB = gA = div_rn(g_mv, 2.f);
    } else {
      gB = sc.B > sc.A ? g_mv : 0.f;
      gA = sc.A > sc.B ? g_mv : 0.f;
    }
    *g_min_scale = mul_rn(-gA, wmin);
    *g_max_scale = mul_rn(gB, wmax);
  } else {
    float g_B = g_q;
    float g_A = add_rn(-g_q, -div_rn(g_zp, sc.s));
    *g_min_scale = mul_rn(g_A, wmin);
    *g_max_scale = mul_rn(g_B, wmax);
  }
}

}  // namespace autoround_fast
