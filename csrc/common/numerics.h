// Bit-exact scalar numerics shared by the CPU and CUDA kernels.
//
// Every rounding step that auto-round performs with a separate PyTorch op is a separate,
// correctly rounded operation here: no fused multiply-add, no fast-math reciprocal. The CPU
// build uses -ffp-contract=off, the CUDA build the explicit *_rn intrinsics, so both
// backends produce the same bits and match PyTorch's elementwise kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include "../formats.h"

#if defined(__CUDACC__)
#define AF_HD __host__ __device__ __forceinline__
#else
#define AF_HD inline
#endif

namespace autoround_fast {

// Storage types: the kernels read and write raw 16-bit patterns and convert themselves,
// so the same code runs on the host and the device without cuda_bf16.h or c10.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

AF_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

AF_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// Correctly rounded fp32 arithmetic, never contracted.
AF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
AF_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
AF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// a * b + c with one rounding (FFMA on the GPU; on the CPU std::fma, a libm call without -mfma).
AF_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
// torch.round: half to even.
AF_HD float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}
AF_HD float fmax_(float a, float b) { return a > b ? a : b; }
AF_HD float fmin_(float a, float b) { return a < b ? a : b; }
AF_HD float fabs_(float a) {
#if defined(__CUDA_ARCH__)
  return fabsf(a);  // the same bits; an operand modifier instead of a LOP3
#else
  return bits_to_float(float_to_bits(a) & 0x7fffffffu);
#endif
}
// max and min for operands that are never NaN and never a +0/-0 pair (the ternaries above
// tell those apart; these need not): one FMNMX on the GPU instead of a compare and a select.
AF_HD float max_num(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}
AF_HD float min_num(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}
// a + p * k where the product p * k is exact (a power of two times a small power of two): the
// add's one rounding; one FFMA on the GPU, where it is the same single rounding.
AF_HD float add_exact_product(float a, float p, float k) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(p, k, a);
#else
  return a + p * k;
#endif
}
AF_HD bool is_finite(float a) { return (float_to_bits(a) & 0x7f800000u) != 0x7f800000u; }
// torch.sign as a float factor: -1, 0 or +1.
AF_HD float sign_of(float a) { return a > 0.f ? 1.f : (a < 0.f ? -1.f : 0.f); }

// fp32 -> bf16, round to nearest even (as c10::BFloat16). On the GPU one cvt.rn instruction
// (IEEE round to nearest even, no flush: the same bits for every non-NaN input; a NaN comes
// out as the canonical 0x7fff where c10 writes 0x7fc0) instead of six integer ops and a NaN
// test: the activation kernels are bound by instruction issue, not memory.
AF_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // the bf16 cvt is sm_80 and later
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
#endif
}
AF_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// fp32 -> fp16, round to nearest even, subnormals kept, overflow to inf (as c10::Half).
AF_HD uint16_t float_to_f16_bits(float f) {
  uint32_t x = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00;  // NaN, as c10
#if defined(__CUDA_ARCH__)
  // IEEE round to nearest even with subnormals and overflow to inf, as below: one cvt.rn
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  if (x >= 0x477ff000u) return sign | 0x7c00;  // inf, and >= 65520 rounds to inf
  if (x < 0x38800000u) {                       // below 2^-14: fp16 subnormal, unit 2^-24
    float a = bits_to_float(x) * 16777216.0f;  // exact power-of-two scaling
    return sign | static_cast<uint16_t>(round_even(a));
  }
  x += 0xfffu + ((x >> 13) & 1u);
  return sign | static_cast<uint16_t>((x - (112u << 23)) >> 13);
#endif
}
AF_HD float f16_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  if ((h & 0x7c00u) != 0x7c00u) {  // finite: the conversion is exact, one cvt instruction
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
#endif
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1f;
  uint32_t m = h & 0x3ff;
  if (e == 0) {
    float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return bits_to_float(float_to_bits(v) | sign);
  }
  if (e == 31) return bits_to_float(sign | 0x7f800000u | (m << 13));
  return bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
}

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static AF_HD float load(float v) { return v; }
  static AF_HD float store(float v) { return v; }
};
template <> struct Cvt<bf16_t> {
  static AF_HD float load(bf16_t v) { return bf16_bits_to_float(v.bits); }
  static AF_HD bf16_t store(float v) { return bf16_t{float_to_bf16_bits(v)}; }
};
template <> struct Cvt<f16_t> {
  static AF_HD float load(f16_t v) { return f16_bits_to_float(v.bits); }
  static AF_HD f16_t store(float v) { return f16_t{float_to_f16_bits(v)}; }
};
template <typename T> AF_HD float to_f32(T v) { return Cvt<T>::load(v); }
template <typename T> AF_HD T from_f32(float v) { return Cvt<T>::store(v); }
// Round an fp32 value through T and back: the value a tensor of dtype T would hold.
template <typename T> AF_HD float round_through(float v) { return Cvt<T>::load(Cvt<T>::store(v)); }
#if defined(__CUDA_ARCH__)
// On the GPU fp16 round trips are two cvt instructions: round to nearest even with subnormals
// and overflow to inf, and the exact widening back (the same value for every non-NaN input;
// the bit-level paths above only tell NaN payloads apart, and a NaN stays a NaN).
template <> __device__ __forceinline__ float round_through<f16_t>(float v) {
  float r;
  asm("{ .reg .b16 h; cvt.rn.f16.f32 h, %1; cvt.f32.f16 %0, h; }" : "=f"(r) : "f"(v));
  return r;
}
#endif

