// FlashAttention-2 backward on the CPU, over a vector unit V and a storage type T.
// 1. Delta_i = rowsum(dO_i ∘ O_i).
// 2. One task per (batch, kv head, split) owns key tiles Kj, Vj: it recomputes P from the saved lse
//    for every query tile (and every query head of the GQA group) that sees them, accumulates dKj, dVj
//    in fp32 locally and adds its share of dQ into the split's private fp32 accumulator (or, for fp32
//    with one split, into dq itself: backward_dq_in_place).
// 3. dQ = Σ over splits, converted to the output dtype (nothing left to do in place).
// Every sum runs in a fixed order, so the result is bitwise repeatable for a given thread count.
#pragma once

#include "cpu/tasks.h"
#include "cpu/tile_ops.h"
#include "cpu/tiling.h"

namespace attnext::cpu {
namespace {

template <class V>
struct BwdScratch {
  LineVector<float> k_t, k_p, v_t, dk, dv, q_s, do_p, s, dp;
  BwdScratch(const Tiling& t, int64_t d)
      : k_t(d * t.block_k), k_p(t.block_k * t.d_pad), v_t(d * t.block_k), dk(t.block_k * t.d_pad),
        dv(t.block_k * t.d_pad), q_s(t.block_q * t.d_pad), do_p(t.block_q * t.d_pad), s(t.block_q * t.block_k),
        dp(t.block_q * t.block_k) {}
};

struct BwdLayout {
  const BwdParams* p;
  Tiling t;
  int64_t n_split;
  float* delta;   // (B, Hq, Sq)
  float* dq_acc;  // the workspace's (n_split, B, Hq, Sq, d_pad), or dq itself when in_place
  bool in_place;
  // Rows of the dQ accumulator lie dq_ld floats apart; dq_head gives row 0 of (split, b, h).
  int64_t dq_ld() const { return in_place ? p->dq_stride.s : t.d_pad; }
  float* dq_head(int64_t split, int64_t b, int64_t h) const {
    if (in_place) return dq_acc + b * p->dq_stride.b + h * p->dq_stride.h;
    return dq_acc + ((split * p->fwd.batch + b) * p->fwd.heads_q + h) * p->fwd.seq_q * t.d_pad;
  }
};

// The fp32 FMA kernels of the backward over V, for storage type T: the operations on one key tile that
// backward_kv_tile strings together (another unit may bring its own, backward_bf16_pairs.h).
// P = 2^(S - lse_i · log2 e) in place over the base-2 score rows of the tile [i0, i0 + rows) x [j0, j0 + nk)
// (row stride nk_pad), with the forward's lse from lse_rows: masked keys, and rows without a visible key
// (lse = -inf), give 0. exp_row(s, shift) writes 2^(s - shift) over one row.
template <class ExpRow>
void probabilities_from_lse(const FwdParams& p, float* s_rows, int64_t nk_pad, int64_t i0, int64_t rows, int64_t j0,
                            int64_t nk, const float* lse_rows, ExpRow exp_row) {
  const bool full = tile_fully_visible(p.mask, i0, i0 + rows, j0, j0 + nk, p.seq_k);
  for (int64_t r = 0; r < rows; ++r) {
    float* s = s_rows + r * nk_pad;
    const int64_t i = i0 + r;
    mask_row(s, j0, nk, nk_pad, key_begin(p.mask, i, p.seq_k), key_end(p.mask, i, p.seq_k), full);
    if (lse_rows[r] == kNegInf) std::fill(s, s + nk_pad, 0.0f);
    else exp_row(s, lse_rows[r] * kLog2e);
  }
}

template <class V_, class T_>
struct FmaBackward {
  using V = V_;
  using T = T_;
  using Scratch = BwdScratch<V>;

