// The bf16 decode on AVX512_BF16 dot products (vdpbf16ps: a[2i]·b[2i] + a[2i+1]·b[2i+1] into fp32 lane i):
// the scores of the dot form and of the rows-as-lanes form, and P · Vj on pairs of keys for both. Included
// by decode_tile.h in the avx512bf16 translation unit only.
#pragma once

#include <array>

#include "cpu/pair_ops.h"

namespace attnext::cpu {
namespace {

// bf16 K and query rows (raw bf16) taken 32 columns at a time as pairs by vdpbf16ps, which sums each
// pair's two exact products into an fp32 lane: half the instructions of the widened products and no
// widening; scale · log2 e multiplies the summed scores.
struct PairDot {
  using Q = uint16_t;
  using Chunk = __m512bh;
  static constexpr int kCols = 32;
  static Chunk load_q(const Q* q) { return (__m512bh)_mm512_loadu_si512(q); }
  static Chunk load_k(const Bf16* k) { return (__m512bh)_mm512_loadu_si512(k); }
  static __m512 add_product(__m512 acc, Chunk k, Chunk q) { return _mm512_dpbf16_ps(acc, k, q); }
};

// The rows-as-lanes scores in 16 lanes (zmm) or 8 (ymm, AVX-512VL: for 5-8 rows, where two ymm vdpbf16ps per
// cycle match one zmm on a Zen 4 core).
struct PairLanes16 {
  using Acc = __m512;
  static constexpr int kLanes = 16, kKeys = 8;  // keys side by side: 8 chains cover vdpbf16ps' latency
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc dot(Acc acc, int32_t k_pair, const uint16_t* q) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(k_pair), (__m512bh)_mm512_loadu_si512(q));
  }
  static void store(float* s, Acc acc, float mul) { _mm512_storeu_ps(s, _mm512_mul_ps(acc, _mm512_set1_ps(mul))); }
};

struct PairLanes8 {
  using Acc = __m256;
  static constexpr int kLanes = 8, kKeys = 16;  // two instructions per cycle: twice the chains
  static Acc zero() { return _mm256_setzero_ps(); }
  static Acc dot(Acc acc, int32_t k_pair, const uint16_t* q) {
    return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_set1_epi32(k_pair), (__m256bh)_mm256_loadu_si256(
                                                                          reinterpret_cast<const __m256i*>(q)));
  }
  static void store(float* s, Acc acc, float mul) { _mm256_storeu_ps(s, _mm256_mul_ps(acc, _mm256_set1_ps(mul))); }
};

// Sᵀ = Kj · Qᵀ · mul for nk keys with the rows as the P::kLanes lanes (R = kLanes), bf16 K and Q taken as
// pairs of columns: per pair, the query rows' pairs (q_pairs: D/2 x kLanes x 2) against each key's pair
// broadcast from memory, one vdpbf16ps per key where the fp32 form takes one FMA per column and key after
// widening K. ahead.next() runs once per pair of columns and block of keys (pair_scores_steps times).
// Keys > 1 go as groups of 4 rows: group bases plus 0-3 strides, the stride hidden from the compiler's loop
// analysis (the empty asm), as in scores_rows16: left to itself, GCC kept one address per key and moved
// those that did not fit from vector registers at every step.
template <class P, int Keys>
void pair_scores_block(const Bf16* k, int64_t k_stride, const uint16_t* q_pairs, int64_t D, float mul, float* s_t,
                       LinesAhead& ahead) {
  static_assert(Keys == 1 || Keys % 4 == 0, "keys go as groups of 4");
  constexpr int kGroups = (Keys + 3) / 4, kPerGroup = Keys < 4 ? Keys : 4;
  typename P::Acc acc[Keys];
#pragma GCC unroll 16
  for (auto& a : acc) a = P::zero();
  const Bf16* base[kGroups];
#pragma GCC unroll 4
  for (int g = 0; g < kGroups; ++g) base[g] = k + 4 * g * k_stride;
  for (int64_t d = 0; d < D; d += 2) {
    ahead.next(d / 2);
    int64_t ld = k_stride;
    asm("" : "+r"(ld));
    const int64_t off[4] = {d, d + ld, d + 2 * ld, d + 3 * ld};
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g)
#pragma GCC unroll 4
      for (int i = 0; i < kPerGroup; ++i) {
        int32_t pair;
        std::memcpy(&pair, base[g] + off[i], 4);
        acc[4 * g + i] = P::dot(acc[4 * g + i], pair, q_pairs + d * P::kLanes);
      }
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < Keys; ++kk) P::store(s_t + kk * P::kLanes, acc[kk], mul);
}

