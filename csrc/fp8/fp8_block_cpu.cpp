// FP8 (e4m3) weights with one scale per 128 x 128 block on the CPU: fp8.h's math per block,
// blocks in parallel, each block's backward sums replayed in fp8_block.h's order, so that the
// CPU and the GPU give the same bits.
#include <atomic>

#include <torch/csrc/stable/ops.h>

#include "../cpu_kernels.h"
#include "../dispatch.h"
#include "fp8_block.h"

namespace autoround_fast::cpu {
namespace {

// Calls f(i) for the flat index i of each element of the block, row by row.
template <typename F>
void for_each_element(const Fp8BlockArgs& a, const Fp8BlockTile& b, const F& f) {
  for (int r = 0; r < b.rows; ++r) {
    const int64_t base = (b.row0 + r) * a.cols + b.col0;
    for (int c = 0; c < b.cols; ++c) f(base + c);
  }
}

// max|W| over the block (of the values as given: an fp16 weight's own), and the number of
// non-finite ones.
template <typename T>
int64_t block_abs_max(const Fp8BlockArgs& a, const Fp8BlockTile& b, float* amax) {
  const T* w = static_cast<const T*>(a.weight);
  int64_t bad = 0;
  float m = 0.f;
  for_each_element(a, b, [&](int64_t i) {
    const float x = to_f32(w[i]);
    bad += !is_finite(x);
    m = fmax_(m, fabs_(x));
  });
  *amax = m;
  return bad;
}

// Calls f(index, tile) for every block, in parallel.
template <typename F>
void for_each_block(const Fp8BlockArgs& a, const F& f) {
  torch::stable::parallel_for(0, a.grid_rows * a.grid_cols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(k, fp8_block_tile(a, k));
  });
}

template <typename T>
int64_t block_forward(const Fp8BlockArgs& a, T* out, float* scale) {
  const T* w = static_cast<const T*>(a.weight);
  std::atomic<int64_t> bad{0};
  for_each_block(a, [&](int64_t k, const Fp8BlockTile& b) {
    float amax;
    if (const int64_t n = block_abs_max<T>(a, b, &amax)) bad += n;
    const Fp8Scale sc = fp8_scale(amax, a.max_scale[k], a.scale_dtype);
    scale[k] = sc.s;
    for_each_element(a, b, [&](int64_t i) { out[i] = from_f32<T>(fp8_qdq(fp8_input(w[i]), a.v[i], sc.div)); });
  });
  return bad.load();
}

template <typename T>
void block_backward(const Fp8BlockArgs& a, const T* grad, float* grad_v, float* grad_ms) {
  const T* w = static_cast<const T*>(a.weight);
  for_each_block(a, [&](int64_t k, const Fp8BlockTile& b) {
    float amax;
    block_abs_max<T>(a, b, &amax);
    const Fp8Scale sc = fp8_scale(amax, a.max_scale[k], a.scale_dtype);
    Fp8Sums th[kFp8Threads];
    for (int t = 0; t < kFp8Threads; ++t) {
      for (int c = 0; c < kFp8BlockChunksPerThread; ++c) {
        const Fp8BlockChunk ch = fp8_block_chunk(t, c);
        if (ch.row >= b.rows) continue;
        const int64_t base = (b.row0 + ch.row) * a.cols + b.col0;
        for (int j = ch.col; j < ch.col + kFp8Chunk && j < b.cols; ++j)
          grad_v[base + j] = fp8_element_backward(fp8_input(w[base + j]), a.v[base + j], to_f32(grad[base + j]),
                                                  sc.div, th[t]);
      }
    }
    grad_ms[k] = fp8_grad_max_scale(fp8_combine_threads(th), sc, amax, a.scale_dtype);
  });
}

}  // namespace

int64_t fake_quant_fp8_block(const Fp8BlockArgs& a, void* out, float* scale) {
  int64_t bad = 0;
  with_float_type(a.dtype, [&](auto t) { bad = block_forward(a, static_cast<decltype(t)*>(out), scale); });
  return bad;
}

void fake_quant_fp8_block_backward(const Fp8BlockArgs& a, const void* grad, float* grad_v, float* grad_max_scale) {
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    block_backward(a, static_cast<const T*>(grad), grad_v, grad_max_scale);
  });
}

}  // namespace autoround_fast::cpu