  // Each key tile streams all of Q, dO and the dQ accumulators of its head through the core once: past
  // the L3's share fewer, longer key tiles win (256 keys against 64: +5-13% on a Zen 4 core at S = 4096,
  // D = 32-256, neutral at S <= 1024). Under a mask, diagonal tiles waste up to a block_k-wide triangle:
  // 64 keys stay best up to S = 2048 (128: -5-9% at S = 512), 128 beyond (+7% at S = 4096).
  static Tiling tiling(const FwdParams& p) {
    Tiling t = choose_tiling(p.seq_q, p.head_dim);
    t.block_k = fma_backward_block_k(p);
    return t;
  }

  // Kjᵀ, Kj · scale and Vjᵀ in fp32; dKj = dVj = 0.
  static void load_keys(const BwdLayout& L, Scratch& w, const T* k, const T* v, int64_t nk) {
    const FwdParams& p = L.p->fwd;
    const int64_t D = p.head_dim, Dp = L.t.d_pad, nk_pad = round_up(nk, V::W);
    pack_transposed<V>(k, p.k_stride.s, nk, D, 1.0f, w.k_t.data(), nk_pad);
    pack_rows<V>(k, p.k_stride.s, nk, D, p.scale, w.k_p.data(), Dp);
    pack_transposed<V>(v, p.v_stride.s, nk, D, 1.0f, w.v_t.data(), nk_pad);
    std::fill(w.dk.begin(), w.dk.end(), 0.0f);
    std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  }

  // The contribution of key tile [j0, j0 + nk) and query rows [i0, i1) of head h to dKj, dVj (w.dk, w.dv)
  // and to dQ_i (rows L.dq_ld() apart).
  static void block(const BwdLayout& L, Scratch& w, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t j0,
                    int64_t nk, float* dq_acc) {
    const FwdParams& p = L.p->fwd;
    const int64_t D = p.head_dim, Dp = L.t.d_pad, rows = i1 - i0, nk_pad = round_up(nk, V::W);
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h + i0 * p.q_stride.s;
    const T* dout =
        static_cast<const T*>(L.p->dout) + b * L.p->dout_stride.b + h * L.p->dout_stride.h + i0 * L.p->dout_stride.s;
    pack_rows<V>(q, p.q_stride.s, rows, D, p.scale * kLog2e, w.q_s.data(), Dp);
    pack_rows<V>(dout, L.p->dout_stride.s, rows, D, 1.0f, w.do_p.data(), Dp);

    // S = Qi · Kjᵀ in base 2, then P = 2^(S - lse_i · log2 e) with the forward's lse (masked keys give 0).
    gemm<V>(rows, nk_pad, D, w.q_s.data(), Dp, 1, w.k_t.data(), nk_pad, w.s.data(), nk_pad, false);
    const int64_t row0 = (b * p.heads_q + h) * p.seq_q + i0;
    probabilities_from_lse(p, w.s.data(), nk_pad, i0, rows, j0, nk, p.lse + row0,
                           [nk_pad](float* s, float shift) { exp2_row<V>(s, nk_pad, shift); });

    // dVj += Pᵀ · dO_i
    gemm<V>(nk, Dp, rows, w.s.data(), 1, nk_pad, w.do_p.data(), Dp, w.dv.data(), Dp, true);
    // dP = dO_i · Vjᵀ, then dS = P ∘ (dP - Delta_i), in place
    gemm<V>(rows, nk_pad, D, w.do_p.data(), Dp, 1, w.v_t.data(), nk_pad, w.dp.data(), nk_pad, false);
    for (int64_t r = 0; r < rows; ++r) {
      const typename V::T delta = V::set1(L.delta[row0 + r]);
      float* ds = w.dp.data() + r * nk_pad;
      const float* pr = w.s.data() + r * nk_pad;
      for (int64_t c = 0; c < nk_pad; c += V::W)
        V::store(ds + c, V::mul(V::load(pr + c), V::sub(V::load(ds + c), delta)));
    }
    // dQ_i += dS · Kj · scale (k_p holds K · scale);  dKj += dSᵀ · Qi (q_s holds Q · scale · log2 e)
    gemm<V>(rows, Dp, nk, w.dp.data(), nk_pad, 1, w.k_p.data(), Dp, dq_acc, L.dq_ld(), true);
    gemm<V>(nk, Dp, rows, w.dp.data(), 1, nk_pad, w.q_s.data(), Dp, w.dk.data(), Dp, true);
  }

