// NVFP4 fake quantization of one 16-element group, forward and backward.
//
// Forward (auto-round 0.15.1, data_type/nvfp.py, all in fp32, in this order):
//   m  = max|W_g| * max_scale_g
//   s  = e4m3(clamp(gs * (m * (1/6)), -448, 448))
//   os = 1 / (s * (1/gs))                       (1/0 -> 0)
//   y  = W * os + V
//   Wq = fp4(clamp(y, -6, 6)) * (1/os)          (then cast to the weight dtype)
// Backward is autograd through those ops with straight-through rounds: dWq/dV = 1/os where
// -6 <= y <= 6 and y != 0, and max_scale's gradient flows through os and s, zero where the
// 448 clamp is active. Sums run sequentially over the group, on the CPU and the GPU alike.
#pragma once

#include "../common/numerics.h"

namespace autoround_fast {

constexpr float kOneSixth = 0.16666666666666666f;  // fp32(1/6), as PyTorch casts the scalar
static_assert(kOneSixth == 1.0f / kFp4Max, "kOneSixth is fp32(1 / kFp4Max)");

struct Nvfp4Scale {
  float s;        // e4m3-rounded group scale (fp32), what is stored
  float os;       // 1 / (s / gs): the multiplier into the FP4 grid
  float r;        // 1 / os: the multiplier back
  float z;        // gs * m / 6 before the 448 clamp
};

AF_HD float inv_global_scale(float gs) { return reciprocal_or_zero(gs); }

// A group's global scale and its inverse.
struct GlobalScale {
  float gs, inv;
};

AF_HD GlobalScale load_global_scale(const float* gs) {
#if defined(__CUDA_ARCH__)
  const float g = __ldg(gs);
#else
  const float g = *gs;
#endif
  return {g, inv_global_scale(g)};
}

// The tensor's global scale, or, per_row, none read (a scale per row of zero rows has no
// element): the groups then read their row's.
AF_HD GlobalScale tensor_scale(const float* gs, bool per_row) {
  return per_row ? GlobalScale{0.f, 0.f} : load_global_scale(gs);
}

// The scale of the group starting at element `base` of a [rows, cols] activation: the
// tensor's (`whole`, tensor_scale's), or, per_row, that of the group's row.
AF_HD GlobalScale act_scale_at(const float* gs, bool per_row, int64_t cols, int64_t base, GlobalScale whole) {
  return per_row ? load_global_scale(gs + base / cols) : whole;
}

// The scale of weight group gi, of `groups` per row: the tensor's (`whole`), or, per_row, that
// of the group's row (the experts of an MoE projection stacked, each under its own).
AF_HD GlobalScale weight_scale_at(const float* gs, bool per_row, int64_t groups, int64_t gi, GlobalScale whole) {
  return per_row ? load_global_scale(gs + gi / groups) : whole;
}

AF_HD Nvfp4Scale nvfp4_group_scale(float amax, float max_scale, float gs, float inv_gs) {
  Nvfp4Scale r;
  float m = mul_rn(amax, max_scale);
  r.z = mul_rn(gs, mul_rn(m, kOneSixth));
  float zc = fmin_(fmax_(r.z, -kE4m3Max), kE4m3Max);
  r.s = e4m3_round(zc);
  r.os = reciprocal_or_zero(mul_rn(r.s, inv_gs));
  r.r = reciprocal_or_zero(r.os);
  return r;
}

// sign(c) * fp4(|c|) for c = clamp(y, -6, 6), as auto-round computes it (torch.sign(0) = 0,
// so y = -0 gives +0, while a small negative y gives -0): y + 0 is y except that -0 becomes
// +0, so its sign bit on the magnitude gives those bits without a compare or a branch.
// kPlusZero: y is already a sum with +0 (the activations' y = x * os + 0), so the add is
// skipped.
template <bool kPlusZero = false>
AF_HD float signed_fp4(float y) {
  if (!kPlusZero) y = add_rn(y, 0.0f);
  return bits_to_float(float_to_bits(fp4_magnitude(fabs_(y))) | (float_to_bits(y) & 0x80000000u));
}

// y = x * os + v, the element's position on the group's grid before rounding. Activations
// have v = 0, which auto-round adds too (it turns -0 into +0).
AF_HD float nvfp4_y(float x, float v, const Nvfp4Scale& sc) { return add_rn(mul_rn(x, sc.os), v); }

// Quantize one element on the group's grid: the fp32 value before the cast to the dtype.
AF_HD float nvfp4_qdq(float x, float v, const Nvfp4Scale& sc) {
  return mul_rn(signed_fp4(nvfp4_y(x, v, sc)), sc.r);
}
AF_HD float nvfp4_qdq_act(float x, const Nvfp4Scale& sc) {
  return mul_rn(signed_fp4<true>(nvfp4_y(x, 0.0f, sc)), sc.r);
}

// Chain rule from d(loss)/d(os) down to d(loss)/d(max_scale) (or to d(loss)/d(amax) with
// max_scale = 1 for activations). Zero for groups whose scale is 0, where auto-round's
// autograd produces NaN (0 * inf in the reciprocal's backward).
AF_HD float nvfp4_grad_through_scale(float g_os, const Nvfp4Scale& sc, float gs, float inv_gs) {
  if (sc.os == 0.f) return 0.f;
  // os = reciprocal(P): dP = -g * (os * os)
  float gP = mul_rn(-g_os, mul_rn(sc.os, sc.os));
  float g_s = mul_rn(gP, inv_gs);  // P = s * inv_gs
  // s = STE(clamp(z, -448, 448)): passes where the clamp is inactive (bounds inclusive)
  float g_z = (sc.z >= -kE4m3Max && sc.z <= kE4m3Max) ? g_s : 0.f;
  float g_t = mul_rn(g_z, gs);     // z = gs * t
  return mul_rn(g_t, kOneSixth);   // t = m * (1/6): d/dm
}

// One element's part of the group backward: returns gc = d(loss)/d(V) (the straight-through
// gradient) and sets *q to the element's FP4 value.
// kAct: v is 0 (activations).
template <bool kAct = false>
AF_HD float nvfp4_element_grad(float x, float v, float g, const Nvfp4Scale& sc, float* q) {
  const float y = nvfp4_y(x, kAct ? 0.0f : v, sc);
  *q = signed_fp4<kAct>(y);
  float gq = mul_rn(g, sc.r);
  return (fabs_(y) <= kFp4Max && y != 0.f) ? gq : 0.f;
}

// The group's sums over its elements, in element order, as autograd reduces them.
struct Nvfp4GroupSums {
  float g_os_y = 0.f;  // from y = x * os + v
  float g_r = 0.f;     // from Wq = q * r
  AF_HD void add(float x, float g, float gc, float q) {
    g_os_y = add_rn(g_os_y, mul_rn(gc, x));
    g_r = add_rn(g_r, mul_rn(g, q));
  }
  // d(loss)/d(m), m = amax * max_scale
  AF_HD float g_m(const Nvfp4Scale& sc, float gs, float inv_gs) const {
    // r = reciprocal(os): d os = -g_r * (r * r)
    float g_os = add_rn(g_os_y, mul_rn(-g_r, mul_rn(sc.r, sc.r)));
    return nvfp4_grad_through_scale(g_os, sc, gs, inv_gs);
  }
};

// Backward for one group. x: weight values (fp32), v: offsets, g: upstream gradient already
// rounded through the output dtype. Writes dV per element, returns d(loss)/d(max_scale).
// Also returns through g_m the gradient reaching m = amax * max_scale (for activations).
// kAct: activations (v is 0; pass nullptr).
template <bool kAct = false>
AF_HD float nvfp4_group_backward(const float* x, const float* v, const float* g, int n,
                                 float amax, float max_scale, float gs, float inv_gs,
                                 float* gv, float* g_m_out) {
  Nvfp4Scale sc = nvfp4_group_scale(amax, max_scale, gs, inv_gs);
  Nvfp4GroupSums sums;
  for (int j = 0; j < n; ++j) {
    float q;
    float gc = nvfp4_element_grad<kAct>(x[j], kAct ? 0.0f : v[j], g[j], sc, &q);
    gv[j] = gc;
    sums.add(x[j], g[j], gc, q);
  }
  float g_m = sums.g_m(sc, gs, inv_gs);
  if (g_m_out) *g_m_out = g_m;
  return mul_rn(g_m, amax);  // m = amax * max_scale
}

// Index of the first element of the group with |x| == amax (torch.max's index), without a
// run-time index into x, so that x can stay in registers.
AF_HD int first_argmax(const float* x, int n, float amax) {
  int arg = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = kNvfp4Group - 1; j >= 0; --j)
    if (j < n && fabs_(x[j]) == amax) arg = j;
  return arg;
}

// Gradient of one activation element: the straight-through path (dV-equivalent times os,
// rounded to the activation dtype by the .float() cast's backward) plus, on the group's first
// argmax, the path through max|x| (rounded to the dtype the max was taken in), summed in T.
template <typename T>
AF_HD float nvfp4_act_grad(float gc, float os, float g_m, float x, bool is_argmax) {
  float direct = round_through<T>(mul_rn(gc, os));
  if (!is_argmax) return direct;
  return add_rn(direct, round_through<T>(mul_rn(round_through<T>(g_m), sign_of(x))));
}

}  // namespace autoround_fast
