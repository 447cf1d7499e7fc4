// FP8 (e4m3) weight and activation fake quantization on the GPU. The math is fp8.h's, shared
// with the CPU kernels, and so is the order of every sum, so both give the same bits.
//
// Per-row weights: the forward runs a block per row, which keeps the row in registers between
// its maximum and its quantization (one read of W); the backward runs a block per 8 rows, a
// warp per row, and a ninth warp that adds each row's terms sequentially, in element order,
// while the eight compute the next 256 columns (double-buffered in shared memory).
// Per-tensor weights and activations: flat passes over tiles of kFp8Tile elements, 8 per
// thread with 16-byte accesses. A weight's maximum, unless the caller gives it, is a first
// pass (partial maxima per block, reduced by every block of the next pass); the backward
// writes one partial of each sum per tile, and a last one-block pass adds them in fp8.h's
// fixed order. No atomics: the same bits on every run.
#include <algorithm>
#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "fp8_cuda.cuh"

namespace autoround_fast {
namespace {

constexpr int kMaxAmaxPartials = 1024;  // blocks of the per-tensor maximum pass, at most
constexpr int kRowsPerBlock = 8;        // the per-row backward: one compute warp per row
constexpr int kRowStep = 32 * kFp8Chunk;  // columns a warp takes per step
// floats per row of the backward's term buffer: (a, b) per column, padded by 4 so that the
// summing lanes' reads of eight rows fall in eight distinct 16-byte bank groups
constexpr int kTermStride = 2 * kRowStep + 4;
// The per-row forward keeps up to kMaxChunks chunks of 8 per thread in registers.
constexpr int kMaxChunks = 8;

// The maximum of n partial maxima (a maximum is exact in any order).
__device__ __forceinline__ float reduce_amax(const float* partials, int n, float* red) {
  float m = 0.f;
  for (int i = threadIdx.x; i < n; i += kFp8Threads) m = max_num(m, partials[i]);
  return block_max(m, red);
}

// ---- per-tensor weights and activations: flat passes ----

// Where a flat pass's scale comes from: the maximum as given (an activation's calibrated
// act_max, a weight's weight_amax) or the partial maxima of the first pass; times max_scale.
struct ScaleSource {
  const float* amax_partials;  // nullptr: the maximum is given
  int n_partials;
  const float* given_amax;
  const float* max_scale;
  int scale_dtype;
  __device__ __forceinline__ float amax(float* red) const {
    return amax_partials ? reduce_amax(amax_partials, n_partials, red) : __ldg(given_amax);
  }
};

template <typename T, bool kVec>
__global__ void __launch_bounds__(kFp8Threads) fp8_amax_kernel(const T* w, int64_t n, float* partials) {
  __shared__ float red[kFp8Warps];
  float m = 0.f;
  for (int64_t i = (blockIdx.x * (int64_t)kFp8Threads + threadIdx.x) * kFp8Chunk; i < n;
       i += (int64_t)gridDim.x * kFp8Tile) {
    float x[kFp8Chunk];
    load_part<T, kFp8Chunk, kVec>(w + i, n - i, x);  // padding reads as 0, which the maximum ignores
#pragma unroll
    for (int j = 0; j < kFp8Chunk; ++j) m = max_num(m, fabs_(x[j]));
  }
  m = block_max(m, red);
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
}

// Tiles in reverse order of the maximum pass, which read them first to last: the tiles it read
// last are the likeliest still in L2 (where the maximum is given, no pass ran, and the order is
// as good as any).
__device__ __forceinline__ int64_t tile_of(int64_t k, int64_t tiles) { return tiles - 1 - k; }

// kAct: an activation's fake quantization (no V); else Wq with the weight's V. scale_out: the
// weight's scale, or nullptr. Two instantiations, so that the activations' holds no V path
// (its registers decide how many blocks an SM holds).
template <typename T, bool kVec, bool kAct>
__global__ void __launch_bounds__(kFp8Threads) fp8_flat_forward_kernel(const T* x, const float* v, T* out, int64_t n,
                                                                       ScaleSource src, float* scale_out) {
  __shared__ float red[kFp8Warps];
  const float amax = src.amax(red);
  const Fp8Scale sc = fp8_scale(amax, __ldg(src.max_scale), src.scale_dtype);
  if (scale_out && blockIdx.x == 0 && threadIdx.x == 0) *scale_out = sc.s;
  const int64_t tiles = (n + kFp8Tile - 1) / kFp8Tile;
  for (int64_t k = blockIdx.x; k < tiles; k += gridDim.x) {
    const int64_t i = tile_of(k, tiles) * kFp8Tile + threadIdx.x * kFp8Chunk;
    if (i >= n) continue;
    float xv[kFp8Chunk], vv[kFp8Chunk];
    load_part<T, kFp8Chunk, kVec>(x + i, n - i, xv);
    if constexpr (!kAct) {
      load_part<float, kFp8Chunk, kVec>(v + i, n - i, vv);
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) xv[j] = fp8_qdq(fp8_x<T>(xv[j]), vv[j], sc.div);
    } else {
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) xv[j] = fp8_qdq<true>(fp8_x<T>(xv[j]), 0.f, sc.div);
    }
    store_part<T, kFp8Chunk, kVec>(out + i, n - i, xv);
  }
}