  // dKj = ln 2 · (dSᵀ · Q · scale · log2 e) = scale · dSᵀ Q;  dVj as accumulated.
  static void store_keys(const BwdLayout& L, const Scratch& w, int64_t nk, T* dk, T* dv) {
    const BwdParams& bp = *L.p;
    unpack_rows<V>(w.dk.data(), L.t.d_pad, nk, bp.fwd.head_dim, kLn2, dk, bp.dk_stride.s);
    unpack_rows<V>(w.dv.data(), L.t.d_pad, nk, bp.fwd.head_dim, 1.0f, dv, bp.dv_stride.s);
  }
};

// One key tile [j0, j0 + nk) of kv head hk: the kernels K (FmaBackward's interface) over every query tile
// of every query head of the group that sees it; dKj, dVj are written once.
template <class K>
void backward_kv_tile(const BwdLayout& L, typename K::Scratch& w, int64_t b, int64_t hk, int64_t split, int64_t j0) {
  using T = typename K::T;
  const BwdParams& bp = *L.p;
  const FwdParams& p = bp.fwd;
  const int64_t nk = std::min(L.t.block_k, p.seq_k - j0), group = p.heads_q / p.heads_kv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h + j0 * p.k_stride.s;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h + j0 * p.v_stride.s;
  K::load_keys(L, w, k, v, nk);

  // Query rows that see any key of the tile; both bounds are non-decreasing in the key index.
  const int64_t rb = row_begin(p.mask, j0, p.seq_q), re = row_end(p.mask, j0 + nk - 1, p.seq_q);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    float* dq_head = L.dq_head(split, b, h);
    for (int64_t i0 = rb; i0 < re; i0 += L.t.block_q) {
      const int64_t i1 = std::min(re, i0 + L.t.block_q);
      K::block(L, w, b, h, i0, i1, j0, nk, dq_head + i0 * L.dq_ld());
    }
  }

  T* dk = static_cast<T*>(bp.dk) + b * bp.dk_stride.b + hk * bp.dk_stride.h + j0 * bp.dk_stride.s;
  T* dv = static_cast<T*>(bp.dv) + b * bp.dv_stride.b + hk * bp.dv_stride.h + j0 * bp.dv_stride.s;
  K::store_keys(L, w, nk, dk, dv);
}

template <class K>
void backward_typed(const BwdParams& bp, const Tiling& t, int64_t n_split) {
  using V = typename K::V;
  using T = typename K::T;
  const FwdParams& p = bp.fwd;
  const int64_t n_rows = p.batch * p.heads_q * p.seq_q;
  const bool in_place = backward_dq_in_place(p, n_split);
  BwdLayout L{&bp, t, n_split, bp.workspace, in_place ? static_cast<float*>(bp.dq) : bp.workspace + n_rows, in_place};

  // 1. Delta_i = Σ_d dO_id · O_id - dlse_i (lse's own gradient enters as dS_ij += P_ij · dlse_i), 0 for
  //    rows with no visible key; the dQ accumulators (or dq itself, in place) zeroed.
  p.parallel_for(n_rows, &L, [](void* c, int64_t begin, int64_t end) {
    const BwdLayout& L = *static_cast<const BwdLayout*>(c);
    const BwdParams& bp = *L.p;
    const FwdParams& p = bp.fwd;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % p.seq_q, bh = row / p.seq_q, b = bh / p.heads_q, h = bh % p.heads_q;
      const T* o = static_cast<const T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + i * p.out_stride.s;
      const T* d = static_cast<const T*>(bp.dout) + b * bp.dout_stride.b + h * bp.dout_stride.h + i * bp.dout_stride.s;
      float sum = 0.0f;
      for (int64_t c = 0; c < p.head_dim; ++c) sum += Convert<V>::to_float(o[c]) * Convert<V>::to_float(d[c]);
      // A row that sees no key has P = 0: its Delta must not carry a NaN/inf dlse into dS = P (dP - Delta).
      L.delta[row] = p.lse[row] == -INFINITY ? 0.0f : bp.dlse ? sum - bp.dlse[row] : sum;
      for (int64_t s = 0; s < L.n_split; ++s) std::fill_n(L.dq_head(s, b, h) + i * L.dq_ld(), L.t.d_pad, 0.0f);
    }
  });

