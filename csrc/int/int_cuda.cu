// Integer fake quantization on the GPU. Element j of a group belongs to lane (j / 4) % 32
// (int_quant.h); each lane sums its elements in order and the lanes combine by an xor
// butterfly, the order the CPU kernel replays. Groups of 4..128 that divide the row run the
// small-group kernels (a group per 1..32 lanes, its elements held in registers); any other
// layout runs the general kernels, one warp per group, 4-element chunks per lane.
#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "int_quant.h"

#include <type_traits>

namespace autoround_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kLanes;
// Blocks of the small-group forward resident per SM: it is held to 48 registers for 5 (it
// waits on memory; at 50 registers 4 stayed resident and it lost 8 points of bandwidth,
// docs/design.md#int-kernels), and its grid is capped at that many blocks per SM (small_grid).
constexpr int kForwardResident = 5;

template <typename T, bool kVec, bool kNc = true>
__device__ __forceinline__ void load_chunk(const T* p, int64_t n_left, float* x) {
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      float4 u = load_ro<kNc>(reinterpret_cast<const float4*>(p));
      x[0] = u.x; x[1] = u.y; x[2] = u.z; x[3] = u.w;
    } else {
      uint2 u = load_ro<kNc>(reinterpret_cast<const uint2*>(p));
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) x[j] = to_f32(t[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) x[j] = j < n_left ? to_f32(p[j]) : 0.f;
  }
}

template <bool kVec, bool kNc = true>
__device__ __forceinline__ void load_chunk_f32(const float* p, int64_t n_left, float* x) {
  load_chunk<float, kVec, kNc>(p, n_left, x);
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

// xor butterflies over the L lanes of a group (L = 32: the whole warp). The partials: sym has
// no zero point, and its zc and zs stay zero.
template <int L>
__device__ __forceinline__ float sub_min(float v) {
#pragma unroll
  for (int off = L / 2; off > 0; off /= 2) v = min_num(v, __shfl_xor_sync(kFullWarp, v, off));
  return v;
}
template <int L>
__device__ __forceinline__ float sub_max(float v) {
#pragma unroll
  for (int off = L / 2; off > 0; off /= 2) v = max_num(v, __shfl_xor_sync(kFullWarp, v, off));
  return v;
}
template <int L>
__device__ __forceinline__ float sub_sum(float v) {
#pragma unroll
  for (int off = L / 2; off > 0; off /= 2) v = add_rn(v, __shfl_xor_sync(kFullWarp, v, off));
  return v;
}
template <int L, typename P>
__device__ __forceinline__ IntPartials sub_sum(const IntPartials& t, const P& p) {
  if (p.sym) return {sub_sum<L>(t.a), sub_sum<L>(t.b), 0.f, 0.f};
  return {sub_sum<L>(t.a), sub_sum<L>(t.b), sub_sum<L>(t.zc), sub_sum<L>(t.zs)};
}

struct GroupSpan {
  int64_t base, n;
};

// The general kernels' parameters, at run time: they are not the hot path, and the fixed
// ones (below) made one of them spill.
__device__ __forceinline__ IntParams int_params(const IntArgs& a) {
  return {a.bits, a.sym, a.scale_dtype, quotient_dtype(a.dtype, a.scale_dtype)};
}

// Calls f(p) with the scheme's parameters, sym and the quotient's dtype as constants
// (FixedIntParams): one warp-uniform branch per thread, where the element code would branch
// on them per element. The quotient of a T weight is T (16-bit T, scales of T's dtype) or fp32.
template <typename T, typename F>
__device__ __forceinline__ void with_fixed_params(const IntArgs& a, F&& f) {
  constexpr int kT = sizeof(T) == 4 ? kFloat : (std::is_same_v<T, bf16_t> ? kBFloat16 : kHalf);
  const bool quot_t = quotient_dtype(a.dtype, a.scale_dtype) == kT;
  if (a.sym) {
    if (kT != kFloat && quot_t) f(FixedIntParams<true, kT>{a.bits, a.scale_dtype});
    else f(FixedIntParams<true, kFloat>{a.bits, a.scale_dtype});
  } else {
    if (kT != kFloat && quot_t) f(FixedIntParams<false, kT>{a.bits, a.scale_dtype});
    else f(FixedIntParams<false, kFloat>{a.bits, a.scale_dtype});
  }
}

// The grid-stride loop of the general kernels, one warp per group: body(gi, span of gi).
template <typename F>
__device__ __forceinline__ void for_each_group(const IntArgs& a, F&& body) {
  const int64_t groups = a.groups;
  const int64_t total = a.rows * groups;
  for (int64_t gi = blockIdx.x * (int64_t)kWarps + threadIdx.x / kLanes; gi < total;
       gi += (int64_t)gridDim.x * kWarps) {
    const int64_t r = gi / groups, k = gi - r * groups;
    const int64_t start = k * a.group;
    const int64_t rest = a.cols - start;
    body(gi, GroupSpan{r * a.cols + start, rest < a.group ? rest : a.group});
  }
}

// The group's min and max (every lane of the warp gets them) and the scale they give with
// the group's min_scale and max_scale (mn, mx).
template <typename T, bool kVec, typename P>
__device__ __forceinline__ IntScale group_scale(const T* w, GroupSpan g, int lane, float mn, float mx,
                                                const P& p, float* wmin, float* wmax) {
  float lo = 0.f, hi = 0.f;
  for (int64_t j = lane * kChunk; j < g.n; j += kLanes * kChunk) {
    float x[kChunk];
    load_chunk<T, kVec>(w + g.base + j, g.n - j, x);
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      lo = min_num(lo, x[c]);  // padding reads as 0, which min(., 0) / max(., 0) ignore
      hi = max_num(hi, x[c]);
    }
  }
  *wmin = group_extreme(sub_min<kLanes>(lo));
  *wmax = group_extreme(sub_max<kLanes>(hi));
  return int_group_scale(*wmin, *wmax, mn, mx, p);
}

