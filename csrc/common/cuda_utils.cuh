// Small device helpers shared by the .cu files. CUDA headers only.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "numerics.h"

namespace autoround_fast {

inline const char* launch_status() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline unsigned grid_for(int64_t work, int per_block) {
  int64_t g = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(g < 1 ? 1 : (g > 0x7fffffff ? 0x7fffffff : g));
}

// N values of T <-> fp32, with 16-byte memory accesses (N * sizeof(T) a multiple of 16).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector width");
  constexpr int kWords = N * sizeof(T) / 16;
  uint4 buf[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) buf[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
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

}  // namespace autoround_fast
