// bf16 forward on AVX512_BF16 dot products: both products of the FlashAttention-2 loop run on
// vdpbf16ps, which adds a[2i]·b[2i] + a[2i+1]·b[2i+1] (bf16 pairs) into fp32 lane i, twice the products of
// an fp32 FMA per instruction. Included only by the avx512bf16 translation unit.
//
// A Pair is one 32-bit word holding two consecutive bf16 values along the summed dimension (the first in
// the low half). The operands are laid out in pairs:
//   S = Qi · Kjᵀ:  Qi as [rows][D/2] pairs (broadcast), Kj as [D/2][keys] pairs: lanes = keys;
//   acc += P · Vj: P as [rows][keys/2] pairs (broadcast), Vj as [keys/2][D] pairs: lanes = head dim.
// The online softmax stays in fp32; only P is rounded to bf16, after it (as GPU FlashAttention does).
#pragma once

#include <immintrin.h>

#include "cpu/forward_impl.h"
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
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < pair_count(d); ++c) dst[r * ld + c] = pair_at(src + r * row_stride, c, d);
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
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + c)));
      const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + c)))
                           : _mm512_setzero_si512();
      _mm512_storeu_si512(out + c, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
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
template <int R, int NV>
inline void pair_block(int64_t K, const Pair* a, int64_t lda, const Pair* b, int64_t ldb, float* c, int64_t ldc,
                       float mul, bool accumulate) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512i bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = _mm512_loadu_si512(b + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(a[r * lda + k]));
      for (int v = 0; v < NV; ++v) acc[r][v] = dot_pairs(acc[r][v], ar, bk[v]);
    }
  }
  const __m512 m = _mm512_set1_ps(mul);
  for (int r = 0; r < R; ++r)
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

// 2^x for P: x = n + f with n = round(x), |f| <= 1/2; 2^f by a degree-5 polynomial (relative error below
// 1e-7, far under P's bf16 rounding), times 2^n by vscalefps. x < -126 (masked scores: -inf) gives exactly 0.
inline __m512 exp2_p(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3266970386e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6754597455e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507426160e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121754e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694916e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000710f));
  const __mmask16 visible = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(visible, p, n);
}

// p = 2^(s - shift) rounded to bf16 (n floats, a multiple of 16, give n / 2 pairs); returns Σ 2^(s - shift)
// before rounding.
inline float exp2_row_pairs(const float* s, int64_t n, float shift, Pair* p) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 e = exp2_p(_mm512_sub_ps(_mm512_loadu_ps(s + c), sh));
    const __m256bh e16 = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c / 2), reinterpret_cast<const __m256i&>(e16));
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// Tiles of the pair kernels, measured on Zen 4 (1 MiB L2): 256 query rows up to D = 256 (128 beyond), and
// 256-key tiles without a mask; with one, 128-key tiles waste less of the tiles on its boundary.
inline Tiling choose_pair_tiling(const FwdParams& p) {
  Tiling t = choose_tiling(p.seq_q, p.head_dim);
  const bool masked = p.mask.left >= 0 || p.mask.right >= 0;
  t.block_q = std::max<int64_t>(1, std::min<int64_t>(p.head_dim <= 256 ? 256 : 128, p.seq_q));
  t.block_k = p.head_dim <= 256 && !masked ? 256 : 128;
  return t;
}

// One worker's scratch: Qi and acc for block_q rows, one key tile of K and V pairs, S (fp32) and P (pairs).
struct PairScratch {
  std::vector<Pair> q, k, v, p;
  std::vector<float> s, acc, m, l;
  PairScratch(const Tiling& t, int64_t d)
      : q(t.block_q * pair_count(d)), k(pair_count(d) * t.block_k), v(t.block_k / 2 * t.d_pad),
        p(t.block_q * t.block_k / 2), s(t.block_q * t.block_k), acc(t.block_q * t.d_pad), m(t.block_q),
        l(t.block_q) {}
};