// Scale dtypes are named by their c10::ScalarType codes (formats.h).
AF_HD float round_to_scale_dtype(float v, int code) {
  if (code == kHalf) return round_through<f16_t>(v);
  if (code == kBFloat16) return round_through<bf16_t>(v);
  return v;
}

// fp32 -> float8_e4m3fn -> fp32, round to nearest even, for |x| <= 448 (callers clamp).
AF_HD float e4m3_round(float x) {
  float a = fabs_(x);
  float q;
  if (a < 0.015625f) {  // below 2^-6: subnormal grid of 2^-9
    q = round_even(a * 512.0f) * 0.001953125f;
  } else {
    uint32_t u = float_to_bits(a);
    u += 0x7ffffu + ((u >> 20) & 1u);
    q = bits_to_float(u & 0xfff00000u);
  }
  return x < 0.f ? -q : q;
}

// |x| on the FP4 (e2m1) grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even, for a >= 0 (above 6
// it is 6), as auto-round's cast_to_fp4 computes it: round(2a)/2 below 2, round(a) below 4,
// 2*round(a/2) above. The grid's step is 0.5 below 2, 1 below 4, 2 above, i.e.
// step = 2^(max(e, 0) - 1) for a's exponent e. Adding C = step * 2^23 puts a where the fp32
// grid is the step, so the add itself rounds a to the step, ties to even (C is an even
// multiple of the step, so the parity of the sum's last bit is that of round_even(a / step));
// subtracting C back is exact. Two adds, a max and a mask, without a branch or a select:
// the same bits as the three-branch form for every fp32 a (checked over all 2^32 patterns).
AF_HD float fp4_magnitude(float a) {
  a = min_num(a, kFp4Max);
  const float unit = bits_to_float(float_to_bits(max_num(a, 1.0f)) & 0x7f800000u);  // 2^max(e, 0)
  const float t = add_exact_product(a, unit, 4194304.0f);                           // C = unit * 2^22
  return add_exact_product(t, -unit, 4194304.0f);
}

// 1/x with 1/0 -> 0 (auto-round's get_reciprocal in nvfp.py).
AF_HD float reciprocal_or_zero(float x) { return x == 0.f ? 0.f : div_rn(1.0f, x); }

// torch.floor (exact).
AF_HD float floor_(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}

// torch.clamp(a, lo, hi) for bounds lo < 0 < hi: NaN stays NaN, -0 stays -0. On the GPU
// the NaN-propagating min and max (two FMNMX instead of two compares and two selects).
AF_HD float clamp_(float a, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(lo));
  asm("min.NaN.f32 %0, %0, %1;" : "+f"(r) : "f"(hi));
  return r;
#else
  return a < lo ? lo : (a > hi ? hi : a);
#endif
}

// 2^e exactly, for -149 <= e <= 127 (built from its bits: subnormal below 2^-126).
AF_HD float exp2_int(int e) {
  return e >= -126 ? bits_to_float(static_cast<uint32_t>(e + 127) << 23)
                   : bits_to_float(1u << (e + 149));
}

// 2^e exactly, for -126 <= e <= 127 (normal): one shift.
AF_HD float exp2_normal(int e) { return bits_to_float(static_cast<uint32_t>(e + 127) << 23); }

// floor(log2(a)) exactly, for finite a > 0: a's binary exponent, subnormals included.
AF_HD int floor_log2(float a) {
  const uint32_t u = float_to_bits(a) & 0x7fffffffu;
  const int e = static_cast<int>(u >> 23);
  if (e != 0) return e - 127;
#if defined(__CUDA_ARCH__)
  return (31 - __clz(u)) - 149;  // u * 2^-149, u < 2^23
#else
  return (31 - __builtin_clz(u)) - 149;
#endif
}

}  // namespace autoround_fast