// The backward's elementwise part and one partial of each sum per tile (tile_a, tile_b).
// kAct: activations (no V; the gradient of x, in T, to grad_out); else the weight's dV
// (fp32) to grad_out.
template <typename T, bool kVec, bool kAct>
__global__ void __launch_bounds__(kFp8Threads) fp8_flat_backward_kernel(const T* x, const float* v, const T* grad,
                                                                        void* grad_out, int64_t n, ScaleSource src,
                                                                        float* tile_a, float* tile_b) {
  __shared__ float red[2 * kFp8Warps];
  const float amax = src.amax(red);
  const Divider d = fp8_scale(amax, __ldg(src.max_scale), src.scale_dtype).div;
  const int64_t tiles = (n + kFp8Tile - 1) / kFp8Tile;
  for (int64_t k = blockIdx.x; k < tiles; k += gridDim.x) {
    const int64_t tile = tile_of(k, tiles);
    const int64_t i = tile * kFp8Tile + threadIdx.x * kFp8Chunk;
    Fp8Sums acc;
    if (i < n) {
      float xv[kFp8Chunk], vv[kFp8Chunk], gv[kFp8Chunk];
      load_part<T, kFp8Chunk, kVec>(x + i, n - i, xv);
      load_part<T, kFp8Chunk, kVec>(grad + i, n - i, gv);
      if constexpr (!kAct) load_part<float, kFp8Chunk, kVec>(v + i, n - i, vv);
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) {
        if (kVec || j < n - i) {  // the sums add the chunk's real elements only
          const float gy = fp8_element_backward<kAct>(fp8_x<T>(xv[j]), kAct ? 0.f : vv[j], gv[j], d, acc);
          if constexpr (kAct) {
            gv[j] = to_f32(fp8_act_grad<T>(gy, d));  // exact: a value of T
          } else {
            gv[j] = gy;
          }
        }
      }
      if constexpr (kAct) {
        store_part<T, kFp8Chunk, kVec>(static_cast<T*>(grad_out) + i, n - i, gv);
      } else {
        store_part<float, kFp8Chunk, kVec>(static_cast<float*>(grad_out) + i, n - i, gv);
      }
    }
    const Fp8Sums t = block_sum(acc, red);
    if (threadIdx.x == 0) {
      tile_a[tile] = t.a;
      tile_b[tile] = t.b;
    }
  }
}