void forward_tile_pairs(const FwdParams& p, const Tiling& t, PairScratch& w, int64_t b, int64_t h, int64_t i0,
                        int64_t i1) {
  const int64_t D = p.head_dim, Dh = pair_count(D), Dp = t.d_pad, rows = i1 - i0;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const Bf16* q = static_cast<const Bf16*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const Bf16* k = static_cast<const Bf16*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const Bf16* v = static_cast<const Bf16*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;

  // Qi as it is (exact bf16 pairs): scale · log2(e) multiplies S in fp32 rather than a re-rounded Q.
  pack_row_pairs(q + i0 * p.q_stride.s, p.q_stride.s, rows, D, w.q.data(), Dh);
  std::fill(w.acc.begin(), w.acc.begin() + rows * Dp, 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);

  int64_t kv_begin, kv_end;
  tile_key_range(p.mask, i0, i1, p.seq_k, &kv_begin, &kv_end);
  for (int64_t j0 = kv_begin; j0 < kv_end; j0 += t.block_k) {
    const int64_t nk = std::min(t.block_k, kv_end - j0), nk_pad = round_up(nk, VecF::W);
    pack_key_major_pairs(k + j0 * p.k_stride.s, p.k_stride.s, nk, D, w.k.data(), nk_pad);
    pack_dim_major_pairs(v + j0 * p.v_stride.s, p.v_stride.s, nk, D, w.v.data(), Dp);

    // Only rows [r0, r1) of the tile see a key of this key tile; the others skip it untouched.
    const int64_t r0 = std::max<int64_t>(0, row_begin(p.mask, j0, p.seq_q) - i0);
    const int64_t r1 = std::min<int64_t>(rows, row_end(p.mask, j0 + nk - 1, p.seq_q) - i0);
    if (r1 <= r0) continue;

    // S = Qi · Kjᵀ · scale · log2(e)  ((r1 - r0) x nk_pad, base-2 logits)
    pair_gemm(r1 - r0, nk_pad, Dh, w.q.data() + r0 * Dh, Dh, w.k.data(), nk_pad, w.s.data(), nk_pad,
              p.scale * kLog2e, false);

    // Online softmax per row (softmax_row) in fp32; P = 2^(S - m_new) is stored as bf16 pairs.
    const bool full = tile_fully_visible(p.mask, i0 + r0, i0 + r1, j0, j0 + nk, p.seq_k);
    for (int64_t r = r0; r < r1; ++r) {
      float* s = w.s.data() + (r - r0) * nk_pad;
      Pair* p_row = w.p.data() + (r - r0) * (nk_pad / 2);
      const int64_t i = i0 + r;
      mask_row(s, j0, nk, nk_pad, key_begin(p.mask, i, p.seq_k), key_end(p.mask, i, p.seq_k), full);
      const bool visible = softmax_row<VecF>(s, nk_pad, w.m[r], w.l[r], w.acc.data() + r * Dp, Dp,
                                             [=](float m_new) { return exp2_row_pairs(s, nk_pad, m_new, p_row); });
      if (!visible) std::fill(p_row, p_row + nk_pad / 2, Pair{0});
    }

    // acc += P · Vj
    pair_gemm(r1 - r0, Dp, pair_count(nk), w.p.data(), nk_pad / 2, w.v.data(), Dp, w.acc.data() + r0 * Dp, Dp,
              1.0f, true);
  }

  write_output<VecF, Bf16>(p, w.acc.data(), Dp, w.m.data(), w.l.data(), b, h, i0, rows);
}

// The bf16 prefill forward on pairs; decode shapes take the fp32 decode kernel (decode_impl.h).
inline void forward_bf16_pairs(const FwdParams& p) {
  for_each_query_tile<PairScratch, forward_tile_pairs>(p, choose_pair_tiling(p));
}

}  // namespace
}  // namespace attnext::cpu
