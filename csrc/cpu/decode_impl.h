// Forward for few query rows per KV head (decoding: Sq · Hq/Hkv <= kDecodeMaxRows), over a vector unit V
// and a storage type T. The scores are computed transposed, Sᵀ = Kj · Qᵀ, with the query rows of all
// heads of a GQA group side by side: each K and V row is read from memory once for the whole group, and
// K needs no transpose. The key range of each (batch, KV head) is split over several tasks when there
// are fewer heads than threads; the partial results are merged through their LSE.
//
// Sᵀ is stored key-major with R lanes per key (R = the rows rounded up): a vector holds W/R keys when
// R < W, so that with one or a few rows the softmax still runs on full vectors.
#pragma once

#include "cpu/tasks.h"
#include "cpu/tile_ops.h"
#include "cpu/tiling.h"
#if defined(__AVX512BF16__)
#include "cpu/decode_bf16_pairs.h"
#endif

namespace attnext::cpu {
namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr int64_t kScoreKeys = 16;      // keys per step of the scores (a multiple of every W / R)
constexpr int64_t kPrefetchKeys = 128;  // how far ahead K and V rows are requested
constexpr int64_t kPageAheadKeys = 256;  // how far ahead each page of K and V rows is touched first

struct DecodeLayout {
  const FwdParams* p;
  Tiling t;
  int64_t rows;   // Sq · group; row r = (head g = r / Sq, query i = r % Sq)
  int64_t R;      // lanes per key in Sᵀ: a power of two <= W/4 (dot form) or a multiple of W (gemm form)
  bool dot_form;  // few rows: dot products along the head dim, reduced W at a time
  int64_t n_split;
  float* part;    // per task: acc (rows, d_pad), then m (rows), then l (rows)
  int64_t part_floats() const { return rows * t.d_pad + 2 * rows; }
};

template <class V>
struct DecodeScratch {
  // q: Q · scale · log2 e, R rows of d_pad (dot form) or Qᵀ, head_dim rows of R (gemm form).
  // m, l, alpha: one period of the lane pattern of Sᵀ (max(R, W) floats).
  std::vector<float> q, k_p, v_p, s_t, m, l, alpha, acc;
  std::vector<uint16_t> q_bits;  // the bf16 query rows as they are (dot form on bf16 pairs)
  std::vector<uint32_t> p_pairs;  // P · Vj on bf16 pairs: the rows of P as pairs of keys, and their scratch
  explicit DecodeScratch(const DecodeLayout& L)
      : q(L.R * L.t.d_pad), k_p(L.t.block_k * L.t.d_pad), v_p(L.t.block_k * L.t.d_pad),
        s_t((L.t.block_k + V::W) * L.R), m(std::max<int64_t>(L.R, V::W)), l(m.size()), alpha(m.size()),
        acc(L.rows * L.t.d_pad), q_bits(L.R * L.t.d_pad), p_pairs(2 * L.R * round_up(L.t.block_k / 2 + 1, 16)) {}
};

// The products of the dot form: K chunks widened to fp32 and FMA'd with the fp32 query rows (which carry
// scale · log2 e), kCols columns per step.
template <class V, class TK>
struct WidenedDot {
  using Q = float;
  using Chunk = typename V::T;
  static constexpr int kCols = V::W;
  static Chunk load_q(const Q* q) { return V::load(q); }
  static Chunk load_k(const TK* k) { return load_float<V>(k); }
  static typename V::T add_product(typename V::T acc, Chunk k, Chunk q) { return V::fma(k, q, acc); }
};

// Sᵀ = Kj · Qᵀ · mul for nk keys in dot form: lane i of each vector is key i / R against query row i % R.
// Per Dot::kCols columns, the R query chunks are loaded once and each of the W/R key chunks once: W
// accumulators take R·(W/R) products with no chain between them, and the W lane sums of the vector come
// out of one transpose_sum. Keys past nk (the last vector's padding) repeat key nk - 1 and are masked
// later. With one row (R = 1) the W keys of a vector are W rows of K: taken column by column they would
// be read W rows at a time, out of address order, which the hardware prefetchers do not follow; there each
// K row is read whole, in order, with the query chunks reloaded from L1. ahead.next() is called once per
// key chunk read (scores_dot_steps times).
template <class V, class Dot, int R, class TK>
void scores_dot(const TK* k, int64_t k_stride, int64_t nk, const typename Dot::Q* q, int64_t Dp, float mul,
                float* s_t, LinesAhead& ahead) {
  constexpr int kKeys = V::W / R;
  int64_t step = 0;
  for (int64_t j = 0; j < nk; j += kKeys) {
    const TK* kj[kKeys];
#pragma GCC unroll 16
    for (int kk = 0; kk < kKeys; ++kk) kj[kk] = k + std::min(j + kk, nk - 1) * k_stride;
    typename V::T acc[V::W];
#pragma GCC unroll 16
    for (auto& a : acc) a = V::zero();
    if constexpr (R == 1) {
#pragma GCC unroll 16
      for (int kk = 0; kk < kKeys; ++kk)
        for (int64_t c = 0; c < Dp; c += Dot::kCols) {
          ahead.next(step++);
          acc[kk] = Dot::add_product(acc[kk], Dot::load_k(kj[kk] + c), Dot::load_q(q + c));
        }
    } else {
      for (int64_t c = 0; c < Dp; c += Dot::kCols) {
        typename Dot::Chunk q_c[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) q_c[r] = Dot::load_q(q + r * Dp + c);
#pragma GCC unroll 16
        for (int kk = 0; kk < kKeys; ++kk) {
          ahead.next(step++);
          const typename Dot::Chunk k_c = Dot::load_k(kj[kk] + c);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) acc[kk * R + r] = Dot::add_product(acc[kk * R + r], k_c, q_c[r]);
        }
      }
    }
    const typename V::T sums = transpose_sum<V>(acc);
    V::store(s_t + j * R, mul == 1.0f ? sums : V::mul(sums, V::set1(mul)));
  }
}

