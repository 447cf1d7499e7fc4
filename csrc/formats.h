// The quantization formats' constants and grouping rules, defined once for every kernel and
// host file; python/autoround_fast/formats.py is the Python twin (tests/test_formats.py holds
// the two equal). No torch or CUDA headers: the .cu files include it too.
#pragma once

#include <cstdint>

namespace autoround_fast {

constexpr int kNvfp4Group = 16;      // elements per NVFP4 scale group, along the row
constexpr float kFp4Max = 6.0f;      // the largest FP4 (e2m1) magnitude
constexpr float kE4m3Max = 448.0f;   // the largest float8_e4m3fn magnitude (NVFP4 group scales)
constexpr int kIntGroupPerRow = -1;  // the INT group_size that means one group per row
constexpr int kMxGroup = 32;         // elements per MX (MXFP4, MXFP8) group, which share one power-of-two scale
constexpr int kE8m0ExpMax = 127;     // |shared exponent| bound of an MX scale (e8m0, bias 127)

// An MX element format (OCP MX spec): exponent bits, explicit mantissa bits, the smallest
// normal exponent, the largest normal exponent (emax) and the largest magnitude. By the
// scheme's bit width, formats.py's MX_ELEMENTS (tests/ops/test_formats.py reads these lines).
struct MxElement {
  int ebits, mbits, min_exp, emax;
  float max_norm;
};
constexpr MxElement kMxFp4 = {2, 1, 0, 2, 6.0f};     // FP4 e2m1, MX_ELEMENTS[4]
constexpr MxElement kMxFp8 = {4, 3, -6, 8, 448.0f};  // FP8 e4m3, MX_ELEMENTS[8]
static_assert(kMxFp4.max_norm == kFp4Max && kMxFp8.max_norm == kE4m3Max, "MX element maxima");
constexpr bool mx_bits_supported(int64_t bits) { return bits == 4 || bits == 8; }
constexpr MxElement mx_element(int bits) { return bits == 4 ? kMxFp4 : kMxFp8; }

// c10::ScalarType codes of the float dtypes: the weight dtypes, and the INT scale dtypes, which
// the ops' schemas take as an int (ops_common.h asserts them equal to torch's ScalarType).
enum ScaleDtype : int { kHalf = 5, kFloat = 6, kBFloat16 = 15 };

// FP8 (e4m3) weights and activations (csrc/fp8/): one scale per tensor, per row or per block.
constexpr int kFp8PerTensor = 0;  // the FP8 group_size that means one scale for the whole tensor
constexpr float kFp8ScaleMin = 4.359654017857143e-06f;  // the FP8 scale floor 1/(448*512), auto-round's (from vLLM)
static_assert(kFp8ScaleMin == static_cast<float>(1.0 / (448.0 * 512.0)), "kFp8ScaleMin is fp32(1 / (448 * 512))");
constexpr int kFp8Block = 128;  // the FP8 group_size that means square weight blocks of this edge (FP8_BLOCK)

// FP8 blocks along a dimension of n elements, the last one partial (formats.py's fp8_block_grid).
constexpr int64_t fp8_blocks(int64_t n) { return (n + kFp8Block - 1) / kFp8Block; }

// Elements per INT group: a group_size of -1, or one larger than the row, means one group per
// row (auto-round's rule).
constexpr int64_t int_group(int64_t cols, int64_t group_size) {
  return (group_size == kIntGroupPerRow || cols < group_size) ? cols : group_size;
}

}  // namespace autoround_fast
