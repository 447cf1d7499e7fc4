#include <atomic>

#include <torch/csrc/stable/ops.h>

#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "nvfp4.h"

namespace autoround_fast::cpu {
namespace {

constexpr int64_t kGrain = 1024;

// Loads one group of up to 16 values and its absolute maximum; counts non-finite values.
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

template <typename T>
int64_t nvfp4_forward(const Nvfp4Args& a, T* out, float* scale) {
  const T* w = static_cast<const T*>(a.weight);
  const int64_t groups = ceil_div(a.cols, kNvfp4Group);
  const float gs = *a.global_scale, inv_gs = inv_global_scale(gs);
  std::atomic<int64_t> bad{0};
  torch::stable::parallel_for(0, a.rows * groups, kGrain, [&](int64_t begin, int64_t end) {
    int64_t local_bad = 0;
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      const int64_t base = r * a.cols + k * kNvfp4Group;
      const int n = static_cast<int>(std::min<int64_t>(kNvfp4Group, a.cols - k * kNvfp4Group));
      float x[kNvfp4Group], amax;
      local_bad += load_group(w + base, n, x, &amax);
      Nvfp4Scale sc = nvfp4_group_scale(amax, a.max_scale[gi], gs, inv_gs);
      scale[gi] = sc.s;
      for (int j = 0; j < n; ++j) out[base + j] = from_f32<T>(nvfp4_qdq(x[j], a.v[base + j], sc));
    }
    bad += local_bad;
  });
  return bad.load();
}

template <typename T>
void nvfp4_backward(const Nvfp4Args& a, const T* grad, float* grad_v, float* grad_ms) {
  const T* w = static_cast<const T*>(a.weight);
  const int64_t groups = ceil_div(a.cols, kNvfp4Group);
  const float gs = *a.global_scale, inv_gs = inv_global_scale(gs);
  torch::stable::parallel_for(0, a.rows * groups, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      const int64_t base = r * a.cols + k * kNvfp4Group;
      const int n = static_cast<int>(std::min<int64_t>(kNvfp4Group, a.cols - k * kNvfp4Group));
      float x[kNvfp4Group], g[kNvfp4Group], amax;
      load_group(w + base, n, x, &amax);
      for (int j = 0; j < n; ++j) g[j] = to_f32(grad[base + j]);
      grad_ms[gi] = nvfp4_group_backward(x, a.v + base, g, n, amax, a.max_scale[gi], gs, inv_gs,
                                         grad_v + base, nullptr);
    }
  });
}

template <typename T>
int64_t act_forward(const Nvfp4ActArgs& a, T* out) {
  const T* xin = static_cast<const T*>(a.x);
  const int64_t groups = ceil_div(a.cols, kNvfp4Group);
  const float gs = *a.global_scale, inv_gs = inv_global_scale(gs);
  std::atomic<int64_t> bad{0};
  torch::stable::parallel_for(0, a.rows * groups, kGrain, [&](int64_t begin, int64_t end) {
    int64_t local_bad = 0;
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      const int64_t base = r * a.cols + k * kNvfp4Group;
      const int n = static_cast<int>(std::min<int64_t>(kNvfp4Group, a.cols - k * kNvfp4Group));
      float x[kNvfp4Group], amax;
      local_bad += load_group(xin + base, n, x, &amax);
      Nvfp4Scale sc = nvfp4_group_scale(amax, 1.0f, gs, inv_gs);
      for (int j = 0; j < n; ++j) out[base + j] = from_f32<T>(nvfp4_qdq(x[j], 0.f, sc));
    }
    bad += local_bad;
  });
  return bad.load();
}

template <typename T>
void act_backward(const Nvfp4ActArgs& a, const T* grad, T* grad_x) {
  const T* xin = static_cast<const T*>(a.x);
  const int64_t groups = ceil_div(a.cols, kNvfp4Group);
  const float gs = *a.global_scale, inv_gs = inv_global_scale(gs);
  torch::stable::parallel_for(0, a.rows * groups, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r = gi / groups, k = gi % groups;
      const int64_t base = r * a.cols + k * kNvfp4Group;
      const int n = static_cast<int>(std::min<int64_t>(kNvfp4Group, a.cols - k * kNvfp4Group));
      float x[kNvfp4Group], g[kNvfp4Group], gv[kNvfp4Group], zeros[kNvfp4Group] = {}, amax, g_m;
      load_group(xin + base, n, x, &amax);
      for (int j = 0; j < n; ++j) g[j] = to_f32(grad[base + j]);
      nvfp4_group_backward(x, zeros, g, n, amax, 1.0f, gs, inv_gs, gv, &g_m);
      const float os = nvfp4_group_scale(amax, 1.0f, gs, inv_gs).os;
      int arg = 0;
      while (arg < n - 1 && fabs_(x[arg]) != amax) ++arg;
      for (int j = 0; j < n; ++j) grad_x[base + j] = from_f32<T>(nvfp4_act_grad<T>(gv[j], os, g_m, x[j], j == arg));
    }
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
