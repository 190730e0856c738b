// FlashAttention-2 forward on the CPU, over a vector unit V and a storage type T.
// One task = one (batch, query head, query tile): it walks the visible key tiles with an online
// softmax, so no task ever holds more than one Bq x Bk score tile, and no two tasks share output.
#pragma once

#include "cpu/decode_impl.h"
#include "cpu/tasks.h"
#include "cpu/tile_ops.h"
#include "cpu/tiling.h"

namespace attnext::cpu {
namespace {

// Per worker: for each of a task's t.group query tiles, Qiᵀ (head_dim x rows_pad, rows as vector lanes),
// acc (block_q x d_pad) and m, l, alpha per row; shared by them, Sᵀ (block_k x rows_pad) and the 16-bit K
// and V rows widened to fp32.
template <class V>
struct FwdScratch {
  int64_t rows_pad;
  LineVector<float> q_t, s_t, s_max, k_p, v_p, acc, m, l, alpha;  // s_max: the lane maxima of Sᵀ
  FwdScratch(const Tiling& t, int64_t d)
      : rows_pad(round_up(t.block_q, V::W)), q_t(t.group * d * rows_pad), s_t(t.block_k * rows_pad), s_max(rows_pad),
        k_p(t.block_k * t.d_pad), v_p(t.block_k * t.d_pad), acc(t.group * t.block_q * t.d_pad),
        m(t.group * rows_pad), l(t.group * rows_pad), alpha(t.group * rows_pad) {}
};

// One query tile of a task: rows [i0, i0 + rows), the keys [kv_begin, kv_end) they may see, and its part
// of the worker's scratch.
struct QueryTile {
  int64_t i0, rows, kv_begin, kv_end;
  float *q_t, *acc, *m, *l, *alpha;
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

// Runs tile(p, t, scratch, b, h, i0, i1) for every (batch, query head, run of t.group query tiles) on the
// thread pool, with one scratch W per worker. Runs are dealt heavy-light (zigzag) so causal work stays
// balanced to the end.
template <class W, void (*Tile)(const FwdParams&, const Tiling&, W&, int64_t, int64_t, int64_t, int64_t)>
void for_each_query_tile(const FwdParams& p, const Tiling& t) {
  const int64_t span = t.block_q * t.group, n_runs = (p.seq_q + span - 1) / span;
  const int64_t n_tasks = p.batch * p.heads_q * n_runs;
  struct Ctx { const FwdParams* p; const Tiling* t; int64_t span, n_runs; } ctx{&p, &t, span, n_runs};
  run_tasks<const Ctx>(p, n_tasks, &ctx, [](const Ctx& x, TaskQueue& queue) {
    W w(*x.t, x.p->head_dim);
    for (int64_t task; queue.next(&task);) {
      const int64_t bh = task / x.n_runs, run = zigzag(task % x.n_runs, x.n_runs);
      const int64_t i0 = run * x.span, i1 = std::min(x.p->seq_q, i0 + x.span);
      Tile(*x.p, *x.t, w, bh / x.p->heads_q, bh % x.p->heads_q, i0, i1);
    }
  });
}

// One row's online-softmax step over a masked base-2 score row s[0, n): m_new = max(m_i, rowmax S),
// P = 2^(S - m_new) (written by exp_row(m_new), which returns rowsum P), l_i ← l_i · 2^(m_i - m_new) + rowsum P,
// acc_i ← acc_i · 2^(m_i - m_new). Returns false while the row has seen no finite score (m_new = -inf).
// NaN scores: the maximum may drop them, but 2^NaN in exp_row carries them into l_i. Where the maximum is
// -inf, exp_row does not run: a NaN score there sets l_i = NaN itself. Either way O_i and lse_i come out NaN.
template <class V, class ExpRow>
inline bool softmax_row(const float* s, int64_t n, float& m, float& l, float* acc, int64_t d_pad, ExpRow exp_row) {
  const float m_new = std::max(m, row_max<V>(s, n));
  if (m_new == kNegInf) {
    if (std::any_of(s, s + n, [](float x) { return std::isnan(x); })) l = std::numeric_limits<float>::quiet_NaN();
    return false;
  }
  const float alpha = m == m_new ? 1.0f : std::exp2(m - m_new);  // most tiles leave the maximum as it was
  l = l * alpha + exp_row(m_new);
  m = m_new;
  if (alpha != 1.0f) scale_row<V>(acc, d_pad, alpha);
  return true;
}

// Rows [0, n) of a K or V tile (n x cols, row stride `stride`) as fp32 with row stride *ld: where they lie
// when they are fp32 (and, with whole_vectors, when cols needs no padding to ld_buf), else widened into buf.
template <class V, class T>
const float* fp32_rows(const T* src, int64_t stride, int64_t n, int64_t cols, bool whole_vectors, float* buf,
                       int64_t ld_buf, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (!whole_vectors || cols == ld_buf) {
      *ld = stride;
      return src;
    }
  }
  pack_rows<V>(src, stride, n, cols, 1.0f, buf, ld_buf);
  *ld = ld_buf;
  return buf;
}

// The scores are computed transposed, Sᵀ = Kj · Qiᵀ, with the query rows as vector lanes: the online
// softmax then runs down the columns (max, sum and the rescale factor of 16 rows per vector, no
// horizontal reductions), K rows are broadcast as they lie (no transpose), and P · Vj reads P from Pᵀ.
// One step: query tile `qt` against the keys [j0, j0 + nk), whose fp32 K and V rows are kb and vb; the
// products step k_ahead and v_ahead (LinesAhead, or NoAhead).
template <class V, class Ahead>
void attend_keys(const FwdParams& p, const Tiling& t, FwdScratch<V>& w, const QueryTile& qt, int64_t j0, int64_t nk,
                 const float* kb, int64_t k_ld, const float* vb, int64_t v_ld, Ahead* k_ahead, Ahead* v_ahead) {
  const int64_t D = p.head_dim, Dp = t.d_pad, ld_q = w.rows_pad, i0 = qt.i0, rows = qt.rows;
  // Only rows [r0, r1) of the tile see a key of this key tile; the lanes [c0, c1) around them are computed.
  const int64_t r0 = std::max<int64_t>(0, row_begin(p.mask, j0, p.seq_q) - i0);
  const int64_t r1 = std::min<int64_t>(rows, row_end(p.mask, j0 + nk - 1, p.seq_q) - i0);
  if (r1 <= r0) return;
  const int64_t c0 = r0 / V::W * V::W, c1 = round_up(r1, V::W), n_lanes = c1 - c0;

  // Sᵀ = Kj · Qiᵀ  (nk x n_lanes, base-2 logits), and the maximum of each lane (row) over the tile's keys
  float* s_t = w.s_t.data();
  const bool visible = tile_fully_visible(p.mask, i0 + c0, i0 + std::min(c1, rows), j0, j0 + nk, p.seq_k);
  float* s_max = visible ? w.s_max.data() : nullptr;
  if (visible) std::fill(s_max, s_max + n_lanes, kNegInf);
  gemm<V>(nk, n_lanes, D, kb, k_ld, 1, qt.q_t + c0, ld_q, s_t, n_lanes, false, k_ahead, s_max);

  // Keys a lane may not see get -inf (only tiles on a mask boundary; their maxima come after).
  if (!visible) {
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t lo = std::clamp<int64_t>(row_begin(p.mask, j0 + j, p.seq_q) - i0, c0, c1);
      const int64_t hi = std::clamp<int64_t>(row_end(p.mask, j0 + j, p.seq_q) - i0, lo, c1);
      std::fill(s_t + j * n_lanes, s_t + j * n_lanes + (lo - c0), kNegInf);
      std::fill(s_t + j * n_lanes + (hi - c0), s_t + (j + 1) * n_lanes, kNegInf);
    }
  }