// The tiles' partials added in fp8.h's order, and the gradient of max_scale. One block.
__global__ void __launch_bounds__(kFp8Threads) fp8_finish_kernel(const float* tile_a, const float* tile_b,
                                                                 int64_t tiles, ScaleSource src, float* grad_ms) {
  __shared__ float red[2 * kFp8Warps];
  const float amax = src.amax(red);
  const Fp8Scale sc = fp8_scale(amax, __ldg(src.max_scale), src.scale_dtype);
  const int64_t per = fp8_partials_per_thread(tiles);
  const int64_t begin = threadIdx.x * per, end = begin + per < tiles ? begin + per : tiles;
  Fp8Sums s;
  for (int64_t i = begin; i < end; ++i) fp8_sums_add(s, Fp8Sums{tile_a[i], tile_b[i]});
  const Fp8Sums total = block_sum(s, red);
  if (threadIdx.x == 0) *grad_ms = fp8_grad_max_scale(total, sc, amax, src.scale_dtype);
}

// ---- per-row weights ----

// A block per row (grid-stride over rows). K > 0: each thread keeps its K chunks of the row
// (rows of at most K * kFp8Tile columns) in registers from the maximum to the quantization;
// K == 0: the row is read twice (the second time mostly from L2).
template <typename T, bool kVec, int K>
__global__ void __launch_bounds__(kFp8Threads) fp8_row_forward_kernel(Fp8Args a, T* out, float* scale) {
  __shared__ float red[kFp8Warps];
  const int64_t cols = a.cols;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* w = static_cast<const T*>(a.weight) + r * cols;
    const float* v = a.v + r * cols;
    T* o = out + r * cols;
    float m = 0.f;
    RawChunk<T> raw[K > 0 ? K : 1];
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (k * (int64_t)kFp8Threads + threadIdx.x) * kFp8Chunk;
        if (c < cols) {
          raw[k].template load<kVec>(w + c, cols - c);
#pragma unroll
          for (int j = 0; j < kFp8Chunk; ++j) m = max_num(m, fabs_(raw[k][j]));  // padding is 0
        }
      }
    } else {
      for (int64_t c = threadIdx.x * kFp8Chunk; c < cols; c += kFp8Tile) {
        float x[kFp8Chunk];
        load_part<T, kFp8Chunk, kVec>(w + c, cols - c, x);
#pragma unroll
        for (int j = 0; j < kFp8Chunk; ++j) m = max_num(m, fabs_(x[j]));
      }
    }
    const Fp8Scale sc = fp8_scale(block_max(m, red), __ldg(a.max_scale + r), a.scale_dtype);
    if (threadIdx.x == 0) scale[r] = sc.s;
    auto quantize = [&](int64_t c, float* x) {
      float vv[kFp8Chunk];
      load_part<float, kFp8Chunk, kVec>(v + c, cols - c, vv);
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) x[j] = fp8_qdq(fp8_x<T>(x[j]), vv[j], sc.div);
      store_part<T, kFp8Chunk, kVec>(o + c, cols - c, x);
    };
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (k * (int64_t)kFp8Threads + threadIdx.x) * kFp8Chunk;
        if (c < cols) {
          float x[kFp8Chunk];
#pragma unroll
          for (int j = 0; j < kFp8Chunk; ++j) x[j] = raw[k][j];
          quantize(c, x);
        }
      }
    } else {
      for (int64_t c = threadIdx.x * kFp8Chunk; c < cols; c += kFp8Tile) {
        float x[kFp8Chunk];
        load_part<T, kFp8Chunk, kVec>(w + c, cols - c, x);
        quantize(c, x);
      }
    }
  }
}

// The per-row backward's step barrier: a named barrier (1) over the block's compute warps and
// its summing warp, which reach it from different places in the code (bar.sync orders their
// shared-memory accesses as __syncthreads does).
__device__ __forceinline__ void step_barrier() {
  asm volatile("bar.sync 1, %0;" ::"n"(kFp8Threads + 32) : "memory");
}

