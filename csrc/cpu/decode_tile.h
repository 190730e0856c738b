// One KV head's part of the decode-shaped forward (decode_impl.h): its layout (how many query rows, in
// which form the scores take them), its running state (m, l, acc and its query rows), and the work on one
// key tile: Sᵀ = Kj · Qᵀ, the online softmax and acc += P · Vj, with the products of decode_ops.h (and of
// decode_bf16_pairs.h on AVX512_BF16).
//
// Sᵀ is stored key-major with R lanes per key (R = the rows rounded up): a vector holds W/R keys when
// R < W, so that with one or a few rows the softmax still runs on full vectors.
#pragma once

#include "cpu/decode_ops.h"
#include "cpu/tiling.h"
#if defined(__AVX512BF16__)
#include "cpu/decode_bf16_pairs.h"
#endif

namespace attnext::cpu {
namespace {

constexpr int64_t kScoreKeys = 16;      // keys per step of the scores (a multiple of every W / R)

struct DecodeLayout {
  const FwdParams* p;
  Tiling t;
  int64_t rows = 0;   // Sq · group; row r = (head g = r / Sq, query i = r % Sq)
  int64_t R = 0;      // lanes per key in Sᵀ: 1, 2 or 4 <= W/2 (dot form) or a multiple of W (gemm form)
  bool dot_form = false;  // few rows: dot products along the head dim, reduced W at a time
  bool heads_together = false;  // K/V key-major: a task takes all KV heads of a batch over its keys
  bool pairs = false, lane_pairs = false;  // bf16 products on vdpbf16ps: dot form, or the rows as lanes
  bool split_v = false;  // other bf16: V widened by pairs, acc's columns in split order (split_columns)
  bool split_k = false;  // and the dot form's K likewise, against Q in split order
  bool packs_k = false, packs_v = false;  // K (V) rows first copied to fp32 rows of d_pad (attend_tile)
  bool copies_k_rows = false;  // fp32, rows as lanes, heads together: a head's K rows of a tile copied first
  int64_t n_split = 1;
  float* part = nullptr;  // per (batch, KV head, split): acc (rows, d_pad), then m (rows), then l (rows)
  int64_t part_floats() const { return rows * t.d_pad + 2 * rows; }
  float* part_of(int64_t b, int64_t hk, int64_t split) const {
    return part + ((b * p->heads_kv + hk) * n_split + split) * part_floats();
  }
};

// The running state of one (batch, KV head) in a task: its query rows in the form the scores take (q:
// Q · scale · log2 e, R rows of d_pad (dot form) or Qᵀ, head_dim rows of R (gemm form); q_bits: the bf16
// query rows as they are, for bf16 pairs), m, l and alpha (one period of the lane pattern of Sᵀ:
// max(R, W) floats) and acc (rows x d_pad).
struct HeadState {
  float *q, *m, *l, *alpha, *acc;
  uint16_t* q_bits;
};

template <class V>
struct DecodeScratch {
  int64_t q_size, lane_size, acc_size;  // per head
  LineVector<float> q, k_p, v_p, s_t, m, l, alpha, acc;
  LineVector<uint16_t> q_bits;
  LineVector<uint32_t> p_pairs;  // P · Vj on bf16 pairs: the rows of P as pairs of keys, and their scratch
  LineVector<char> k_rows;  // one head's K rows of a tile, copied together (decode_heads_task)
  DecodeScratch(const DecodeLayout& L, int64_t heads)
      : q_size(L.R * L.t.d_pad), lane_size(std::max<int64_t>(L.R, V::W)), acc_size(L.rows * L.t.d_pad),
        q(heads * q_size), k_p(L.packs_k ? L.t.block_k * L.t.d_pad : 0), v_p(L.packs_v ? L.t.block_k * L.t.d_pad : 0),
        s_t((L.t.block_k + V::W) * L.R), m(heads * lane_size), l(m.size()), alpha(m.size()),
        acc(heads * acc_size), q_bits(heads * q_size), p_pairs(2 * L.R * round_up(L.t.block_k / 2 + 1, 16)),
        k_rows(L.copies_k_rows ? L.t.block_k * L.p->head_dim * sizeof(float) : 0) {}
  HeadState head(int64_t h) {
    return {q.data() + h * q_size, m.data() + h * lane_size, l.data() + h * lane_size,
            alpha.data() + h * lane_size, acc.data() + h * acc_size, q_bits.data() + h * q_size};
  }
};

// The keys of [j0, j0 + nk) that row r may not see get -inf (only tiles on a mask boundary get here).
inline void mask_lanes(const DecodeLayout& L, float* s_t, int64_t j0, int64_t nk) {
  const FwdParams& p = *L.p;
  for (int64_t r = 0; r < L.rows; ++r) {
    const int64_t i = r % p.seq_q, kb = key_begin(p.mask, i, p.seq_k), ke = key_end(p.mask, i, p.seq_k);
    for (int64_t j = 0; j < nk; ++j)
      if (j0 + j < kb || j0 + j >= ke) s_t[j * L.R + r] = kNegInf;
  }
}

// Sᵀ (16 keys x W rows) = Kj · Qᵀ in one block of 16 accumulators: per column d, one Qᵀ vector and 16
// K elements broadcast from rows ld apart. The rows are addressed as 4 bases plus 0-3 strides, the
// strides hidden from the compiler's loop analysis (the empty asm): left to itself, GCC kept 16 row
// addresses and, out of registers, moved some of them from vector registers at every step (7-12% slower).
template <class V>
void scores_rows16(int64_t D, const float* k, int64_t ld, const float* q_t, float* s_t, LinesAhead& ahead) {
  typename V::T acc[kScoreKeys];
#pragma GCC unroll 16
  for (auto& a : acc) a = V::zero();
  const float* base[4] = {k, k + 4 * ld, k + 8 * ld, k + 12 * ld};
  for (int64_t d = 0; d < D; ++d) {
    ahead.next(d);
    int64_t ld1 = ld;
    asm("" : "+r"(ld1));
    const int64_t off[4] = {d, d + ld1, d + 2 * ld1, d + 3 * ld1};
    const typename V::T q = V::load(q_t + d * V::W);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[4 * g + i] = V::fma(V::set1(base[g][off[i]]), q, acc[4 * g + i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < kScoreKeys; ++i) V::store(s_t + i * V::W, acc[i]);
}

#if defined(__AVX512BF16__)
constexpr bool kPairProducts = true;  // vdpbf16ps: bf16 takes the pair forms (choose_pair_forms)
#else
constexpr bool kPairProducts = false;
#endif

// bf16 K and V widened by pairs (split order) on units without vdpbf16ps: with 32 registers (AVX-512F,
// zmm or ymm) 1-16 rows per KV head ran 1.02-1.13x (K/V from memory, 8k keys, one thread, a Zen 4 core
// running the avx512 unit); with AVX2's 16 the dot form's split query chunks no longer fit the registers
// and one row's chain doubles: 0.79-0.97x, so AVX2 keeps the plain widening.
template <class V, class T>
constexpr bool kSplitBf16 = std::is_same_v<T, Bf16> && V::kRegisters == 32 && !kPairProducts;

// Which pair forms bf16 heads take: vdpbf16ps products in the dot form (pairs) or with the rows as lanes
// (lane_pairs); without it, K and V widened by pairs (split_v, and split_k in the dot form) for head dims
// that rows split into runs of 4 vectors (a shift or a mask per W elements, where the plain widening takes
// a zero-extension and a shift).
template <class V, class T>
void choose_pair_forms(DecodeLayout& L) {
  const int64_t D = L.p->head_dim;
  const bool bf16 = std::is_same_v<T, Bf16>;
  L.pairs = kPairProducts && bf16 && L.dot_form && D % 32 == 0;
  L.lane_pairs = kPairProducts && bf16 && !L.dot_form && L.R == V::W && D % 2 == 0;
  L.split_v = kSplitBf16<V, T> && D % (4 * V::W) == 0;
  L.split_k = L.split_v && L.dot_form;
}

// Q · scale · log2 e of KV head hk's rows in the form the scores use (or Q as it is, for bf16 pairs),
// padding rows and columns zero; m = -inf, l = 0, acc = 0.
template <class V, class T>
void start_head(const DecodeLayout& L, const HeadState& s, int64_t b, int64_t hk) {
  const FwdParams& p = *L.p;
  const int64_t D = p.head_dim, Dp = L.t.d_pad, R = L.R, group = p.heads_q / p.heads_kv;
  std::fill(s.q, s.q + R * Dp, 0.0f);
  std::fill(s.q_bits, s.q_bits + R * Dp, uint16_t{0});
  for (int64_t r = 0; r < L.rows; ++r) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + (hk * group + r / p.seq_q) * p.q_stride.h +
                 (r % p.seq_q) * p.q_stride.s;
    if (L.pairs) std::memcpy(&s.q_bits[r * Dp], q, D * 2);
    else if (L.lane_pairs) for (int64_t d = 0; d < D; d += 2) std::memcpy(&s.q_bits[(d / 2 * R + r) * 2], q + d, 4);
    else if (L.dot_form) {
      pack_rows<V>(q, 0, 1, D, p.scale * kLog2e, s.q + r * Dp, Dp);
      if (L.split_k) split_columns<V>(s.q + r * Dp, Dp, false);
    }
    else for (int64_t d = 0; d < D; ++d) s.q[d * R + r] = Convert<V>::to_float(q[d]) * p.scale * kLog2e;
  }
  const int64_t lanes = std::max<int64_t>(R, V::W);
  std::fill(s.m, s.m + lanes, kNegInf);
  std::fill(s.l, s.l + lanes, 0.0f);
  std::fill(s.acc, s.acc + L.rows * Dp, 0.0f);
}

// One key tile [j0, j0 + nk) of one head (K rows from kj, k_ld elements apart; V rows likewise):
// Sᵀ = Kj · Qᵀ, the online softmax, acc = acc · alpha + P · Vj. k_ahead(j, n, steps) and v_ahead(steps)
// give the LinesAhead that the products of the score chunk at key j (n keys) and of P · Vj step while they
// run.
template <class V, class T, class KAhead, class VAhead>
void attend_tile(const DecodeLayout& L, DecodeScratch<V>& w, const HeadState& s, const T* kj, int64_t k_ld,
                 const T* vj, int64_t v_ld, int64_t j0, int64_t nk, const KAhead& k_ahead, const VAhead& v_ahead) {
  const FwdParams& p = *L.p;
  const int64_t D = p.head_dim, Dp = L.t.d_pad, R = L.R;
  const bool in_place = D == Dp;  // K and V rows read (and widened) straight from memory
  const int64_t keys_per_vec = std::max<int64_t>(1, V::W / R), nk_pad = round_up(nk, keys_per_vec);
  // Sᵀ = Kj · Qᵀ  (nk_pad x R, base-2 logits), kScoreKeys keys at a time. The stream from memory is
  // the whole cost: rows further on are requested at the pace of the products that read the current
  // ones (k_ahead; v_ahead likewise in P · Vj below).
  for (int64_t j = 0; j < nk; j += kScoreKeys) {
    const int64_t n = std::min(kScoreKeys, nk - j);
    const T* k_j = kj + j * k_ld;
    float* s_j = w.s_t.data() + j * R;
    if (L.dot_form && in_place) {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, Bf16> && V::W == 16) {  // zmm code; the 8-lane unit has no dot form
        if (L.pairs) {
          LinesAhead ahead = k_ahead(j, n, scores_dot_steps<V, PairDot>(R, n, Dp));
          scores_dot<V, PairDot>(R, k_j, k_ld, n, s.q_bits, Dp, p.scale * kLog2e, s_j, ahead);
          continue;
        }
      }
#endif
      if constexpr (kSplitBf16<V, T>) {
        if (L.split_k) {
          using Dot = SplitBf16Dot<V>;
          LinesAhead ahead = k_ahead(j, n, scores_dot_steps<V, Dot>(R, n, Dp));
          scores_dot<V, Dot>(R, k_j, k_ld, n, s.q, Dp, 1.0f, s_j, ahead);
          continue;
        }
      }
      using Dot = WidenedDot<V, T>;
      LinesAhead ahead = k_ahead(j, n, scores_dot_steps<V, Dot>(R, n, Dp));
      scores_dot<V, Dot>(R, k_j, k_ld, n, s.q, Dp, 1.0f, s_j, ahead);
    } else if (L.dot_form) {
      using Dot = WidenedDot<V, float>;
      LinesAhead ahead = k_ahead(j, n, scores_dot_steps<V, Dot>(R, n, Dp));
      pack_rows<V>(k_j, k_ld, n, D, 1.0f, w.k_p.data(), Dp);
      scores_dot<V, Dot>(R, w.k_p.data(), Dp, n, s.q, Dp, 1.0f, s_j, ahead);
    } else {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, Bf16>) {
        if (L.lane_pairs) {
          using P = std::conditional_t<V::W == 16, PairLanes16, PairLanes8>;
          LinesAhead ahead = k_ahead(j, n, pair_scores_steps<P>(n, D));
          pair_scores<P>(k_j, k_ld, n, s.q_bits, D, p.scale * kLog2e, s_j, ahead);
          continue;
        }
      }
#endif
      if constexpr (V::kRows == 8) {
        // One vector of rows (R = W): the whole chunk of keys in one block of 16 accumulators, each Qᵀ
        // vector loaded once for all of them (over the 8-key blocks of gemm: 1.02-1.08x in 14 of 15
        // alternating runs, fp32 with K/V from memory, 8 and 16 rows).
        if (R == V::W && n == kScoreKeys) {
          LinesAhead ahead = k_ahead(j, n, D);
          if constexpr (std::is_same_v<T, float>) {
            scores_rows16<V>(D, k_j, k_ld, s.q, s_j, ahead);
          } else {
            pack_rows<V>(k_j, k_ld, n, D, 1.0f, w.k_p.data(), Dp);
            scores_rows16<V>(D, w.k_p.data(), Dp, s.q, s_j, ahead);
          }
          continue;
        }
      }
      LinesAhead ahead = k_ahead(j, n, gemm_steps<V>(n, R, D));
      if constexpr (std::is_same_v<T, float>) {
        gemm<V>(n, R, D, k_j, k_ld, 1, s.q, R, s_j, R, false, &ahead);
      } else {
        pack_rows<V>(k_j, k_ld, n, D, 1.0f, w.k_p.data(), Dp);
        gemm<V>(n, R, D, w.k_p.data(), Dp, 1, s.q, R, s_j, R, false, &ahead);
      }
    }
  }
  std::fill(w.s_t.data() + nk * R, w.s_t.data() + nk_pad * R, kNegInf);
  if (!tile_fully_visible(p.mask, 0, p.seq_q, j0, j0 + nk, p.seq_k)) mask_lanes(L, w.s_t.data(), j0, nk);

