// Integer fake quantization on the GPU: one warp per group. Element j of a group belongs to
// lane (j / 4) % 32 (int_quant.h); each lane reads its 4-element chunks with one vector load
// when the layout allows, sums in order, and the warp combines by an xor butterfly, the same
// order the CPU kernel replays.
#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "int_quant.h"

namespace autoround_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kLanes;

template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk(const T* p, int64_t n_left, float* x) {
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      float4 u = __ldg(reinterpret_cast<const float4*>(p));
      x[0] = u.x; x[1] = u.y; x[2] = u.z; x[3] = u.w;
    } else {
      uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) x[j] = to_f32(t[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) x[j] = j < n_left ? to_f32(p[j]) : 0.f;
  }
}

template <bool kVec>
__device__ __forceinline__ void load_chunk_f32(const float* p, int64_t n_left, float* x) {
  load_chunk<float, kVec>(p, n_left, x);
}

template <typename T, bool kVec>
__device__ __forceinline__ void store_chunk(T* p, int64_t n_left, const float* x) {
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
    } else {
      uint2 u;
      T* t = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) t[j] = from_f32<T>(x[j]);
      *reinterpret_cast<uint2*>(p) = u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n_left) p[j] = from_f32<T>(x[j]);
  }
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) v = fmin_(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) v = fmax_(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

struct GroupSpan {
  int64_t base, n;
};

__device__ __forceinline__ GroupSpan int_group_span(const IntArgs& a, int64_t gi, int64_t groups) {
  const int64_t r = gi / groups, k = gi - r * groups;
  const int64_t start = k * a.group;
  const int64_t rest = a.cols - start;
  return {r * a.cols + start, rest < a.group ? rest : a.group};
}

template <typename T, bool kVec>
__device__ __forceinline__ void group_min_max(const T* w, GroupSpan g, int lane, float* wmin, float* wmax) {
  float lo = 0.f, hi = 0.f;
  for (int64_t j = lane * kChunk; j < g.n; j += kLanes * kChunk) {
    float x[kChunk];
    load_chunk<T, kVec>(w + g.base + j, g.n - j, x);
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      lo = fmin_(lo, x[c]);  // padding reads as 0, which min(., 0) / max(., 0) ignore
      hi = fmax_(hi, x[c]);
    }
  }
  *wmin = warp_min(lo);
  *wmax = warp_max(hi);
}

template <typename T, typename S, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_int_kernel(IntArgs a, T* out, S* scale, float* zp) {
  const int lane = threadIdx.x % kLanes;
  const int64_t groups = (a.cols + a.group - 1) / a.group;
  const int64_t total = a.rows * groups;
  const IntParams p{a.bits, a.sym, a.scale_dtype, quotient_dtype(a.dtype, a.scale_dtype)};
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t gi = blockIdx.x * (int64_t)kWarps + threadIdx.x / kLanes; gi < total;
       gi += (int64_t)gridDim.x * kWarps) {
    GroupSpan g = int_group_span(a, gi, groups);
    float wmin, wmax;
    group_min_max<T, kVec>(w, g, lane, &wmin, &wmax);
    IntScale sc = int_group_scale(wmin, wmax, __ldg(a.min_scale + gi), __ldg(a.max_scale + gi), p);
    if (lane == 0) {
      scale[gi] = from_f32<S>(sc.s);
      zp[gi] = sc.zp;
    }
    for (int64_t j = lane * kChunk; j < g.n; j += kLanes * kChunk) {
      float x[kChunk], v[kChunk];
      load_chunk<T, kVec>(w + g.base + j, g.n - j, x);
      load_chunk_f32<kVec>(a.v + g.base + j, g.n - j, v);
#pragma unroll
      for (int c = 0; c < kChunk; ++c) x[c] = int_qdq(x[c], v[c], sc, a.sym);
      store_chunk<T, kVec>(out + g.base + j, g.n - j, x);
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_int_backward_kernel(
    IntArgs a, const T* grad, float* grad_v, float* g_min, float* g_max) {
  const int lane = threadIdx.x % kLanes;
  const int64_t groups = (a.cols + a.group - 1) / a.group;
  const int64_t total = a.rows * groups;
  const IntParams p{a.bits, a.sym, a.scale_dtype, quotient_dtype(a.dtype, a.scale_dtype)};
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t gi = blockIdx.x * (int64_t)kWarps + threadIdx.x / kLanes; gi < total;
       gi += (int64_t)gridDim.x * kWarps) {
    GroupSpan g = int_group_span(a, gi, groups);
    float wmin, wmax;
    group_min_max<T, kVec>(w, g, lane, &wmin, &wmax);
    IntScale sc = int_group_scale(wmin, wmax, __ldg(a.min_scale + gi), __ldg(a.max_scale + gi), p);
    IntPartials acc{0.f, 0.f, 0.f, 0.f};
    for (int64_t j = lane * kChunk; j < g.n; j += kLanes * kChunk) {
      float x[kChunk], v[kChunk], gr[kChunk], gv[kChunk];
      load_chunk<T, kVec>(w + g.base + j, g.n - j, x);
      load_chunk<T, kVec>(grad + g.base + j, g.n - j, gr);
      load_chunk_f32<kVec>(a.v + g.base + j, g.n - j, v);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (kVec || j + c < g.n) int_element_backward(x[c], v[c], gr[c], sc, a.sym, &gv[c], acc);
      store_chunk<float, kVec>(grad_v + g.base + j, g.n - j, gv);
    }
    IntPartials tot{warp_sum(acc.a), warp_sum(acc.b), warp_sum(acc.zc), warp_sum(acc.zs)};
    if (lane == 0) int_group_scale_backward(tot, wmin, wmax, sc, p, g_min + gi, g_max + gi);
  }
}

bool chunked(const IntArgs& a, std::initializer_list<const void*> ptrs) {
  if (a.group % kChunk != 0 || a.cols % kChunk != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

const char* launch_fake_quant_int(const IntArgs& a, void* out, void* scale, float* zp, void* stream) {
  const int64_t total = a.rows * ((a.cols + a.group - 1) / a.group);
  const bool vec = chunked(a, {a.weight, a.v, out});
  auto s = static_cast<cudaStream_t>(stream);
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_float_type(a.scale_dtype, [&](auto st) {
      using S = decltype(st);
      if (vec)
        fake_quant_int_kernel<T, S, true><<<grid_for(total, kWarps), kThreads, 0, s>>>(
            a, static_cast<T*>(out), static_cast<S*>(scale), zp);
      else
        fake_quant_int_kernel<T, S, false><<<grid_for(total, kWarps), kThreads, 0, s>>>(
            a, static_cast<T*>(out), static_cast<S*>(scale), zp);
    });
  });
  return launch_status();
}

const char* launch_fake_quant_int_backward(const IntArgs& a, const void* grad, float* grad_v,
                                           float* g_min, float* g_max, void* stream) {
  const int64_t total = a.rows * ((a.cols + a.group - 1) / a.group);
  const bool vec = chunked(a, {a.weight, a.v, grad, grad_v});
  auto s = static_cast<cudaStream_t>(stream);
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (vec)
      fake_quant_int_backward_kernel<T, true><<<grid_for(total, kWarps), kThreads, 0, s>>>(
          a, static_cast<const T*>(grad), grad_v, g_min, g_max);
    else
      fake_quant_int_backward_kernel<T, false><<<grid_for(total, kWarps), kThreads, 0, s>>>(
          a, static_cast<const T*>(grad), grad_v, g_min, g_max);
  });
  return launch_status();
}

}  // namespace autoround_fast
