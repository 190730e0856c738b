// Tile sizes and the backward's work split: shared by the kernels and by the workspace size query,
// so both always agree. Plain integer code.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attnext/params.h"

namespace attnext::cpu {
namespace {

struct Tiling {
  int64_t block_q;  // query rows per tile
  int64_t block_k;  // keys per tile
  int64_t d_pad;    // head dim padded to 16 floats, the widest vector unit
  int64_t group = 1;  // query tiles per forward task, sharing each key tile (at most kMaxQueryGroup)
  bool prefetch_next = false;  // the FMA forward requests each next key tile while it works on one
};

constexpr int64_t kMaxQueryGroup = 8;

// A key tile of block_k keys for seq_k keys: never longer than the keys there are, rounded up to 16 (every
// unit's padding). The workers' scratch is sized by the tile and cleared when it is made, so short calls
// clear no 256-key tiles (with S = 16 the backward's took a fifth of the call in memset).
inline int64_t key_tile(int64_t block_k, int64_t seq_k) {
  return std::min<int64_t>(block_k, (std::max<int64_t>(seq_k, 1) + 15) / 16 * 16);
}

// The tiles of the backward (and the workspace it needs), the decode and the base of the pair kernels:
// tall query tiles amortise packing each key tile (a transpose of Kj) over many rows; the sizes keep Qi,
// acc, S, Kj and Vj (fp32) within a 512 KiB L2: 256 rows up to D = 128, 128 up to 256, then 64 rows and
// 32-key tiles. The FMA forward has its own (choose_forward_tiling).
inline Tiling choose_tiling(int64_t seq_q, int64_t head_dim) {
  Tiling t;
  const int64_t rows = head_dim <= 128 ? 256 : head_dim <= 256 ? 128 : 64;
  t.block_q = std::max<int64_t>(1, std::min<int64_t>(rows, seq_q));
  t.block_k = head_dim > 256 ? 32 : 64;
  t.d_pad = (head_dim + 15) / 16 * 16;
  return t;
}

// Query tiles per forward task. Each task reads every key tile of its head; once one head's K and V (times
// the threads streaming them side by side) outgrow about 8 MiB, the share of the L3 a core can count on,
// they come from memory for every query tile. Grouping the tiles of a task to about 256 rows then reads
// each key tile once for all of them (from the L2 after the first): on a Zen 4 core, fp32 D = 256,
// S = 8192 81.6 -> 104.6 GFLOP/s at one thread, S = 4096 at two threads 160 -> 202 (measured; below the
// threshold it changed nothing beyond noise). Keeps two tasks per thread; masked runs keep one tile.
inline int64_t forward_query_group(const FwdParams& p, int64_t block_q) {
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t kv_bytes = 2 * p.seq_k * p.head_dim * elem * p.num_threads;
  if (hides_keys(p.mask) || kv_bytes < (int64_t{8} << 20)) return 1;
  int64_t group = std::min<int64_t>(kMaxQueryGroup, std::max<int64_t>(1, 256 / block_q));
  const auto tasks = [&](int64_t g) { return p.batch * p.heads_q * ((p.seq_q + block_q * g - 1) / (block_q * g)); };
  while (group > 1 && tasks(group) < 2 * p.num_threads) group /= 2;
  return group;
}

// Whether the FMA forward requests the next key tile's K and V rows while it works on the current one,
// paced by its products (forward_impl.h). On a Zen 4 core this gained 2-3.5% at D = 128 and 256 (fp32
// and fp16, one thread; 0-1% at two), where each query tile reads its head's K and V from the L3 or from
// memory. Left to the hardware prefetchers: rows that do not lie back to back (they would be requested in
// one burst, see LinesAhead), 256-key tiles within the 32 KiB L1 (D = 32 fp32 lost 2%), and masks that
// bound the keys (the pacing steps in the products of 16-row causal tiles cost 3-7% at two threads).
constexpr int64_t kForwardBlockK = 256;  // the FMA forward's key tile (halved past D = 128 when requesting ahead)

inline bool forward_prefetches_next(const FwdParams& p) {
  const int64_t row_bytes = p.head_dim * (p.dtype == DType::kFloat32 ? 4 : 2);
  return p.k_stride.s == p.head_dim && p.v_stride.s == p.head_dim &&
         kForwardBlockK * row_bytes > (int64_t{32} << 10) && !hides_keys(p.mask);
}

// Tiles of the FMA forward (forward_impl.h), which computes Sᵀ = Kj · Qiᵀ with the query rows as lanes.
// Long key tiles (256 keys; 128 for D > 128 when the next one is requested ahead, so that both fit the
// L2) amortise each tile's fixed work (rescaling acc, the micro-kernel's loads and stores of C) and short
// query tiles keep Sᵀ (block_q x block_k fp32) within 64 KiB. fp32 uses 16 rows when a mask bounds the
// keys (a diagonal tile then wastes at most a 16 x 16 triangle), else 32 rows for D > 128 and 64 up to
// it; 16-bit K/V are widened once per tile, so 64 rows share that work. Past D = 256 the L2 sizes above.
// Chosen by measurement on a Zen 4 core (+5-10% over 256 x 64 at D = 32-256, causal +10-20%).
inline Tiling choose_forward_tiling(const FwdParams& p, bool fp32) {
  Tiling t = choose_tiling(p.seq_q, p.head_dim);
  if (p.head_dim > 256) return t;
  const int64_t rows = !fp32 ? 64 : hides_keys(p.mask) ? 16 : p.head_dim > 128 ? 32 : 64;
  t.block_q = std::max<int64_t>(1, std::min<int64_t>(rows, p.seq_q));
  t.prefetch_next = forward_prefetches_next(p);
  t.block_k = key_tile(p.head_dim > 128 && t.prefetch_next ? kForwardBlockK / 2 : kForwardBlockK, p.seq_k);
  t.group = forward_query_group(p, t.block_q);
  return t;
}

// The backward runs one task per (batch, kv head, split); a split owns every n_split-th key tile and
// a private fp32 dQ accumulator. More splits are used only when batch x kv heads cannot fill the pool.
inline int64_t backward_splits(int64_t batch, int64_t heads_kv, int64_t seq_k, int64_t block_k, int num_threads) {
  const int64_t units = batch * heads_kv, n_kv_tiles = (seq_k + block_k - 1) / block_k;
  if (units == 0 || units >= 2 * num_threads || n_kv_tiles <= 1) return 1;
  return std::min<int64_t>(n_kv_tiles, (2 * num_threads + units - 1) / units);
}

// The decode-shaped forward (decode_impl.h) takes over when each KV head serves at most this many
// query rows (Sq x the GQA group): its lanes are those rows, so it streams K and V once per group.
constexpr int64_t kDecodeMaxRows = 16;

// Query rows per KV head (Sq · Hq/Hkv): the decode's rows (heads_kv > 0).
inline int64_t decode_rows(const FwdParams& p) { return p.seq_q * (p.heads_q / p.heads_kv); }

inline bool use_decode(const FwdParams& p) { return p.heads_kv > 0 && decode_rows(p) <= kDecodeMaxRows; }

// Tasks per unit of the decode forward (a (batch, KV head), or a batch whose KV heads go together): the
// key range is split when the units alone cannot give every thread two tasks.
inline int64_t decode_splits(const FwdParams& p, int64_t block_k, int64_t units) {
  const int64_t n_tiles = (p.seq_k + block_k - 1) / block_k;
  if (units == 0 || units >= 2 * p.num_threads || n_tiles <= 1) return 1;
  return std::min<int64_t>(n_tiles, (2 * p.num_threads + units - 1) / units);
}

// Whether the backward adds dQ up in dq itself: fp32 rows that need no padding, one split. Otherwise each
// split has its own fp32 accumulator in the workspace, summed (and converted) into dq at the end; in place
// saves that pass and the workspace (as much memory as dq).
inline bool backward_dq_in_place(const FwdParams& p, int64_t n_split) {
  return p.dtype == DType::kFloat32 && p.head_dim % 16 == 0 && n_split == 1;
}

// Keys per tile of the FMA backward (backward_impl.h, FmaBackward::tiling says why), which every fp32
// backward runs: 256 without a mask up to D = 256, under one 64 up to Sq = 2048 and 128 beyond.
inline int64_t fma_backward_block_k(const FwdParams& p) {
  if (p.head_dim > 256) return choose_tiling(p.seq_q, p.head_dim).block_k;
  return !hides_keys(p.mask) ? 256 : p.seq_q > 2048 ? 128 : 64;
}

// Floats of fp32 workspace the backward needs: Delta (B, Hq, Sq) and, unless dQ is added up in place,
// n_split dQ accumulators (B, Hq, Sq, d_pad). fp32 counts the splits of the FMA backward's own tiles; 16-bit
// ones those of the shortest tiles its kernels take (choose_tiling's), at least as many as they give.
inline int64_t backward_workspace_floats(const FwdParams& p) {
  const Tiling t = choose_tiling(p.seq_q, p.head_dim);
  const int64_t block_k = p.dtype == DType::kFloat32 ? fma_backward_block_k(p) : t.block_k;
  const int64_t n_split = backward_splits(p.batch, p.heads_kv, p.seq_k, block_k, p.num_threads);
  const int64_t rows = p.batch * p.heads_q * p.seq_q;
  return rows + (backward_dq_in_place(p, n_split) ? 0 : n_split * rows * t.d_pad);
}

}  // namespace
}  // namespace attnext::cpu