  online_softmax<V>(w.s_t.data(), nk_pad * R / V::W, R, s.m, s.l, s.alpha);
  for (int64_t r = 0; r < L.rows; ++r)
    if (s.alpha[r] != 1.0f) scale_row<V>(s.acc + r * Dp, Dp, s.alpha[r]);

  // acc += P · Vj (bf16 with D a multiple of 64: on pairs of keys, with P rounded to bf16)
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, Bf16>) {
    if (pv_on_pairs(D)) {
      LinesAhead ahead = v_ahead(pv_pairs_steps(L.rows, nk, D));
      pv_pairs(L.rows, R, nk, w.s_t.data(), vj, v_ld, D, w.p_pairs.data(), s.acc, ahead);
      return;
    }
  }
#endif
  LinesAhead ahead = v_ahead(pv_steps<V>(L.rows, nk, Dp));
  if constexpr (kSplitBf16<V, T>) {
    if (L.split_v) {  // acc's columns in split order, joined in finish_head
      pv<V>(L.rows, nk, w.s_t.data(), R, reinterpret_cast<const Bf16Split*>(vj), v_ld, s.acc, Dp, ahead);
      return;
    }
  }
  if (in_place) pv<V>(L.rows, nk, w.s_t.data(), R, vj, v_ld, s.acc, Dp, ahead);
  else {
    pack_rows<V>(vj, v_ld, nk, D, 1.0f, w.v_p.data(), Dp);
    pv<V>(L.rows, nk, w.s_t.data(), R, w.v_p.data(), Dp, s.acc, Dp, ahead);
  }
}

// acc (its columns in natural order), m and l of a head into its part; l as the per-lane partial sums of
// each row added up.
template <class V>
void finish_head(const DecodeLayout& L, const HeadState& s, float* part) {
  const int64_t Dp = L.t.d_pad;
  if (L.R < V::W)
    V::store(s.l, fold_lanes<V>(V::load(s.l), L.R, [](auto a, auto b) { return V::add(a, b); }));
  std::copy_n(s.acc, L.rows * Dp, part);
  if (L.split_v)
    for (int64_t r = 0; r < L.rows; ++r) split_columns<V>(part + r * Dp, Dp, true);
  std::copy_n(s.m, L.rows, part + L.rows * Dp);
  std::copy_n(s.l, L.rows, part + L.rows * Dp + L.rows);
}

}  // namespace
}  // namespace attnext::cpu
