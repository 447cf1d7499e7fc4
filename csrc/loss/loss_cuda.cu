// Fused masked MSE on the GPU: one pass over pred and ref with 16-byte loads, per-block
// partial sums, then one block that adds the partials in a fixed order (deterministic).
#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "loss.h"

namespace autoround_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxBlocks = 1024;

__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = add_rn(v, __shfl_xor_sync(kFullWarp, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? smem[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v = add_rn(v, __shfl_xor_sync(kFullWarp, v, off));
  }
  return v;
}

// kMask: a.mask is set; without it every element counts and the unmasked forms apply (loss.h).
template <typename T, bool kVec, bool kMask>
__global__ void __launch_bounds__(kThreads) masked_mse_partial_kernel(LossArgs a, float* partials) {
  __shared__ float smem[kThreads / 32];
  constexpr int kV = 16 / sizeof(T);
  const T* p = static_cast<const T*>(a.pred);
  const T* r = static_cast<const T*>(a.ref);
  float acc = 0.f;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  if constexpr (kVec) {
    for (int64_t i = (blockIdx.x * (int64_t)kThreads + threadIdx.x) * kV; i < a.numel; i += stride * kV) {
      float x[kV], y[kV];
      load_vec<T, kV>(p + i, x);
      load_vec<T, kV>(r + i, y);
      if constexpr (kMask) {
        const float m = __ldg(a.mask + i / a.hidden);
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          float d = sub_rn(round_through<T>(mul_rn(x[j], m)), round_through<T>(mul_rn(y[j], m)));
          acc = add_rn(acc, mul_rn(d, d));
        }
      } else {
#pragma unroll
        for (int j = 0; j < kV; ++j) acc = add_rn(acc, unmasked_sq_diff(x[j], y[j]));
      }
    }
  } else {
    for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < a.numel; i += stride) {
      const float m = a.mask ? __ldg(a.mask + i / a.hidden) : 1.f;
      float d = sub_rn(masked_value(p[i], m), masked_value(r[i], m));
      acc = add_rn(acc, mul_rn(d, d));
    }
  }
  float tot = block_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = tot;
}

__global__ void __launch_bounds__(kThreads) masked_mse_final_kernel(const float* partials, int n,
                                                                   double inv_numel, float* loss) {
  __shared__ float smem[kThreads / 32];
  float acc = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) acc = add_rn(acc, partials[i]);
  float tot = block_sum(acc, smem);
  if (threadIdx.x == 0) *loss = static_cast<float>(static_cast<double>(tot) * inv_numel);
}

template <typename T, bool kVec, bool kMask>
__global__ void __launch_bounds__(kThreads) masked_mse_backward_kernel(LossArgs a, const float* grad_loss,
                                                                      float norm, T* out) {
  constexpr int kV = 16 / sizeof(T);
  const T* p = static_cast<const T*>(a.pred);
  const T* r = static_cast<const T*>(a.ref);
  const float g = __ldg(grad_loss);
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  if constexpr (kVec) {
    for (int64_t i = (blockIdx.x * (int64_t)kThreads + threadIdx.x) * kV; i < a.numel; i += stride * kV) {
      float x[kV], y[kV], o[kV];
      load_vec<T, kV>(p + i, x);
      load_vec<T, kV>(r + i, y);
      if constexpr (kMask) {
        const float m = __ldg(a.mask + i / a.hidden);
#pragma unroll
        for (int j = 0; j < kV; ++j)
          o[j] = to_f32(masked_mse_grad(from_f32<T>(x[j]), from_f32<T>(y[j]), m, norm, g));
      } else {
#pragma unroll
        for (int j = 0; j < kV; ++j) o[j] = to_f32(unmasked_mse_grad<T>(x[j], y[j], norm, g));
      }
      store_vec<T, kV>(out + i, o);
    }
  } else {
    for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < a.numel; i += stride) {
      const float m = a.mask ? __ldg(a.mask + i / a.hidden) : 1.f;
      out[i] = masked_mse_grad(p[i], r[i], m, norm, g);
    }
  }
}

template <typename T>
bool vectorizable(const LossArgs& a, std::initializer_list<const void*> ptrs) {
  constexpr int kV = 16 / sizeof(T);
  if (a.hidden % kV != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

unsigned loss_grid(int64_t numel) {
  unsigned g = grid_for(numel, kThreads * 8);
  return g > kMaxBlocks ? kMaxBlocks : g;
}

}  // namespace

int64_t loss_partials_size() { return kMaxBlocks; }

const char* launch_masked_mse_loss(const LossArgs& a, float* partials, float* loss, cudaStream_t s) {
  const unsigned grid = loss_grid(a.numel);
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    const bool vec = vectorizable<T>(a, {a.pred, a.ref});
    if (vec && a.mask)
      masked_mse_partial_kernel<T, true, true><<<grid, kThreads, 0, s>>>(a, partials);
    else if (vec)
      masked_mse_partial_kernel<T, true, false><<<grid, kThreads, 0, s>>>(a, partials);
    else
      masked_mse_partial_kernel<T, false, true><<<grid, kThreads, 0, s>>>(a, partials);
  });
  masked_mse_final_kernel<<<1, kThreads, 0, s>>>(partials, static_cast<int>(grid),
                                                1.0 / static_cast<double>(a.numel), loss);
  return launch_status();
}

const char* launch_masked_mse_loss_backward(const LossArgs& a, const float* grad_loss, void* grad_pred,
                                            cudaStream_t s) {
  const float norm = static_cast<float>(2.0 / static_cast<double>(a.numel));
  const unsigned grid = loss_grid(a.numel);
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    const bool vec = vectorizable<T>(a, {a.pred, a.ref, grad_pred});
    T* o = static_cast<T*>(grad_pred);
    if (vec && a.mask)
      masked_mse_backward_kernel<T, true, true><<<grid, kThreads, 0, s>>>(a, grad_loss, norm, o);
    else if (vec)
      masked_mse_backward_kernel<T, true, false><<<grid, kThreads, 0, s>>>(a, grad_loss, norm, o);
    else
      masked_mse_backward_kernel<T, false, true><<<grid, kThreads, 0, s>>>(a, grad_loss, norm, o);
  });
  return launch_status();
}

}  // namespace autoround_fast