template <class V, class Dot>
constexpr int64_t scores_dot_steps(int64_t R, int64_t nk, int64_t Dp) {
  const int64_t keys = V::W / R;
  return (nk + keys - 1) / keys * keys * (Dp / Dot::kCols);
}

template <class V, class Dot, class TK>
void scores_dot(int64_t R, const TK* k, int64_t k_stride, int64_t nk, const typename Dot::Q* q, int64_t Dp,
                float mul, float* s_t, LinesAhead& ahead) {
  if (R == 1) return scores_dot<V, Dot, 1>(k, k_stride, nk, q, Dp, mul, s_t, ahead);
  if (R == 2) return scores_dot<V, Dot, 2>(k, k_stride, nk, q, Dp, mul, s_t, ahead);
  if constexpr (V::W >= 16) return scores_dot<V, Dot, 4>(k, k_stride, nk, q, Dp, mul, s_t, ahead);
}

// acc (Rows x Dp) += P · Vj, P read from Pᵀ (R lanes per key), Vj rows widened in registers: Rows x 8
// vectors of acc stay in registers over the whole key tile, and the Vj rows are read in order (whole rows
// up to 8 vectors), which keeps the hardware prefetchers on the stream. ahead.next() runs pv_steps times.
template <class V, int Rows, class TV>
void pv_pass(int64_t nk, const float* p_t, int64_t R, const TV* v, int64_t v_stride, float* acc, int64_t Dp,
             LinesAhead& ahead) {
  int64_t n = 0;
  for (; n + 8 * V::W <= Dp; n += 8 * V::W)
    gemm_block<V, Rows, 8>(nk, p_t, 1, R, v + n, v_stride, acc + n, Dp, true, &ahead);
  if (n + 4 * V::W <= Dp) {
    gemm_block<V, Rows, 4>(nk, p_t, 1, R, v + n, v_stride, acc + n, Dp, true, &ahead);
    n += 4 * V::W;
  }
  for (; n < Dp; n += V::W) gemm_block<V, Rows, 1>(nk, p_t, 1, R, v + n, v_stride, acc + n, Dp, true, &ahead);
}

template <class V>
constexpr int kPassRows = std::max(1, 2 * V::kRows / 8);  // 16 accumulators on AVX-512

