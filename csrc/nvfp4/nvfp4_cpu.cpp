#include <atomic>

#include <torch/csrc/stable/ops.h>

#include "../common/cpu_groups.h"
#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "nvfp4.h"

namespace autoround_fast::cpu {
namespace {

constexpr int64_t kGrain = 1024;

template <typename T>
int64_t nvfp4_forward(const Nvfp4Args& a, T* out, float* scale) {
  const T* w = static_cast<const T*>(a.weight);
  const GlobalScale whole = tensor_scale(a.global_scale, a.per_row);
  const int64_t groups = ceil_div(a.cols, kNvfp4Group);
  std::atomic<int64_t> bad{0};
  for_each_group<kNvfp4Group, kGrain>(a.rows, a.cols, [&](int64_t gi, int64_t base, int n) {
    float x[kNvfp4Group], amax;
    if (int b = load_group(w + base, n, x, &amax)) bad += b;
    const GlobalScale s = weight_scale_at(a.global_scale, a.per_row, groups, gi, whole);
    Nvfp4Scale sc = nvfp4_group_scale(amax, a.max_scale[gi], s.gs, s.inv);
    scale[gi] = sc.s;
    for (int j = 0; j < n; ++j) out[base + j] = from_f32<T>(nvfp4_qdq(x[j], a.v[base + j], sc));
  });
  return bad.load();
}

template <typename T>
void nvfp4_backward(const Nvfp4Args& a, const T* grad, float* grad_v, float* grad_ms) {
  const T* w = static_cast<const T*>(a.weight);
  const GlobalScale whole = tensor_scale(a.global_scale, a.per_row);
  const int64_t groups = ceil_div(a.cols, kNvfp4Group);
  for_each_group<kNvfp4Group, kGrain>(a.rows, a.cols, [&](int64_t gi, int64_t base, int n) {
    float x[kNvfp4Group], g[kNvfp4Group], amax;
    load_group(w + base, n, x, &amax);
    for (int j = 0; j < n; ++j) g[j] = to_f32(grad[base + j]);
    const GlobalScale s = weight_scale_at(a.global_scale, a.per_row, groups, gi, whole);
    grad_ms[gi] = nvfp4_group_backward(x, a.v + base, g, n, amax, a.max_scale[gi], s.gs, s.inv,
                                       grad_v + base, nullptr);
  });
}

template <typename T>
int64_t act_forward(const Nvfp4ActArgs& a, T* out) {
  const T* xin = static_cast<const T*>(a.x);
  const GlobalScale whole = tensor_scale(a.global_scale, a.per_row);
  std::atomic<int64_t> bad{0};
  for_each_group<kNvfp4Group, kGrain>(a.rows, a.cols, [&](int64_t, int64_t base, int n) {
    float x[kNvfp4Group], amax;
    if (int b = load_group(xin + base, n, x, &amax)) bad += b;
    const GlobalScale s = act_scale_at(a.global_scale, a.per_row, a.cols, base, whole);
    Nvfp4Scale sc = nvfp4_group_scale(amax, 1.0f, s.gs, s.inv);
    for (int j = 0; j < n; ++j) out[base + j] = from_f32<T>(nvfp4_qdq_act(x[j], sc));
  });
  return bad.load();
}

template <typename T>
void act_backward(const Nvfp4ActArgs& a, const T* grad, T* grad_x) {
  const T* xin = static_cast<const T*>(a.x);
  const GlobalScale whole = tensor_scale(a.global_scale, a.per_row);
  for_each_group<kNvfp4Group, kGrain>(a.rows, a.cols, [&](int64_t, int64_t base, int n) {
    float x[kNvfp4Group], g[kNvfp4Group], gv[kNvfp4Group], amax, g_m;
    load_group(xin + base, n, x, &amax);
    const GlobalScale s = act_scale_at(a.global_scale, a.per_row, a.cols, base, whole);
    for (int j = 0; j < n; ++j) g[j] = to_f32(grad[base + j]);
    nvfp4_group_backward<true>(x, nullptr, g, n, amax, 1.0f, s.gs, s.inv, gv, &g_m);
    const float os = nvfp4_group_scale(amax, 1.0f, s.gs, s.inv).os;
    const int arg = first_argmax(x, n, amax);
    for (int j = 0; j < n; ++j)
      grad_x[base + j] = from_f32<T>(nvfp4_act_grad<T>(gv[j], os, g_m, x[j], j == arg));
  });
}

}  // namespace

int64_t fake_quant_nvfp4(const Nvfp4Args& a, void* out, float* scale) {
  int64_t bad = 0;
  with_float_type(a.dtype, [&](auto t) { bad = nvfp4_forward(a, static_cast<decltype(t)*>(out), scale); });
  return bad;
}

void fake_quant_nvfp4_backward(const Nvfp4Args& a, const void* grad, float* grad_v, float* grad_ms) {
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    nvfp4_backward(a, static_cast<const T*>(grad), grad_v, grad_ms);
  });
}

int64_t fake_quant_nvfp4_activation(const Nvfp4ActArgs& a, void* out) {
  int64_t bad = 0;
  with_float_type(a.dtype, [&](auto t) { bad = act_forward(a, static_cast<decltype(t)*>(out)); });
  return bad;
}

void fake_quant_nvfp4_activation_backward(const Nvfp4ActArgs& a, const void* grad, void* grad_x) {
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    act_backward(a, static_cast<const T*>(grad), static_cast<T*>(grad_x));
  });
}

}  // namespace autoround_fast::cpu
