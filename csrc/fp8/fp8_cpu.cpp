// FP8 (e4m3) fake quantization on the CPU: fp8.h's math, and its order of the sums over a
// tensor, replayed tile by tile, so that the CPU and the GPU give the same bits.
#include <algorithm>
#include <atomic>
#include <vector>

#include <torch/csrc/stable/ops.h>

#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "fp8.h"

namespace autoround_fast::cpu {
namespace {

constexpr int64_t kGrain = 16384;

// max|p| over n values (of the values as given: an fp16 weight's own), and the number of
// non-finite ones.
template <typename T>
int64_t abs_max(const T* p, int64_t n, float* amax) {
  int64_t bad = 0;
  float m = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float x = to_f32(p[j]);
    bad += !is_finite(x);
    m = fmax_(m, fabs_(x));
  }
  *amax = m;
  return bad;
}

// A per-tensor weight's max|W|: as given, else over the whole tensor in parallel (a maximum
// is exact in any order).
template <typename T>
float tensor_amax(const Fp8Args& a, const T* w) {
  if (a.amax) return *a.amax;
  const int64_t n = a.rows * a.cols, chunks = ceil_div(n, kGrain);
  std::vector<float> part(chunks);
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) abs_max(w + c * kGrain, std::min(kGrain, n - c * kGrain), &part[c]);
  });
  float m = 0.f;
  for (float x : part) m = fmax_(m, x);
  return m;
}

// f(i) for every i < n, in parallel; returns how many of x[0..n) are not finite.
template <typename T, typename F>
int64_t for_each_counting_non_finite(const T* x, int64_t n, const F& f) {
  std::atomic<int64_t> bad{0};
  torch::stable::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t i = begin; i < end; ++i) {
      local += !is_finite(to_f32(x[i]));
      f(i);
    }
    if (local) bad += local;
  });
  return bad.load();
}

// The sums of the flat tensor's backward in fp8.h's order: element(i, acc) adds element i's
// terms to acc (and writes its gradient). Tiles run in parallel; each replays the GPU block's
// threads and tree.
template <typename F>
Fp8Sums tensor_sums(int64_t n, const F& element) {
  const int64_t tiles = ceil_div(n, kFp8Tile);
  std::vector<Fp8Sums> part(tiles);
  torch::stable::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    Fp8Sums th[kFp8Threads];
    for (int64_t t = begin; t < end; ++t) {
      for (int k = 0; k < kFp8Threads; ++k) {
        th[k] = Fp8Sums{};
        const int64_t i0 = t * kFp8Tile + k * kFp8Chunk, i1 = std::min(i0 + kFp8Chunk, n);
        for (int64_t i = i0; i < i1; ++i) element(i, th[k]);
      }
      part[t] = fp8_combine_threads(th);
    }
  });
  Fp8Sums th[kFp8Threads];
  const int64_t per = fp8_partials_per_thread(tiles);
  for (int k = 0; k < kFp8Threads; ++k)
    for (int64_t i = k * per; i < std::min((k + 1) * per, tiles); ++i) fp8_sums_add(th[k], part[i]);
  return fp8_combine_threads(th);
}

template <typename T>
int64_t fp8_forward(const Fp8Args& a, T* out, float* scale) {
  const T* w = static_cast<const T*>(a.weight);
  const int64_t n = a.rows * a.cols;
  if (a.per_tensor) {
    const Fp8Scale sc = fp8_scale(tensor_amax(a, w), a.max_scale[0], a.scale_dtype);
    scale[0] = sc.s;
    return for_each_counting_non_finite(
        w, n, [&](int64_t i) { out[i] = from_f32<T>(fp8_qdq(fp8_input(w[i]), a.v[i], sc.div)); });
  }
  std::atomic<int64_t> bad{0};
  torch::stable::parallel_for(0, a.rows, std::max<int64_t>(1, kGrain / a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * a.cols;
      float amax;
      if (int64_t b = abs_max(w + base, a.cols, &amax)) bad += b;
      const Fp8Scale sc = fp8_scale(amax, a.max_scale[r], a.scale_dtype);
      scale[r] = sc.s;
      for (int64_t j = base; j < base + a.cols; ++j) out[j] = from_f32<T>(fp8_qdq(fp8_input(w[j]), a.v[j], sc.div));
    }
  });
  return bad.load();
}

