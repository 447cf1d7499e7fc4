#include <atomic>

#include <torch/csrc/stable/ops.h>

#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "int_quant.h"

namespace autoround_fast::cpu {
namespace {

template <typename T>
int group_min_max(const T* src, int64_t n, float* wmin, float* wmax) {
  int bad = 0;
  float lo = 0.f, hi = 0.f;  // min(W, 0) and max(W, 0)
  for (int64_t j = 0; j < n; ++j) {
    float x = to_f32(src[j]);
    bad += !is_finite(x);
    lo = fmin_(lo, x);
    hi = fmax_(hi, x);
  }
  *wmin = group_extreme(lo);
  *wmax = group_extreme(hi);
  return bad;
}

template <typename T>
int64_t int_forward(const IntArgs& a, T* out, void* scale, float* zp) {
  const T* w = static_cast<const T*>(a.weight);
  const int64_t groups = a.groups;
  const IntParams p{a.bits, a.sym, a.scale_dtype, quotient_dtype(a.dtype, a.scale_dtype)};
  std::atomic<int64_t> bad{0};
  torch::stable::parallel_for(0, a.rows * groups, 16, [&](int64_t begin, int64_t end) {
    int64_t local_bad = 0;
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      const int64_t base = r * a.cols + k * a.group;
      const int64_t n = std::min<int64_t>(a.group, a.cols - k * a.group);
      float wmin, wmax;
      local_bad += group_min_max(w + base, n, &wmin, &wmax);
      IntScale sc = int_group_scale(wmin, wmax, a.min_scale[gi], a.max_scale[gi], p);
      int_store_scale(scale, gi, sc.s, a.scale_dtype);
      zp[gi] = sc.zp;
      for (int64_t j = 0; j < n; ++j) {  // each element's quotient is exact on either path
        const float x = to_f32(w[base + j]);
        const float q = sc.fast && int_fast_element(x) ? int_qdq<true>(x, a.v[base + j], sc, p)
                                                       : int_qdq<false>(x, a.v[base + j], sc, p);
        out[base + j] = from_f32<T>(q);
      }
    }
    bad += local_bad;
  });
  return bad.load();
}

template <typename T>
void int_backward(const IntArgs& a, const T* grad, float* grad_v, float* g_min, float* g_max) {
  const T* w = static_cast<const T*>(a.weight);
  const int64_t groups = a.groups;
  const IntParams p{a.bits, a.sym, a.scale_dtype, quotient_dtype(a.dtype, a.scale_dtype)};
  torch::stable::parallel_for(0, a.rows * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      const int64_t base = r * a.cols + k * a.group;
      const int64_t n = std::min<int64_t>(a.group, a.cols - k * a.group);
      float wmin, wmax;
      group_min_max(w + base, n, &wmin, &wmax);
      IntScale sc = int_group_scale(wmin, wmax, a.min_scale[gi], a.max_scale[gi], p);
      // Replay the CUDA kernel's order: per-lane sums, then an xor butterfly.
      IntPartials lane[kLanes] = {};
      const bool group_fast = int_second_division_fast(sc, wmin, wmax, p);
      for (int64_t j = 0; j < n; ++j) {
        const float x = to_f32(w[base + j]), g = to_f32(grad[base + j]);
        IntPartials& acc = lane[lane_of(static_cast<int>(j))];
        if (group_fast && int_fast_element(x))
          int_element_backward<true>(x, a.v[base + j], g, sc, p, grad_v + base + j, acc);
        else
          int_element_backward<false>(x, a.v[base + j], g, sc, p, grad_v + base + j, acc);
      }
      for (int off = kLanes / 2; off > 0; off /= 2) {
        IntPartials next[kLanes];
        for (int l = 0; l < kLanes; ++l) {
          next[l] = lane[l];
          int_partials_add(next[l], lane[l ^ off]);
        }
        for (int l = 0; l < kLanes; ++l) lane[l] = next[l];
      }
      int_group_scale_backward(lane[0], wmin, wmax, sc, p, g_min + gi, g_max + gi);
    }
  });
}

}  // namespace

int64_t fake_quant_int(const IntArgs& a, void* out, void* scale, float* zero_point) {
  int64_t bad = 0;
  with_float_type(a.dtype, [&](auto t) {
    bad = int_forward(a, static_cast<decltype(t)*>(out), scale, zero_point);
  });
  return bad;
}

void fake_quant_int_backward(const IntArgs& a, const void* grad, float* grad_v, float* g_min,
                             float* g_max) {
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    int_backward(a, static_cast<const T*>(grad), grad_v, g_min, g_max);
  });
}

}  // namespace autoround_fast::cpu
