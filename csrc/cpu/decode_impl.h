// Forward for few query rows per KV head (decoding: Sq · Hq/Hkv <= kDecodeMaxRows), over a vector unit V
// and a storage type T. The scores are computed transposed, Sᵀ = Kj · Qᵀ, with the query rows of all
// heads of a GQA group as the vector lanes: each K and V row is read from memory once for the whole
// group, and K needs no transpose. The key range of each (batch, KV head) is split over several tasks
// when there are fewer heads than threads; the partial results are merged through their LSE.
#pragma once

#include "cpu/tile_ops.h"
#include "cpu/tiling.h"

namespace attnext::cpu {
namespace {

struct DecodeLayout {
  const FwdParams* p;
  Tiling t;
  int64_t rows, rows_pad, n_split;  // rows = Sq · group, lane r = (head g = r / Sq, query i = r % Sq)
  float* part;                      // per task: acc (rows, d_pad), then m (rows), then l (rows)
  int64_t part_floats() const { return rows * t.d_pad + 2 * rows; }
};

template <class V>
struct DecodeScratch {
  std::vector<float> q_t, q_r, k_p, v_p, s_t, m, l, m_use, alpha, acc;
  DecodeScratch(const DecodeLayout& L)
      : q_t(L.p->head_dim * L.rows_pad), q_r(L.rows * L.t.d_pad), k_p(L.t.block_k * L.t.d_pad),
        v_p(L.t.block_k * L.t.d_pad),
        s_t(L.t.block_k * L.rows_pad), m(L.rows_pad), l(L.rows_pad), m_use(L.rows_pad), alpha(L.rows_pad),
        acc(L.rows * L.t.d_pad) {}
};

// The keys of [j0, j0 + nk) that lane r may not see get -inf (only tiles on a mask boundary get here).
inline void mask_lanes(const DecodeLayout& L, float* s_t, int64_t j0, int64_t nk) {
  const FwdParams& p = *L.p;
  for (int64_t r = 0; r < L.rows; ++r) {
    const int64_t i = r % p.seq_q, kb = key_begin(p.mask, i, p.seq_k), ke = key_end(p.mask, i, p.seq_k);
    for (int64_t j = 0; j < nk; ++j)
      if (j0 + j < kb || j0 + j >= ke) s_t[j * L.rows_pad + r] = kNegInf;
  }
}

template <class V, class T>
void decode_task(const DecodeLayout& L, DecodeScratch<V>& w, int64_t b, int64_t hk, int64_t split, float* part) {
  const FwdParams& p = *L.p;
  const int64_t D = p.head_dim, Dp = L.t.d_pad, R = L.rows_pad, group = p.heads_q / p.heads_kv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;

  // With few rows (at most 4, a quarter of the lanes), most lanes of Kj · Qᵀ would be padding: take
  // dot products along the head dim instead, one K row against all rows at once.
  const bool dot_form = 4 * L.rows <= V::W;

  // Q · scale · log2 e: row-major for the dot products, else Qᵀ with the group's query rows as lanes
  // (padding lanes are zero and never read back).
  if (!dot_form) std::fill(w.q_t.begin(), w.q_t.end(), 0.0f);
  for (int64_t r = 0; r < L.rows; ++r) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + (hk * group + r / p.seq_q) * p.q_stride.h +
                 (r % p.seq_q) * p.q_stride.s;
    if (dot_form) pack_rows<V>(q, 0, 1, D, p.scale * kLog2e, w.q_r.data() + r * Dp, Dp);
    else for (int64_t d = 0; d < D; ++d) w.q_t[d * R + r] = Convert<V>::to_float(q[d]) * p.scale * kLog2e;
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
  const bool direct = std::is_same_v<T, float> && D == Dp;  // fp32 V rows read in place
  for (int64_t j0 = j_first; j0 < j_last; j0 += L.t.block_k) {
    const int64_t nk = std::min(L.t.block_k, j_last - j0);
    const T* kj = k + j0 * p.k_stride.s;
    const T* vj = v + j0 * p.v_stride.s;
    // The stream from memory is the whole cost: request the next key tile while this one is computed.
    const int64_t nk_next = std::min(L.t.block_k, j_last - j0 - nk);
    prefetch_rows(kj + nk * p.k_stride.s, p.k_stride.s, nk_next, D);
    prefetch_rows(vj + nk * p.v_stride.s, p.v_stride.s, nk_next, D);

    // Sᵀ = Kj · Qᵀ  (nk x R, base-2 logits)
    if (dot_form && D == Dp) {  // K rows widened in registers, straight from memory
      for (int64_t j = 0; j < nk; ++j) dot_rows<V>(kj + j * p.k_stride.s, w.q_r.data(), Dp, L.rows, Dp, &w.s_t[j * R]);
    } else {
      pack_rows<V>(kj, p.k_stride.s, nk, D, 1.0f, w.k_p.data(), Dp);
      if (dot_form) {
        for (int64_t j = 0; j < nk; ++j) dot_rows<V>(w.k_p.data() + j * Dp, w.q_r.data(), Dp, L.rows, Dp, &w.s_t[j * R]);
      } else {
        gemm<V>(nk, R, D, w.k_p.data(), Dp, 1, w.q_t.data(), R, w.s_t.data(), R, false);
      }
    }
    if (!tile_fully_visible(p.mask, 0, p.seq_q, j0, j0 + nk, p.seq_k)) mask_lanes(L, w.s_t.data(), j0, nk);

    // Online softmax per lane: m_new = max(m, max_j Sᵀ_j), Pᵀ = 2^(Sᵀ - m_new), l ← l·2^(m - m_new) + Σ_j Pᵀ_j.
    for (int64_t c = 0; c < R; c += V::W) {
      typename V::T mx = V::set1(kNegInf);
      for (int64_t j = 0; j < nk; ++j) mx = V::max(mx, V::load(w.s_t.data() + j * R + c));
      V::store(w.m_use.data() + c, mx);
    }
    for (int64_t r = 0; r < R; ++r) {
      const float m_new = std::max(w.m[r], w.m_use[r]);
      w.m_use[r] = m_new == kNegInf ? 0.0f : m_new;  // a lane with nothing visible yet keeps P = 0
      w.alpha[r] = std::exp2(w.m[r] - w.m_use[r]);
      w.m[r] = m_new;
    }
    for (int64_t c = 0; c < R; c += V::W) {
      const typename V::T shift = V::load(w.m_use.data() + c);
      typename V::T sum = V::zero();
      for (int64_t j = 0; j < nk; ++j) {
        const typename V::T pj = V::exp2(V::sub(V::load(w.s_t.data() + j * R + c), shift));
        V::store(w.s_t.data() + j * R + c, pj);
        sum = V::add(sum, pj);
      }
      V::store(w.l.data() + c, V::fma(V::load(w.l.data() + c), V::load(w.alpha.data() + c), sum));
    }
    for (int64_t r = 0; r < L.rows; ++r)
      if (w.alpha[r] != 1.0f) scale_row<V>(w.acc.data() + r * Dp, Dp, w.alpha[r]);

    // acc += P · Vj  (P read transposed from Pᵀ)
    const float* bv = direct ? reinterpret_cast<const float*>(vj) : w.v_p.data();
    const int64_t ldb = direct ? p.v_stride.s : Dp;
    if (!direct) pack_rows<V>(vj, p.v_stride.s, nk, D, 1.0f, w.v_p.data(), Dp);
    gemm<V>(L.rows, Dp, nk, w.s_t.data(), 1, R, bv, ldb, w.acc.data(), Dp, true);
  }
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
  DecodeLayout L{&p, choose_tiling(p.seq_q, p.head_dim), 0, 0, 0, nullptr};
  L.rows = p.seq_q * (p.heads_q / p.heads_kv);
  L.rows_pad = round_up(L.rows, V::W);
  L.n_split = decode_splits(p, L.t.block_k);
  std::vector<float> part(p.batch * p.heads_kv * L.n_split * L.part_floats());
  L.part = part.data();
  p.parallel_for(p.batch * p.heads_kv * L.n_split, &L, [](void* c, int64_t begin, int64_t end) {
    const DecodeLayout& L = *static_cast<const DecodeLayout*>(c);
    DecodeScratch<V> w(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / L.n_split;
      decode_task<V, T>(L, w, bh / L.p->heads_kv, bh % L.p->heads_kv, task % L.n_split, L.part + task * L.part_floats());
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
