// Device helpers the FP8 CUDA kernels share (fp8_cuda.cu, fp8_block_cuda.cu): a chunk of the
// weight kept as loaded, and the block-wide maximum and sums in fp8.h's order.
#pragma once

#include "../common/cuda_utils.cuh"
#include "fp8.h"

namespace autoround_fast {
namespace {

// A chunk of T kept as loaded (16-bit types two to a register).
template <typename T>
struct RawChunk {
  static constexpr int kWords = kFp8Chunk * sizeof(T) / 16;
  uint4 w[kWords];
  template <bool kVec>
  __device__ __forceinline__ void load(const T* p, int64_t left) {
    if constexpr (kVec) {
#pragma unroll
      for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    } else {
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) reinterpret_cast<T*>(w)[j] = j < left ? p[j] : from_f32<T>(0.f);
    }
  }
  __device__ __forceinline__ float operator[](int j) const { return to_f32(reinterpret_cast<const T*>(w)[j]); }
};

__device__ __forceinline__ float warp_max(float m) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = max_num(m, __shfl_xor_sync(kFullWarp, m, off));
  return m;
}

// The maximum over a kFp8Threads block, to every thread. red: kFp8Warps floats of shared memory.
__device__ __forceinline__ float block_max(float m, float* red) {
  m = warp_max(m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kFp8Warps; ++w) r = max_num(r, red[w]);
  __syncthreads();  // red is reused
  return r;
}

// A block's kFp8Threads thread sums combined in fp8.h's order (the shuffle-down tree per warp,
// then the warps in order); thread 0 gets the result. red: 2 * kFp8Warps floats.
__device__ __forceinline__ Fp8Sums block_sum(Fp8Sums s, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    s.a = add_rn(s.a, __shfl_down_sync(kFullWarp, s.a, off));
    s.b = add_rn(s.b, __shfl_down_sync(kFullWarp, s.b, off));
  }
  if (threadIdx.x % 32 == 0) {
    red[threadIdx.x / 32] = s.a;
    red[kFp8Warps + threadIdx.x / 32] = s.b;
  }
  __syncthreads();
  Fp8Sums t;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kFp8Warps; ++w) fp8_sums_add(t, Fp8Sums{red[w], red[kFp8Warps + w]});
  }
  __syncthreads();  // red is reused
  return t;
}

}  // namespace
}  // namespace autoround_fast