template <class P>
void pair_scores(const Bf16* k, int64_t k_stride, int64_t nk, const uint16_t* q_pairs, int64_t D, float mul,
                 float* s_t, LinesAhead& ahead) {
  constexpr int kKeys = P::kKeys, kLanes = P::kLanes;
  int64_t j = 0;
  for (; j + kKeys <= nk; j += kKeys)
    pair_scores_block<P, kKeys>(k + j * k_stride, k_stride, q_pairs, D, mul, s_t + j * kLanes, ahead);
  for (; j < nk; ++j) pair_scores_block<P, 1>(k + j * k_stride, k_stride, q_pairs, D, mul, s_t + j * kLanes, ahead);
}

template <class P>
constexpr int64_t pair_scores_steps(int64_t nk, int64_t D) { return (nk / P::kKeys + nk % P::kKeys) * (D / 2); }

// Row r of P as bf16 pairs of keys, from Pᵀ (R lanes per key, rows < R): word kp of row r = (P[2kp][r],
// P[2kp + 1][r]) rounded to bf16 after the softmax, as in the bf16 forward; keys past nk read as 0. Out:
// R rows of ld words. R = 16: two keys interleaved, then 16 x 16 transposes; R <= 4: 32 / R keys of all R
// rows per vector, sorted into rows by one vpermw.
template <int R>
void p_pair_rows(float* p_t, int64_t nk, Pair* out, int64_t ld, Pair* scratch) {
  if constexpr (R == 16) {
    for (int64_t kp = 0; kp < ld; ++kp) {
      const __m512 lo = 2 * kp < nk ? _mm512_loadu_ps(p_t + 2 * kp * 16) : _mm512_setzero_ps();
      const __m512 hi = 2 * kp + 1 < nk ? _mm512_loadu_ps(p_t + (2 * kp + 1) * 16) : _mm512_setzero_ps();
      _mm512_storeu_si512(scratch + kp * 16, interleave_bf16(round_bf16(lo), round_bf16(hi)));
    }
    transpose_pairs(scratch, 16, ld, 16, out, ld);
  } else {
    constexpr int kKeys = 32 / R;  // keys per vector of 32 bf16
    static constexpr auto kOrder = [] {  // word r·kKeys + k of the output <- word k·R + r of the input
      std::array<uint16_t, 32> order{};
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < kKeys; ++k) order[r * kKeys + k] = static_cast<uint16_t>(k * R + r);
      return order;
    }();
    const __m512i idx = _mm512_loadu_si512(kOrder.data());
    alignas(64) uint16_t sorted[32];
    const int64_t n_keys = round_up(nk, kKeys);
    std::fill(p_t + nk * R, p_t + n_keys * R, 0.0f);
    for (int64_t j = 0; j < n_keys; j += kKeys) {
      const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16(_mm512_loadu_ps(p_t + j * R))),
                                           round_bf16(_mm512_loadu_ps(p_t + j * R + 16)), 1);
      _mm512_store_si512(sorted, _mm512_permutexvar_epi16(idx, x));
      for (int r = 0; r < R; ++r) std::memcpy(out + r * ld + j / 2, sorted + r * kKeys, 2 * kKeys);
    }
  }
}

// One step kp of pv_pair_block: the key rows a and b (b = 0 past the last key) as pairs of 16 columns,
// interleaved in registers (vpermt2w, 32 columns per pair of loads), against each row's P pair.
template <int Rows, int NV, bool kLastOdd>
[[gnu::always_inline]] inline void pv_pair_step(__m512 (&acc)[Rows][NV], const Pair* p, int64_t ld_p, int64_t kp,
                                                const Bf16* a, const Bf16* b) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  __m512i v_pairs[NV];
#pragma GCC unroll 8
  for (int h = 0; h < NV / 2; ++h) {
    const __m512i x = _mm512_loadu_si512(a + 32 * h);
    const __m512i y = kLastOdd ? _mm512_setzero_si512() : _mm512_loadu_si512(b + 32 * h);
    v_pairs[2 * h] = _mm512_permutex2var_epi16(x, lo, y);
    v_pairs[2 * h + 1] = _mm512_permutex2var_epi16(x, hi, y);
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    const __m512i p_r = _mm512_set1_epi32(static_cast<int>(p[r * ld_p + kp]));
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = dot_pairs(acc[r][v], p_r, v_pairs[v]);
  }
}

