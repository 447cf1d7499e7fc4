// MX (MXFP4, MXFP8) weight and activation fake quantization on the GPU. A 32-element group
// per 4 lanes, 8 consecutive elements per lane (a 16-byte load of a 16-bit type, two of
// fp32), so a warp takes 8 groups, 256 consecutive elements, per pass. The group's maximum
// is an xor butterfly over its 4 lanes; the max_scale gradient's sums run through the lanes
// in order (lane 0's elements, then lane 1's, ...), the sequential sum the CPU kernel takes.
// The math is mx.h's, shared with the CPU kernels: both produce the same bits.
#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "mx.h"

namespace autoround_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kL = 4;                 // lanes per group
constexpr int kE = kMxGroup / kL;     // elements per lane
constexpr int kPerWarp = 32 / kL;     // groups per warp and pass
// floats per row of group_backward's term buffer (a group's 32 terms of one sum): padded so that
// the 16 summing lanes' 16-byte reads of a warp's 16 rows take two wavefronts, not sixteen
constexpr int kChainStride = kMxGroup + 4;

// Where a lane works in a pass: its group, the index of its first element, how many of its
// kE elements the group has (kE on the vector path; fewer, or none, at a ragged row end),
// and its place in the group.
struct LaneSpan {
  int64_t gi;
  bool active;  // false: a slot past the last group, which redoes the last one and stores nothing
  int64_t at;
  int n;
  int sub, slot;
};

// The grid-stride loop: body(LaneSpan) on every lane, since the butterflies and the chained
// sums need the whole warp. kWhole: rows are whole groups (group gi starts at 32 * gi).
template <bool kWhole, typename F>
__device__ __forceinline__ void for_each_mx_group(int64_t rows, int64_t cols, F&& body) {
  const int lane = threadIdx.x % 32, sub = lane % kL, slot = lane / kL;
  const int64_t groups = (cols + kMxGroup - 1) / kMxGroup, total = rows * groups;
  const int64_t warp = blockIdx.x * (int64_t)kWarps + threadIdx.x / 32;
  for (int64_t g0 = warp * kPerWarp; g0 < total; g0 += (int64_t)gridDim.x * kWarps * kPerWarp) {
    const bool active = g0 + slot < total;
    const int64_t gi = active ? g0 + slot : total - 1;
    if constexpr (kWhole) {
      body(LaneSpan{gi, active, gi * kMxGroup + sub * kE, kE, sub, slot});
    } else {
      const int64_t r = gi / groups, k = gi - r * groups;
      const int64_t rest = cols - k * kMxGroup - sub * kE;
      body(LaneSpan{gi, active, r * cols + k * kMxGroup + sub * kE,
                    static_cast<int>(rest < 0 ? 0 : (rest < kE ? rest : kE)), sub, slot});
    }
  }
}

// max |x| over the group (every lane of it gets it).
__device__ __forceinline__ float group_amax(const float* x) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < kE; ++j) m = max_num(m, fabs_(x[j]));  // |x| >= +0, never NaN (checked inputs)
#pragma unroll
  for (int off = kL / 2; off > 0; off /= 2) m = max_num(m, __shfl_xor_sync(kFullWarp, m, off));
  return m;
}