// kRowsPerBlock compute warps (warp r: row r of the block's group) and one summing warp.
// Compute warps write each step's (a, b) terms to terms[step & 1][row] and meet the summing
// warp at one barrier per step; the summing warp's lane 2r adds row r's a terms, lane 2r + 1
// its b terms, one step behind, in column order.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kFp8Threads + 32) fp8_row_backward_kernel(Fp8Args a, const T* grad,
                                                                            float* grad_v, float* grad_ms) {
  __shared__ __align__(16) float terms[2][kRowsPerBlock][kTermStride];
  __shared__ float row_amax[kRowsPerBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t cols = a.cols;
  const int64_t steps = (cols + kRowStep - 1) / kRowStep;
  for (int64_t r0 = blockIdx.x * (int64_t)kRowsPerBlock; r0 < a.rows; r0 += (int64_t)gridDim.x * kRowsPerBlock) {
    if (warp < kRowsPerBlock) {
      const int64_t r = r0 + warp;
      const bool valid = r < a.rows;
      const T* w = static_cast<const T*>(a.weight) + r * cols;
      const T* g = grad + r * cols;
      const float* v = a.v + r * cols;
      float* gv_row = grad_v + r * cols;
      float m = 0.f;
      if (valid) {
        for (int64_t c = lane * kFp8Chunk; c < cols; c += kRowStep) {
          float x[kFp8Chunk];
          load_part<T, kFp8Chunk, kVec>(w + c, cols - c, x);
#pragma unroll
          for (int j = 0; j < kFp8Chunk; ++j) m = max_num(m, fabs_(x[j]));
        }
      }
      const float amax = warp_max(m);
      const Divider d = fp8_scale(amax, valid ? __ldg(a.max_scale + r) : 1.f, a.scale_dtype).div;
      if (lane == 0) row_amax[warp] = amax;
      for (int64_t k = 0; k < steps; ++k) {
        const int64_t c = k * kRowStep + lane * kFp8Chunk;
        float ta[kFp8Chunk] = {}, tb[kFp8Chunk] = {};  // +0 past the row's end: no change to a sum
        if (valid && c < cols) {
          float x[kFp8Chunk], vv[kFp8Chunk], gg[kFp8Chunk];
          load_part<T, kFp8Chunk, kVec>(w + c, cols - c, x);
          load_part<T, kFp8Chunk, kVec>(g + c, cols - c, gg);
          load_part<float, kFp8Chunk, kVec>(v + c, cols - c, vv);
#pragma unroll
          for (int j = 0; j < kFp8Chunk; ++j) {
            const Fp8Terms e = fp8_element_terms(fp8_x<T>(x[j]), vv[j], gg[j], d);
            gg[j] = e.gy;
            if (kVec || j < cols - c) ta[j] = e.a, tb[j] = e.b;
          }
          store_part<float, kFp8Chunk, kVec>(gv_row + c, cols - c, gg);
        }
        float4* dst = reinterpret_cast<float4*>(&terms[k & 1][warp][lane * 2 * kFp8Chunk]);
#pragma unroll
        for (int j = 0; j < kFp8Chunk / 2; ++j) dst[j] = make_float4(ta[2 * j], tb[2 * j], ta[2 * j + 1], tb[2 * j + 1]);
        step_barrier();  // barrier k: step k's terms are in
      }
      step_barrier();  // barrier `steps`: the summing warp is done with this group
    } else {
      const int row = (lane / 2) % kRowsPerBlock;  // lanes 16..31 repeat 0..15's work, unused
      const bool odd = lane & 1;
      const int64_t r = r0 + row;
      float acc = 0.f, amax = 0.f;
      for (int64_t k = 0; k < steps; ++k) {
        step_barrier();  // barrier k
        if (k == 0) amax = row_amax[row];  // written before barrier 0, rewritten after barrier `steps`
        const float4* src = reinterpret_cast<const float4*>(&terms[k & 1][row][0]);
#pragma unroll 8
        for (int i = 0; i < kRowStep / 2; ++i) {
          const float4 p = src[i];
          acc = add_rn(acc, odd ? p.y : p.x);
          acc = add_rn(acc, odd ? p.w : p.z);
        }
      }
      step_barrier();  // barrier `steps`
      const float b = __shfl_down_sync(kFullWarp, acc, 1);
      if (lane < 2 * kRowsPerBlock && !odd && r < a.rows) {
        const Fp8Scale sc = fp8_scale(amax, __ldg(a.max_scale + r), a.scale_dtype);
        grad_ms[r] = fp8_grad_max_scale(Fp8Sums{acc, b}, sc, amax, a.scale_dtype);
      }
    }
  }
}

// ---- launches ----

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

unsigned sms() {
  const int n = sm_count();
  return n > 0 ? static_cast<unsigned>(n) : 132u;
}

unsigned amax_blocks(int64_t n) {
  const int64_t tiles = (n + kFp8Tile - 1) / kFp8Tile;
  const int64_t cap = std::min<int64_t>(kMaxAmaxPartials, 4 * sms());
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, cap)));
}

