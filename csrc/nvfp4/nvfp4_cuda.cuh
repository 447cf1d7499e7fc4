// The 16-element group loop and the group loads and stores that the NVFP4 kernels share
// (nvfp4_cuda.cu, silu_act_cuda.cu). CUDA headers only.
#pragma once

#include <initializer_list>
#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "nvfp4.h"

namespace autoround_fast {
namespace nvfp4_cuda {

constexpr int kThreads = 256;

// The group's n values (16 on the vector path) as fp32; the rest of x is left unset.
template <typename T, bool kVec>
__device__ __forceinline__ void load_vals(const T* src, int n, float* x) {
  if constexpr (kVec) {
    load_vec<T, kNvfp4Group>(src, x);
  } else {
    for (int j = 0; j < n; ++j) x[j] = to_f32(src[j]);
  }
}

// max |x| over the group's n values.
template <bool kVec>
__device__ __forceinline__ float group_amax(const float* x, int n) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < kNvfp4Group; ++j)
    if (kVec || j < n) m = max_num(m, fabs_(x[j]));  // |x| >= +0, never NaN (checked inputs)
  return m;
}

// load_vals and group_amax; returns the group's length.
template <typename T, bool kVec>
__device__ __forceinline__ int load_group(const T* src, int n, float* x, float* amax) {
  load_vals<T, kVec>(src, n, x);
  *amax = group_amax<kVec>(x, n);
  return kVec ? kNvfp4Group : n;
}

// One group's 16 values of T kept as loaded (16-bit types two to a register): for kernels
// that hold several groups of inputs at once, at half the registers of fp32 copies. Reads
// convert on the fly; set() rounds an fp32 value into T.
template <typename T, bool kVec>
struct RawGroup {
  static constexpr int kWords = kNvfp4Group * sizeof(T) / 16;
  uint4 w[kWords];
  __device__ __forceinline__ void load(const T* src, int n) {
    if constexpr (kVec) {
#pragma unroll
      for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
    } else {
      for (int j = 0; j < n; ++j) reinterpret_cast<T*>(w)[j] = src[j];
    }
  }
  __device__ __forceinline__ float operator[](int j) const { return to_f32(reinterpret_cast<const T*>(w)[j]); }
  __device__ __forceinline__ void set(int j, float v) { reinterpret_cast<T*>(w)[j] = from_f32<T>(v); }
  // Tells the compiler the values may have changed (they have not; no instruction is
  // emitted), so that what a later pass recomputes from them is recomputed, not kept in
  // registers from an earlier pass.
  __device__ __forceinline__ void fence() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) asm volatile("" : "+r"(w[i].x), "+r"(w[i].y), "+r"(w[i].z), "+r"(w[i].w));
  }
  __device__ __forceinline__ void store(T* dst, int n) const {
    if constexpr (kVec) {
#pragma unroll
      for (int i = 0; i < kWords; ++i) reinterpret_cast<uint4*>(dst)[i] = w[i];
    } else {
      for (int j = 0; j < n; ++j) dst[j] = reinterpret_cast<const T*>(w)[j];
    }
  }
};

template <bool kVec, bool kNc = true>
__device__ __forceinline__ void load_f32(const float* src, int n, float* x) {
  if constexpr (kVec) {
    load_vec<float, kNvfp4Group, kNc>(src, x);
  } else {
    for (int j = 0; j < n; ++j) x[j] = load_ro<kNc>(src + j);
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store_group(T* dst, int n, const float* y) {
  if constexpr (kVec) {
    store_vec<T, kNvfp4Group>(dst, y);
  } else {
    for (int j = 0; j < n; ++j) dst[j] = from_f32<T>(y[j]);
  }
}

struct GroupIndex {
  int64_t base;
  int n;
};

// The grid-stride loop of every kernel here, one thread per 16-element group of a [rows, cols]
// tensor: body(gi, where group gi starts and how many elements it has). Unrolling the
// activation kernels by 2 groups per thread, all loaded before the first use, lowered
// occupancy and bandwidth on the H100 (63% -> 49% of copy bandwidth for fwd+bwd, docs/design.md#nvfp4-kernels).
// kWhole (rows are whole groups, the vector path): group gi starts at element 16 * gi, so
// the loop needs no 64-bit division by the groups per row.
template <bool kWhole, typename F>
__device__ __forceinline__ void for_each_group(int64_t rows, int64_t cols, F&& body) {
  const int64_t groups = (cols + kNvfp4Group - 1) / kNvfp4Group;
  const int64_t total = rows * groups;
  for (int64_t gi = blockIdx.x * (int64_t)kThreads + threadIdx.x; gi < total;
       gi += (int64_t)gridDim.x * kThreads) {
    if constexpr (kWhole) {
      body(gi, GroupIndex{gi * kNvfp4Group, kNvfp4Group});
    } else {
      const int64_t r = gi / groups, k = gi - r * groups;
      const int64_t start = k * kNvfp4Group;
      const int64_t rest = cols - start;
      body(gi, GroupIndex{r * cols + start, static_cast<int>(rest < kNvfp4Group ? rest : kNvfp4Group)});
    }
  }
}

// Rows are whole groups and every pointer is 16-byte aligned: the vector path applies.
inline bool whole_groups(int64_t cols, std::initializer_list<const void*> ptrs) {
  if (cols % kNvfp4Group != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// Launches a kernel over the 16-element groups of a [rows, cols] tensor, one thread per group:
// launch(t, vec, grid, stream), with t a value of the dtype's storage type and vec a
// std::bool_constant, true where whole_groups(cols, ptrs) allows the vector path. Returns
// launch_status(); launches nothing for zero rows (an activation of no tokens).
template <typename F>
const char* launch_over_groups(int dtype, int64_t rows, int64_t cols, std::initializer_list<const void*> ptrs,
                               cudaStream_t s, F&& launch) {
  if (rows == 0) return nullptr;
  const unsigned grid = grid_for(rows * ((cols + kNvfp4Group - 1) / kNvfp4Group), kThreads);
  const bool vec = whole_groups(cols, ptrs);
  with_type_and_vec(dtype, vec, [&](auto t, auto v) { launch(t, v, grid, s); });
  return launch_status();
}

}  // namespace nvfp4_cuda
}  // namespace autoround_fast
