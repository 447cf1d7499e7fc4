// The INT kernels' fast division (int_divide<true> in csrc/int/int_quant.h) against IEEE
// division, bit for bit: every finite bf16 and fp16 x against every 23rd fp16 scale
// (both signs), and random fp32 pairs, over the domain the kernels take it in (int_divider).
// Built and run by tests/test_ops.py; `--mutant` replaces the division by its first estimate
// (q0 = x * RN(1/s)), which the check must reject. Exit status: 0 when every pair matches.
#include "int/int_quant.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

using namespace autoround_fast;

namespace {

bool mutant = false;
long pairs = 0, bad = 0;

float divide(float x, const IntScale& sc) { return mutant ? mul_rn(x, sc.y) : int_divide<true, true>(x, sc); }

// The domain's widest group for scale s: its largest magnitude (int_divider's bounds).
float widest(float s) { return std::min(std::fabs(s) * 0x1p40f, 0x1p62f); }

void check(float x, float s, const IntScale& sc) {
  const float want = x / s, got = divide(x, sc);
  ++pairs;
  if (float_to_bits(got) != float_to_bits(want) && ++bad <= 5)
    std::printf("mismatch: x=%a s=%a got %a want %a\n", x, s, got, want);
}

IntScale group(float s) {
  IntScale sc{};
  sc.s = s;
  int_divider(sc, -widest(s), widest(s));
  return sc;
}

}  // namespace

int main(int argc, char** argv) {
  mutant = argc > 1 && std::strcmp(argv[1], "--mutant") == 0;
  std::vector<float> xs;
  for (uint32_t h = 0; h < 65536; ++h)
    for (float x : {bf16_bits_to_float(static_cast<uint16_t>(h)), f16_bits_to_float(static_cast<uint16_t>(h))})
      if (std::isfinite(x)) xs.push_back(x);
  long outside = 0;
  for (uint32_t h = 1; h < 65536; h += 23) {
    const float s = f16_bits_to_float(static_cast<uint16_t>(h));
    if (!std::isfinite(s) || s == 0.f) continue;
    const IntScale sc = group(s);
    if (!sc.fast) {  // every finite nonzero fp16 scale is in the domain
      std::printf("scale %a outside the domain\n", s);
      ++outside;
      continue;
    }
    for (float x : xs)  // zeros through the zero select; nonzero x down to 2^-80
      if (std::fabs(x) <= widest(s) && (x == 0.f || std::fabs(x) >= 0x1p-80f)) check(x, s, sc);
  }
  std::mt19937_64 gen(20261128);
  for (int i = 0; i < 2000000; ++i) {
    const uint64_t u = gen();
    const uint32_t se = 127 - 24 + static_cast<uint32_t>(u % 40);  // |s| in [2^-24, 2^16)
    const float s = bits_to_float((static_cast<uint32_t>(u >> 8) & 0x807fffffu) | (se << 23));
    const int hi = std::min(static_cast<int>(se) - 127 + 40, 61), lo = -80;
    const uint32_t xe = static_cast<uint32_t>(127 + lo + static_cast<int>((u >> 40) % (hi - lo + 1)));
    const float x = bits_to_float((static_cast<uint32_t>(gen()) & 0x807fffffu) | (xe << 23));
    if (std::fabs(x) <= widest(s)) check(x, s, group(s));
  }
  std::printf("%ld pairs, %ld mismatches, %ld scales outside the domain\n", pairs, bad, outside);
  return bad == 0 && outside == 0 ? 0 : 1;
}
