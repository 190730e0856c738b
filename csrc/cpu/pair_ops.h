// Building blocks of the bf16 kernels on AVX512_BF16 dot products (forward_bf16_pairs.h,
// backward_bf16_pairs.h): vdpbf16ps adds a[2i]·b[2i] + a[2i+1]·b[2i+1] (bf16 pairs) into fp32 lane i,
// twice the products of an fp32 FMA per instruction. Included only by the avx512bf16 translation unit.
//
// A Pair is one 32-bit word holding two consecutive bf16 values along the summed dimension of a product
// (the first in the low half). An operand broadcast from memory is packed [rows][summed/2] (pack_row_pairs);
// one loaded as vectors is packed [summed/2][lanes], from rows along the lanes (pack_key_major_pairs, a
// transpose) or from rows along the summed dimension, two interleaved (pack_dim_major_pairs).
#pragma once

#include <immintrin.h>

#include "cpu/tile_ops.h"
#include "cpu/vec_avx512.h"

namespace attnext::cpu {
namespace {

using Pair = uint32_t;
using VecF = VecAvx512;

inline int64_t pair_count(int64_t n) { return (n + 1) / 2; }

// Pair c of a bf16 row x of length n: (x[2c], x[2c + 1]), a missing odd element reading 0.
inline Pair pair_at(const Bf16* x, int64_t c, int64_t n) {
  if (2 * c + 1 >= n) return x[2 * c].bits;
  Pair w;
  std::memcpy(&w, x + 2 * c, sizeof(w));
  return w;
}

// dst[r][c] = pair c of row r of src, for r < rows, c < ceil(d / 2).
inline void pack_row_pairs(const Bf16* src, int64_t row_stride, int64_t rows, int64_t d, Pair* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld, src + r * row_stride, d / 2 * sizeof(Pair));
    if (d % 2) dst[r * ld + d / 2] = src[r * row_stride + d - 1].bits;
  }
}

// r[c] <- column c of the 16 x 16 matrix of 32-bit words whose rows are r[0..16).
inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // words of row pairs interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // then 64-bit halves of row quads
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // then 128-bit lanes, twice
    t[i] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// dst[c][j] = pair c of key row j (a transpose of whole pairs), 16 keys x 16 pairs at a time in registers
// where both are whole; keys [nk, ld) are zero.
inline void pack_key_major_pairs(const Bf16* src, int64_t row_stride, int64_t nk, int64_t d, Pair* dst,
                                 int64_t ld) {
  const int64_t dh = pair_count(d), whole_c = d / 32 * 16, whole_j = nk / 16 * 16;
  for (int64_t j0 = 0; j0 < whole_j; j0 += 16)
    for (int64_t c0 = 0; c0 < whole_c; c0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (j0 + i) * row_stride + 2 * c0);
      transpose_16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (c0 + i) * ld + j0, r[i]);
    }
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = j < whole_j ? whole_c : 0; c < dh; ++c) dst[c * ld + j] = pair_at(src + j * row_stride, c, d);
  for (int64_t c = 0; c < dh; ++c) std::fill(dst + c * ld + nk, dst + (c + 1) * ld, Pair{0});
}

// Pair i = (lo[i], hi[i]) for 16 bf16 values each.
inline __m512i interleave_bf16(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

// 16 floats rounded to bf16 (nearest even).
inline __m256i round_bf16(__m512 x) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  return reinterpret_cast<const __m256i&>(h);
}

// 2^x for probabilities that are rounded to bf16 (8 significant bits, a relative error up to 2^-8 = 3.9e-3)
// before any product: 2^f by a degree-3 minimax series (7.5e-5 on |f| <= 1/2), two FMAs fewer per 16 scores
// than VecF::exp2's degree-5 one (2.1e-7). l sums the same unrounded values that are rounded into P, so
// Σ P / l = 1 up to that rounding; the lse is off by at most 7.5e-5 (1.2e-5 on random rows; 9e-7 with
// VecF::exp2). Never for the rescale factors alpha: its 2^0 is 1 - 7.2e-5, not 1 (kExp2Series' comment).
// x < -126 (masked scores: -inf) gives exactly 0.
constexpr float kExp2SeriesBf16[] = {5.5171426386e-2f, 2.4261054397e-1f, 6.9326096773e-1f, 9.9992811680e-1f};

inline __m512 exp2_bf16(__m512 x) { return VecF::exp2_series(x, kExp2SeriesBf16); }

