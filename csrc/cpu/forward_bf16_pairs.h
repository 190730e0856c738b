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

#include "cpu/forward_impl.h"
#include "cpu/pair_ops.h"

namespace attnext::cpu {
namespace {

// p = 2^(s - shift) rounded to bf16 (n floats, a multiple of 16, give n / 2 pairs); returns Σ 2^(s - shift)
// before rounding.
inline float exp2_row_pairs(const float* s, int64_t n, float shift, Pair* p) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 e = exp2_bf16(_mm512_sub_ps(_mm512_loadu_ps(s + c), sh));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c / 2), round_bf16(e));
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// Tiles of the pair kernels, measured on Zen 4 (1 MiB L2): 256 query rows up to D = 256 (128 beyond), and
// 256-key tiles without a mask; with one, 128-key tiles waste less of the tiles on its boundary.
inline Tiling choose_pair_tiling(const FwdParams& p) {
  Tiling t = choose_tiling(p.seq_q, p.head_dim);
  t.block_q = std::max<int64_t>(1, std::min<int64_t>(p.head_dim <= 256 ? 256 : 128, p.seq_q));
  t.block_k = key_tile(p.head_dim <= 256 && !hides_keys(p.mask) ? 256 : 128, p.seq_k);
  return t;
}

// One worker's scratch: Qi and acc for block_q rows, one key tile of K and V pairs, S (fp32) and P (pairs).
struct PairScratch {
  LineVector<Pair> q, k, v, p;
  LineVector<float> s, acc, m, l;
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
