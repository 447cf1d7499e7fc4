// SiLU(gate) * up followed by W4A4's NVFP4 activation fake quantization, in one pass, forward
// and backward: a Llama MLP's down_proj input under W4A4. The product m never goes through
// memory; the backward recomputes it from gate and up.
//
// The bits are those of the eager composition fake_quant_nvfp4_activation(F.silu(gate) * up):
//   s  = T(silu(gate))              silu in fp32, rounded to the dtype T (F.silu)
//   m  = T(s * up)                  (the bf16/fp16 multiply computes in fp32 and rounds)
//   out = act_qdq(m)                (nvfp4.h, as fake_quant_nvfp4_activation)
// and backward, as autograd runs it:
//   dm    = act_backward(grad, m)   (rounded to T, as the act op's gradient)
//   dup   = T(dm * s)
//   dgate = T(silu_backward(T(dm * up), gate))
//
// SiLU and its gradient are PyTorch's eager CUDA formulas (ActivationSiluKernel.cu), in fp32:
//   silu(x) = x / (1 + exp(-x)),   silu_backward(dy, x) = dy * s * (1 + x * (1 - s)),
//   s = 1 / (1 + exp(-x)).
// PyTorch compiles them with nvcc's default FMA contraction, which fuses expf's last multiply
// with the "+ 1" and x * (1 - s) + 1 into FMAs; the same source without contraction rounds
// differently. So this file, alone among the .cu files, is built with --fmad=true
// (CMakeLists.txt); everything else in it rounds through the explicit *_rn intrinsics of
// numerics.h, which no contraction touches.
#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "nvfp4_cuda.cuh"

namespace autoround_fast {
namespace {
using namespace nvfp4_cuda;

__device__ __forceinline__ float silu_eager(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float silu_backward_eager(float dy, float x) {
  const float s = 1.0f / (1.0f + expf(-x));
  return dy * s * (1.0f + x * (1.0f - s));
}

// m = T(s * up) for s = T(silu(gate)): the eager ops' roundings, shared by the forward, the
// backward's group pass and its argmax element.
template <typename T>
__device__ __forceinline__ float silu_times_up(float s, float up) { return round_through<T>(mul_rn(s, up)); }

// m = T(T(silu(gate)) * up) for the group's values.
template <typename T, bool kVec>
__device__ __forceinline__ void silu_mul(const float* gate, const float* up, int n, float* m) {
#pragma unroll
  for (int j = 0; j < kNvfp4Group; ++j)
    if (kVec || j < n) m[j] = silu_times_up<T>(round_through<T>(silu_eager(gate[j])), up[j]);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) silu_mul_act_kernel(SiluMulActArgs a, T* out) {
  const float gs = __ldg(a.global_scale), inv_gs = inv_global_scale(gs);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t, GroupIndex g) {
    float x[kNvfp4Group], u[kNvfp4Group];
    load_vals<T, kVec>(gate + g.base, g.n, x);
    load_vals<T, kVec>(up + g.base, g.n, u);
    silu_mul<T, kVec>(x, u, g.n, x);
    const Nvfp4Scale sc = nvfp4_group_scale(group_amax<kVec>(x, g.n), 1.0f, gs, inv_gs);
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j)
      if (kVec || j < g.n) x[j] = nvfp4_qdq_act(x[j], sc);
    store_group<T, kVec>(out + g.base, g.n, x);
  });
}