// The group's backward: V's gradient per element (gt), and d(loss)/d(m) (every lane of the
// group gets it), the sums taken element by element in the group's order (mx.h's MxGroupSums).
// The elements take mx.h's short path (mx_element_grad_fast) where it gives the same bits, which
// is everywhere but in groups with extreme gradients (a lane with one such element redoes its
// elements by the full path). kNoV: activations (V = 0; v is not read).
template <int kBits, bool kNoV>
__device__ __forceinline__ float group_backward(const float* x, const float* v, const float* g, int n,
                                                const MxScale& sc, const LaneSpan& ls, float* gt) {
  float ta[kE], tb[kE];  // the terms of MxGroupSums' two sums
  bool fast = true;
#pragma unroll
  for (int j = 0; j < kE; ++j) {
    const MxElem e = mx_element_forward<kBits, kNoV>(x[j], kNoV ? 0.f : v[j], sc);
    const float g3 = mul_rn(g[j], sc.scale);
    fast &= mx_grad_fast_ok(e, g3);
    gt[j] = mx_element_grad_fast<kBits>(e, g3);
    ta[j] = MxGroupSums::out_term(g[j], e.q);
    tb[j] = MxGroupSums::div_term(x[j], gt[j], sc);
  }
  if (!fast) {
#pragma unroll
    for (int j = 0; j < kE; ++j) {
      gt[j] = mx_element_grad<kBits>(mx_element_forward<kBits, kNoV>(x[j], kNoV ? 0.f : v[j], sc), g[j], sc);
      tb[j] = MxGroupSums::div_term(x[j], gt[j], sc);
    }
  }
  // The chains: each group's terms go through shared memory to two of its lanes, lane 0 (sum
  // of ta) and lane 1 (sum of tb), which add all 32 in element order. A term past the row's end
  // is -0, which leaves every sum as it is (x + -0 = x, -0 included).
  __shared__ __align__(16) float terms[kWarps][kPerWarp * 2][kChainStride];
  float(*const mine)[kChainStride] = terms[threadIdx.x / 32] + ls.slot * 2;
#pragma unroll
  for (int j = 0; j < kE; j += 4) {
    *reinterpret_cast<float4*>(&mine[0][ls.sub * kE + j]) =
        make_float4(j < n ? ta[j] : -0.f, j + 1 < n ? ta[j + 1] : -0.f, j + 2 < n ? ta[j + 2] : -0.f,
                    j + 3 < n ? ta[j + 3] : -0.f);
    *reinterpret_cast<float4*>(&mine[1][ls.sub * kE + j]) =
        make_float4(j < n ? tb[j] : -0.f, j + 1 < n ? tb[j + 1] : -0.f, j + 2 < n ? tb[j + 2] : -0.f,
                    j + 3 < n ? tb[j + 3] : -0.f);
  }
  __syncwarp();
  float s = 0.f;
  if (ls.sub < 2) {
    const float4* src = reinterpret_cast<const float4*>(mine[ls.sub]);
#pragma unroll
    for (int i = 0; i < kMxGroup / 4; ++i) {
      const float4 t = src[i];
      s = add_rn(add_rn(add_rn(add_rn(s, t.x), t.y), t.z), t.w);
    }
  }
  __syncwarp();  // terms is rewritten in the next pass
  const int first = (threadIdx.x % 32) - ls.sub;
  MxGroupSums sums;
  sums.out = __shfl_sync(kFullWarp, s, first);
  sums.div = __shfl_sync(kFullWarp, s, first + 1);
  return sums.g_m(sc);
}

template <int kBits, typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_mx_kernel(MxArgs a, T* out, float* exps) {
  const T* w = static_cast<const T*>(a.weight);
  for_each_mx_group<kVec>(a.rows, a.cols, [&](const LaneSpan& ls) {
    float x[kE], v[kE];
    load_part<T, kE, kVec>(w + ls.at, ls.n, x);
    load_part<float, kE, kVec>(a.v + ls.at, ls.n, v);
    const float amax = group_amax(x);
    if (!ls.active) return;
    const MxScale sc = mx_group_scale<kBits>(amax, __ldg(a.max_scale + ls.gi));
    if (ls.sub == 0) exps[ls.gi] = sc.e;
#pragma unroll
    for (int j = 0; j < kE; ++j) x[j] = mx_qdq<kBits>(x[j], v[j], sc);
    store_part<T, kE, kVec>(out + ls.at, ls.n, x);
  });
}

template <int kBits, typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_mx_backward_kernel(MxArgs a, const T* grad, float* grad_v,
                                                                          float* grad_ms) {
  const T* w = static_cast<const T*>(a.weight);
  for_each_mx_group<kVec>(a.rows, a.cols, [&](const LaneSpan& ls) {
    float x[kE], v[kE], g[kE], gt[kE];
    load_part<T, kE, kVec>(w + ls.at, ls.n, x);
    load_part<T, kE, kVec>(grad + ls.at, ls.n, g);
    load_part<float, kE, kVec>(a.v + ls.at, ls.n, v);
    const float amax = group_amax(x);
    const MxScale sc = mx_group_scale<kBits>(amax, __ldg(a.max_scale + ls.gi));
    const float g_m = group_backward<kBits, false>(x, v, g, ls.n, sc, ls, gt);
    if (!ls.active) return;
    store_part<float, kE, kVec>(grad_v + ls.at, ls.n, gt);
    if (ls.sub == 0) grad_ms[ls.gi] = mul_rn(g_m, amax);
  });
}

template <int kBits, typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_mx_activation_kernel(MxActArgs a, T* out) {
  const T* xin = static_cast<const T*>(a.x);
  for_each_mx_group<kVec>(a.rows, a.cols, [&](const LaneSpan& ls) {
    float x[kE];
    load_part<T, kE, kVec>(xin + ls.at, ls.n, x);
    const float amax = group_amax(x);
    if (!ls.active) return;
    const MxScale sc = mx_group_scale<kBits>(amax, 1.0f);
#pragma unroll
    for (int j = 0; j < kE; ++j) x[j] = mx_qdq<kBits, true>(x[j], 0.0f, sc);
    store_part<T, kE, kVec>(out + ls.at, ls.n, x);
  });
}

