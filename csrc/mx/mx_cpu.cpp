#include <atomic>

#include <torch/csrc/stable/ops.h>

#include "../common/cpu_groups.h"
#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "mx.h"

namespace autoround_fast::cpu {
namespace {

constexpr int64_t kGrain = 512;

template <int kBits, typename T>
int64_t mx_forward(const MxArgs& a, T* out, float* exps) {
  const T* w = static_cast<const T*>(a.weight);
  std::atomic<int64_t> bad{0};
  for_each_group<kMxGroup, kGrain>(a.rows, a.cols, [&](int64_t gi, int64_t base, int n) {
    float x[kMxGroup], amax;
    if (int b = load_group(w + base, n, x, &amax)) bad += b;
    const MxScale sc = mx_group_scale<kBits>(amax, a.max_scale[gi]);
    exps[gi] = sc.e;
    for (int j = 0; j < n; ++j) out[base + j] = from_f32<T>(mx_qdq<kBits>(x[j], a.v[base + j], sc));
  });
  return bad.load();
}

template <int kBits, typename T>
void mx_backward(const MxArgs& a, const T* grad, float* grad_v, float* grad_ms) {
  const T* w = static_cast<const T*>(a.weight);
  for_each_group<kMxGroup, kGrain>(a.rows, a.cols, [&](int64_t gi, int64_t base, int n) {
    float x[kMxGroup], g[kMxGroup], amax;
    load_group(w + base, n, x, &amax);
    for (int j = 0; j < n; ++j) g[j] = to_f32(grad[base + j]);
    const MxScale sc = mx_group_scale<kBits>(amax, a.max_scale[gi]);
    grad_ms[gi] = mul_rn(mx_group_backward<kBits>(x, a.v + base, g, n, sc, grad_v + base), amax);
  });
}

template <int kBits, typename T>
int64_t act_forward(const MxActArgs& a, T* out) {
  const T* xin = static_cast<const T*>(a.x);
  std::atomic<int64_t> bad{0};
  for_each_group<kMxGroup, kGrain>(a.rows, a.cols, [&](int64_t, int64_t base, int n) {
    float x[kMxGroup], amax;
    if (int b = load_group(xin + base, n, x, &amax)) bad += b;
    const MxScale sc = mx_group_scale<kBits>(amax, 1.0f);
    for (int j = 0; j < n; ++j) out[base + j] = from_f32<T>(mx_qdq<kBits>(x[j], 0.0f, sc));
  });
  return bad.load();
}

template <int kBits, typename T>
void act_backward(const MxActArgs& a, const T* grad, T* grad_x) {
  const T* xin = static_cast<const T*>(a.x);
  static const float kZeros[kMxGroup] = {};
  for_each_group<kMxGroup, kGrain>(a.rows, a.cols, [&](int64_t, int64_t base, int n) {
    float x[kMxGroup], g[kMxGroup], gt[kMxGroup], amax;
    load_group(xin + base, n, x, &amax);
    for (int j = 0; j < n; ++j) g[j] = to_f32(grad[base + j]);
    const MxScale sc = mx_group_scale<kBits>(amax, 1.0f);
    const float g_m = mx_group_backward<kBits>(x, kZeros, g, n, sc, gt);
    int arg = 0;  // torch.max's index: the first element with |x| == amax
    while (arg < n - 1 && fabs_(x[arg]) != amax) ++arg;
    for (int j = 0; j < n; ++j) grad_x[base + j] = from_f32<T>(mx_act_grad<T>(gt[j], sc, g_m, x[j], j == arg));
  });
}

}  // namespace

int64_t fake_quant_mx(const MxArgs& a, void* out, float* exps) {
  int64_t bad = 0;
  with_mx_bits(a.bits, [&](auto bits) {
    with_float_type(a.dtype, [&](auto t) {
      bad = mx_forward<decltype(bits)::value>(a, static_cast<decltype(t)*>(out), exps);
    });
  });
  return bad;
}

void fake_quant_mx_backward(const MxArgs& a, const void* grad, float* grad_v, float* grad_ms) {
  with_mx_bits(a.bits, [&](auto bits) {
    with_float_type(a.dtype, [&](auto t) {
      using T = decltype(t);
      mx_backward<decltype(bits)::value>(a, static_cast<const T*>(grad), grad_v, grad_ms);
    });
  });
}

int64_t fake_quant_mx_activation(const MxActArgs& a, void* out) {
  int64_t bad = 0;
  with_mx_bits(a.bits, [&](auto bits) {
    with_float_type(a.dtype, [&](auto t) {
      bad = act_forward<decltype(bits)::value>(a, static_cast<decltype(t)*>(out));
    });
  });
  return bad;
}

void fake_quant_mx_activation_backward(const MxActArgs& a, const void* grad, void* grad_x) {
  with_mx_bits(a.bits, [&](auto bits) {
    with_float_type(a.dtype, [&](auto t) {
      using T = decltype(t);
      act_backward<decltype(bits)::value>(a, static_cast<const T*>(grad), static_cast<T*>(grad_x));
    });
  });
}

}  // namespace autoround_fast::cpu