// With the rows as lanes (more than 4 rows on AVX-512) P · Vj runs in blocks of 4 rows x 4 vectors, so
// each Vj element is loaded (and widened) once per 4 rows instead of per 2: +9-19% with 16 rows on a Zen 4
// core. With 4 rows (the dot form) fp32 lost 2-10% that way: it keeps the 2 x 8 blocks. (bf16 with D a
// multiple of 64 takes pv_pairs instead, decode_bf16_pairs.h.)
template <class V>
constexpr bool pv_quads(int64_t rows, int64_t Dp) {
  return V::W == 16 && rows > 4 && Dp % (4 * V::W) == 0;
}

template <class V>
constexpr int64_t pv_steps(int64_t rows, int64_t nk, int64_t Dp) {
  const int64_t blocks = Dp / (8 * V::W) + (Dp % (8 * V::W) >= 4 * V::W) + Dp % (4 * V::W) / V::W;
  const int64_t quads = pv_quads<V>(rows, Dp) ? rows / 4 : 0, rest = rows - 4 * quads;
  return (quads * (Dp / (4 * V::W)) + (rest + kPassRows<V> - 1) / kPassRows<V> * blocks) * nk;
}

template <class V, class TV>
void pv(int64_t rows, int64_t nk, const float* p_t, int64_t R, const TV* v, int64_t v_stride, float* acc, int64_t Dp,
        LinesAhead& ahead) {
  constexpr int kRows = kPassRows<V>;
  int64_t r = 0;
  if (pv_quads<V>(rows, Dp)) {
    for (; r + 4 <= rows; r += 4)
      for (int64_t n = 0; n < Dp; n += 4 * V::W)
        gemm_block<V, 4, 4>(nk, p_t + r, 1, R, v + n, v_stride, acc + r * Dp + n, Dp, true, &ahead);
  }
  for (; r < rows; r += kRows) {
    if (r + kRows <= rows) pv_pass<V, kRows>(nk, p_t + r, R, v, v_stride, acc + r * Dp, Dp, ahead);
    else pv_pass<V, 1>(nk, p_t + r, R, v, v_stride, acc + r * Dp, Dp, ahead);
  }
}

// Online softmax over one key tile, per lane: m_new = max(m, max_j Sᵀ_j), Pᵀ = 2^(Sᵀ - m_new) in place,
// alpha = 2^(m - m_new), l ← l·alpha + Σ_j Pᵀ_j. The lane pattern repeats every max(R, W) floats; m and
// alpha hold the same value in every lane of a row, l its per-lane partial sums (folded at the end).
template <class V>
void online_softmax(float* s_t, int64_t n_vec, int64_t R, float* m, float* l, float* alpha) {
  using VT = typename V::T;
  const int64_t period = std::max<int64_t>(1, R / V::W);  // vectors per period of the pattern
  for (int64_t c = 0; c < period; ++c) {
    VT mx = V::set1(kNegInf), sum = V::zero();
    for (int64_t v = c; v < n_vec; v += period) mx = V::max(mx, V::load(s_t + v * V::W));
    mx = fold_lanes<V>(mx, R, [](VT a, VT b) { return V::max(a, b); });
    const VT m_old = V::load(m + c * V::W), m_new = V::max(m_old, mx);
    const VT shift = V::max(m_new, V::set1(kLowest));  // a row with nothing visible yet keeps P = 0
    const VT a = V::exp2(V::sub(m_old, shift));
    for (int64_t v = c; v < n_vec; v += period) {
      const VT p = V::exp2(V::sub(V::load(s_t + v * V::W), shift));
      V::store(s_t + v * V::W, p);
      sum = V::add(sum, p);
    }
    V::store(m + c * V::W, m_new);
    V::store(alpha + c * V::W, a);
    V::store(l + c * V::W, V::fma(V::load(l + c * V::W), a, sum));
  }
}

// The keys of [j0, j0 + nk) that row r may not see get -inf (only tiles on a mask boundary get here).
inline void mask_lanes(const DecodeLayout& L, float* s_t, int64_t j0, int64_t nk) {
  const FwdParams& p = *L.p;
  for (int64_t r = 0; r < L.rows; ++r) {
    const int64_t i = r % p.seq_q, kb = key_begin(p.mask, i, p.seq_k), ke = key_end(p.mask, i, p.seq_k);
    for (int64_t j = 0; j < nk; ++j)
      if (j0 + j < kb || j0 + j >= ke) s_t[j * L.R + r] = kNegInf;
  }
}

