// Small device helpers shared by the .cu files. CUDA headers only.
#pragma once

#include <atomic>
#include <cstdint>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../launchers.h"
#include "../step/step.h"
#include "numerics.h"

namespace autoround_fast {

constexpr unsigned kFullWarp = 0xffffffffu;  // every lane of a warp, for the *_sync intrinsics

inline const char* launch_status() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline unsigned grid_for(int64_t work, int per_block) {
  int64_t g = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(g < 1 ? 1 : (g > 0x7fffffff ? 0x7fffffff : g));
}

// The current device's SM count, 0 where it cannot be read (a grid-size hint only). Read
// once per device: launches on the eager path are host-bound.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();  // not the launch's error
    return 0;
  }
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable && (n = cached[dev].load(std::memory_order_relaxed)) > 0) return n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (cacheable) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// A load through the read-only cache (kNc), or a plain one for memory the kernel also writes
// (the tunables a backward steps in place): __ldg requires data that no thread changes while
// the kernel runs.
template <bool kNc, typename U>
__device__ __forceinline__ U load_ro(const U* p) {
  if constexpr (kNc) {
    return __ldg(p);
  } else {
    return *p;
  }
}

// N values of T <-> fp32, with 16-byte memory accesses (N * sizeof(T) a multiple of 16).
template <typename T, int N, bool kNc = true>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector width");
  constexpr int kWords = N * sizeof(T) / 16;
  uint4 buf[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) buf[i] = load_ro<kNc>(reinterpret_cast<const uint4*>(p) + i);
  const T* t = reinterpret_cast<const T*>(buf);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_f32(t[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector width");
  constexpr int kWords = N * sizeof(T) / 16;
  uint4 buf[kWords];
  T* t = reinterpret_cast<T*>(buf);
#pragma unroll
  for (int j = 0; j < N; ++j) t[j] = from_f32<T>(in[j]);
#pragma unroll
  for (int i = 0; i < kWords; ++i) reinterpret_cast<uint4*>(p)[i] = buf[i];
}

// The first `left` of N values of T at p as fp32, the rest read as 0: 16-byte loads where the N
// are all there and aligned (kVec), else guarded scalar loads.
template <typename T, int N, bool kVec, typename Left>
__device__ __forceinline__ void load_part(const T* p, Left left, float* x) {
  if constexpr (kVec) {
    load_vec<T, N>(p, x);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = j < left ? to_f32(p[j]) : 0.f;
  }
}

// The first `left` of N fp32 values stored as T at p (all N with 16-byte stores under kVec).
template <typename T, int N, bool kVec, typename Left>
__device__ __forceinline__ void store_part(T* p, Left left, const float* x) {
  if constexpr (kVec) {
    store_vec<T, N>(p, x);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < left) p[j] = from_f32<T>(x[j]);
  }
}

// Where a weight backward's results go: the gradients of V and the scales (GradOut), or the
// sign step they drive, in place (StepOut, launchers.h's StepTargets). Each call gets the
// value the kernel read (an element of V, a scale) beside its gradient, so the step reads
// nothing twice. kInPlace: the kernel must read V and the scales with plain loads.
// Kernels that stage V through shared memory (the NVFP4 backward) write v_value(p, g) to
// v_dst(). V has no best copy: the engine keeps the best fake-quantized weight.
struct GradOut {
  static constexpr bool kInPlace = false;
  float* v;
  float* min_scale;
  float* max_scale;
  __device__ __forceinline__ void start() {}
  template <int N>
  __device__ __forceinline__ void v_vec(int64_t at, const float*, const float* g) const {
    store_vec<float, N>(v + at, g);
  }
  __device__ __forceinline__ void v_one(int64_t at, float, float g) const { v[at] = g; }
  __device__ __forceinline__ float* v_dst() const { return v; }
  __device__ __forceinline__ float v_value(float, float g) const { return g; }
  __device__ __forceinline__ void min_one(int64_t gi, float, float g) const { min_scale[gi] = g; }
  __device__ __forceinline__ void max_one(int64_t gi, float, float g) const { max_scale[gi] = g; }
};

struct StepOut {
  static constexpr bool kInPlace = true;
  StepTargets t;
  bool improved;
  float lr;
  __device__ __forceinline__ void start() {
    improved = *t.improved;
    lr = *t.lr;
  }
  __device__ __forceinline__ void step(float* param, float* best, int64_t at, float p, float g) const {
    if (improved) best[at] = p;
    param[at] = sign_step_value(p, g, lr);
  }
  template <int N>
  __device__ __forceinline__ void v_vec(int64_t at, const float* p, const float* g) const {
    float s[N];
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = sign_step_value(p[j], g[j], lr);
    store_vec<float, N>(t.v + at, s);
  }
  __device__ __forceinline__ void v_one(int64_t at, float p, float g) const { t.v[at] = sign_step_value(p, g, lr); }
  __device__ __forceinline__ float* v_dst() const { return t.v; }
  __device__ __forceinline__ float v_value(float p, float g) const { return sign_step_value(p, g, lr); }
  __device__ __forceinline__ void min_one(int64_t gi, float p, float g) const {
    step(t.min_scale, t.best_min_scale, gi, p, g);
  }
  __device__ __forceinline__ void max_one(int64_t gi, float p, float g) const {
    step(t.max_scale, t.best_max_scale, gi, p, g);
  }
};

}  // namespace autoround_fast