// Whether every one of a lane's E elements takes the fast division (group_fast: the group is
// in its domain). One branch per lane, not per element: the per-element IEEE division's
// reciprocal and slow-path branch are what the fast division saves.
template <int E>
__device__ __forceinline__ bool lane_fast(const float* x, bool group_fast) {
  bool fast = group_fast;
#pragma unroll
  for (int c = 0; c < E; ++c) fast = fast && int_fast_element(x[c]);
  return fast;
}

// x[c] = qdq(x[c], v[c]) for a lane's E elements (padding too: its results are not stored).
template <int E, typename P>
__device__ __forceinline__ void qdq_elements(float* x, const float* v, const IntScale& sc, const P& p) {
  if (lane_fast<E>(x, sc.fast)) {
#pragma unroll
    for (int c = 0; c < E; ++c) x[c] = int_qdq<true>(x[c], v[c], sc, p);
  } else {
#pragma unroll
    for (int c = 0; c < E; ++c) x[c] = int_qdq<false>(x[c], v[c], sc, p);
  }
}

// The backward of a lane's E elements: gv[c], and the partial sums of element c into
// acc[c / kChunk] (the CPU lane it belongs to). Only the first n elements are real (n == E
// but in the general kernel's ragged tail, which never takes the fast division: kMayFast).
template <int E, bool kMayFast, typename P>
__device__ __forceinline__ void backward_elements(const float* x, const float* v, const float* g,
                                                  const IntScale& sc, const P& p, bool group_fast, int64_t n,
                                                  float* gv, IntPartials* acc) {
  if (kMayFast && lane_fast<E>(x, group_fast)) {
#pragma unroll
    for (int c = 0; c < E; ++c) int_element_backward<true>(x[c], v[c], g[c], sc, p, &gv[c], acc[c / kChunk]);
  } else {
#pragma unroll
    for (int c = 0; c < E; ++c)
      if (c < n) int_element_backward<false>(x[c], v[c], g[c], sc, p, &gv[c], acc[c / kChunk]);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fake_quant_int_kernel(IntArgs a, T* out, void* scale, float* zp) {
  const int lane = threadIdx.x % kLanes;
  const T* w = static_cast<const T*>(a.weight);
  const IntParams p = int_params(a);
  for_each_group(a, [&](int64_t gi, GroupSpan g) {
    float wmin, wmax;
    const IntScale sc = group_scale<T, kVec>(w, g, lane, __ldg(a.min_scale + gi), __ldg(a.max_scale + gi), p,
                                             &wmin, &wmax);
    if (lane == 0) {
      int_store_scale(scale, gi, sc.s, a.scale_dtype);
      zp[gi] = sc.zp;
    }
    for (int64_t j = lane * kChunk; j < g.n; j += kLanes * kChunk) {
      float x[kChunk], v[kChunk];
      load_chunk<T, kVec>(w + g.base + j, g.n - j, x);
      load_chunk_f32<kVec>(a.v + g.base + j, g.n - j, v);
      qdq_elements<kChunk>(x, v, sc, p);
      store_chunk<T, kVec>(out + g.base + j, g.n - j, x);
    }
  });
}

// A group's scale gradients, to Out (lane 0 of the group, after every lane has read the scales).
template <typename Out, typename P>
__device__ __forceinline__ void scales_out(const Out& out, const IntPartials& tot, float wmin, float wmax,
                                           const IntScale& sc, const P& p, int64_t gi, float mn, float mx) {
  float g_mn, g_mx;
  int_group_scale_backward(tot, wmin, wmax, sc, p, &g_mn, &g_mx);
  out.min_one(gi, mn, g_mn);
  out.max_one(gi, mx, g_mx);
}

// Out: GradOut (the gradients) or StepOut (the sign step in place, cuda_utils.cuh).
template <typename T, bool kVec, typename Out>
__global__ void __launch_bounds__(kThreads) fake_quant_int_backward_kernel(IntArgs a, const T* grad, Out out) {
  constexpr bool kNc = !Out::kInPlace;
  out.start();
  const int lane = threadIdx.x % kLanes;
  const T* w = static_cast<const T*>(a.weight);
  const IntParams p = int_params(a);
  for_each_group(a, [&](int64_t gi, GroupSpan g) {
    float wmin, wmax;
    const float mn = load_ro<kNc>(a.min_scale + gi), mx = load_ro<kNc>(a.max_scale + gi);
    const IntScale sc = group_scale<T, kVec>(w, g, lane, mn, mx, p, &wmin, &wmax);
    const bool group_fast = int_second_division_fast(sc, wmin, wmax, p);
    IntPartials acc{0.f, 0.f, 0.f, 0.f};
    for (int64_t j = lane * kChunk; j < g.n; j += kLanes * kChunk) {
      float x[kChunk], v[kChunk], gr[kChunk], gv[kChunk];
      load_chunk<T, kVec>(w + g.base + j, g.n - j, x);
      load_chunk<T, kVec>(grad + g.base + j, g.n - j, gr);
      load_chunk_f32<kVec, kNc>(a.v + g.base + j, g.n - j, v);
      backward_elements<kChunk, kVec>(x, v, gr, sc, p, group_fast, kVec ? kChunk : g.n - j, gv, &acc);
      if constexpr (kVec) {
        out.template v_vec<kChunk>(g.base + j, v, gv);
      } else {
#pragma unroll
        for (int c = 0; c < kChunk; ++c)
          if (j + c < g.n) out.v_one(g.base + j + c, v[c], gv[c]);
      }
    }
    const IntPartials tot = sub_sum<kLanes>(acc, p);
    if (lane == 0) scales_out(out, tot, wmin, wmax, sc, p, gi, mn, mx);
  });
}


// ---------------------------------------------------------------------------------------
// Small groups (every group whole, a group per L lanes, L a power of two): each lane holds E
// elements in registers, so each element is read once, and a warp works on 32 / L groups at
// a time. E = 8 where the group allows (groups 8..128: 16-byte loads of bf16 and fp16, and
// each group's scale arithmetic and butterflies shared by twice the elements; these kernels
// are bound by instruction issue), else E = 4 (group 4). E = 16 took 122 registers, two
// blocks per SM, and lost 4-18 points of bandwidth on the H200 (docs/design.md#tried-and-not-kept).
// The sums: element j belongs to the CPU's lane j / 4 (int_quant.h), whose partials a 32-lane
// xor butterfly combines (lanes past the group add zeros). With E = 4 lane k is that lane, and
// the butterfly over the L lanes takes the same steps. With E = 8 lane k holds the CPU's
// lanes 2k and 2k+1: their partials stay apart, each is combined over the L lanes (the CPU's
// steps xor 2L/2 .. 2 are xor L/2 .. 1 here), and the two are added last (its step xor 1).
// The same additions in the same order: the same bits.
// ---------------------------------------------------------------------------------------

constexpr int kWide = 2 * kChunk;

// A lane's E elements: 16-byte accesses where E values of T fill whole 16-byte words, else
// (E = 4 of a 16-bit type) one 8-byte access.
template <typename T, int E, bool kNc = true>
__device__ __forceinline__ void load_lane(const T* p, float* x) {
  if constexpr ((E * sizeof(T)) % 16 == 0) {
    load_vec<T, E, kNc>(p, x);
  } else {
    static_assert(E == kChunk, "lane width");
    load_chunk<T, true, kNc>(p, kChunk, x);
  }
}
template <typename T, int E>
__device__ __forceinline__ void store_lane(T* p, const float* x) {
  if constexpr ((E * sizeof(T)) % 16 == 0) {
    store_vec<T, E>(p, x);
  } else {
    static_assert(E == kChunk, "lane width");
    store_chunk<T, true>(p, kChunk, x);
  }
}

// The grid-stride loop of the small-group kernels: a warp takes 32 / L groups per pass, one
// per slot of L lanes. body(gi, active, offset of this lane's elements, lane within the
// group); every lane runs body, since the butterflies need the whole warp. A slot past the
// last group reads the last group again (active false): it must store nothing, and what it
// computes is discarded (its reads may meet that group's in-place step half done). That
// spares the zeroing and the branches around the loads. Unrolling by 4 groups per slot
// lowered occupancy and bandwidth on the H100 (70% -> 51% of copy bandwidth for fwd+bwd,
// docs/design.md#tried-and-not-kept): one group per slot per pass.
template <int L, int E, typename F>
__device__ __forceinline__ void for_each_small_group(const IntArgs& a, F&& body) {
  constexpr int kPerWarp = kLanes / L;
  const int lane = threadIdx.x % kLanes, sub = lane % L, slot = lane / L;
  const int64_t total = a.rows * a.groups;
  const int64_t warp = blockIdx.x * (int64_t)kWarps + threadIdx.x / kLanes;
  for (int64_t g0 = warp * kPerWarp; g0 < total; g0 += (int64_t)gridDim.x * kWarps * kPerWarp) {
    const int64_t gi = g0 + slot < total ? g0 + slot : total - 1;
    body(gi, g0 + slot < total, gi * a.group + sub * E, sub);
  }
}

// The group's min and max over its L lanes' E elements each.
template <int L, int E>
__device__ __forceinline__ void small_min_max(const float* x, float* lo, float* hi) {
  float l = 0.f, h = 0.f;
#pragma unroll
  for (int c = 0; c < E; ++c) {
    l = min_num(l, x[c]);
    h = max_num(h, x[c]);
  }
  *lo = group_extreme(sub_min<L>(l));
  *hi = group_extreme(sub_max<L>(h));
}

template <typename T, int L, int E>
__global__ void __launch_bounds__(kThreads, kForwardResident) fake_quant_int_small_kernel(IntArgs a, T* out, void* scale, float* zp) {
  const T* w = static_cast<const T*>(a.weight);
  with_fixed_params<T>(a, [&](const auto& p) {
    for_each_small_group<L, E>(a, [&](int64_t gi, bool active, int64_t off, int sub) {
      float x[E], v[E], lo, hi;
      load_lane<T, E>(w + off, x);
      load_lane<float, E>(a.v + off, v);
      small_min_max<L, E>(x, &lo, &hi);
      if (!active) return;
      const IntScale sc = int_group_scale(lo, hi, __ldg(a.min_scale + gi), __ldg(a.max_scale + gi), p);
      if (sub == 0) {
        int_store_scale(scale, gi, sc.s, a.scale_dtype);
        zp[gi] = sc.zp;
      }
      qdq_elements<E>(x, v, sc, p);
      store_lane<T, E>(out + off, x);
    });
  });
}

template <typename T, int L, int E, typename Out>
__global__ void __launch_bounds__(kThreads) fake_quant_int_small_backward_kernel(IntArgs a, const T* grad, Out out) {
  constexpr int kParts = E / kChunk;  // the CPU's lanes this lane holds
  constexpr bool kNc = !Out::kInPlace;
  out.start();
  const T* w = static_cast<const T*>(a.weight);
  with_fixed_params<T>(a, [&](const auto& p) {
    for_each_small_group<L, E>(a, [&](int64_t gi, bool active, int64_t off, int sub) {
      float x[E], v[E], gr[E], gv[E], lo, hi;
      load_lane<T, E>(w + off, x);
      load_lane<T, E>(grad + off, gr);
      load_lane<float, E, kNc>(a.v + off, v);
      const float mn = load_ro<kNc>(a.min_scale + gi), mx = load_ro<kNc>(a.max_scale + gi);
      small_min_max<L, E>(x, &lo, &hi);
      const IntScale sc = int_group_scale(lo, hi, mn, mx, p);
      IntPartials acc[kParts] = {};
      backward_elements<E, true>(x, v, gr, sc, p, int_second_division_fast(sc, lo, hi, p), E, gv, acc);
      if (active) out.template v_vec<E>(off, v, gv);
#pragma unroll
      for (int k = 0; k < kParts; ++k) acc[k] = sub_sum<L>(acc[k], p);
      // the CPU's last steps, xor kParts / 2 .. 1, over the parts this lane holds
#pragma unroll
      for (int step = kParts / 2; step > 0; step /= 2)
#pragma unroll
        for (int k = 0; k < step; ++k) int_partials_add(acc[k], acc[k + step]);
      if (active && sub == 0) scales_out(out, acc[0], lo, hi, sc, p, gi, mn, mx);
    });
  });
}

// The small-group layout: lanes per group and elements per lane, or {0, 0} when the layout
// needs the general kernels.
struct SmallLayout {
  int lanes, per_lane;
};
SmallLayout small_layout(const IntArgs& a, std::initializer_list<const void*> ptrs) {
  if (a.cols % a.group != 0) return {0, 0};
  for (const void* p : ptrs)
    if (!aligned16(p)) return {0, 0};
  const auto pow2 = [](int64_t n) { return n > 0 && (n & (n - 1)) == 0; };
  if (a.group % kWide == 0 && pow2(a.group / kWide) && a.group / kWide <= kLanes / 2)
    return {static_cast<int>(a.group / kWide), kWide};
  if (a.group % kChunk == 0 && pow2(a.group / kChunk) && a.group / kChunk <= kLanes)
    return {static_cast<int>(a.group / kChunk), kChunk};
  return {0, 0};
}

// f(lanes) with lanes (a power of two up to kMax) as a compile-time constant.
template <int kMax, typename F>
void with_lanes(int lanes, F&& f) {
  if constexpr (kMax > 1) {
    if (lanes < kMax) return with_lanes<kMax / 2>(lanes, f);
  }
  f(std::integral_constant<int, kMax>{});
}

// One pass over the groups, or (resident_per_sm > 0) at most the blocks that are resident at
// once: each warp then loops over several groups and pays its set-up (the group count,
// indices, parameters: about a fifth of a forward lane's instructions) once, not per group.
// H200, INT4 g128: the forward went from 73-78% to 78-90% of copy bandwidth; the backward
// with the step lost 7 points on the large shapes that way (87% -> 80%), so it keeps one
// pass (docs/design.md#int-kernels).
unsigned small_grid(int64_t groups, int lanes, int resident_per_sm = 0) {
  const unsigned g = grid_for(groups, kWarps * (kLanes / lanes));
  const int64_t cap = resident_per_sm > 0 ? static_cast<int64_t>(sm_count()) * resident_per_sm : 0;
  return cap > 0 && g > cap ? static_cast<unsigned>(cap) : g;
}

bool chunked(const IntArgs& a, std::initializer_list<const void*> ptrs) {
  if (a.group % kChunk != 0 || a.cols % kChunk != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// Calls f(lanes, per lane) as compile-time constants for a layout small_layout gives; only
// those are instantiated: E = 8 for groups 8..128 (1..16 lanes), E = 4 for group 4 (one lane).
template <typename F>
void with_small_layout(SmallLayout l, F&& f) {
  if (l.per_lane == kWide)
    with_lanes<kLanes / 2>(l.lanes, [&](auto lanes) { f(lanes, std::integral_constant<int, kWide>{}); });
  else
    f(std::integral_constant<int, 1>{}, std::integral_constant<int, kChunk>{});
}

}  // namespace

const char* launch_fake_quant_int(const IntArgs& a, void* out, void* scale, float* zp, cudaStream_t s) {
  const int64_t total = a.rows * a.groups;
  const bool vec = chunked(a, {a.weight, a.v, out});
  const SmallLayout small = small_layout(a, {a.weight, a.v, out});
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (small.lanes)
      with_small_layout(small, [&](auto l, auto e) {
        fake_quant_int_small_kernel<T, decltype(l)::value, decltype(e)::value>
            <<<small_grid(total, small.lanes, kForwardResident), kThreads, 0, s>>>(
                a, static_cast<T*>(out), scale, zp);
      });
    else if (vec)
      fake_quant_int_kernel<T, true><<<grid_for(total, kWarps), kThreads, 0, s>>>(
          a, static_cast<T*>(out), scale, zp);
    else
      fake_quant_int_kernel<T, false><<<grid_for(total, kWarps), kThreads, 0, s>>>(
          a, static_cast<T*>(out), scale, zp);
  });
  return launch_status();
}

namespace {

template <typename Out>
const char* launch_int_backward(const IntArgs& a, const void* grad, Out out,
                                std::initializer_list<const void*> ptrs, cudaStream_t s) {
  const int64_t total = a.rows * a.groups;
  const bool vec = chunked(a, ptrs);
  const SmallLayout small = small_layout(a, ptrs);
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (small.lanes)
      with_small_layout(small, [&](auto l, auto e) {
        fake_quant_int_small_backward_kernel<T, decltype(l)::value, decltype(e)::value, Out>
            <<<small_grid(total, small.lanes), kThreads, 0, s>>>(a, static_cast<const T*>(grad), out);
      });
    else if (vec)
      fake_quant_int_backward_kernel<T, true, Out><<<grid_for(total, kWarps), kThreads, 0, s>>>(
          a, static_cast<const T*>(grad), out);
    else
      fake_quant_int_backward_kernel<T, false, Out><<<grid_for(total, kWarps), kThreads, 0, s>>>(
          a, static_cast<const T*>(grad), out);
  });
  return launch_status();
}

}  // namespace

const char* launch_fake_quant_int_backward(const IntArgs& a, const void* grad, float* grad_v,
                                           float* g_min, float* g_max, cudaStream_t stream) {
  return launch_int_backward(a, grad, GradOut{grad_v, g_min, g_max}, {a.weight, a.v, grad, grad_v}, stream);
}

const char* launch_fake_quant_int_backward_step(const IntArgs& a, const void* grad, const StepTargets& t,
                                                cudaStream_t stream) {
  return launch_int_backward(a, grad, StepOut{t, false, 0.f}, {a.weight, a.v, grad}, stream);
}

}  // namespace autoround_fast
