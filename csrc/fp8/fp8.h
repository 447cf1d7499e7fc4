// FP8 (e4m3) fake quantization, forward and backward, for one tensor-wide or one per-row scale
// (auto-round 0.15.1, data_type/fp8.py: quant_fp8_sym; python/autoround_fast/reference.py's
// fake_quant_fp8 and fake_quant_fp8_activation). All in fp32, in this order:
//   amax = max|W_g| (of the weight as given, or the caller's weight_amax for a per-tensor
//          weight; activations: the calibrated act_max)
//   z    = (amax * max_scale) / 448
//   s    = to_fp32(to_scale_dtype(max(z, 1/(448*512))))
//   y    = x / s + V          (x: W in fp32, an fp16 W rounded to bf16 first; activations V = 0)
//   Wq   = e4m3(clamp(y, -448, 448)) * s     (then cast to W's dtype)
// Backward is autograd through those ops, e4m3 straight through:
//   dV   = (|y| <= 448) ? g * s : 0
//   dS   = sum_j g_j * q_j  +  sum_j -dV_j * ((x_j / s) / s)    (two sums, then added)
//   dMax = ((z >= 1/(448*512) ? round_to_scale_dtype(dS) : 0) / 448) * amax
// The order of every sum is fixed (below), shared by the CPU and CUDA kernels, so both give
// the same bits on every run.
#pragma once

#include <type_traits>

#include "../common/division.h"
#include "../common/numerics.h"

