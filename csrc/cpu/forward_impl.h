// FlashAttention-2 forward on the CPU, over a vector unit V and a storage type T.
// One task = one (batch, query head, query tile): it walks the visible key tiles with an online
// softmax, so no task ever holds more than one Bq x Bk score tile, and no two tasks share output.
#pragma once

#include "cpu/decode_impl.h"
#include "cpu/tile_ops.h"
#include "cpu/tiling.h"

namespace attnext::cpu {
namespace {

template <class V>
struct FwdScratch {
  std::vector<float> q_s, acc, k_t, v_p, s, m, l;
  FwdScratch(const Tiling& t, int64_t d)
      : q_s(t.block_q * t.d_pad), acc(t.block_q * t.d_pad), k_t(d * t.block_k), v_p(t.block_k * t.d_pad),
        s(t.block_q * t.block_k), m(t.block_q), l(t.block_q) {}
};

// O_i = acc_i / l_i and lse_i = (m_i + log2 l_i) · ln 2 for the rows [i0, i0 + rows) of head (b, h); a row
// with no visible key gets O = 0, lse = -inf.
template <class V, class T>
void write_output(const FwdParams& p, const float* acc, int64_t ld, const float* m, const float* l, int64_t b,
                  int64_t h, int64_t i0, int64_t rows) {
  T* out = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + i0 * p.out_stride.s;
  float* lse = p.lse + (b * p.heads_q + h) * p.seq_q + i0;
  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = l[r] == 0.0f;
    unpack_rows<V>(acc + r * ld, ld, 1, p.head_dim, empty ? 0.0f : 1.0f / l[r], out + r * p.out_stride.s, 0);
    lse[r] = empty ? kNegInf : (m[r] + std::log2(l[r])) * kLn2;
  }
}

// Runs tile(p, t, scratch, b, h, i0, i1) for every (batch, query head, query tile) on the thread pool, with
// one scratch W per worker range. Query tiles are dealt heavy-light (zigzag) so causal work stays balanced.
template <class W, void (*Tile)(const FwdParams&, const Tiling&, W&, int64_t, int64_t, int64_t, int64_t)>
void for_each_query_tile(const FwdParams& p, const Tiling& t) {
  const int64_t n_tiles = (p.seq_q + t.block_q - 1) / t.block_q;
  const int64_t n_tasks = p.batch * p.heads_q * n_tiles;
  struct Ctx { const FwdParams* p; const Tiling* t; int64_t n_tiles; } ctx{&p, &t, n_tiles};
  p.parallel_for(n_tasks, &ctx, [](void* c, int64_t begin, int64_t end) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    W w(*x.t, x.p->head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / x.n_tiles, tile = zigzag(task % x.n_tiles, x.n_tiles);
      const int64_t i0 = tile * x.t->block_q, i1 = std::min(x.p->seq_q, i0 + x.t->block_q);
      Tile(*x.p, *x.t, w, bh / x.p->heads_q, bh % x.p->heads_q, i0, i1);
    }
  });
}

// One row's online-softmax step over a masked base-2 score row s[0, n): m_new = max(m_i, rowmax S),
// P = 2^(S - m_new) (written by exp_row(m_new), which returns rowsum P), l_i ← l_i · 2^(m_i - m_new) + rowsum P,
// acc_i ← acc_i · 2^(m_i - m_new). Returns false, touching nothing, while the row has seen no visible key.
template <class V, class ExpRow>
inline bool softmax_row(const float* s, int64_t n, float& m, float& l, float* acc, int64_t d_pad, ExpRow exp_row) {
  const float m_new = std::max(m, row_max<V>(s, n));
  if (m_new == kNegInf) return false;
  const float alpha = std::exp2(m - m_new);
  l = l * alpha + exp_row(m_new);
  m = m_new;
  if (alpha != 1.0f) scale_row<V>(acc, d_pad, alpha);
  return true;
}