// The backward keeps gate, up, the gradient and T(silu(gate)) as loaded (RawGroup, two
// 16-bit values to a register) and recomputes m = T(s * up) and each element's
// straight-through gradient where they are needed (for the group's sums, then for the
// output) rather than holding them in fp32. The fences between the passes stop the compiler
// from keeping the first pass's values alive for the next (common subexpressions): 64
// registers per thread instead of 127, twice the groups in flight (forward+backward on
// 16384x14336 bf16, H200: 1.886 -> 1.709 ms).
// The kernel is bound by the conversion pipe (expf, the reciprocals and the fp32 -> 16-bit
// roundings; docs/design.md#silu-act-kernel), so the output pass treats every element as off the
// group's argmax (its gradient T(gc * os) needs no second rounding), and the argmax element
// is redone alone after the group's stores, overwriting its place: 144 -> 103 roundings per
// 16 bf16 elements. Four blocks per SM for the 16-bit types (64 registers; ptxas spills 4
// bytes), the compiler's choice for fp32 (0: no minimum).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 2 ? 4 : 0)
    silu_mul_act_backward_kernel(SiluMulActArgs a, const T* grad, T* grad_gate, T* grad_up) {
  const float gs = __ldg(a.global_scale), inv_gs = inv_global_scale(gs);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  for_each_group<kVec>(a.rows, a.cols, [&](int64_t, GroupIndex g) {
    const int n = g.n;
    RawGroup<T, kVec> gt, u, gr, s;
    gt.load(gate + g.base, n);
    u.load(up + g.base, n);
    gr.load(grad + g.base, n);
    auto m_at = [&](int j) { return silu_times_up<T>(s[j], u[j]); };
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j) {
      if (kVec || j < n) {
        s.set(j, silu_eager(gt[j]));  // T(silu(gate))
        amax = max_num(amax, fabs_(m_at(j)));
      }
    }
    const Nvfp4Scale sc = nvfp4_group_scale(amax, 1.0f, gs, inv_gs);
    s.fence();
    u.fence();
    gt.fence();
    Nvfp4GroupSums sums;
    // The first element with |m| == amax (torch.max's index) also takes the gradient through
    // max|m|: its results are computed and written after the group's.
    int arg = -1;
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j) {
      if (kVec || j < n) {
        const float m = m_at(j);
        if (arg < 0 && fabs_(m) == amax) arg = j;
        float q;
        const float gc = nvfp4_element_grad<true>(m, 0.f, gr[j], sc, &q);
        sums.add(m, gr[j], gc, q);
      }
    }
    const float g_m = sums.g_m(sc, gs, inv_gs);
    s.fence();
    u.fence();
    gr.fence();
    // Every element as if it were not the argmax: dm = T(gc * os) (nvfp4_act_grad's direct
    // path, already in T), then the argmax's own results overwrite its place.
#pragma unroll
    for (int j = 0; j < kNvfp4Group; ++j) {
      if (kVec || j < n) {
        const float m = m_at(j);
        float q;
        const float gc = nvfp4_element_grad<true>(m, 0.f, gr[j], sc, &q);
        const float dm = round_through<T>(mul_rn(gc, sc.os));
        const float dgate = silu_backward_eager(round_through<T>(mul_rn(dm, u[j])), gt[j]);
        const float dup = mul_rn(dm, s[j]);
        gt.set(j, dgate);  // gate, up: element j is not read again
        u.set(j, dup);
      }
    }
    gt.store(grad_gate + g.base, n);
    u.store(grad_up + g.base, n);
    if (arg >= 0) {  // its inputs read again (cached); the same thread's later stores replace
      const int64_t at = g.base + arg;  // the values just written
      const float x = to_f32(gate[at]), up_x = to_f32(up[at]);
      const float s_x = round_through<T>(silu_eager(x));
      const float m = silu_times_up<T>(s_x, up_x);
      float q;
      const float gc = nvfp4_element_grad<true>(m, 0.f, to_f32(grad[at]), sc, &q);
      const float dm = round_through<T>(nvfp4_act_grad<T>(gc, sc.os, g_m, m, true));
      grad_gate[at] = from_f32<T>(silu_backward_eager(round_through<T>(mul_rn(dm, up_x)), x));
      grad_up[at] = from_f32<T>(mul_rn(dm, s_x));
    }
  });
}

}  // namespace

const char* launch_silu_mul_nvfp4_activation(const SiluMulActArgs& a, void* out, cudaStream_t stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.gate, a.up, out}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              silu_mul_act_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                                  a, static_cast<T*>(out));
                            });
}

const char* launch_silu_mul_nvfp4_activation_backward(const SiluMulActArgs& a, const void* grad,
                                                      void* grad_gate, void* grad_up, cudaStream_t stream) {
  return launch_over_groups(a.dtype, a.rows, a.cols, {a.gate, a.up, grad, grad_gate, grad_up}, stream,
                            [&](auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              silu_mul_act_backward_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                                  a, static_cast<const T*>(grad), static_cast<T*>(grad_gate),
                                  static_cast<T*>(grad_up));
                            });
}

}  // namespace autoround_fast