namespace autoround_fast {

constexpr float kInvE4m3Max = 1.0f / kE4m3Max;  // fp32(1/448), as PyTorch's CUDA division takes it

// z / 448 as PyTorch divides an fp32 tensor by a Python scalar: the CUDA kernel multiplies by
// the fp32 reciprocal of the scalar (BinaryDivTrueKernel.cu's CPU-scalar path), the CPU kernel
// divides. The two differ in the last bit for about half of all z, so each device follows its
// own: the oracle, and auto-round, compute the scale with that division on whichever device
// the weight is.
AF_HD float div_by_e4m3_max(float z) {
#if defined(__CUDA_ARCH__)
  return mul_rn(z, kInvE4m3Max);
#else
  return div_rn(z, kE4m3Max);
#endif
}

struct Fp8Scale {
  float z;      // amax * max_scale / 448, before the floor
  float s;      // the scale: z floored at kFp8ScaleMin, rounded through the scale dtype
  Divider div;  // x / s for the group's elements (common/division.h: IEEE division's bits)
};

AF_HD Fp8Scale fp8_scale(float amax, float max_scale, int scale_dtype) {
  Fp8Scale r;
  r.z = div_by_e4m3_max(mul_rn(amax, max_scale));
  r.s = round_to_scale_dtype(r.z < kFp8ScaleMin ? kFp8ScaleMin : r.z, scale_dtype);
  r.div = make_divider(r.s);
  return r;
}

// The value the quantizer divides: W's fp32 value, an fp16 weight (or activation) rounded to
// bf16 first, as auto-round does "to avoid NaN gradients with float16".
// From the fp32 value of a T.
template <typename T>
AF_HD float fp8_x(float w) {
  if constexpr (std::is_same_v<T, f16_t>) return round_through<bf16_t>(w);
  return w;
}
template <typename T>
AF_HD float fp8_input(T w) { return fp8_x<T>(to_f32(w)); }

// a = |c| rounded onto the e4m3 grid, half to even, for 0 <= a <= 448: numerics.h's
// e4m3_round without its branch between the subnormal and the normal grid (a divergent branch
// per element on the GPU). The grid's step is 2^(max(e, -6) - 3) for a's exponent e; adding
// C = step * 2^23 puts a where the fp32 grid is that step, so the add itself rounds, ties to
// even (C is an even multiple of the step); subtracting C back is exact. numerics.h's
// fp4_magnitude does the same for FP4. Equal to torch's cast for every fp32 |c| <= 448
// (tests/ops/native/fp8_grid_check.cpp checks all of them).
AF_HD float e4m3_magnitude(float a) {
  const float unit = bits_to_float(float_to_bits(max_num(a, 0.015625f)) & 0x7f800000u);  // 2^max(e, -6)
  const float t = add_exact_product(a, unit, 1048576.0f);                                // C = unit * 2^20
  return add_exact_product(t, -unit, 1048576.0f);
}

// e4m3(clamp(y, -448, 448)) as the straight-through estimator leaves it: (q - c) + c is q (the
// subtraction is exact, q being within a factor 2 of c) except that a zero comes out +0. y is
// never NaN (finite inputs; an overflowing x / s is +-inf, which the clamp takes to +-448).
AF_HD float fp8_grid(float y) {
  const float q = e4m3_magnitude(min_num(fabs_(y), kE4m3Max));
  return add_rn(bits_to_float(float_to_bits(q) | (float_to_bits(y) & 0x80000000u)), 0.0f);
}

// y = x / s + V, the element's position on the e4m3 grid. kNoV (activations): auto-round adds
// a zero V, which only turns -0 into +0; y is used only through |y| and fp8_grid, the same for
// either zero, so the add is skipped.
template <bool kNoV = false>
AF_HD float fp8_y(float t, float v) { return kNoV ? t : add_rn(t, v); }

// One element's fake-quantized fp32 value (before the cast to W's dtype). d: the group's
// Fp8Scale::div, whose s is the scale.
template <bool kNoV = false>
AF_HD float fp8_qdq(float x, float v, const Divider& d) {
  return mul_rn(fp8_grid(fp8_y<kNoV>(divide(x, d), v)), d.s);
}

// The two sums of dS, each in its own fixed order.
struct Fp8Sums {
  float a = 0.f;  // sum g * q               (from Wq = q * s)
  float b = 0.f;  // sum -dV * ((x / s) / s)  (from y = x / s + V)
};

AF_HD void fp8_sums_add(Fp8Sums& x, const Fp8Sums& y) {
  x.a = add_rn(x.a, y.a);
  x.b = add_rn(x.b, y.b);
}

// One element of the backward: dV (the gradient reaching y) and the element's terms of the
// two sums.
struct Fp8Terms {
  float gy, a, b;
};
template <bool kNoV = false>
AF_HD Fp8Terms fp8_element_terms(float x, float v, float g, const Divider& d) {
  const float t = divide(x, d);
  const float y = fp8_y<kNoV>(t, v);
  const float gy = fabs_(y) <= kE4m3Max ? mul_rn(g, d.s) : 0.f;  // clip's backward, bounds inclusive
  return {gy, mul_rn(g, fp8_grid(y)), mul_rn(-gy, divide(t, d))};
}

// fp8_element_terms, the terms added to acc (in element order); returns dV. Adding a +0 term
// (an element past the end) changes no sum: a sum that starts at +0 never becomes -0.
template <bool kNoV = false>
AF_HD float fp8_element_backward(float x, float v, float g, const Divider& d, Fp8Sums& acc) {
  const Fp8Terms e = fp8_element_terms<kNoV>(x, v, g, d);
  acc.a = add_rn(acc.a, e.a);
  acc.b = add_rn(acc.b, e.b);
  return e.gy;
}

// From the group's two sums to d(loss)/d(max_scale).
AF_HD float fp8_grad_max_scale(const Fp8Sums& sums, const Fp8Scale& sc, float amax, int scale_dtype) {
  // the casts to the scale dtype and back round the gradient through that dtype
  const float g_s = round_to_scale_dtype(add_rn(sums.a, sums.b), scale_dtype);
  const float g_z = sc.z >= kFp8ScaleMin ? g_s : 0.f;  // clip's backward at the floor
  // z = (amax * max_scale) / 448. The division, on both devices: PyTorch's CUDA autograd
  // multiplies by fp32(1/448) here too (a last-bit difference, within the closeness the sums
  // leave), but one formula lets the CPU and the GPU agree where their scales do.
  return mul_rn(div_rn(g_z, kE4m3Max), amax);
}

// The activation's gradient: dV / s in fp32, rounded to x's dtype, an fp16 x through bf16 (the
// backward of its cast to bf16).
template <typename T>
AF_HD T fp8_act_grad(float gy, const Divider& d) {
  const float g = divide(gy, d);
  if constexpr (std::is_same_v<T, f16_t>) return from_f32<T>(round_through<bf16_t>(g));
  return from_f32<T>(g);
}

// ---- The order of the sums over a whole tensor (per-tensor weights, activations) ----
// The flat tensor is cut into tiles of kFp8Tile elements; in a tile, "thread" t sums elements
// [t * kFp8Chunk, (t + 1) * kFp8Chunk) in order (from +0); the 32 thread sums of each warp
// combine by the tree s[l] += s[l + off], off = 16, 8, 4, 2, 1 (a shuffle-down on the GPU),
// and the kFp8Warps warp sums add in warp order: the tile's partial. The tile partials then
// reduce the same way: final "thread" t sums tiles [t * k, (t + 1) * k) in order, k =
// ceil(tiles / kFp8Threads), and those kFp8Threads sums combine as a tile's do.
// A row of a per-row weight is summed sequentially, element by element, from +0.
constexpr int kFp8Threads = 256;
constexpr int kFp8Warps = kFp8Threads / 32;
constexpr int kFp8Chunk = 8;
constexpr int64_t kFp8Tile = kFp8Threads * kFp8Chunk;

// The tree and the warp-order sum over kFp8Threads thread sums (s is overwritten).
inline Fp8Sums fp8_combine_threads(Fp8Sums* s) {
  Fp8Sums total;
  for (int w = 0; w < kFp8Warps; ++w) {
    Fp8Sums* lane = s + w * 32;
    for (int off = 16; off > 0; off /= 2)
      for (int l = 0; l < off; ++l) fp8_sums_add(lane[l], lane[l + off]);
    fp8_sums_add(total, lane[0]);
  }
  return total;
}

// Elements per final "thread" of the tile partials' reduction.
AF_HD int64_t fp8_partials_per_thread(int64_t tiles) { return (tiles + kFp8Threads - 1) / kFp8Threads; }

}  // namespace autoround_fast
