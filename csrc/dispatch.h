// Runs f(T{}) with T the storage type for a c10::ScalarType code (float, bf16_t, f16_t).
#pragma once

#include <type_traits>

#include "common/numerics.h"

namespace autoround_fast {

template <typename F>
bool with_float_type(int code, F&& f) {
  switch (code) {
    case kFloat: f(float{}); return true;
    case kBFloat16: f(bf16_t{}); return true;
    case kHalf: f(f16_t{}); return true;
    default: return false;
  }
}

// Runs f(flag) with flag a std::bool_constant of the run-time one.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Runs f(T{}, vec) with vec a std::bool_constant of the run-time flag (the kernels' 16-byte
// path or their guarded scalar one).
template <typename F>
void with_type_and_vec(int code, bool vec, F&& f) {
  with_float_type(code, [&](auto t) { with_flag(vec, [&](auto v) { f(t, v); }); });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace autoround_fast
