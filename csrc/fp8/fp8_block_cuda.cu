// FP8 (e4m3) weights with one scale per 128 x 128 block on the GPU, forward and backward, each
// one pass over the weight: a CUDA block of kFp8Threads per FP8 block. Each thread loads its
// kFp8BlockChunksPerThread chunks of W at once (16-byte accesses where rows allow) and keeps
// them in registers from the block's maximum to the quantization, then streams V (and the
// gradient) chunk by chunk. The backward's sums run in fp8_block.h's order (the CPU kernels
// replay it) and end in one block reduction: the same bits on every run, no atomics.
#include <algorithm>
#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "../launchers.h"
#include "fp8_block.h"
#include "fp8_cuda.cuh"

namespace autoround_fast {
namespace {

constexpr int kChunks = kFp8BlockChunksPerThread;
// CUDA blocks per SM each kernel is built for (__launch_bounds__' minimum): as many as keep a
// thread's chunks of W in registers without spilling (nvcc 13, sm_90: a 16-bit weight's
// forward fits 64 registers, its backward 80; an fp32 weight, or the ragged paths, 128).
// More resident blocks hide each one's pauses at its reductions.
template <typename T, bool kVec>
constexpr int kForwardBlocksPerSm = kVec && sizeof(T) == 2 ? 4 : 2;
template <typename T, bool kVec>
constexpr int kBackwardBlocksPerSm = kVec && sizeof(T) == 2 ? 3 : 2;

// This thread's chunks of a block: chunk k starts at flat offset base + k * stride and holds
// `left` elements of the weight (more than kFp8Chunk: all of them) if k < count.
struct ThreadChunks {
  int64_t base, stride;
  int count, left;
  __device__ __forceinline__ bool has(int k) const { return k < count && left > 0; }
  __device__ __forceinline__ int64_t at(int k) const { return base + k * stride; }
};

__device__ __forceinline__ ThreadChunks thread_chunks(const Fp8BlockArgs& a, const Fp8BlockTile& b) {
  const Fp8BlockChunk c = fp8_block_chunk(threadIdx.x, 0);
  const int rows_left = b.rows - c.row;  // rows of the block from this thread's first one
  return {(b.row0 + c.row) * a.cols + b.col0 + c.col, kFp8BlockRowsPerPass * a.cols,
          (rows_left + kFp8BlockRowsPerPass - 1) / kFp8BlockRowsPerPass, b.cols - c.col};
}
static_assert(kFp8BlockRowsPerPass * kFp8BlockChunksPerRow == kFp8Threads,
              "chunk k of a thread is k passes of the threads below its chunk 0 (fp8_block_chunk)");

// Loads this thread's chunks of W into raw; returns their max |W| (0 if none).
template <typename T, bool kVec>
__device__ __forceinline__ float load_weight(const T* w, const ThreadChunks& tc, RawChunk<T>* raw) {
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (tc.has(k)) {
      raw[k].template load<kVec>(w + tc.at(k), tc.left);
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) m = max_num(m, fabs_(raw[k][j]));  // padding is 0
    }
  }
  return m;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kFp8Threads, (kForwardBlocksPerSm<T, kVec>))
    fp8_block_forward_kernel(Fp8BlockArgs a, T* out, float* scale) {
  __shared__ float red[kFp8Warps];
  for (int64_t bi = blockIdx.x; bi < a.grid_rows * a.grid_cols; bi += gridDim.x) {
    const ThreadChunks tc = thread_chunks(a, fp8_block_tile(a, bi));
    RawChunk<T> raw[kChunks];
    const float amax = block_max(load_weight<T, kVec>(static_cast<const T*>(a.weight), tc, raw), red);
    const Fp8Scale sc = fp8_scale(amax, __ldg(a.max_scale + bi), a.scale_dtype);
    if (threadIdx.x == 0) scale[bi] = sc.s;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (!tc.has(k)) continue;
      float x[kFp8Chunk];
      load_part<float, kFp8Chunk, kVec>(a.v + tc.at(k), tc.left, x);
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j) x[j] = fp8_qdq(fp8_x<T>(raw[k][j]), x[j], sc.div);
      store_part<T, kFp8Chunk, kVec>(out + tc.at(k), tc.left, x);
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kFp8Threads, (kBackwardBlocksPerSm<T, kVec>))
    fp8_block_backward_kernel(Fp8BlockArgs a, const T* grad, float* grad_v, float* grad_ms) {
  __shared__ float red[2 * kFp8Warps];
  for (int64_t bi = blockIdx.x; bi < a.grid_rows * a.grid_cols; bi += gridDim.x) {
    const ThreadChunks tc = thread_chunks(a, fp8_block_tile(a, bi));
    RawChunk<T> raw[kChunks];
    const float amax = block_max(load_weight<T, kVec>(static_cast<const T*>(a.weight), tc, raw), red);
    const Fp8Scale sc = fp8_scale(amax, __ldg(a.max_scale + bi), a.scale_dtype);
    Fp8Sums acc;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (!tc.has(k)) continue;
      float vv[kFp8Chunk], gg[kFp8Chunk];
      load_part<float, kFp8Chunk, kVec>(a.v + tc.at(k), tc.left, vv);
      load_part<T, kFp8Chunk, kVec>(grad + tc.at(k), tc.left, gg);
#pragma unroll
      for (int j = 0; j < kFp8Chunk; ++j)
        if (kVec || j < tc.left)  // the sums add the weight's elements only
          gg[j] = fp8_element_backward(fp8_x<T>(raw[k][j]), vv[j], gg[j], sc.div, acc);
      store_part<float, kFp8Chunk, kVec>(grad_v + tc.at(k), tc.left, gg);
    }
    const Fp8Sums total = block_sum(acc, red);
    if (threadIdx.x == 0) grad_ms[bi] = fp8_grad_max_scale(total, sc, amax, a.scale_dtype);
  }
}

// 16-byte accesses need every chunk to start 16 bytes into each tensor: whole chunks per row
// (kFp8Block is a multiple of kFp8Chunk) and aligned bases.
bool vector_path(const Fp8BlockArgs& a, std::initializer_list<const void*> ptrs) {
  if (a.cols % kFp8Chunk != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

unsigned grid_of(const Fp8BlockArgs& a) {
  return static_cast<unsigned>(std::min<int64_t>(a.grid_rows * a.grid_cols, 0x7fffffff));
}

}  // namespace

const char* launch_fake_quant_fp8_block(const Fp8BlockArgs& a, void* out, float* scale, cudaStream_t stream) {
  with_type_and_vec(a.dtype, vector_path(a, {a.weight, a.v, out}), [&](auto t, auto kv) {
    using T = decltype(t);
    fp8_block_forward_kernel<T, decltype(kv)::value><<<grid_of(a), kFp8Threads, 0, stream>>>(
        a, static_cast<T*>(out), scale);
  });
  return launch_status();
}

const char* launch_fake_quant_fp8_block_backward(const Fp8BlockArgs& a, const void* grad, float* grad_v,
                                                 float* grad_ms, cudaStream_t stream) {
  with_type_and_vec(a.dtype, vector_path(a, {a.weight, a.v, grad, grad_v}), [&](auto t, auto kv) {
    using T = decltype(t);
    fp8_block_backward_kernel<T, decltype(kv)::value><<<grid_of(a), kFp8Threads, 0, stream>>>(
        a, static_cast<const T*>(grad), grad_v, grad_ms);
  });
  return launch_status();
}

}  // namespace autoround_fast