template <class V, class T>
void decode_task(const DecodeLayout& L, DecodeScratch<V>& w, int64_t b, int64_t hk, int64_t split, float* part) {
  const FwdParams& p = *L.p;
  const int64_t D = p.head_dim, Dp = L.t.d_pad, R = L.R, group = p.heads_q / p.heads_kv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;

  // Q · scale · log2 e in the form the scores use (or Q as it is, for bf16 pairs); padding rows and
  // columns are zero.
  const bool in_place = D == Dp;  // K and V rows read (and widened) straight from memory
  bool pairs = false, lane_pairs = false;  // bf16 pairs in the dot form / with the rows as lanes
#if defined(__AVX512BF16__)
  pairs = std::is_same_v<T, Bf16> && L.dot_form && D % 32 == 0;
  lane_pairs = std::is_same_v<T, Bf16> && !L.dot_form && R == 16 && D % 2 == 0;
#endif
  std::fill(w.q.begin(), w.q.end(), 0.0f);
  std::fill(w.q_bits.begin(), w.q_bits.end(), uint16_t{0});
  for (int64_t r = 0; r < L.rows; ++r) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + (hk * group + r / p.seq_q) * p.q_stride.h +
                 (r % p.seq_q) * p.q_stride.s;
    if (pairs) for (int64_t d = 0; d < D; ++d) std::memcpy(&w.q_bits[r * Dp + d], q + d, 2);
    else if (lane_pairs) for (int64_t d = 0; d < D; ++d) std::memcpy(&w.q_bits[d / 2 * 32 + r * 2 + d % 2], q + d, 2);
    else if (L.dot_form) pack_rows<V>(q, 0, 1, D, p.scale * kLog2e, w.q.data() + r * Dp, Dp);
    else for (int64_t d = 0; d < D; ++d) w.q[d * R + r] = Convert<V>::to_float(q[d]) * p.scale * kLog2e;
  }
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);

  // This split's share of the visible keys: whole key tiles, dealt out in contiguous runs.
  int64_t kv_begin, kv_end;
  tile_key_range(p.mask, 0, p.seq_q, p.seq_k, &kv_begin, &kv_end);
  const int64_t n_tiles = (kv_end - kv_begin + L.t.block_k - 1) / L.t.block_k;
  const int64_t per_split = (n_tiles + L.n_split - 1) / L.n_split;
  const int64_t j_first = kv_begin + split * per_split * L.t.block_k;
  const int64_t j_last = std::min(kv_end, j_first + per_split * L.t.block_k);
  const int64_t keys_per_vec = std::max<int64_t>(1, V::W / R);
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
    const int64_t nk = std::min(L.t.block_k, j_last - j0), nk_pad = round_up(nk, keys_per_vec);
    const T* kj = k + j0 * p.k_stride.s;
    const T* vj = v + j0 * p.v_stride.s;
    if (contiguous) {
      const int64_t n_pages = std::clamp<int64_t>(pages_end - (j0 + kPageAheadKeys), 0, nk);
      request_pages(kj + kPageAheadKeys * p.k_stride.s, n_pages * k_bytes);
      request_pages(vj + kPageAheadKeys * p.v_stride.s, n_pages * v_bytes);
    }
    // Sᵀ = Kj · Qᵀ  (nk_pad x R, base-2 logits), kScoreKeys keys at a time. The stream from memory is
    // the whole cost: the K rows kPrefetchKeys further on are requested at the pace of the products that
    // read the current ones (the V rows ahead likewise in P · Vj below).
    for (int64_t j = 0; j < nk; j += kScoreKeys) {
      const int64_t n = std::min(kScoreKeys, nk - j);
      const int64_t n_ahead = keys_ahead(j0 + j + kPrefetchKeys, n);
      const T* k_ahead = kj + (j + kPrefetchKeys) * p.k_stride.s;
      const auto k_rows_ahead = [&](int64_t steps) { return lines_ahead(k_ahead, n_ahead, k_bytes, D * elem, steps); };
      const T* k_j = kj + j * p.k_stride.s;
      float* s_j = w.s_t.data() + j * R;
      if (L.dot_form && in_place) {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, Bf16>) {
          if (pairs) {
            LinesAhead ahead = k_rows_ahead(scores_dot_steps<V, PairDot>(R, n, Dp));
            scores_dot<V, PairDot>(R, k_j, p.k_stride.s, n, w.q_bits.data(), Dp, p.scale * kLog2e, s_j, ahead);
            continue;
          }
        }
#endif
        using Dot = WidenedDot<V, T>;
        LinesAhead ahead = k_rows_ahead(scores_dot_steps<V, Dot>(R, n, Dp));
        scores_dot<V, Dot>(R, k_j, p.k_stride.s, n, w.q.data(), Dp, 1.0f, s_j, ahead);
      } else if (L.dot_form) {
        using Dot = WidenedDot<V, float>;
        LinesAhead ahead = k_rows_ahead(scores_dot_steps<V, Dot>(R, n, Dp));
        pack_rows<V>(k_j, p.k_stride.s, n, D, 1.0f, w.k_p.data(), Dp);
        scores_dot<V, Dot>(R, w.k_p.data(), Dp, n, w.q.data(), Dp, 1.0f, s_j, ahead);
      } else {
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, Bf16>) {
          if (lane_pairs) {
            LinesAhead ahead = k_rows_ahead(pair_scores_steps(n, D));
            pair_scores(k_j, p.k_stride.s, n, w.q_bits.data(), D, p.scale * kLog2e, s_j, ahead);
            continue;
          }
        }