template <int kBits, typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_mx_activation_backward_kernel(MxActArgs a, const T* grad,
                                                                                     T* grad_x) {
  const T* xin = static_cast<const T*>(a.x);
  for_each_mx_group<kVec>(a.rows, a.cols, [&](const LaneSpan& ls) {
    float x[kE], g[kE], gt[kE];
    load_part<T, kE, kVec>(xin + ls.at, ls.n, x);
    load_part<T, kE, kVec>(grad + ls.at, ls.n, g);
    const float amax = group_amax(x);
    const MxScale sc = mx_group_scale<kBits>(amax, 1.0f);
    const float g_m = group_backward<kBits, true>(x, nullptr, g, ls.n, sc, ls, gt);
    // torch.max's index: the group's first element with |x| == amax, on the first lane that
    // holds one (elements past the row's end read as 0, after every real one); xa: its value
    int arg = kE;
    float xa = 0.f;
#pragma unroll
    for (int j = kE - 1; j >= 0; --j)
      if (fabs_(x[j]) == amax) arg = j, xa = x[j];
    const unsigned lanes = (__ballot_sync(kFullWarp, arg < kE) >> (ls.slot * kL)) & ((1u << kL) - 1u);
    if (ls.sub != __ffs(lanes) - 1) arg = kE;
    if (!ls.active) return;
    const float m_arg = mx_act_max_term(g_m, xa, true);
    // the fp32 sums; the store rounds them to T once, as mx_act_grad's round trip does
#pragma unroll
    for (int j = 0; j < kE; ++j)
      gt[j] = mx_act_grad_fp32(gt[j], sc, j == arg ? m_arg : mx_act_max_term(g_m, x[j], false));
    store_part<T, kE, kVec>(grad_x + ls.at, ls.n, gt);
  });
}

// Launches kernel<bits, T, vec> over the groups of a [rows, cols] tensor: launch(bits, t, vec,
// grid, stream) with bits and vec as std::integral_constant / std::bool_constant, vec true
// where rows are whole groups and every pointer is 16-byte aligned. Launches nothing for zero
// rows (an activation of no tokens).
template <typename F>
const char* launch_over_groups(int bits, int dtype, int64_t rows, int64_t cols,
                               std::initializer_list<const void*> ptrs, cudaStream_t s, F&& launch) {
  if (rows == 0) return nullptr;
  const int64_t total = rows * ((cols + kMxGroup - 1) / kMxGroup);
  const unsigned grid = grid_for(total, kWarps * kPerWarp);
  bool vec = cols % kMxGroup == 0;
  for (const void* p : ptrs) vec = vec && aligned16(p);
  with_mx_bits(bits, [&](auto b) {
    with_type_and_vec(dtype, vec, [&](auto t, auto v) { launch(b, t, v, grid, s); });
  });
  return launch_status();
}

}  // namespace

const char* launch_fake_quant_mx(const MxArgs& a, void* out, float* exps, cudaStream_t stream) {
  return launch_over_groups(a.bits, a.dtype, a.rows, a.cols, {a.weight, a.v, out}, stream,
                            [&](auto b, auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_mx_kernel<decltype(b)::value, T, decltype(vec)::value>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<T*>(out), exps);
                            });
}

const char* launch_fake_quant_mx_backward(const MxArgs& a, const void* grad, float* grad_v, float* grad_ms,
                                          cudaStream_t stream) {
  return launch_over_groups(a.bits, a.dtype, a.rows, a.cols, {a.weight, a.v, grad, grad_v}, stream,
                            [&](auto b, auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_mx_backward_kernel<decltype(b)::value, T, decltype(vec)::value>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), grad_v, grad_ms);
                            });
}

const char* launch_fake_quant_mx_activation(const MxActArgs& a, void* out, cudaStream_t stream) {
  return launch_over_groups(a.bits, a.dtype, a.rows, a.cols, {a.x, out}, stream,
                            [&](auto b, auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_mx_activation_kernel<decltype(b)::value, T, decltype(vec)::value>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<T*>(out));
                            });
}

const char* launch_fake_quant_mx_activation_backward(const MxActArgs& a, const void* grad, void* grad_x,
                                                     cudaStream_t stream) {
  return launch_over_groups(a.bits, a.dtype, a.rows, a.cols, {a.x, grad, grad_x}, stream,
                            [&](auto b, auto t, auto vec, unsigned grid, cudaStream_t s) {
                              using T = decltype(t);
                              fake_quant_mx_activation_backward_kernel<decltype(b)::value, T, decltype(vec)::value>
                                  <<<grid, kThreads, 0, s>>>(a, static_cast<const T*>(grad), static_cast<T*>(grad_x));
                            });
}

}  // namespace autoround_fast
