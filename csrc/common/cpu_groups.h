// The CPU kernels' loop over a row-major tensor's groups along its rows (NVFP4's 16, MX's 32),
// shared by their *_cpu.cpp files. Host only: it uses torch's parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

#include <torch/csrc/stable/ops.h>

#include "../dispatch.h"
#include "numerics.h"

namespace autoround_fast::cpu {

// Loads one group of n values as fp32 and its absolute maximum; returns the number of
// non-finite values.
template <typename T>
int load_group(const T* src, int n, float* x, float* amax) {
  int bad = 0;
  float m = 0.f;
  for (int j = 0; j < n; ++j) {
    x[j] = to_f32(src[j]);
    bad += !is_finite(x[j]);
    m = fmax_(m, fabs_(x[j]));
  }
  *amax = m;
  return bad;
}

// Runs fn(group_index, first_element, n) over every kGroup-element group of each row (the last
// one of a row may be shorter), kGrain groups at least per task.
template <int kGroup, int64_t kGrain, typename F>
void for_each_group(int64_t rows, int64_t cols, const F& fn) {
  const int64_t groups = ceil_div(cols, kGroup);
  torch::stable::parallel_for(0, rows * groups, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      fn(gi, r * cols + k * kGroup, static_cast<int>(std::min<int64_t>(kGroup, cols - k * kGroup)));
    }
  });
}

}  // namespace autoround_fast::cpu