#endif
        if constexpr (std::is_same_v<T, float> && V::W == 16) {
          // One vector of rows (R = 16): the whole chunk of keys in one block of 16 accumulators, each Qᵀ
          // vector loaded once for all of them (over the 8-key blocks of gemm: 1.02-1.08x in 14 of 15
          // alternating runs, fp32 with K/V from memory, 8 and 16 rows).
          if (R == V::W && n == kScoreKeys) {
            LinesAhead ahead = k_rows_ahead(D);
            gemm_block<V, kScoreKeys, 1>(D, k_j, p.k_stride.s, 1, w.q.data(), R, s_j, R, false, &ahead);
            continue;
          }
        }
        LinesAhead ahead = k_rows_ahead(gemm_steps<V>(n, R, D));
        if constexpr (std::is_same_v<T, float>) {
          gemm<V>(n, R, D, k_j, p.k_stride.s, 1, w.q.data(), R, s_j, R, false, &ahead);
        } else {
          pack_rows<V>(k_j, p.k_stride.s, n, D, 1.0f, w.k_p.data(), Dp);
          gemm<V>(n, R, D, w.k_p.data(), Dp, 1, w.q.data(), R, s_j, R, false, &ahead);
        }
      }
    }
    std::fill(w.s_t.data() + nk * R, w.s_t.data() + nk_pad * R, kNegInf);
    if (!tile_fully_visible(p.mask, 0, p.seq_q, j0, j0 + nk, p.seq_k)) mask_lanes(L, w.s_t.data(), j0, nk);

    online_softmax<V>(w.s_t.data(), nk_pad * R / V::W, R, w.m.data(), w.l.data(), w.alpha.data());
    for (int64_t r = 0; r < L.rows; ++r)
      if (w.alpha[r] != 1.0f) scale_row<V>(w.acc.data() + r * Dp, Dp, w.alpha[r]);

    // acc += P · Vj (bf16 with D a multiple of 64: on pairs of keys, with P rounded to bf16)
    const int64_t n_ahead = keys_ahead(j0 + kPrefetchKeys, nk);
    const auto v_rows_ahead = [&](int64_t steps) {
      return lines_ahead(vj + kPrefetchKeys * p.v_stride.s, n_ahead, v_bytes, D * elem, steps);
    };
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, Bf16>) {
      if (pv_on_pairs(D)) {
        LinesAhead ahead = v_rows_ahead(pv_pairs_steps(L.rows, nk, D));
        pv_pairs(L.rows, R, nk, w.s_t.data(), vj, p.v_stride.s, D, w.p_pairs.data(), w.acc.data(), ahead);
        continue;
      }
    }
