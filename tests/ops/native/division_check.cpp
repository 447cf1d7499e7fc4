// The fast division (csrc/common/division.h) against IEEE division, bit for bit: divide_fast
// over its range (x = 0 or 2^-80 <= |x| <= 2^40 |s|) for every finite bf16 and fp16 x against
// every 23rd fp16 scale (both signs) and random fp32 pairs; and the kernels' selection
// (in_fast_domain) never outside that range: not for zeros, subnormals, infinities, NaN,
// values past the bounds, nor for any x under a scale outside 2^-24 <= |s| <= 2^16. Built and
// run by tests/ops/test_ops.py; `--mutant` replaces the division by its first estimate
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
long pairs = 0, bad = 0, outside = 0;

// divide_fast's range for x under d, as proven, written apart from division.h's own bounds
bool in_range(float x, const Divider& d) {
  const float as = std::fabs(d.s);
  const bool scale_ok = as >= 0x1p-24f && as <= 0x1p16f;
  return scale_ok && (x == 0.f || (std::fabs(x) >= 0x1p-80f && std::fabs(x) <= 0x1p40f * as));
}

void check_pair(float x, const Divider& d) {
  if (in_fast_domain(x, d) && !in_range(x, d) && ++outside <= 5)
    std::printf("selected outside the range: x=%a s=%a\n", x, d.s);
  if (!in_range(x, d)) return;
  const float want = x / d.s, got = mutant ? mul_rn(x, d.y) : divide_fast(x, d);
  ++pairs;
  if (float_to_bits(got) != float_to_bits(want) && ++bad <= 5)
    std::printf("mismatch: x=%a s=%a got %a want %a\n", x, d.s, got, want);
}

}  // namespace

int main(int argc, char** argv) {
  mutant = argc > 1 && std::strcmp(argv[1], "--mutant") == 0;
  std::vector<float> xs;
  for (uint32_t h = 0; h < 65536; ++h)
    for (float x : {bf16_bits_to_float(static_cast<uint16_t>(h)), f16_bits_to_float(static_cast<uint16_t>(h))})
      xs.push_back(x);  // NaN and infinities included
  for (float x : {0x1p-81f, 0x1p-80f, 0x1p-61f, 0x1p-60f, 0x1p62f, 0x1p-149f, 0x1p-126f, 3e38f})
    xs.insert(xs.end(), {x, -x});
  long scales_outside = 0;
  for (uint32_t h = 1; h < 65536; h += 23) {
    const float s = f16_bits_to_float(static_cast<uint16_t>(h));
    if (!std::isfinite(s) || s == 0.f) continue;
    const Divider d = make_divider(s);
    if (d.xmax < 0.f) {  // every finite nonzero fp16 scale is in the range
      std::printf("scale %a outside the range\n", s);
      ++scales_outside;
      continue;
    }
    for (float x : xs) check_pair(x, d);
  }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (float s : {0x1p-25f, 0x1p-140f, 0x1.000002p16f, 0x1p17f, 1e30f, 3.4e38f, inf, nan, 0.f}) {
    for (float sign : {1.f, -1.f}) {
      const Divider d = make_divider(sign * s);
      for (float x : xs)
        if (in_fast_domain(x, d) && ++outside <= 5) std::printf("selected under a scale outside: s=%a\n", d.s);
    }
  }
  std::mt19937_64 gen(20261128);
  for (int i = 0; i < 2000000; ++i) {
    const uint64_t u = gen();
    const uint32_t se = 127 - 24 + static_cast<uint32_t>(u % 40);  // |s| in [2^-24, 2^16)
    const float s = bits_to_float((static_cast<uint32_t>(u >> 8) & 0x807fffffu) | (se << 23));
    const int hi = static_cast<int>(se) - 127 + 41, lo = -82;  // past the bounds too
    const uint32_t xe = static_cast<uint32_t>(127 + lo + static_cast<int>((u >> 40) % (hi - lo + 1)));
    const float x = bits_to_float((static_cast<uint32_t>(gen()) & 0x807fffffu) | (xe << 23));
    check_pair(x, make_divider(s));
  }
  std::printf("%ld pairs, %ld mismatches, %ld scales outside the range, %ld selected outside\n", pairs, bad,
              scales_outside, outside);
  return bad == 0 && scales_outside == 0 && outside == 0 ? 0 : 1;
}
