// Which keys a query row sees. One rule covers no mask, both causal alignments and sliding windows:
//   key j is visible from query i  iff  i + offset - left <= j <= i + offset + right,
// where a negative left/right means unbounded on that side. offset is 0 for top-left causal (SDPA's
// is_causal) and Sk - Sq for bottom-right (FlashAttention's causal and its windows).
// Plain C++ usable from host and device code, tested by CTest.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ATTNEXT_HD __host__ __device__
#else
#define ATTNEXT_HD
#endif

namespace attnext {

enum class MaskKind : int32_t { kNone = 0, kCausalTopLeft = 1, kCausalBottomRight = 2, kWindow = 3 };

struct MaskSpec {
  int64_t offset = 0;  // diagonal offset: row i's diagonal is key i + offset
  int64_t left = -1;   // keys visible left of the diagonal; -1 = unbounded
  int64_t right = -1;  // keys visible right of the diagonal; -1 = unbounded
};

// The MaskSpec for a (kind, window) request. For kWindow, (left, right) are FlashAttention's window_size.
ATTNEXT_HD inline MaskSpec make_mask(MaskKind kind, int64_t seq_q, int64_t seq_k, int64_t left, int64_t right) {
  MaskSpec m;
  switch (kind) {
    case MaskKind::kNone: break;
    case MaskKind::kCausalTopLeft: m.offset = 0; m.left = left; m.right = 0; break;
    case MaskKind::kCausalBottomRight: m.offset = seq_k - seq_q; m.left = left; m.right = 0; break;
    case MaskKind::kWindow: m.offset = seq_k - seq_q; m.left = left; m.right = right; break;
  }
  return m;
}

// Whether some row may not see some key (causal or window; a plain mask hides nothing).
ATTNEXT_HD inline bool hides_keys(const MaskSpec& m) { return m.left >= 0 || m.right >= 0; }

ATTNEXT_HD inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
ATTNEXT_HD inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// First visible key of row i (clamped to [0, seq_k]).
ATTNEXT_HD inline int64_t key_begin(const MaskSpec& m, int64_t i, int64_t seq_k) {
  return m.left < 0 ? 0 : min64(seq_k, max64(0, i + m.offset - m.left));
}

// One past the last visible key of row i (clamped to [0, seq_k]); <= key_begin means no visible key.
ATTNEXT_HD inline int64_t key_end(const MaskSpec& m, int64_t i, int64_t seq_k) {
  return m.right < 0 ? seq_k : max64(0, min64(seq_k, i + m.offset + m.right + 1));
}

// Keys seen by any row of [i0, i1): both bounds are non-decreasing in i, so the first and last rows decide.
ATTNEXT_HD inline void tile_key_range(const MaskSpec& m, int64_t i0, int64_t i1, int64_t seq_k,
                                      int64_t* begin, int64_t* end) {
  *begin = key_begin(m, i0, seq_k);
  *end = key_end(m, i1 - 1, seq_k);
  if (*end < *begin) *end = *begin;
}

// True when every (row, key) pair of the tile [i0, i1) x [j0, j1) is visible: no element mask needed.
ATTNEXT_HD inline bool tile_fully_visible(const MaskSpec& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                          int64_t seq_k) {
  return key_begin(m, i1 - 1, seq_k) <= j0 && key_end(m, i0, seq_k) >= j1;
}

// Queries that see key j: the rows [row_begin, row_end). Used by the backward, which walks key tiles.
ATTNEXT_HD inline int64_t row_begin(const MaskSpec& m, int64_t j, int64_t seq_q) {
  // j <= i + offset + right  <=>  i >= j - offset - right
  return m.right < 0 ? 0 : min64(seq_q, max64(0, j - m.offset - m.right));
}

ATTNEXT_HD inline int64_t row_end(const MaskSpec& m, int64_t j, int64_t seq_q) {
  // j >= i + offset - left  <=>  i <= j - offset + left
  return m.left < 0 ? seq_q : max64(0, min64(seq_q, j - m.offset + m.left + 1));
}

}  // namespace attnext