#endif
    LinesAhead ahead = v_rows_ahead(pv_steps<V>(L.rows, nk, Dp));
    if (in_place) pv<V>(L.rows, nk, w.s_t.data(), R, vj, p.v_stride.s, w.acc.data(), Dp, ahead);
    else {
      pack_rows<V>(vj, p.v_stride.s, nk, D, 1.0f, w.v_p.data(), Dp);
      pv<V>(L.rows, nk, w.s_t.data(), R, w.v_p.data(), Dp, w.acc.data(), Dp, ahead);
    }
  }
  // l: the per-lane partial sums of each row added up.
  if (R < V::W)
    V::store(w.l.data(), fold_lanes<V>(V::load(w.l.data()), R, [](auto a, auto b) { return V::add(a, b); }));
  std::copy_n(w.acc.data(), L.rows * Dp, part);
  std::copy_n(w.m.data(), L.rows, part + L.rows * Dp);
  std::copy_n(w.l.data(), L.rows, part + L.rows * Dp + L.rows);
}

// Merge the splits of one (batch, KV head): m = max_s m_s, l = Σ_s l_s·2^(m_s - m),
// O = Σ_s acc_s·2^(m_s - m) / l, lse = (m + log2 l)·ln 2.
template <class V, class T>
void decode_merge(const DecodeLayout& L, int64_t b, int64_t hk, std::vector<float>& acc) {
  const FwdParams& p = *L.p;
  const int64_t Dp = L.t.d_pad, group = p.heads_q / p.heads_kv;
  const float* first = L.part + (b * p.heads_kv + hk) * L.n_split * L.part_floats();
  for (int64_t r = 0; r < L.rows; ++r) {
    float m = kNegInf;
    for (int64_t s = 0; s < L.n_split; ++s) m = std::max(m, first[s * L.part_floats() + L.rows * Dp + r]);
    float l = 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (m != kNegInf) {
      for (int64_t s = 0; s < L.n_split; ++s) {
        const float* part = first + s * L.part_floats();
        const float weight = std::exp2(part[L.rows * Dp + r] - m);
        l += part[L.rows * Dp + L.rows + r] * weight;
        for (int64_t d = 0; d < Dp; ++d) acc[d] += part[r * Dp + d] * weight;
      }
    }
    const int64_t h = hk * group + r / p.seq_q, i = r % p.seq_q;
    T* out = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + i * p.out_stride.s;
    const bool empty = l == 0.0f;
    unpack_rows<V>(acc.data(), Dp, 1, p.head_dim, empty ? 0.0f : 1.0f / l, out, 0);
    p.lse[(b * p.heads_q + h) * p.seq_q + i] = empty ? kNegInf : (m + std::log2(l)) * kLn2;
  }
}

template <class V, class T>
void decode_typed(const FwdParams& p) {
  DecodeLayout L{&p, choose_tiling(p.seq_q, p.head_dim), 0, 0, false, 0, nullptr};
  L.rows = p.seq_q * (p.heads_q / p.heads_kv);
  // With at most W/4 rows most lanes of a row-per-lane Sᵀ would be padding: take dot products instead.
  L.dot_form = 4 * L.rows <= V::W;
  L.R = L.dot_form ? (L.rows <= 1 ? 1 : L.rows <= 2 ? 2 : 4) : round_up(L.rows, V::W);
  L.n_split = decode_splits(p, L.t.block_k);
  std::vector<float> part(p.batch * p.heads_kv * L.n_split * L.part_floats());
  L.part = part.data();
  run_tasks<const DecodeLayout>(p, p.batch * p.heads_kv * L.n_split, &L, [](const DecodeLayout& L, TaskQueue& queue) {
    DecodeScratch<V> w(L);
    for (int64_t task; queue.next(&task);) {
      const int64_t bh = task / L.n_split;
      float* part = L.part + task * L.part_floats();
      decode_task<V, T>(L, w, bh / L.p->heads_kv, bh % L.p->heads_kv, task % L.n_split, part);
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
