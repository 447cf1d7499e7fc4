// The fused SignSGD step and best-parameter copy: one pass over param and grad (and a write of
// best only when the loss improved and there is one), where torch.where, sign_ and addcmul_
// took three passes.
#include <algorithm>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "launchers.h"
#include "step/step.h"

namespace autoround_fast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void step4(float4& p, const float4& g, float lr) {
  p.x = sign_step_value(p.x, g.x, lr);
  p.y = sign_step_value(p.y, g.y, lr);
  p.z = sign_step_value(p.z, g.z, lr);
  p.w = sign_step_value(p.w, g.w, lr);
}

// kVec: 16-byte accesses, four elements per iteration (numel % 4 == 0, pointers aligned).
template <bool kVec>
__global__ void __launch_bounds__(kThreads) sign_step_kernel(SignStepArgs a) {
  const bool improved = *a.improved && a.best != nullptr;
  const float lr = *a.lr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if constexpr (kVec) {
    float4* p4 = reinterpret_cast<float4*>(a.param);
    float4* b4 = reinterpret_cast<float4*>(a.best);
    const float4* g4 = reinterpret_cast<const float4*>(a.grad);
    for (int64_t i = first; i < a.numel / 4; i += stride) {
      float4 p = p4[i];
      if (improved) b4[i] = p;
      step4(p, __ldg(g4 + i), lr);
      p4[i] = p;
    }
  } else {
    for (int64_t i = first; i < a.numel; i += stride) {
      const float p = a.param[i];
      if (improved) a.best[i] = p;
      a.param[i] = sign_step_value(p, __ldg(a.grad + i), lr);
    }
  }
}

// kVec: 16-byte accesses (bytes % 16 == 0, pointers aligned), else one byte per thread.
template <bool kVec>
__global__ void __launch_bounds__(kThreads) copy_if_kernel(CopyIfArgs a) {
  if (!*a.flag) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if constexpr (kVec) {
    const int4* s = reinterpret_cast<const int4*>(a.src);
    int4* d = reinterpret_cast<int4*>(a.dst);
    for (int64_t i = first; i < a.bytes / 16; i += stride) d[i] = __ldg(s + i);
  } else {
    const unsigned char* s = static_cast<const unsigned char*>(a.src);
    unsigned char* d = static_cast<unsigned char*>(a.dst);
    for (int64_t i = first; i < a.bytes; i += stride) d[i] = s[i];
  }
}

}  // namespace

const char* launch_copy_if(const CopyIfArgs& a, cudaStream_t s) {
  if (a.bytes == 0) return nullptr;
  const bool vec = a.bytes % 16 == 0 && aligned16(a.dst) && aligned16(a.src);
  const int64_t work = vec ? a.bytes / 16 : a.bytes;
  const unsigned blocks = std::min<unsigned>(grid_for(work, kThreads), 8192u);
  if (vec) {
    copy_if_kernel<true><<<blocks, kThreads, 0, s>>>(a);
  } else {
    copy_if_kernel<false><<<blocks, kThreads, 0, s>>>(a);
  }
  return launch_status();
}

const char* launch_sign_step(const SignStepArgs& a, cudaStream_t s) {
  if (a.numel == 0) return nullptr;
  const bool vec = a.numel % 4 == 0 && aligned16(a.param) && (a.best == nullptr || aligned16(a.best)) && aligned16(a.grad);
  const int64_t work = vec ? a.numel / 4 : a.numel;
  // grid-stride: a few waves of blocks at most, each thread a few elements
  const unsigned blocks = std::min<unsigned>(grid_for(work, kThreads), 8192u);
  if (vec) {
    sign_step_kernel<true><<<blocks, kThreads, 0, s>>>(a);
  } else {
    sign_step_kernel<false><<<blocks, kThreads, 0, s>>>(a);
  }
  return launch_status();
}

}  // namespace autoround_fast
