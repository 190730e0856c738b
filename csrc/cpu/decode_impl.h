// Forward for few query rows per KV head (decoding: Sq · Hq/Hkv <= kDecodeMaxRows), over a vector unit V
// and a storage type T. The scores are computed transposed, Sᵀ = Kj · Qᵀ, with the query rows of all
// heads of a GQA group side by side: each K and V row is read from memory once for the whole group, and
// K needs no transpose. The key range of each (batch, KV head) is split over several tasks when there
// are fewer heads than threads; the partial results are merged through their LSE. With K/V laid out
// key-major ((batch, key, head, dim), FlashAttention's KV cache) a task walks all KV heads of a batch
// together, tile by tile, so that it reads each tile's rows of all heads as one span.
//
// Sᵀ is stored key-major with R lanes per key (R = the rows rounded up): a vector holds W/R keys when
// R < W, so that with one or a few rows the softmax still runs on full vectors.
#pragma once

#include <memory>

#include "cpu/decode_ops.h"
#include "cpu/tasks.h"
#include "cpu/tiling.h"
#if defined(__AVX512BF16__)
#include "cpu/decode_bf16_pairs.h"
#endif

namespace attnext::cpu {
namespace {

constexpr int64_t kScoreKeys = 16;      // keys per step of the scores (a multiple of every W / R)
constexpr int64_t kPrefetchKeys = 128;  // how far ahead K and V rows are requested
constexpr int64_t kPageAheadKeys = 256;  // how far ahead each page of K and V rows is touched first
constexpr int64_t kSpanBytes = 128 << 10;  // K (and V) bytes of all heads per tile when heads go together

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
  std::vector<float> q, k_p, v_p, s_t, m, l, alpha, acc;
  std::vector<uint16_t> q_bits;
  std::vector<uint32_t> p_pairs;  // P · Vj on bf16 pairs: the rows of P as pairs of keys, and their scratch
  std::vector<char> k_rows;  // one head's K rows of a tile, copied together (decode_heads_task)
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

// A split's share of the visible keys, [*first, *last): whole key tiles, dealt out in contiguous runs;
// *end: the end of all visible keys.
inline void split_keys(const DecodeLayout& L, int64_t split, int64_t* first, int64_t* last, int64_t* end) {
  const FwdParams& p = *L.p;
  int64_t kv_begin;
  tile_key_range(p.mask, 0, p.seq_q, p.seq_k, &kv_begin, end);
  const int64_t n_tiles = (*end - kv_begin + L.t.block_k - 1) / L.t.block_k;
  const int64_t per_split = (n_tiles + L.n_split - 1) / L.n_split;
  *first = kv_begin + split * per_split * L.t.block_k;
  *last = std::min(*end, *first + per_split * L.t.block_k);
}

// One (batch, KV head) over one split of its keys.
template <class V, class T>
void decode_task(const DecodeLayout& L, DecodeScratch<V>& w, int64_t b, int64_t hk, int64_t split) {
  const FwdParams& p = *L.p;
  const int64_t D = p.head_dim, R = L.R;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
  const HeadState s = w.head(0);
  start_head<V, T>(L, s, b, hk);
  int64_t j_first, j_last, kv_end;
  split_keys(L, split, &j_first, &j_last, &kv_end);
  const int64_t elem = sizeof(T), k_bytes = p.k_stride.s * elem, v_bytes = p.v_stride.s * elem;
  // Where K and V are each one block of rows in task order ((b, h, s) contiguous), the rows past this
  // task's last key are the next task's first ones: they are requested ahead as well. With one query row
  // (R = 1) such K and V are two streams read in address order with one FMA per element, which the
  // hardware prefetchers follow faster than the paced requests: no line is requested there (only each
  // page once, below).
  const auto in_task_order = [&](const Strides& st) {
    return st.s == D && st.h == p.seq_k * D && (p.batch == 1 || st.b == p.heads_kv * st.h);
  };
  const bool contiguous = in_task_order(p.k_stride) && in_task_order(p.v_stride);
  const bool requests = !(contiguous && R == 1);
  const int64_t ahead_end = contiguous ? kv_end + kPrefetchKeys : j_last;
  // With contiguous rows each 4 KiB page is also touched once kPageAheadKeys ahead, twice as far as the
  // line requests: on 4 KiB pages every one needs a page walk, and a walk that waits on memory would
  // otherwise hold up the stream into that page, whether the lines are requested (a few rows) or left to
  // the hardware prefetchers (one row), which stop at each page boundary. On a Zen 4 core, K/V from memory:
  // one row 1.14-1.20x, 4 rows 0.96-1.17x, 16 rows 0.95-1.08x (docs/architecture.md).
  // (Strided rows: not measured.)
  const int64_t pages_end = kv_end + kPageAheadKeys;
  // Keys [from, from + n) as far as they are requested at all.
  const auto keys_ahead = [&](int64_t from, int64_t n) {
    return requests ? std::clamp<int64_t>(ahead_end - from, 0, n) : int64_t{0};
  };
  // The task's own first pages: the task before it in memory may have run on another core, and a page
  // walk fills the TLB of the core that made it (two threads, fp32, one row, 1k keys: 1.05-1.12x;
  // elsewhere 0.96-1.02x; docs/architecture.md).
  if (contiguous) {
    const int64_t n_first = std::min(kPageAheadKeys, j_last - j_first);
    request_pages(k + j_first * p.k_stride.s, n_first * k_bytes);
    request_pages(v + j_first * p.v_stride.s, n_first * v_bytes);
  }
  for (int64_t j0 = j_first; j0 < j_last; j0 += L.t.block_k) {
    const int64_t nk = std::min(L.t.block_k, j_last - j0);
    const T* kj = k + j0 * p.k_stride.s;
    const T* vj = v + j0 * p.v_stride.s;
    if (contiguous) {
      const int64_t n_pages = std::clamp<int64_t>(pages_end - (j0 + kPageAheadKeys), 0, nk);
      request_pages(kj + kPageAheadKeys * p.k_stride.s, n_pages * k_bytes);
      request_pages(vj + kPageAheadKeys * p.v_stride.s, n_pages * v_bytes);
    }
    const auto k_ahead = [&](int64_t j, int64_t n, int64_t steps) {
      const int64_t from = j0 + j + kPrefetchKeys;
      return lines_ahead(kj + (j + kPrefetchKeys) * p.k_stride.s, keys_ahead(from, n), k_bytes, D * elem, steps);
    };
    const auto v_ahead = [&](int64_t steps) {
      return lines_ahead(vj + kPrefetchKeys * p.v_stride.s, keys_ahead(j0 + kPrefetchKeys, nk), v_bytes, D * elem,
                         steps);
    };
    attend_tile<V, T>(L, w, s, kj, p.k_stride.s, vj, p.v_stride.s, j0, nk, k_ahead, v_ahead);
  }
  finish_head<V>(L, s, L.part_of(b, hk, split));
}

// All KV heads of batch b over one split of the keys, for K/V laid out key-major: tile by tile, each
// head in turn, so that a tile's rows of all heads (one span of memory) are read within one tile's time,
// rather than one head's rows a whole row of heads apart over the task (a page apart at 8 fp32 heads of
// D = 128: the hardware prefetchers stop at each, and each DRAM page gives a sliver). Tiles keep each
// span near kSpanBytes; while a head computes on one tile it requests its share of the next tile's spans.
template <class V, class T>
void decode_heads_task(const DecodeLayout& L, DecodeScratch<V>& w, int64_t b, int64_t split) {
  const FwdParams& p = *L.p;
  const int64_t H = p.heads_kv, D = p.head_dim;
  for (int64_t hk = 0; hk < H; ++hk) start_head<V, T>(L, w.head(hk), b, hk);
  int64_t j_first, j_last, kv_end;
  split_keys(L, split, &j_first, &j_last, &kv_end);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b;
  const int64_t elem = sizeof(T), k_key = p.k_stride.s * elem, v_key = p.v_stride.s * elem;  // bytes per key
  for (int64_t j0 = j_first; j0 < j_last; j0 += L.t.block_k) {
    const int64_t nk = std::min(L.t.block_k, j_last - j0);
    const int64_t n_next = std::clamp<int64_t>(kv_end - (j0 + nk), 0, L.t.block_k);
    const char* k_next = reinterpret_cast<const char*>(k + (j0 + nk) * p.k_stride.s);
    const char* v_next = reinterpret_cast<const char*>(v + (j0 + nk) * p.v_stride.s);
    const int64_t k_share = round_up(n_next * k_key / H, 64), v_share = round_up(n_next * v_key / H, 64);
    for (int64_t hk = 0; hk < H; ++hk) {
      // Head hk requests share hk of the next tile's spans: its score chunk at key j the part j / nk of it.
      const char* k_mine = k_next + hk * k_share;
      const int64_t k_left = std::clamp<int64_t>(n_next * k_key - hk * k_share, 0, k_share);
      const auto k_ahead = [&](int64_t j, int64_t n, int64_t steps) {
        const int64_t from = k_left * j / nk, to = k_left * (j + n) / nk;
        return lines_ahead(k_mine + from, to > from, to - from, to - from, steps);
      };
      const int64_t v_left = std::clamp<int64_t>(n_next * v_key - hk * v_share, 0, v_share);
      const auto v_ahead = [&](int64_t steps) {
        return lines_ahead(v_next + hk * v_share, v_left > 0, v_left, v_left, steps);
      };
      const T* kj = k + hk * p.k_stride.h + j0 * p.k_stride.s;
      const T* vj = v + hk * p.v_stride.h + j0 * p.v_stride.s;
      if (L.copies_k_rows) {
        // fp32 scores with the rows as lanes read 16 K rows at each step: rows a multiple of 4 KiB apart
        // would all fall in one set of the L1. They are copied together first (V rows are read one at
        // a time, and bf16 and fp16 read K 8 rows at a time or pack it).
        T* k_rows = reinterpret_cast<T*>(w.k_rows.data());
        for (int64_t j = 0; j < nk; ++j) std::memcpy(k_rows + j * D, kj + j * p.k_stride.s, D * elem);
        attend_tile<V, T>(L, w, w.head(hk), k_rows, D, vj, p.v_stride.s, j0, nk, k_ahead, v_ahead);
      } else {
        attend_tile<V, T>(L, w, w.head(hk), kj, p.k_stride.s, vj, p.v_stride.s, j0, nk, k_ahead, v_ahead);
      }
    }
  }
  for (int64_t hk = 0; hk < H; ++hk) finish_head<V>(L, w.head(hk), L.part_of(b, hk, split));
}

// Merge the splits of one (batch, KV head): m = max_s m_s, l = Σ_s l_s·2^(m_s - m),
// O = Σ_s acc_s·2^(m_s - m) / l, lse = (m + log2 l)·ln 2.
template <class V, class T>
void decode_merge(const DecodeLayout& L, int64_t b, int64_t hk, std::vector<float>& acc) {
  const FwdParams& p = *L.p;
  const int64_t Dp = L.t.d_pad, group = p.heads_q / p.heads_kv;
  const float* first = L.part_of(b, hk, 0);
  for (int64_t r = 0; r < L.rows; ++r) {
    float m = kNegInf;
    for (int64_t s = 0; s < L.n_split; ++s) m = std::max(m, first[s * L.part_floats() + L.rows * Dp + r]);
    float l = 0.0f;
    const float* o = acc.data();  // Σ_s acc_s·2^(m_s - m), or the one part's acc as it is
    if (L.n_split == 1) {
      l = first[L.rows * Dp + L.rows + r];
      o = first + r * Dp;
    } else {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < L.n_split && m != kNegInf; ++s) {
        const float* part = first + s * L.part_floats();
        const float weight = std::exp2(part[L.rows * Dp + r] - m);
        l += part[L.rows * Dp + L.rows + r] * weight;
        for (int64_t d = 0; d < Dp; ++d) acc[d] += part[r * Dp + d] * weight;
      }
    }
    const int64_t h = hk * group + r / p.seq_q, i = r % p.seq_q;
    T* out = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + i * p.out_stride.s;
    const bool empty = l == 0.0f;
    unpack_rows<V>(o, Dp, 1, p.head_dim, empty ? 0.0f : 1.0f / l, out, 0);
    p.lse[(b * p.heads_q + h) * p.seq_q + i] = empty ? kNegInf : (m + std::log2(l)) * kLn2;
  }
}

template <class V, class T>
void decode_typed(const FwdParams& p) {
  DecodeLayout L{&p, choose_tiling(p.seq_q, p.head_dim)};
  L.rows = decode_rows(p);
  // With at most 4 rows most lanes of a row-per-lane Sᵀ would be padding (at least half of 8): take dot
  // products instead, each vector holding at least 2 keys. (3-4 rows on the 8-lane avx2 unit, where this
  // once took the rows as lanes: 1.4-1.5x, fp32 and bf16, K/V from memory, on a Zen 4 core.)
  L.dot_form = L.rows <= std::min(4, V::W / 2);
  L.R = L.dot_form ? (L.rows <= 1 ? 1 : L.rows <= 2 ? 2 : 4) : round_up(L.rows, V::W);
  choose_pair_forms<V, T>(L);
  L.packs_v = p.head_dim != L.t.d_pad;
  L.packs_k = L.packs_v || (!L.dot_form && !L.lane_pairs && !std::is_same_v<T, float>);
  // Key-major K/V: all heads of a key lie closer together than one head's consecutive keys.
  L.heads_together = p.heads_kv > 1 && p.k_stride.h < p.k_stride.s && p.v_stride.h < p.v_stride.s;
  L.copies_k_rows = L.heads_together && !L.dot_form && std::is_same_v<T, float>;
  const int64_t units = p.batch * (L.heads_together ? 1 : p.heads_kv);
  if (L.heads_together) {
    const int64_t span = p.heads_kv * std::max(p.k_stride.s, p.v_stride.s) * int64_t{sizeof(T)};
    L.t.block_k = std::clamp<int64_t>(kSpanBytes / span / kScoreKeys * kScoreKeys, kScoreKeys, L.t.block_k);
  }
  L.n_split = decode_splits(p, L.t.block_k, units);
  // Every task writes its whole part (finish_head): no need to clear it first.
  const std::unique_ptr<float[]> part(new float[p.batch * p.heads_kv * L.n_split * L.part_floats()]);
  L.part = part.get();
  run_tasks<const DecodeLayout>(p, units * L.n_split, &L, [](const DecodeLayout& L, TaskQueue& queue) {
    DecodeScratch<V> w(L, L.heads_together ? L.p->heads_kv : 1);
    for (int64_t task; queue.next(&task);) {
      const int64_t unit = task / L.n_split, split = task % L.n_split;
      if (L.heads_together) decode_heads_task<V, T>(L, w, unit, split);
      else decode_task<V, T>(L, w, unit / L.p->heads_kv, unit % L.p->heads_kv, split);
    }
  });
  p.parallel_for(p.batch * p.heads_kv, &L, [](void* c, int64_t begin, int64_t end) {
    const DecodeLayout& L = *static_cast<const DecodeLayout*>(c);
    std::vector<float> acc(L.t.d_pad);
    for (int64_t bh = begin; bh < end; ++bh) decode_merge<V, T>(L, bh / L.p->heads_kv, bh % L.p->heads_kv, acc);
  });
}

}  // namespace
}  // namespace attnext::cpu