// dst[c][r] = src[r][c] for r < rows, c < cols, both multiples of 16: 16 x 16 blocks in registers.
inline void transpose_pairs(const Pair* src, int64_t lds, int64_t rows, int64_t cols, Pair* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512i x[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_loadu_si512(src + (r0 + i) * lds + c0);
      transpose_16x16(x);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (c0 + i) * ldd + r0, x[i]);
    }
}

// dst[kp][c] = (v[2kp][c], v[2kp + 1][c]): two key rows interleaved; key nk (odd nk) and columns [d, ld)
// are zero.
inline void pack_dim_major_pairs(const Bf16* src, int64_t row_stride, int64_t nk, int64_t d, Pair* dst,
                                 int64_t ld) {
  for (int64_t kp = 0; kp < pair_count(nk); ++kp) {
    const uint16_t* lo = reinterpret_cast<const uint16_t*>(src + 2 * kp * row_stride);
    const uint16_t* hi = 2 * kp + 1 < nk ? lo + row_stride : nullptr;
    Pair* out = dst + kp * ld;
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) {
      const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + c));
      const __m256i h = hi ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(out + c, interleave_bf16(l, h));
    }
    for (; c < d; ++c) out[c] = lo[c] | (hi ? Pair{hi[c]} << 16 : 0u);
    std::fill(out + d, out + ld, Pair{0});
  }
}

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

// Micro-kernel: an R x (NV·16) block of C = mul · Σ_k A(r, k)·B(k, n) (or C += Σ_k ... when accumulating)
// over K pair steps, with A(r, k) = a[r·lda + k] broadcast and B rows b[k·ldb ...] loaded 16 pairs at a time.
// The loops over R and NV are unrolled so that acc never leaves the registers (as in gemm_block).
template <int R, int NV>
inline void pair_block(int64_t K, const Pair* a, int64_t lda, const Pair* b, int64_t ldb, float* c, int64_t ldc,
                       float mul, bool accumulate) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512i bk[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bk[v] = _mm512_loadu_si512(b + k * ldb + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(a[r * lda + k]));
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = dot_pairs(acc[r][v], ar, bk[v]);
    }
  }
  const __m512 m = _mm512_set1_ps(mul);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(c + r * ldc + 16 * v, accumulate ? acc[r][v] : _mm512_mul_ps(acc[r][v], m));
}

template <int R, int NV>
inline void pair_rows(int rows, int64_t K, const Pair* a, int64_t lda, const Pair* b, int64_t ldb, float* c,
                      int64_t ldc, float mul, bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) return pair_rows<R - 1, NV>(rows, K, a, lda, b, ldb, c, ldc, mul, accumulate);
  }
  pair_block<R, NV>(K, a, lda, b, ldb, c, ldc, mul, accumulate);
}

// One panel of NV·16 columns of C over all M rows, R rows at a time: B's panel stays in L1 while A streams.
template <int R, int NV>
void pair_panel(int64_t M, int64_t K, const Pair* a, int64_t lda, const Pair* b, int64_t ldb, float* c,
                int64_t ldc, float mul, bool accumulate) {
  for (int64_t m = 0; m < M; m += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, M - m));
    pair_rows<R, NV>(rows, K, a + m * lda, lda, b, ldb, c + m * ldc, ldc, mul, accumulate);
  }
}

// C[M][N] = mul · A·B, or C += A·B, for A = M x K pairs (row stride lda) and B = K x N pairs; N is a
// multiple of 16. Panels of 4 vectors take 6 rows at a time (24 accumulators of the 32 zmm registers);
// narrower remainders take more rows, so that each broadcast of A still feeds several vectors or rows.
inline void pair_gemm(int64_t M, int64_t N, int64_t K, const Pair* a, int64_t lda, const Pair* b, int64_t ldb,
                      float* c, int64_t ldc, float mul, bool accumulate) {
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) pair_panel<6, 4>(M, K, a, lda, b + n, ldb, c + n, ldc, mul, accumulate);
  switch ((N - n) / 16) {
    case 3: return pair_panel<8, 3>(M, K, a, lda, b + n, ldb, c + n, ldc, mul, accumulate);
    case 2: return pair_panel<12, 2>(M, K, a, lda, b + n, ldb, c + n, ldc, mul, accumulate);
    case 1: return pair_panel<16, 1>(M, K, a, lda, b + n, ldb, c + n, ldc, mul, accumulate);
    default: return;
  }
}

}  // namespace
}  // namespace attnext::cpu