  // 2. Key tiles: task = (batch, kv head, split); split s owns key tiles s, s + n_split, ...
  run_tasks<const BwdLayout>(p, p.batch * p.heads_kv * n_split, &L, [](const BwdLayout& L, TaskQueue& queue) {
    const FwdParams& p = L.p->fwd;
    typename K::Scratch w(L.t, p.head_dim);
    const int64_t n_kv_tiles = (p.seq_k + L.t.block_k - 1) / L.t.block_k;
    for (int64_t task; queue.next(&task);) {
      const int64_t split = task % L.n_split, bh = task / L.n_split;
      for (int64_t tile = split; tile < n_kv_tiles; tile += L.n_split)
        backward_kv_tile<K>(L, w, bh / p.heads_kv, bh % p.heads_kv, split, tile * L.t.block_k);
    }
  });

  // 3. dQ = Σ_split dQ_split
  if (L.in_place) return;
  p.parallel_for(n_rows, &L, [](void* c, int64_t begin, int64_t end) {
    const BwdLayout& L = *static_cast<const BwdLayout*>(c);
    const BwdParams& bp = *L.p;
    const FwdParams& p = bp.fwd;
    const int64_t n_rows = p.batch * p.heads_q * p.seq_q, Dp = L.t.d_pad;
    std::vector<float> sum(Dp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % p.seq_q, bh = row / p.seq_q, b = bh / p.heads_q, h = bh % p.heads_q;
      std::copy_n(L.dq_acc + row * Dp, Dp, sum.data());
      for (int64_t s = 1; s < L.n_split; ++s)
        for (int64_t d = 0; d < Dp; ++d) sum[d] += L.dq_acc[(s * n_rows + row) * Dp + d];
      T* dq = static_cast<T*>(bp.dq) + b * bp.dq_stride.b + h * bp.dq_stride.h + i * bp.dq_stride.s;
      unpack_rows<V>(sum.data(), Dp, 1, p.head_dim, 1.0f, dq, 0);
    }
  });
}

// The backward with kernels K; its tiles may differ from the workspace query's in block_q and block_k only:
// a longer block_k gives at most as many splits, so their dQ accumulators still fit (fp32 counts its own).
// key_tile makes it shorter than the query's only where one tile holds all the keys: one split either way.
template <class K>
Status backward_run(const BwdParams& bp) {
  const FwdParams& p = bp.fwd;
  Tiling t = K::tiling(p);
  t.block_k = key_tile(t.block_k, p.seq_k);
  const int64_t n_split = backward_splits(p.batch, p.heads_kv, p.seq_k, t.block_k, p.num_threads);
  if (bp.workspace_floats < backward_workspace_floats(p)) return Status::kWorkspaceTooSmall;
  backward_typed<K>(bp, t, n_split);
  return Status::kOk;
}

template <class V>
Status backward_impl(const BwdParams& bp) {
  switch (bp.fwd.dtype) {
    case DType::kFloat32: return backward_run<FmaBackward<V, float>>(bp);
    case DType::kFloat16: return backward_run<FmaBackward<V, Half>>(bp);
    case DType::kBFloat16: return backward_run<FmaBackward<V, Bf16>>(bp);
  }
  return Status::kUnsupportedDType;
}

}  // namespace
}  // namespace attnext::cpu