// acc[r][0, 16·NV) += Σ_j P(r, j) · Vj[j][0, 16·NV) for Rows rows over nk keys, two keys per vdpbf16ps
// (P as pair rows, see p_pair_rows; Vj rows read where they lie). ahead.next() runs once per key pair.
template <int Rows, int NV>
void pv_pair_block(int64_t nk, const Pair* p, int64_t ld_p, const Bf16* v, int64_t v_stride, float* acc,
                   int64_t ld_acc, LinesAhead& ahead) {
  __m512 c[Rows][NV];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) c[r][n] = _mm512_loadu_ps(acc + r * ld_acc + 16 * n);
  int64_t kp = 0;
  for (; 2 * kp + 1 < nk; ++kp) {
    ahead.next(kp);
    const Bf16* a = v + 2 * kp * v_stride;
    pv_pair_step<Rows, NV, false>(c, p, ld_p, kp, a, a + v_stride);
  }
  if (nk % 2) {
    ahead.next(kp);
    pv_pair_step<Rows, NV, true>(c, p, ld_p, kp, v + 2 * kp * v_stride, nullptr);
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(acc + r * ld_acc + 16 * n, c[r][n]);
}

// Whether P · Vj runs on pairs: the Vj rows are read in whole 64-column blocks.
inline bool pv_on_pairs(int64_t D) { return D % 64 == 0; }

// Columns per block of pv_pairs: 128 with one or two rows (8 chains of vdpbf16ps, not 4), else 64.
constexpr int64_t pv_pairs_cols(int64_t rows, int64_t D) { return rows <= 2 && D % 128 == 0 ? 128 : 64; }

constexpr int64_t pv_pairs_steps(int64_t rows, int64_t nk, int64_t D) {
  return (rows + 3) / 4 * (D / pv_pairs_cols(rows, D)) * ((nk + 1) / 2);
}

// acc (rows x D) += P · Vj on bf16 pairs of keys, P from Pᵀ (R lanes per key; its padding lanes are
// overwritten), in blocks of up to 4 rows x pv_pairs_cols. ahead.next() runs pv_pairs_steps times.
inline void pv_pairs(int64_t rows, int64_t R, int64_t nk, float* p_t, const Bf16* v, int64_t v_stride, int64_t D,
                     Pair* p_rows, float* acc, LinesAhead& ahead) {
  const int64_t ld = round_up(pair_count(nk), 16), cols = pv_pairs_cols(rows, D);
  Pair* scratch = p_rows + R * ld;
  if (R == 16) p_pair_rows<16>(p_t, nk, p_rows, ld, scratch);
  else if (R == 8) p_pair_rows<8>(p_t, nk, p_rows, ld, scratch);
  else if (R == 4) p_pair_rows<4>(p_t, nk, p_rows, ld, scratch);
  else if (R == 2) p_pair_rows<2>(p_t, nk, p_rows, ld, scratch);
  else p_pair_rows<1>(p_t, nk, p_rows, ld, scratch);
  for (int64_t r = 0; r < rows; r += 4) {
    const Pair* p = p_rows + r * ld;
    const int64_t block_rows = std::min<int64_t>(4, rows - r);
    for (int64_t n = 0; n < D; n += cols) {
      float* c = acc + r * D + n;
      if (cols == 128 && block_rows == 1) pv_pair_block<1, 8>(nk, p, ld, v + n, v_stride, c, D, ahead);
      else if (cols == 128) pv_pair_block<2, 8>(nk, p, ld, v + n, v_stride, c, D, ahead);
      else if (block_rows == 1) pv_pair_block<1, 4>(nk, p, ld, v + n, v_stride, c, D, ahead);
      else if (block_rows == 2) pv_pair_block<2, 4>(nk, p, ld, v + n, v_stride, c, D, ahead);
      else if (block_rows == 3) pv_pair_block<3, 4>(nk, p, ld, v + n, v_stride, c, D, ahead);
      else pv_pair_block<4, 4>(nk, p, ld, v + n, v_stride, c, D, ahead);
    }
  }
}

}  // namespace
}  // namespace attnext::cpu
