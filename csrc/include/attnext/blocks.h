// Block scheduling and online-softmax arithmetic of the tiled GPU kernels, as plain C++ so that CTest
// checks on the CPU exactly what the CUDA kernels compute on the device (tests/cpp/test_blocks.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "attnext/mask.h"

namespace attnext {

// A half-open range of block indices [first, end); empty when end <= first.
struct BlockRange {
  int64_t first = 0, end = 0;
  ATTNEXT_HD bool empty() const { return end <= first; }
};

// Key blocks of block_n keys that the query rows [i0, i1) see: blocks wholly outside every row's
// visible range (causal future, outside a window) are skipped, never computed and masked.
ATTNEXT_HD inline BlockRange key_block_range(const MaskSpec& m, int64_t i0, int64_t i1, int64_t seq_k,
                                             int64_t block_n) {
  int64_t begin = 0, end = 0;
  tile_key_range(m, i0, i1, seq_k, &begin, &end);
  if (end <= begin) return {0, 0};
  return {begin / block_n, (end + block_n - 1) / block_n};
}

// Query blocks of block_m rows that see any key of [j0, j1): the backward's loop over query blocks.
ATTNEXT_HD inline BlockRange query_block_range(const MaskSpec& m, int64_t j0, int64_t j1, int64_t seq_q,
                                               int64_t block_m) {
  const int64_t begin = row_begin(m, j0, seq_q), end = row_end(m, j1 - 1, seq_q);
  if (end <= begin) return {0, 0};
  return {begin / block_m, (end + block_m - 1) / block_m};
}

// A tile [i0, i0 + block_m) x [j0, j0 + block_n) needs the per-element mask when some pair in it is not
// visible, or when it reaches past the last key (padding keys must not enter the softmax).
ATTNEXT_HD inline bool tile_needs_mask(const MaskSpec& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                       int64_t seq_k) {
  return j1 > seq_k || !tile_fully_visible(m, i0, i1, j0, j1, seq_k);
}

// The keys of the tile [j0, j0 + block_n) that row i sees, as tile-local indices [lo, hi): the
// per-element mask test in 32-bit arithmetic.
struct TileKeys {
  int lo = 0, hi = 0;
  ATTNEXT_HD bool contains(int key) const { return key >= lo && key < hi; }
};

ATTNEXT_HD inline TileKeys tile_keys(const MaskSpec& m, int64_t i, int64_t j0, int block_n, int64_t seq_k) {
  const int64_t lo = key_begin(m, i, seq_k) - j0, hi = key_end(m, i, seq_k) - j0;
  return {int(min64(block_n, max64(0, lo))), int(min64(block_n, max64(0, hi)))};
}

// Online softmax in base 2 (scores already multiplied by scale·log2(e)). A row's running maximum is
// -inf until it has seen a visible key; these guards keep exp2 from producing inf - inf = NaN.

// The offset subtracted before exp2: the running maximum, or 0 for a row that has seen nothing.
ATTNEXT_HD inline float softmax_offset(float m_i) { return m_i == -INFINITY ? 0.0f : m_i; }

// Factor that rescales l_i and acc when the running maximum moves from m_old to m_new:
// exp2(m_old - m_new); exp2(-inf) = 0 when nothing was accumulated yet (m_old = -inf).
ATTNEXT_HD inline float softmax_rescale(float m_old, float m_new) { return exp2f(m_old - softmax_offset(m_new)); }

// Natural-log LSE of a row from its base-2 maximum m_i and denominator l_i: ln(l_i) + m_i·ln(2);
// -inf for a row with no visible key (l_i = 0), NaN where a NaN score made l_i NaN.
ATTNEXT_HD inline float lse_from_base2(float m_i, float l_i) {
  return l_i == 0.0f ? -INFINITY : (m_i + log2f(l_i)) * 0.693147180559945309f;
}

// 1 / l_i for the output: 0 for a row with no visible key (l_i = 0), NaN where l_i is NaN.
ATTNEXT_HD inline float inverse_denominator(float l_i) { return l_i == 0.0f ? 0.0f : 1.0f / l_i; }

// The backward's offset for P = exp2(s·scale·log2(e) - offset): lse·log2(e), or +inf for a row with
// no visible key so that its P is exactly 0.
ATTNEXT_HD inline float lse_to_base2_offset(float lse) {
  return lse == -INFINITY ? INFINITY : lse * 1.44269504088896341f;
}

// The CUDA kernels are compiled for a few head-dim buckets; any head dim that is a multiple of 8 runs
// on the smallest bucket that holds it (its padding columns are zero). 0: not supported on CUDA.
ATTNEXT_HD inline int cuda_head_dim_bucket(int64_t head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return 0;
  const int buckets[] = {32, 64, 96, 128, 192, 256};
  for (int b : buckets)
    if (head_dim <= b) return b;
  return 0;
}

}  // namespace attnext
