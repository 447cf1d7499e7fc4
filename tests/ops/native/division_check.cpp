// The fast division (csrc/common/division.h) against IEEE division, bit for bit: divide_fast
// over its domain for every finite bf16 and fp16 x against every 23rd fp16 scale (both signs)
// and random fp32 pairs; divide, which takes the IEEE division outside the domain, for zeros,
// subnormals, infinities, NaN and values past the domain's bounds too. Built and run by
// tests/ops/test_ops.py; `--mutant` replaces the division by its first estimate
// (q0 = x * RN(1/s)), which the check must reject. Exit status: 0 when every pair matches.
#include "common/division.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace autoround_fast;

namespace {

bool mutant = false;
long pairs = 0, bad = 0;

float fast(float x, const Divider& d) { return mutant ? mul_rn(x, d.y) : divide_fast(x, d); }

void check(float got, float x, float s) {
  const float want = x / s;
  ++pairs;
  const bool same = float_to_bits(got) == float_to_bits(want) || (std::isnan(got) && std::isnan(want));
  if (!same && ++bad <= 5) std::printf("mismatch: x=%a s=%a got %a want %a\n", x, s, got, want);
}

// divide_fast where x is in the domain or zero; divide everywhere.
void check_pair(float x, const Divider& d) {
  if (x == 0.f || in_fast_domain(x, d)) check(fast(x, d), x, d.s);
  check(mutant ? mul_rn(x, d.y) : divide(x, d), x, d.s);
}

}  // namespace

int main(int argc, char** argv) {
  mutant = argc > 1 && std::strcmp(argv[1], "--mutant") == 0;
  std::vector<float> xs;
  for (uint32_t h = 0; h < 65536; ++h)
    for (float x : {bf16_bits_to_float(static_cast<uint16_t>(h)), f16_bits_to_float(static_cast<uint16_t>(h))})
      xs.push_back(x);  // NaN and infinities included: divide takes them to the IEEE division
  for (float x : {0x1p-61f, 0x1p-60f, 0x1p62f, 0x1.fffffep61f, 0x1p-149f, 0x1p-126f, 3e38f})
    xs.insert(xs.end(), {x, -x});
  long outside = 0;
  for (uint32_t h = 1; h < 65536; h += 23) {
    const float s = f16_bits_to_float(static_cast<uint16_t>(h));
    if (!std::isfinite(s) || s == 0.f) continue;
    const Divider d = make_divider(s);
    if (d.xmax < 0.f) {  // every finite nonzero fp16 scale is in the domain
      std::printf("scale %a outside the domain\n", s);
      ++outside;
      continue;
    }
    for (float x : xs) check_pair(x, d);
  }
  std::mt19937_64 gen(20261128);
  for (int i = 0; i < 2000000; ++i) {
    const uint64_t u = gen();
    const uint32_t se = 127 - 24 + static_cast<uint32_t>(u % 40);  // |s| in [2^-24, 2^16)
    const float s = bits_to_float((static_cast<uint32_t>(u >> 8) & 0x807fffffu) | (se << 23));
    const int hi = std::min(static_cast<int>(se) - 127 + 41, 63), lo = -62;  // past the bounds too
    const uint32_t xe = static_cast<uint32_t>(127 + lo + static_cast<int>((u >> 40) % (hi - lo + 1)));
    const float x = bits_to_float((static_cast<uint32_t>(gen()) & 0x807fffffu) | (xe << 23));
    check_pair(x, make_divider(s));
  }
  std::printf("%ld pairs, %ld mismatches, %ld scales outside the domain\n", pairs, bad, outside);
  return bad == 0 && outside == 0 ? 0 : 1;
}
