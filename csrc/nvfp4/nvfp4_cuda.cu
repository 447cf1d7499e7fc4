// NVFP4 weight and activation fake quantization on the GPU: one thread per 16-element group,
// 16-byte loads and stores when rows are whole groups. The math is nvfp4.h's, shared with
// the CPU kernels, so both produce the same bits.
#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "nvfp4_cuda.cuh"

namespace autoround_fast {
namespace {
using namespace nvfp4_cuda;

// kPerRow: a global scale per row (Nvfp4Args::per_row), else one for the tensor; a template
// flag, so that the tensor's kernels carry no per-group division.
template <typename T, bool kVec, bool kPerRow>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_kernel(Nvfp4Args a, T* out, float* scale) {
  const GlobalScale whole = tensor_scale(a.global_scale, kPerRow);
  const int64_t groups = (a.cols + kNvfp4Group - 1) / kNvfp4Group;
  const T* w = static_cast<const T*>(a.weight);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t gi, GroupIndex g) {
    float x[kNvfp4Group], v[kNvfp4Group], amax;
    int n = load_group<T, kVec>(w + g.base, g.n, x, &amax);
    load_f32<kVec>(a.v + g.base, n, v);
    const GlobalScale s = weight_scale_at(a.global_scale, kPerRow, groups, gi, whole);
    Nvfp4Scale sc = nvfp4_group_scale(amax, __ldg(a.max_scale + gi), s.gs, s.inv);
    scale[gi] = sc.s;
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < n) x[j] = nvfp4_qdq(x[j], v[j], sc);
    store_group<T, kVec>(out + g.base, n, x);
  });
}

// Out: GradOut (the gradients) or StepOut (the sign step in place, cuda_utils.cuh).
// The ragged path (rows that are not whole groups, or unaligned tensors): one thread per
// group, element by element.
template <typename T, typename Out, bool kPerRow>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_backward_kernel(Nvfp4Args a, const T* grad, Out out) {
  constexpr bool kNc = !Out::kInPlace;
  out.start();
  const GlobalScale whole = tensor_scale(a.global_scale, kPerRow);
  const int64_t groups = (a.cols + kNvfp4Group - 1) / kNvfp4Group;
  const T* w = static_cast<const T*>(a.weight);
  for_each_group<false>(a.rows, a.cols, [&](int64_t gi, GroupIndex g) {
    float x[kNvfp4Group], v[kNvfp4Group], gr[kNvfp4Group], gv[kNvfp4Group], amax;
    int n = load_group<T, false>(w + g.base, g.n, x, &amax);
    load_vals<T, false>(grad + g.base, g.n, gr);
    load_f32<false, kNc>(a.v + g.base, n, v);
    const float ms = load_ro<kNc>(a.max_scale + gi);
    const GlobalScale s = weight_scale_at(a.global_scale, kPerRow, groups, gi, whole);
    out.max_one(gi, ms, nvfp4_group_backward(x, v, gr, n, amax, ms, s.gs, s.inv, gv, nullptr));
    for (int j = 0; j < n; ++j) out.v_one(g.base + j, v[j], gv[j]);
  });
}

// The vector path, with V and its result (the gradient, or the stepped V)
// staged through shared memory. One thread per group would read and write V's fp32 values as
// four 16-byte accesses 64 bytes apart across the warp: every store instruction fills half
// of 32 sectors, and ncu showed the backward + step bound by L2 throughput (84%) with DRAM at
// 54% (docs/design.md#nvfp4-kernels). Here each block moves its 256 groups' V (16 KB) with
// contiguous 512-byte warp accesses, in and out; each thread reads and writes its group's 16
// values in shared memory.
// Chunk c (16 bytes) of the tile lives at c ^ ((c >> 3) & 3): a thread's four chunks 4t..4t+3
// are 64 bytes apart, so eight neighbouring threads would hit two of the eight 16-byte bank
// groups (four-way conflicts); the swizzle spreads them over all eight, and the contiguous
// copies stay conflict-free (it permutes chunks within each aligned run of eight).
__device__ __forceinline__ int tile_slot(int c) { return c ^ ((c >> 3) & 3); }