unsigned flat_blocks(int64_t n) {
  const int64_t tiles = (n + kFp8Tile - 1) / kFp8Tile;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tiles, 8 * sms())));
}

// A per-tensor weight's ScaleSource: its maximum as given, or the maximum pass's partials.
ScaleSource weight_scale_source(const Fp8Args& a, bool vec, float* partials, cudaStream_t s) {
  if (a.amax) return ScaleSource{nullptr, 0, a.amax, a.max_scale, a.scale_dtype};
  const int64_t n = a.rows * a.cols;
  const unsigned grid = amax_blocks(n);
  with_type_and_vec(a.dtype, vec, [&](auto t, auto kv) {
    using T = decltype(t);
    fp8_amax_kernel<T, decltype(kv)::value><<<grid, kFp8Threads, 0, s>>>(static_cast<const T*>(a.weight), n, partials);
  });
  return ScaleSource{partials, static_cast<int>(grid), nullptr, a.max_scale, a.scale_dtype};
}

template <typename T, bool kVec, int K>
void launch_row_forward(const Fp8Args& a, void* out, float* scale, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(a.rows, 0x7fffffff));
  fp8_row_forward_kernel<T, kVec, K><<<grid, kFp8Threads, 0, s>>>(a, static_cast<T*>(out), scale);
}

}  // namespace

int64_t fp8_scratch_floats(int64_t numel) { return kMaxAmaxPartials + 2 * ((numel + kFp8Tile - 1) / kFp8Tile); }

const char* launch_fake_quant_fp8(const Fp8Args& a, void* out, float* scale, float* scratch, cudaStream_t stream) {
  const int64_t n = a.rows * a.cols;
  if (a.per_tensor) {
    const bool vec = n % kFp8Chunk == 0 && all_aligned({a.weight, a.v, out});
    const ScaleSource src = weight_scale_source(a, vec, scratch, stream);
    with_type_and_vec(a.dtype, vec, [&](auto t, auto kv) {
      using T = decltype(t);
      fp8_flat_forward_kernel<T, decltype(kv)::value, false><<<flat_blocks(n), kFp8Threads, 0, stream>>>(
          static_cast<const T*>(a.weight), a.v, static_cast<T*>(out), n, src, scale);
    });
    return launch_status();
  }
  const bool vec = a.cols % kFp8Chunk == 0 && all_aligned({a.weight, a.v, out});
  const int64_t chunks = (a.cols + kFp8Tile - 1) / kFp8Tile;  // per thread
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (!vec || chunks > kMaxChunks)
      vec ? launch_row_forward<T, true, 0>(a, out, scale, stream) : launch_row_forward<T, false, 0>(a, out, scale, stream);
    else if (chunks == 1)
      launch_row_forward<T, true, 1>(a, out, scale, stream);
    else if (chunks == 2)
      launch_row_forward<T, true, 2>(a, out, scale, stream);
    else if (chunks <= 4)
      launch_row_forward<T, true, 4>(a, out, scale, stream);
    else
      launch_row_forward<T, true, kMaxChunks>(a, out, scale, stream);
  });
  return launch_status();
}

