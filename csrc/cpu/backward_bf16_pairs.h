// bf16 backward on AVX512_BF16 dot products: the key-tile structure of backward_impl.h (backward_run over
// kernels with FmaBackward's interface) with the five products of a block on vdpbf16ps (pair_ops.h),
// accumulated in fp32:
//   S = Qi·Kjᵀ and dP = dO_i·Vjᵀ on the exact bf16 inputs, lanes = keys (Kj, Vj packed key-major);
//   dVj += Pᵀ·dO_i and dKj += dSᵀ·Qi with P and dS rounded to bf16 and transposed to [keys][rows/2] pairs,
//   lanes = head dim (dO_i, Qi packed as interleaved row pairs);
//   dQ_i += dS·Kj with dS as [rows][keys/2] pairs, lanes = head dim (Kj as interleaved key pairs).
// P and dS are computed in fp32 and rounded only as operands of the next products, as GPU FlashAttention
// does; the softmax scale is folded into dS before its rounding. Included only by the avx512bf16 unit.
#pragma once

#include "cpu/backward_impl.h"
#include "cpu/pair_ops.h"

namespace attnext::cpu {
namespace {

// One worker's scratch. Key tile: Kj, Vj key-major (S, dP), Kj as key pairs (dQ), fp32 dKj and dVj.
// Query block, rows padded to 32 (16 row pairs, one register transpose): Qi, dO_i as row pairs (S, dP) and
// as interleaved row pairs (dK, dV); S then P and dP then dS in fp32; dS as row pairs (dQ); Pᵀ and dSᵀ
// as pairs of rows (dV, dK), through `interleaved` before their transpose.
struct PairBwdScratch {
  LineVector<Pair> k_km, v_km, k_dm, q_rp, do_rp, q_dm, do_dm, ds_rp, p_t, ds_t, interleaved;
  LineVector<float> dk, dv, s, dp;
  PairBwdScratch(const Tiling& t, int64_t d)
      : k_km(pair_count(d) * t.block_k), v_km(pair_count(d) * t.block_k), k_dm(t.block_k / 2 * t.d_pad),
        q_rp(rows_pad(t) * pair_count(d)), do_rp(rows_pad(t) * pair_count(d)), q_dm(rows_pad(t) / 2 * t.d_pad),
        do_dm(rows_pad(t) / 2 * t.d_pad), ds_rp(rows_pad(t) * t.block_k / 2), p_t(t.block_k * rows_pad(t) / 2),
        ds_t(t.block_k * rows_pad(t) / 2), interleaved(rows_pad(t) / 2 * t.block_k), dk(t.block_k * t.d_pad),
        dv(t.block_k * t.d_pad), s(rows_pad(t) * t.block_k), dp(rows_pad(t) * t.block_k) {}
  static int64_t rows_pad(const Tiling& t) { return round_up(t.block_q, 32); }
};

// dst[j][rp] = (x[2rp][j], x[2rp + 1][j]) rounded to bf16, for the rows32 x n fp32 matrix x (rows32 a
// multiple of 32, n of 16): row pairs interleaved, then transposed 16 x 16 pairs at a time.
inline void transposed_row_pairs(const float* x, int64_t rows32, int64_t n, Pair* interleaved, Pair* dst) {
  for (int64_t rp = 0; rp < rows32 / 2; ++rp)
    for (int64_t c = 0; c < n; c += 16) {
      const __m256i lo = round_bf16(_mm512_loadu_ps(x + 2 * rp * n + c));
      const __m256i hi = round_bf16(_mm512_loadu_ps(x + (2 * rp + 1) * n + c));
      _mm512_storeu_si512(interleaved + rp * n + c, interleave_bf16(lo, hi));
    }
  transpose_pairs(interleaved, n, rows32 / 2, n, dst, rows32 / 2);
}

struct PairBackward {
  using V = VecF;
  using T = Bf16;
  using Scratch = PairBwdScratch;

  // Up to D = 256, 256-key tiles without a mask and 128 under one (on a Zen 4 core: 128 a few % over 64;
  // 256 over 128 +4-8% at D = 128-256, S = 1024-4096, neutral at D <= 64), which cut the packing of Qi and
  // dO_i per key and the passes over them; backward_run keeps the workspace's split bound.
  static Tiling tiling(const FwdParams& p) {
    Tiling t = choose_tiling(p.seq_q, p.head_dim);
    if (p.head_dim <= 256) t.block_k = hides_keys(p.mask) ? 128 : 256;
    return t;
  }

  static void load_keys(const BwdLayout& L, Scratch& w, const Bf16* k, const Bf16* v, int64_t nk) {
    const FwdParams& p = L.p->fwd;
    const int64_t D = p.head_dim, Dp = L.t.d_pad, nk_pad = round_up(nk, V::W);
    pack_key_major_pairs(k, p.k_stride.s, nk, D, w.k_km.data(), nk_pad);
    pack_key_major_pairs(v, p.v_stride.s, nk, D, w.v_km.data(), nk_pad);
    pack_dim_major_pairs(k, p.k_stride.s, nk, D, w.k_dm.data(), Dp);
    std::fill(w.dk.begin(), w.dk.end(), 0.0f);
    std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  }