template <class V, class T>
void forward_tile(const FwdParams& p, const Tiling& t, FwdScratch<V>& w, int64_t b, int64_t h, int64_t i0,
                  int64_t i1) {
  const int64_t D = p.head_dim, Dp = t.d_pad, rows = i1 - i0;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;

  // Qi ← Q[i0:i1] · scale · log2(e): scores come out in base 2, so the softmax uses exp2.
  pack_rows<V>(q + i0 * p.q_stride.s, p.q_stride.s, rows, D, p.scale * kLog2e, w.q_s.data(), Dp);
  std::fill(w.acc.begin(), w.acc.begin() + rows * Dp, 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);

  int64_t kv_begin, kv_end;
  tile_key_range(p.mask, i0, i1, p.seq_k, &kv_begin, &kv_end);
  for (int64_t j0 = kv_begin; j0 < kv_end; j0 += t.block_k) {
    const int64_t nk = std::min(t.block_k, kv_end - j0), nk_pad = round_up(nk, V::W);
    pack_transposed<V>(k + j0 * p.k_stride.s, p.k_stride.s, nk, D, w.k_t.data(), nk_pad);
    pack_rows<V>(v + j0 * p.v_stride.s, p.v_stride.s, nk, D, 1.0f, w.v_p.data(), Dp);

    // Only rows [r0, r1) of the tile see a key of this key tile; the others skip it untouched.
    const int64_t r0 = std::max<int64_t>(0, row_begin(p.mask, j0, p.seq_q) - i0);
    const int64_t r1 = std::min<int64_t>(rows, row_end(p.mask, j0 + nk - 1, p.seq_q) - i0);
    if (r1 <= r0) continue;
    float* q_s = w.q_s.data() + r0 * Dp;
    float* acc = w.acc.data() + r0 * Dp;

    // S = Qi · Kjᵀ  ((r1 - r0) x nk_pad, base-2 logits)
    gemm<V>(r1 - r0, nk_pad, D, q_s, Dp, 1, w.k_t.data(), nk_pad, w.s.data(), nk_pad, false);

    // Online softmax per row (softmax_row), P = 2^(S - m_new) in place; rows that see no key yet get P = 0.
    const bool full = tile_fully_visible(p.mask, i0 + r0, i0 + r1, j0, j0 + nk, p.seq_k);
    for (int64_t r = r0; r < r1; ++r) {
      float* s = w.s.data() + (r - r0) * nk_pad;
      const int64_t i = i0 + r;
      mask_row(s, j0, nk, nk_pad, key_begin(p.mask, i, p.seq_k), key_end(p.mask, i, p.seq_k), full);
      const bool visible = softmax_row<V>(s, nk_pad, w.m[r], w.l[r], w.acc.data() + r * Dp, Dp,
                                          [s, nk_pad](float m_new) { return exp2_row<V>(s, nk_pad, m_new); });
      if (!visible) std::fill(s, s + nk_pad, 0.0f);
    }

    // acc += P · Vj
    gemm<V>(r1 - r0, Dp, nk, w.s.data(), nk_pad, 1, w.v_p.data(), Dp, acc, Dp, true);
  }

  write_output<V, T>(p, w.acc.data(), Dp, w.m.data(), w.l.data(), b, h, i0, rows);
}

template <class V, class T>
void forward_typed(const FwdParams& p) {
  if (use_decode(p)) return decode_typed<V, T>(p);
  for_each_query_tile<FwdScratch<V>, forward_tile<V, T>>(p, choose_tiling(p.seq_q, p.head_dim));
}

template <class V>
Status forward_impl(const FwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: forward_typed<V, float>(p); return Status::kOk;
    case DType::kFloat16: forward_typed<V, Half>(p); return Status::kOk;
    case DType::kBFloat16: forward_typed<V, Bf16>(p); return Status::kOk;
  }
  return Status::kUnsupportedDType;
}

}  // namespace
}  // namespace attnext::cpu