const char* launch_fake_quant_fp8_backward(const Fp8Args& a, const void* grad, float* grad_v, float* grad_ms,
                                           float* scratch, cudaStream_t stream) {
  const int64_t n = a.rows * a.cols;
  if (a.per_tensor) {
    const bool vec = n % kFp8Chunk == 0 && all_aligned({a.weight, a.v, grad, grad_v});
    const ScaleSource src = weight_scale_source(a, vec, scratch, stream);
    const int64_t tiles = (n + kFp8Tile - 1) / kFp8Tile;
    float* tile_a = scratch + kMaxAmaxPartials;
    float* tile_b = tile_a + tiles;
    with_type_and_vec(a.dtype, vec, [&](auto t, auto kv) {
      using T = decltype(t);
      fp8_flat_backward_kernel<T, decltype(kv)::value, false><<<flat_blocks(n), kFp8Threads, 0, stream>>>(
          static_cast<const T*>(a.weight), a.v, static_cast<const T*>(grad), grad_v, n, src, tile_a, tile_b);
    });
    fp8_finish_kernel<<<1, kFp8Threads, 0, stream>>>(tile_a, tile_b, tiles, src, grad_ms);
    return launch_status();
  }
  const bool vec = a.cols % kFp8Chunk == 0 && all_aligned({a.weight, a.v, grad, grad_v});
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((a.rows + kRowsPerBlock - 1) / kRowsPerBlock, 0x7fffffff));
  with_type_and_vec(a.dtype, vec, [&](auto t, auto kv) {
    using T = decltype(t);
    fp8_row_backward_kernel<T, decltype(kv)::value><<<grid, kFp8Threads + 32, 0, stream>>>(
        a, static_cast<const T*>(grad), grad_v, grad_ms);
  });
  return launch_status();
}

const char* launch_fake_quant_fp8_activation(const Fp8ActArgs& a, void* out, cudaStream_t stream) {
  if (a.numel == 0) return nullptr;  // an activation of no tokens
  const bool vec = a.numel % kFp8Chunk == 0 && all_aligned({a.x, out});
  const ScaleSource src{nullptr, 0, a.act_max, a.max_scale, a.scale_dtype};
  with_type_and_vec(a.dtype, vec, [&](auto t, auto kv) {
    using T = decltype(t);
    fp8_flat_forward_kernel<T, decltype(kv)::value, true><<<flat_blocks(a.numel), kFp8Threads, 0, stream>>>(
        static_cast<const T*>(a.x), nullptr, static_cast<T*>(out), a.numel, src, nullptr);
  });
  return launch_status();
}

const char* launch_fake_quant_fp8_activation_backward(const Fp8ActArgs& a, const void* grad, void* grad_x,
                                                      float* grad_ms, float* scratch, cudaStream_t stream) {
  const bool vec = a.numel % kFp8Chunk == 0 && all_aligned({a.x, grad, grad_x});
  const ScaleSource src{nullptr, 0, a.act_max, a.max_scale, a.scale_dtype};
  const int64_t tiles = (a.numel + kFp8Tile - 1) / kFp8Tile;
  float* tile_a = scratch + kMaxAmaxPartials;
  float* tile_b = tile_a + tiles;
  if (a.numel > 0) {  // no tokens: no tiles, and the finish writes a zero gradient
    with_type_and_vec(a.dtype, vec, [&](auto t, auto kv) {
      using T = decltype(t);
      fp8_flat_backward_kernel<T, decltype(kv)::value, true><<<flat_blocks(a.numel), kFp8Threads, 0, stream>>>(
          static_cast<const T*>(a.x), nullptr, static_cast<const T*>(grad), grad_x, a.numel, src, tile_a, tile_b);
    });
  }
  fp8_finish_kernel<<<1, kFp8Threads, 0, stream>>>(tile_a, tile_b, tiles, src, grad_ms);
  return launch_status();
}

}  // namespace autoround_fast