template <typename T, typename Out, bool kPerRow>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_backward_staged_kernel(Nvfp4Args a, const T* grad,
                                                                                   Out out) {
  constexpr bool kNc = !Out::kInPlace;
  constexpr int kChunksPerGroup = kNvfp4Group / 4;  // float4 chunks of V per group
  __shared__ float4 tile[kThreads * kChunksPerGroup];
  out.start();
  const GlobalScale whole = tensor_scale(a.global_scale, kPerRow);
  const T* w = static_cast<const T*>(a.weight);
  const int64_t groups = a.cols / kNvfp4Group;
  const int64_t total = a.rows * groups;
  const float4* v4 = reinterpret_cast<const float4*>(a.v);
  float4* dst4 = reinterpret_cast<float4*>(out.v_dst());
  for (int64_t g0 = blockIdx.x * (int64_t)kThreads; g0 < total; g0 += (int64_t)gridDim.x * kThreads) {
    const int64_t rest = total - g0;
    const int chunks = static_cast<int>(rest < kThreads ? rest : kThreads) * kChunksPerGroup;
    const int64_t c0 = g0 * kChunksPerGroup;
#pragma unroll
    for (int k = 0; k < kChunksPerGroup; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < chunks) {
        const float4 p = load_ro<kNc>(v4 + c0 + c);
        tile[tile_slot(c)] = p;
      }
    }
    __syncthreads();
    const int64_t gi = g0 + threadIdx.x;
    if (threadIdx.x * kChunksPerGroup < chunks) {
      const int64_t base = gi * kNvfp4Group;
      float x[kNvfp4Group], v[kNvfp4Group], gr[kNvfp4Group], gv[kNvfp4Group], amax;
      load_group<T, true>(w + base, kNvfp4Group, x, &amax);
      load_vals<T, true>(grad + base, kNvfp4Group, gr);
#pragma unroll
      for (int k = 0; k < kChunksPerGroup; ++k) {
        const float4 p = tile[tile_slot(threadIdx.x * kChunksPerGroup + k)];
        v[4 * k] = p.x, v[4 * k + 1] = p.y, v[4 * k + 2] = p.z, v[4 * k + 3] = p.w;
      }
      const float ms = load_ro<kNc>(a.max_scale + gi);
      const GlobalScale s = weight_scale_at(a.global_scale, kPerRow, groups, gi, whole);
      out.max_one(gi, ms, nvfp4_group_backward(x, v, gr, kNvfp4Group, amax, ms, s.gs, s.inv, gv, nullptr));
#pragma unroll
      for (int k = 0; k < kChunksPerGroup; ++k) {
        tile[tile_slot(threadIdx.x * kChunksPerGroup + k)] =
            make_float4(out.v_value(v[4 * k], gv[4 * k]), out.v_value(v[4 * k + 1], gv[4 * k + 1]),
                        out.v_value(v[4 * k + 2], gv[4 * k + 2]), out.v_value(v[4 * k + 3], gv[4 * k + 3]));
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunksPerGroup; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < chunks) dst4[c0 + c] = tile[tile_slot(c)];
    }
    __syncthreads();  // the next tile reuses the shared memory
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_activation_kernel(Nvfp4ActArgs a, T* out) {
  const GlobalScale whole = tensor_scale(a.global_scale, a.per_row);
  const T* xin = static_cast<const T*>(a.x);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t, GroupIndex g) {
    float x[kNvfp4Group], amax;
    const int n = load_group<T, kVec>(xin + g.base, g.n, x, &amax);
    const GlobalScale s = act_scale_at(a.global_scale, a.per_row, a.cols, g.base, whole);
    Nvfp4Scale sc = nvfp4_group_scale(amax, 1.0f, s.gs, s.inv);
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < n) x[j] = nvfp4_qdq_act(x[j], sc);
    store_group<T, kVec>(out + g.base, n, x);
  });
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_nvfp4_activation_backward_kernel(
    Nvfp4ActArgs a, const T* grad, T* grad_x) {
  const GlobalScale whole = tensor_scale(a.global_scale, a.per_row);
  const T* xin = static_cast<const T*>(a.x);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t, GroupIndex g) {
    float x[kNvfp4Group], gr[kNvfp4Group], gv[kNvfp4Group], amax, g_m;
    const int n = load_group<T, kVec>(xin + g.base, g.n, x, &amax);
    load_vals<T, kVec>(grad + g.base, g.n, gr);
    const GlobalScale s = act_scale_at(a.global_scale, a.per_row, a.cols, g.base, whole);
    nvfp4_group_backward<true>(x, nullptr, gr, n, amax, 1.0f, s.gs, s.inv, gv, &g_m);
    const float os = nvfp4_group_scale(amax, 1.0f, s.gs, s.inv).os;
    const int arg = first_argmax(x, n, amax);
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < n) gv[j] = nvfp4_act_grad<T>(gv[j], os, g_m, x[j], j == arg);
    store_group<T, kVec>(grad_x + g.base, n, gv);
  });
}

}  // namespace

const char* launch_fake_quant_nvfp4(const Nvfp4Args& a, void* out, float* scale, cudaStream_t stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.weight, a.v, out}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              with_flag(a.per_row, [&](auto per_row) {
                                fake_quant_nvfp4_kernel<T, decltype(vec)::value, decltype(per_row)::value>
                                    <<<grid, kThreads, 0, s>>>(a, static_cast<T*>(out), scale);
                              });
                            });
}

namespace {

template <typename Out>
const char* launch_nvfp4_backward(const Nvfp4Args& a, const void* grad, Out out,
                                  std::initializer_list<const void*> ptrs, cudaStream_t stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, ptrs, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              with_flag(a.per_row, [&](auto per_row) {
                                constexpr bool kPerRow = decltype(per_row)::value;
                                if constexpr (decltype(vec)::value) {
                                  fake_quant_nvfp4_backward_staged_kernel<T, Out, kPerRow>
                                      <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), out);
                                } else {
                                  fake_quant_nvfp4_backward_kernel<T, Out, kPerRow>
                                      <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), out);
                                }
                              });
                            });
}

}  // namespace

const char* launch_fake_quant_nvfp4_backward(const Nvfp4Args& a, const void* grad, float* grad_v,
                                             float* grad_ms, cudaStream_t stream) {
  return launch_nvfp4_backward(a, grad, GradOut{grad_v, nullptr, grad_ms}, {a.weight, a.v, grad, grad_v},
                               stream);
}

const char* launch_fake_quant_nvfp4_backward_step(const Nvfp4Args& a, const void* grad,
                                                  const StepTargets& t, cudaStream_t stream) {
  return launch_nvfp4_backward(a, grad, StepOut{t, false, 0.f}, {a.weight, a.v, grad}, stream);
}

const char* launch_fake_quant_nvfp4_activation(const Nvfp4ActArgs& a, void* out, cudaStream_t stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.x, out}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_nvfp4_activation_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                                  a, static_cast<T*>(out));
                            });
}

const char* launch_fake_quant_nvfp4_activation_backward(const Nvfp4ActArgs& a, const void* grad,
                                                        void* grad_x, cudaStream_t stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.x, grad, grad_x}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_nvfp4_activation_backward_kernel<T, decltype(vec)::value>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), static_cast<T*>(grad_x));
                            });
}

}  // namespace autoround_fast
