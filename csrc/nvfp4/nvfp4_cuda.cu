// NVFP4 weight and activation fake quantization on the GPU: one thread per 16-element group,
// 16-byte loads and stores when rows are whole groups. The math is nvfp4.h's, shared with
// the CPU kernels, so both produce the same bits.
#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "nvfp4_cuda.cuh"

namespace autoround_fast {
namespace {
using namespace nvfp4_cuda;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_kernel(Nvfp4Args a, T* out, float* scale) {
  const float gs = __ldg(a.global_scale), inv_gs = inv_global_scale(gs);
  const T* w = static_cast<const T*>(a.weight);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t gi, GroupIndex g) {
    float x[kNvfp4Group], v[kNvfp4Group], amax;
    int n = load_group<T, kVec>(w + g.base, g.n, x, &amax);
    load_f32<kVec>(a.v + g.base, n, v);
    Nvfp4Scale sc = nvfp4_group_scale(amax, __ldg(a.max_scale + gi), gs, inv_gs);
    scale[gi] = sc.s;
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < n) x[j] = nvfp4_qdq(x[j], v[j], sc);
    store_group<T, kVec>(out + g.base, n, x);
  });
}

// Out: GradOut (the gradients) or StepOut (the sign step in place, cuda_utils.cuh).
template <typename T, bool kVec, typename Out>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_backward_kernel(Nvfp4Args a, const T* grad, Out out) {
  constexpr bool kNc = !Out::kInPlace;
  out.start();
  const float gs = __ldg(a.global_scale), inv_gs = inv_global_scale(gs);
  const T* w = static_cast<const T*>(a.weight);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t gi, GroupIndex g) {
    float x[kNvfp4Group], v[kNvfp4Group], gr[kNvfp4Group], gv[kNvfp4Group], amax;
    int n = load_group<T, kVec>(w + g.base, g.n, x, &amax);
    load_vals<T, kVec>(grad + g.base, g.n, gr);
    load_f32<kVec, kNc>(a.v + g.base, n, v);
    const float ms = load_ro<kNc>(a.max_scale + gi);
    out.max_one(gi, ms, nvfp4_group_backward(x, v, gr, n, amax, ms, gs, inv_gs, gv, nullptr));
    if constexpr (kVec) {
      out.template v_vec<kNvfp4Group>(g.base, v, gv);
    } else {
      for (int j = 0; j < n; ++j) out.v_one(g.base + j, v[j], gv[j]);
    }
  });
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_activation_kernel(Nvfp4ActArgs a, T* out) {
  const float gs = __ldg(a.global_scale), inv_gs = inv_global_scale(gs);
  const T* xin = static_cast<const T*>(a.x);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t, GroupIndex g) {
    float x[kNvfp4Group], amax;
    const int n = load_group<T, kVec>(xin + g.base, g.n, x, &amax);
    Nvfp4Scale sc = nvfp4_group_scale(amax, 1.0f, gs, inv_gs);
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < n) x[j] = nvfp4_qdq_act(x[j], sc);
    store_group<T, kVec>(out + g.base, n, x);
  });
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_activation_backward_kernel(
    Nvfp4ActArgs a, const T* grad, T* grad_x) {
  const float gs = __ldg(a.global_scale), inv_gs = inv_global_scale(gs);
  const T* xin = static_cast<const T*>(a.x);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t, GroupIndex g) {
    float x[kNvfp4Group], gr[kNvfp4Group], gv[kNvfp4Group], amax, g_m;
    const int n = load_group<T, kVec>(xin + g.base, g.n, x, &amax);
    load_vals<T, kVec>(grad + g.base, g.n, gr);
    nvfp4_group_backward<true>(x, nullptr, gr, n, amax, 1.0f, gs, inv_gs, gv, &g_m);
    const float os = nvfp4_group_scale(amax, 1.0f, gs, inv_gs).os;
    const int arg = first_argmax(x, n, amax);
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < n) gv[j] = nvfp4_act_grad<T>(gv[j], os, g_m, x[j], j == arg);
    store_group<T, kVec>(grad_x + g.base, n, gv);
  });
}

}  // namespace

const char* launch_fake_quant_nvfp4(const Nvfp4Args& a, void* out, float* scale, void* stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.weight, a.v, out}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_nvfp4_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                                  a, static_cast<T*>(out), scale);
                            });
}

namespace {

template <typename Out>
const char* launch_nvfp4_backward(const Nvfp4Args& a, const void* grad, Out out,
                                  std::initializer_list<const void*> ptrs, void* stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, ptrs, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_nvfp4_backward_kernel<T, decltype(vec)::value, Out>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), out);
                            });
}

}  // namespace

const char* launch_fake_quant_nvfp4_backward(const Nvfp4Args& a, const void* grad, float* grad_v,
                                             float* grad_ms, void* stream) {
  return launch_nvfp4_backward(a, grad, GradOut{grad_v, nullptr, grad_ms}, {a.weight, a.v, grad, grad_v},
                               stream);
}

const char* launch_fake_quant_nvfp4_backward_step(const Nvfp4Args& a, const void* grad,
                                                  const StepTargets& t, void* stream) {
  return launch_nvfp4_backward(a, grad, StepOut{t, false, 0.f}, {a.weight, a.v, grad, t.best_v}, stream);
}

const char* launch_fake_quant_nvfp4_activation(const Nvfp4ActArgs& a, void* out, void* stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.x, out}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_nvfp4_activation_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                                  a, static_cast<T*>(out));
                            });
}

const char* launch_fake_quant_nvfp4_activation_backward(const Nvfp4ActArgs& a, const void* grad,
                                                        void* grad_x, void* stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.x, grad, grad_x}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_nvfp4_activation_backward_kernel<T, decltype(vec)::value>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), static_cast<T*>(grad_x));
                            });
}

}  // namespace autoround_fast
