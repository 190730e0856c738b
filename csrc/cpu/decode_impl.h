// Forward for few query rows per KV head (decoding: Sq · Hq/Hkv <= kDecodeMaxRows), over a vector unit V
// and a storage type T. The scores are computed transposed, Sᵀ = Kj · Qᵀ, with the query rows of all
// heads of a GQA group side by side: each K and V row is read from memory once for the whole group, and
// K needs no transpose. The key range of each (batch, KV head) is split over several tasks when there
// are fewer heads than threads; the partial results are merged through their LSE. With K/V laid out
// key-major ((batch, key, head, dim), FlashAttention's KV cache) a task walks all KV heads of a batch
// together, tile by tile, so that it reads each tile's rows of all heads as one span.
// The work on one head's key tile lies in decode_tile.h.
#pragma once

#include <memory>

#include "cpu/decode_tile.h"
#include "cpu/tasks.h"

namespace attnext::cpu {
namespace {

constexpr int64_t kPrefetchKeys = 128;  // how far ahead K and V rows are requested
constexpr int64_t kPageAheadKeys = 256;  // how far ahead each page of K and V rows is touched first
constexpr int64_t kSpanBytes = 128 << 10;  // K (and V) bytes of all heads per tile when heads go together

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
      for (int64_t s = 0; s < L.n_split; ++s) {
        const float* part = first + s * L.part_floats();
        // No part saw a finite score (m = -inf): l is 0, or NaN where a part saw NaN scores; acc stays 0.
        const float weight = m == kNegInf ? 1.0f : std::exp2(part[L.rows * Dp + r] - m);
        l += part[L.rows * Dp + L.rows + r] * weight;
        if (m != kNegInf)
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
