// The deterministic backward's dQ pass (see bwd_kernel.cuh): one thread block per (query block, head,
// batch) walks the key blocks its rows see, recomputes S and dP, and accumulates dQi in registers.
// Each warp owns 16 query rows; dS goes from the accumulators straight into the A fragments of dS·Kj.
#pragma once

#include "attnext/blocks.h"
#include "attnext/params.h"
#include "cuda/bwd_kernel.cuh"
#include "cuda/tile.cuh"

namespace attnext::cuda {

// kStages: shared-memory buffers for Kj, Vj (2: the next key block's copy overlaps this one's products).
template <class T_, int kD_, int kBlockN_, int kStages_ = 2>
struct BwdDqConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockN = kBlockN_, kStages = kStages_, kWarps = 4, kThreads = 128;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kStride = tile_stride<kD>();
  static constexpr int kSmemBytes = (2 * kBlockM + 2 * kStages * kBlockN) * kStride * int(sizeof(T));
  static_assert(kBlockN % 16 == 0 && kD % 16 == 0 && (kStages == 1 || kStages == 2), "bad dQ tiling");
};

template <class C>
__global__ void __launch_bounds__(C::kThreads) bwd_dq_kernel(const BwdParams p, const BwdWork w) {
  using T = typename C::T;
  constexpr int kD = C::kD, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStride = C::kStride;
  constexpr int kNTiles = kBlockN / 8, kDTiles = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlockM * kStride;
  T* sK_stages = sdO + kBlockM * kStride;  // [kStages][kBlockN][kStride]
  T* sV_stages = sK_stages + C::kStages * kBlockN * kStride;

  const FwdParams& f = p.fwd;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (f.heads_q / f.heads_kv), bh = b * f.heads_q + h;
  const int64_t i0 = int64_t(gridDim.x - 1 - blockIdx.x) * kBlockM, i1 = min(i0 + kBlockM, f.seq_q);  // longest first
  const int head_dim = int(f.head_dim);
  const float scale_log2 = f.scale * 1.44269504088896341f;
  const T* k = static_cast<const T*>(f.k) + b * f.k_stride.b + hk * f.k_stride.h;
  const T* v = static_cast<const T*>(f.v) + b * f.v_stride.b + hk * f.v_stride.h;

  const BlockRange blocks = key_block_range(f.mask, i0, i1, f.seq_k, kBlockN);
  load_tile<kBlockM, kD, C::kThreads>(sQ, static_cast<const T*>(f.q) + b * f.q_stride.b + h * f.q_stride.h,
                                       f.q_stride.s, i0, f.seq_q, head_dim);
  load_tile<kBlockM, kD, C::kThreads>(sdO, static_cast<const T*>(p.dout) + b * p.dout_stride.b + h * p.dout_stride.h,
                                       p.dout_stride.s, i0, f.seq_q, head_dim);
  cp_async_commit();
  // Issues the copies of key block n into stage `stage`.
  auto load_kv = [&](int64_t n, int stage) {
    load_tile<kBlockN, kD, C::kThreads>(sK_stages + stage * kBlockN * kStride, k, f.k_stride.s, n * kBlockN,
                                         f.seq_k, head_dim);
    load_tile<kBlockN, kD, C::kThreads>(sV_stages + stage * kBlockN * kStride, v, f.v_stride.s, n * kBlockN,
                                         f.seq_k, head_dim);
    cp_async_commit();
  };

  // This thread's rows g and g + 8 of the warp's 16: their lse·log2 e offset and Delta.
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = i0 + 16 * warp + g + 8 * r;
    lse2[r] = row < f.seq_q ? lse_to_base2_offset(f.lse[bh * f.seq_q + row]) : INFINITY;
    delta[r] = row < f.seq_q ? w.delta[bh * f.seq_q + row] : 0.0f;
  }

  float dq[kDTiles][4] = {};
  for (int64_t n = blocks.first; n < blocks.end; ++n) {
    const int64_t j0 = n * kBlockN;
    const int stage = C::kStages == 1 ? 0 : int((n - blocks.first) % 2);
    __syncthreads();  // every warp is done with the previous Kj, Vj: their stage may be overwritten
    if (C::kStages == 1 || n == blocks.first) load_kv(n, stage);
    if (C::kStages == 2 && n + 1 < blocks.end) {
      load_kv(n + 1, 1 - stage);  // the next key block's copies overlap this block's products
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // Qi, dOi, Kj and Vj are in shared memory for every warp
    const T* sK = sK_stages + stage * kBlockN * kStride;
    const T* sV = sV_stages + stage * kBlockN * kStride;

    // S = Qi · Kjᵀ and dP = dOi · Vjᵀ for this warp's 16 rows.
    float s[kNTiles][4] = {}, dp[kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD; kk += 16) {
      uint32_t aq[4], ao[4];
      load_a(aq, sQ, kStride, 16 * warp, kk, lane);
      load_a(ao, sdO, kStride, 16 * warp, kk, lane);
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        uint32_t bk[4], bv[4];
        load_b_nk(bk, sK, kStride, nt * 8, kk, lane);
        load_b_nk(bv, sV, kStride, nt * 8, kk, lane);
        mma_16816<T>(s[nt], aq, bk[0], bk[1]);
        mma_16816<T>(s[nt + 1], aq, bk[2], bk[3]);
        mma_16816<T>(dp[nt], ao, bv[0], bv[1]);
        mma_16816<T>(dp[nt + 1], ao, bv[2], bv[3]);
      }
    }

    // dS = P ∘ (dP - Delta), P = exp2(S·scale·log2 e - lse·log2 e), 0 where masked; kept in s.
    const bool masked = tile_needs_mask(f.mask, i0, i1, j0, j0 + kBlockN, f.seq_k);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const TileKeys keys = tile_keys(f.mask, i0 + 16 * warp + g + 8 * r, j0, kBlockN, f.seq_k);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const bool visible = !masked || keys.contains(nt * 8 + 2 * t + c);
          const float pv = visible ? fast_exp2(s[nt][2 * r + c] * scale_log2 - lse2[r]) : 0.0f;
          s[nt][2 * r + c] = pv * (dp[nt][2 * r + c] - delta[r]);
        }
    }

    // dQi += dS · Kj.
#pragma unroll
    for (int kk = 0; kk < kNTiles; kk += 2) {
      uint32_t a[4];
      acc_to_a<T>(a, s[kk], s[kk + 1]);
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        uint32_t bk[4];
        load_b_kn(bk, sK, kStride, kk * 8, dt * 8, lane);
        mma_16816<T>(dq[dt], a, bk[0], bk[1]);
        mma_16816<T>(dq[dt + 1], a, bk[2], bk[3]);
      }
    }
  }
  cp_async_wait<0>();

  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_stride.b + h * p.dq_stride.h;
  store_acc<kD, T>(dq_out, p.dq_stride.s, i0 + 16 * warp, f.seq_q, 0, head_dim, dq, f.scale, lane);
}

}  // namespace attnext::cuda