  // Online softmax down each lane: m, l, alpha per row; Pᵀ = 2^(Sᵀ - m_new) in place.
  online_softmax<V>(s_t, nk * n_lanes / V::W, n_lanes, qt.m + c0, qt.l + c0, qt.alpha + c0, s_max);
  for (int64_t r = r0; r < r1; ++r)
    if (qt.alpha[r] != 1.0f) scale_row<V>(qt.acc + r * Dp, Dp, qt.alpha[r]);

  // acc[r0:r1] += P · Vj, P(r, j) = Pᵀ[j][r - c0]
  gemm<V>(r1 - r0, Dp, nk, s_t + (r0 - c0), 1, n_lanes, vb, v_ld, qt.acc + r0 * Dp, Dp, true, v_ahead);
}

// One task: the query rows [i0, i1) of head (b, h), up to t.group query tiles that share each key tile,
// so that it is read from memory once for all of them and then from the L2.
template <class V, class T>
void forward_tile(const FwdParams& p, const Tiling& t, FwdScratch<V>& w, int64_t b, int64_t h, int64_t i0,
                  int64_t i1) {
  const int64_t D = p.head_dim, Dp = t.d_pad, ld_q = w.rows_pad, elem = sizeof(T);
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;

  // Per tile, Qiᵀ ← (Q[i0:i1] · scale · log2 e)ᵀ: scores come out in base 2, so the softmax uses exp2.
  QueryTile tiles[kMaxQueryGroup];
  const int64_t n_tiles = (i1 - i0 + t.block_q - 1) / t.block_q;
  int64_t kv_lo = p.seq_k, kv_hi = 0;
  for (int64_t g = 0; g < n_tiles; ++g) {
    QueryTile& qt = tiles[g];
    qt.i0 = i0 + g * t.block_q;
    qt.rows = std::min(t.block_q, i1 - qt.i0);
    qt.q_t = w.q_t.data() + g * D * ld_q;
    qt.acc = w.acc.data() + g * t.block_q * Dp;
    qt.m = w.m.data() + g * ld_q;
    qt.l = w.l.data() + g * ld_q;
    qt.alpha = w.alpha.data() + g * ld_q;
    pack_transposed<V>(q + qt.i0 * p.q_stride.s, p.q_stride.s, qt.rows, D, p.scale * kLog2e, qt.q_t, ld_q);
    std::fill(qt.acc, qt.acc + qt.rows * Dp, 0.0f);
    std::fill(qt.m, qt.m + ld_q, kNegInf);
    std::fill(qt.l, qt.l + ld_q, 0.0f);
    tile_key_range(p.mask, qt.i0, qt.i0 + qt.rows, p.seq_k, &qt.kv_begin, &qt.kv_end);
    if (qt.kv_end > qt.kv_begin) {
      kv_lo = std::min(kv_lo, qt.kv_begin);
      kv_hi = std::max(kv_hi, qt.kv_end);
    }
  }

  for (int64_t j0 = kv_lo; j0 < kv_hi; j0 += t.block_k) {
    const int64_t nk = std::min(t.block_k, kv_hi - j0);
    // fp32 K rows are broadcast where they lie, V rows read where they lie when they need no padding;
    // 16-bit ones are widened first, once for all the tiles.
    int64_t k_ld, v_ld;
    const float* kb = fp32_rows<V>(k + j0 * p.k_stride.s, p.k_stride.s, nk, D, false, w.k_p.data(), Dp, &k_ld);
    const float* vb = fp32_rows<V>(v + j0 * p.v_stride.s, p.v_stride.s, nk, D, true, w.v_p.data(), Dp, &v_ld);
    const auto attend_tiles = [&](auto* k_ahead, auto* v_ahead) {
      for (int64_t g = 0; g < n_tiles; ++g) {
        const int64_t a = std::max(j0, tiles[g].kv_begin), e = std::min(j0 + nk, tiles[g].kv_end);
        if (a < e)
          attend_keys<V>(p, t, w, tiles[g], a, e - a, kb + (a - j0) * k_ld, k_ld, vb + (a - j0) * v_ld, v_ld, k_ahead,
                         v_ahead);
      }
    };
    if (!t.prefetch_next) {
      NoAhead none;
      attend_tiles(&none, &none);
      continue;
    }
    // The next key tile's K and V rows, requested at the pace of the products on this one (see
    // forward_prefetches_next).
    const int64_t j_next = j0 + t.block_k, n_next = std::clamp<int64_t>(kv_hi - j_next, 0, t.block_k);
    LinesAhead k_ahead = lines_ahead(k + j_next * p.k_stride.s, n_next, p.k_stride.s * elem, D * elem,
                                     n_tiles * gemm_steps<V>(nk, ld_q, D));
    LinesAhead v_ahead = lines_ahead(v + j_next * p.v_stride.s, n_next, p.v_stride.s * elem, D * elem,
                                     n_tiles * gemm_steps<V>(t.block_q, Dp, nk));
    attend_tiles(&k_ahead, &v_ahead);
  }

  for (int64_t g = 0; g < n_tiles; ++g)
    write_output<V, T>(p, tiles[g].acc, Dp, tiles[g].m, tiles[g].l, b, h, tiles[g].i0, tiles[g].rows);
}

template <class V, class T>
void forward_typed(const FwdParams& p) {
  if (use_decode(p)) {
    // Rows as lanes that would fill at most half of V's vectors (5-8 rows on AVX-512) take the narrower
    // unit, whose lanes cost the same per cycle on a Zen 4 core (docs/architecture.md, decode).
    if constexpr (!std::is_void_v<typename V::Narrow>) {
      const int64_t rows = decode_rows(p);
      if (rows > V::W / 4 && rows <= V::Narrow::W) return decode_typed<typename V::Narrow, T>(p);
    }
    return decode_typed<V, T>(p);
  }
  for_each_query_tile<FwdScratch<V>, forward_tile<V, T>>(p, choose_forward_tiling(p, std::is_same_v<T, float>));
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