template <typename T>
void fp8_backward(const Fp8Args& a, const T* grad, float* grad_v, float* grad_ms) {
  const T* w = static_cast<const T*>(a.weight);
  const int64_t n = a.rows * a.cols;
  if (a.per_tensor) {
    const float amax = tensor_amax(a, w);
    const Fp8Scale sc = fp8_scale(amax, a.max_scale[0], a.scale_dtype);
    const Fp8Sums sums = tensor_sums(n, [&](int64_t i, Fp8Sums& acc) {
      grad_v[i] = fp8_element_backward(fp8_input(w[i]), a.v[i], to_f32(grad[i]), sc.div, acc);
    });
    grad_ms[0] = fp8_grad_max_scale(sums, sc, amax, a.scale_dtype);
    return;
  }
  // one row: sequentially, element by element
  torch::stable::parallel_for(0, a.rows, std::max<int64_t>(1, kGrain / a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * a.cols;
      float amax;
      abs_max(w + base, a.cols, &amax);
      const Fp8Scale sc = fp8_scale(amax, a.max_scale[r], a.scale_dtype);
      Fp8Sums acc;
      for (int64_t j = base; j < base + a.cols; ++j)
        grad_v[j] = fp8_element_backward(fp8_input(w[j]), a.v[j], to_f32(grad[j]), sc.div, acc);
      grad_ms[r] = fp8_grad_max_scale(acc, sc, amax, a.scale_dtype);
    }
  });
}

template <typename T>
int64_t act_forward(const Fp8ActArgs& a, T* out) {
  const T* x = static_cast<const T*>(a.x);
  const Divider d = fp8_scale(*a.act_max, *a.max_scale, a.scale_dtype).div;
  return for_each_counting_non_finite(
      x, a.numel, [&](int64_t i) { out[i] = from_f32<T>(fp8_qdq<true>(fp8_input(x[i]), 0.f, d)); });
}

template <typename T>
void act_backward(const Fp8ActArgs& a, const T* grad, T* grad_x, float* grad_ms) {
  const T* x = static_cast<const T*>(a.x);
  const float act_max = *a.act_max;
  const Fp8Scale sc = fp8_scale(act_max, *a.max_scale, a.scale_dtype);
  const Fp8Sums sums = tensor_sums(a.numel, [&](int64_t i, Fp8Sums& acc) {
    grad_x[i] = fp8_act_grad<T>(fp8_element_backward<true>(fp8_input(x[i]), 0.f, to_f32(grad[i]), sc.div, acc), sc.div);
  });
  *grad_ms = fp8_grad_max_scale(sums, sc, act_max, a.scale_dtype);
}

}  // namespace

int64_t fake_quant_fp8(const Fp8Args& a, void* out, float* scale) {
  int64_t bad = 0;
  with_float_type(a.dtype, [&](auto t) { bad = fp8_forward(a, static_cast<decltype(t)*>(out), scale); });
  return bad;
}

void fake_quant_fp8_backward(const Fp8Args& a, const void* grad, float* grad_v, float* grad_max_scale) {
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    fp8_backward(a, static_cast<const T*>(grad), grad_v, grad_max_scale);
  });
}

int64_t fake_quant_fp8_activation(const Fp8ActArgs& a, void* out) {
  int64_t bad = 0;
  with_float_type(a.dtype, [&](auto t) { bad = act_forward(a, static_cast<decltype(t)*>(out)); });
  return bad;
}

void fake_quant_fp8_activation_backward(const Fp8ActArgs& a, const void* grad, void* grad_x, float* grad_max_scale) {
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    act_backward(a, static_cast<const T*>(grad), static_cast<T*>(grad_x), grad_max_scale);
  });
}

}  // namespace autoround_fast::cpu
