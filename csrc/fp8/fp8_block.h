// FP8 (e4m3) weights with one scale per kFp8Block x kFp8Block block (FP8_BLOCK;
// python/autoround_fast/reference.py's fake_quant_fp8_block). Each block is quantized as
// fp8.h quantizes a whole tensor, its maximum taken over its own elements (an edge block's
// over fewer), so the per-element and per-scale math is fp8.h's; this header adds only where a
// block lies and the order of its backward's sums, shared by the CPU and CUDA kernels.
//
// The order: a block is cut into chunks of kFp8Chunk consecutive elements of a row
// (kFp8BlockChunksPerRow per row). "Thread" t of kFp8Threads takes chunks t, t + kFp8Threads,
// ... (fp8_block_chunk(t, k), k = 0 .. kFp8BlockChunksPerThread - 1), adding each chunk's
// elements in order, from +0, skipping those past the weight's edge; the thread sums then
// combine as fp8.h's tile does (fp8_combine_threads): per warp the shuffle-down tree, then
// the warps in order.
#pragma once

#include "../launchers.h"
#include "fp8.h"

namespace autoround_fast {

constexpr int kFp8BlockChunksPerRow = kFp8Block / kFp8Chunk;
constexpr int kFp8BlockRowsPerPass = kFp8Threads / kFp8BlockChunksPerRow;  // rows a pass of the threads covers
constexpr int kFp8BlockChunksPerThread = kFp8Block / kFp8BlockRowsPerPass;
static_assert(kFp8Block % kFp8Chunk == 0 && kFp8Threads % kFp8BlockChunksPerRow == 0 &&
                  kFp8Block % kFp8BlockRowsPerPass == 0,
              "a block's chunks divide evenly among the threads");

// Where block `index` (row-major over the grid of blocks) lies in the weight.
struct Fp8BlockTile {
  int64_t row0, col0;  // its first element
  int rows, cols;      // its extent, kFp8Block except at the weight's last row or column of blocks
};

AF_HD Fp8BlockTile fp8_block_tile(const Fp8BlockArgs& a, int64_t index) {
  const int64_t row0 = index / a.grid_cols * kFp8Block, col0 = index % a.grid_cols * kFp8Block;
  const int64_t nr = a.rows - row0 < kFp8Block ? a.rows - row0 : kFp8Block;
  const int64_t nc = a.cols - col0 < kFp8Block ? a.cols - col0 : kFp8Block;
  return {row0, col0, static_cast<int>(nr), static_cast<int>(nc)};
}

// Chunk k of thread t: its row and first column within the block.
struct Fp8BlockChunk {
  int row, col;
};

AF_HD Fp8BlockChunk fp8_block_chunk(int t, int k) {
  return {k * kFp8BlockRowsPerPass + t / kFp8BlockChunksPerRow, (t % kFp8BlockChunksPerRow) * kFp8Chunk};
}

}  // namespace autoround_fast