  static void block(const BwdLayout& L, Scratch& w, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t j0,
                    int64_t nk, float* dq_acc) {
    const BwdParams& bp = *L.p;
    const FwdParams& p = bp.fwd;
    const int64_t D = p.head_dim, Dh = pair_count(D), Dp = L.t.d_pad, rows = i1 - i0, rows32 = round_up(rows, 32);
    const int64_t nk_pad = round_up(nk, V::W), row0 = (b * p.heads_q + h) * p.seq_q + i0;
    const Bf16* q = static_cast<const Bf16*>(p.q) + b * p.q_stride.b + h * p.q_stride.h + i0 * p.q_stride.s;
    const Bf16* dout =
        static_cast<const Bf16*>(bp.dout) + b * bp.dout_stride.b + h * bp.dout_stride.h + i0 * bp.dout_stride.s;
    pack_row_pairs(q, p.q_stride.s, rows, D, w.q_rp.data(), Dh);
    pack_row_pairs(dout, bp.dout_stride.s, rows, D, w.do_rp.data(), Dh);
    pack_dim_major_pairs(q, p.q_stride.s, rows, D, w.q_dm.data(), Dp);
    pack_dim_major_pairs(dout, bp.dout_stride.s, rows, D, w.do_dm.data(), Dp);

    // S = Qi · Kjᵀ · scale · log2 e, then P = 2^(S - lse_i · log2 e) with the forward's lse (masked keys
    // and rows without a visible key give 0; so do the padding rows up to rows32).
    pair_gemm(rows, nk_pad, Dh, w.q_rp.data(), Dh, w.k_km.data(), nk_pad, w.s.data(), nk_pad, p.scale * kLog2e,
              false);
    probabilities_from_lse(p, w.s.data(), nk_pad, i0, rows, j0, nk, p.lse + row0, [nk_pad](float* s, float shift) {
      const __m512 m = _mm512_set1_ps(shift);
      for (int64_t c = 0; c < nk_pad; c += 16)
        _mm512_storeu_ps(s + c, exp2_bf16(_mm512_sub_ps(_mm512_loadu_ps(s + c), m)));
    });
    std::fill(w.s.data() + rows * nk_pad, w.s.data() + rows32 * nk_pad, 0.0f);

    // dP = dO_i · Vjᵀ, then dS = scale · P ∘ (dP - Delta_i) in place, and as bf16 row pairs.
    pair_gemm(rows, nk_pad, Dh, w.do_rp.data(), Dh, w.v_km.data(), nk_pad, w.dp.data(), nk_pad, 1.0f, false);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 delta = _mm512_set1_ps(L.delta[row0 + r]), scale = _mm512_set1_ps(p.scale);
      float* ds = w.dp.data() + r * nk_pad;
      const float* pr = w.s.data() + r * nk_pad;
      for (int64_t c = 0; c < nk_pad; c += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(pr + c), scale),
                                       _mm512_sub_ps(_mm512_loadu_ps(ds + c), delta));
        _mm512_storeu_ps(ds + c, x);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.ds_rp.data() + r * (nk_pad / 2) + c / 2), round_bf16(x));
      }
    }
    std::fill(w.dp.data() + rows * nk_pad, w.dp.data() + rows32 * nk_pad, 0.0f);

    // dVj += Pᵀ · dO_i;  dKj += dSᵀ · Qi;  dQ_i += dS · Kj
    transposed_row_pairs(w.s.data(), rows32, nk_pad, w.interleaved.data(), w.p_t.data());
    transposed_row_pairs(w.dp.data(), rows32, nk_pad, w.interleaved.data(), w.ds_t.data());
    pair_gemm(nk, Dp, pair_count(rows), w.p_t.data(), rows32 / 2, w.do_dm.data(), Dp, w.dv.data(), Dp, 1.0f, true);
    pair_gemm(nk, Dp, pair_count(rows), w.ds_t.data(), rows32 / 2, w.q_dm.data(), Dp, w.dk.data(), Dp, 1.0f, true);
    pair_gemm(rows, Dp, pair_count(nk), w.ds_rp.data(), nk_pad / 2, w.k_dm.data(), Dp, dq_acc, L.dq_ld(), 1.0f, true);
  }

  // dKj = dSᵀ · Q (scale is in dS) and dVj as accumulated.
  static void store_keys(const BwdLayout& L, const Scratch& w, int64_t nk, Bf16* dk, Bf16* dv) {
    const BwdParams& bp = *L.p;
    unpack_rows<V>(w.dk.data(), L.t.d_pad, nk, bp.fwd.head_dim, 1.0f, dk, bp.dk_stride.s);
    unpack_rows<V>(w.dv.data(), L.t.d_pad, nk, bp.fwd.head_dim, 1.0f, dv, bp.dv_stride.s);
  }
};

}  // namespace
}  // namespace attnext::cpu
