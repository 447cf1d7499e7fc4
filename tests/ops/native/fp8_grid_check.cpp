// The FP8 kernels' e4m3 rounding (fp8_grid and e4m3_magnitude in csrc/fp8/fp8.h) against
// torch's float -> float8_e4m3fn cast (c10::Float8_e4m3fn), bit for bit, for fp32 values in
// [-448, 448]: every STRIDE-th bit pattern (default 1: all 2.3e9, about 10 s), every bf16 and
// fp16 value, and the clamp beyond 448. Built and run by tests/ops/test_fp8_ops.py; `--mutant`
// rounds onto a grid twice as coarse, which the check must reject. Exit status 0: all match.
#include "fp8/fp8.h"

#include <c10/util/Float8_e4m3fn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace autoround_fast;

namespace {

bool mutant = false;
long values = 0, bad = 0;

float grid(float x) {
  if (!mutant) return fp8_grid(x);
  const float unit = bits_to_float(float_to_bits(max_num(fabs_(x), 0.015625f)) & 0x7f800000u);
  const float t = add_exact_product(fabs_(x), unit, 2097152.0f);  // the step doubled
  return add_rn(std::copysign(add_exact_product(t, -unit, 2097152.0f), x), 0.0f);
}

void check(float x) {
  const float c = x > 448.f ? 448.f : (x < -448.f ? -448.f : x);
  const float q = static_cast<float>(c10::Float8_e4m3fn(c));
  const float want = (q - c) + c;  // the straight-through estimator's value: a zero as +0
  const float got = grid(x);
  ++values;
  if (float_to_bits(got) != float_to_bits(want) && ++bad <= 5) std::printf("mismatch: x=%a got %a want %a\n", x, got, want);
  if (!mutant && std::fabs(c) <= 448.f && float_to_bits(e4m3_magnitude(std::fabs(c))) != float_to_bits(std::fabs(q)) && ++bad <= 5)
    std::printf("mismatch: |x|=%a magnitude %a want %a\n", c, e4m3_magnitude(std::fabs(c)), std::fabs(q));
}

}  // namespace

int main(int argc, char** argv) {
  uint32_t stride = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--mutant") == 0) mutant = true;
    if (std::strcmp(argv[i], "--stride") == 0 && i + 1 < argc) stride = static_cast<uint32_t>(std::atol(argv[++i]));
  }
  const uint32_t top = float_to_bits(448.0f);
  for (uint32_t u = 0; u <= top; u += stride)
    for (uint32_t sign : {0u, 0x80000000u}) check(bits_to_float(u | sign));
  for (uint32_t h = 0; h < 65536; ++h) {
    for (float x : {bf16_bits_to_float(static_cast<uint16_t>(h)), f16_bits_to_float(static_cast<uint16_t>(h))})
      if (std::isfinite(x)) check(x);
  }
  for (float x : {448.0f, 448.00003f, 464.0f, 480.0f, 1e30f, 3.4e38f}) check(x), check(-x);
  std::printf("%ld values, %ld mismatches\n", values, bad);
  return bad == 0 ? 0 : 1;
}
