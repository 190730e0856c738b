// FlashAttention-2 forward on the tensor cores (sm_80+): one thread block per (query block, head, batch).
// The block keeps its Q tile in shared memory and walks its key blocks from the last to the first,
// streaming K and V through shared memory with cp.async (the V copy overlaps Q·Kᵀ, the next K copy overlaps
// the softmax and P·V). Each warp owns 16·kMTiles query rows; S, P and the output accumulator stay in
// registers: P goes from the S accumulators straight into the A fragments of P·V.
#pragma once

#include "attnext/blocks.h"
#include "attnext/params.h"
#include "cuda/tile.cuh"

namespace attnext::cuda {

template <class T_, int kD_, int kBlockM_, int kBlockN_, int kWarps_>
struct FwdConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);  // 16-row MMA tiles per warp
  static constexpr int kStride = tile_stride<kD>();
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kStride * int(sizeof(T));
  static_assert(kMTiles * 16 * kWarps == kBlockM && kBlockN % 16 == 0 && kD % 16 == 0, "bad forward tiling");
};

template <class C>
__global__ void __launch_bounds__(C::kThreads) fwd_kernel(const FwdParams p) {
  using T = typename C::T;
  constexpr int kD = C::kD, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kMTiles = C::kMTiles;
  constexpr int kStride = C::kStride, kNTiles = kBlockN / 8, kDTiles = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.heads_q / p.heads_kv);
  // Query blocks run last-first: under a causal mask the last rows see the most keys, and starting the
  // longest blocks first shortens the tail of the grid.
  const int64_t i0 = int64_t(gridDim.x - 1 - blockIdx.x) * kBlockM, i1 = min(i0 + kBlockM, p.seq_q);
  const int head_dim = int(p.head_dim);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
  T* out = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h;
  float* lse = p.lse + (b * p.heads_q + h) * p.seq_q;
  const int warp_row0 = warp * 16 * kMTiles;  // within the block

  float acc[kMTiles][kDTiles][4] = {};
  float m_i[kMTiles][2], l_i[kMTiles][2];  // per thread: rows g and g + 8 of each m-tile
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
    for (int r = 0; r < 2; ++r) m_i[mt][r] = -INFINITY, l_i[mt][r] = 0.0f;

  const BlockRange blocks = key_block_range(p.mask, i0, i1, p.seq_k, kBlockN);
  if (!blocks.empty()) {
    load_tile<kBlockM, kD, C::kThreads>(sQ, q, p.q_stride.s, i0, p.seq_q, head_dim);
    load_tile<kBlockN, kD, C::kThreads>(sK, k, p.k_stride.s, (blocks.end - 1) * kBlockN, p.seq_k, head_dim);
    cp_async_commit();
  }
  const float scale_log2 = p.scale * 1.44269504088896341f;

  for (int64_t n = blocks.end - 1; n >= blocks.first; --n) {
    const int64_t j0 = n * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_j is in shared memory; every warp is done with the previous V
    load_tile<kBlockN, kD, C::kThreads>(sV, v, p.v_stride.s, j0, p.seq_k, head_dim);
    cp_async_commit();

    // S = Qi · Kjᵀ (fp32 accumulators, 16 rows x kBlockN keys per m-tile).
    float s[kMTiles][kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD; kk += 16) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) load_a(a[mt], sQ, kStride, warp_row0 + mt * 16, kk, lane);
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        uint32_t bk[4];
        load_b_nk(bk, sK, kStride, nt * 8, kk, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(s[mt][nt], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][nt + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Scores in base 2, s·scale·log2(e); invisible pairs and padding keys become -inf (boundary tiles only).
    const bool masked = tile_needs_mask(p.mask, i0, i1, j0, j0 + kBlockN, p.seq_k);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const TileKeys keys = tile_keys(p.mask, i0 + warp_row0 + mt * 16 + g + 8 * r, j0, kBlockN, p.seq_k);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int key = nt * 8 + 2 * t + c;
            float& x = s[mt][nt][2 * r + c];
            x = (masked && !keys.contains(key)) ? -INFINITY : x * scale_log2;
          }
      }

    cp_async_wait<0>();
    __syncthreads();  // V_j is in shared memory; every warp is done with K_j
    if (n > blocks.first) {
      load_tile<kBlockN, kD, C::kThreads>(sK, k, p.k_stride.s, j0 - kBlockN, p.seq_k, head_dim);
      cp_async_commit();
    }

    // Online softmax: m_new = max(m_i, rowmax S); P = exp2(S - m_new); l_i = l_i·2^(m_i - m_new) + rowsum P;
    // acc is rescaled by the same factor.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float row_max = m_i[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) row_max = fmaxf(row_max, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        row_max = quad_max(row_max);
        const float alpha = softmax_rescale(m_i[mt][r], row_max), offset = softmax_offset(row_max);
        m_i[mt][r] = row_max;
        float row_sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& x = s[mt][nt][2 * r + c];
            x = fast_exp2(x - offset);
            row_sum += x;
          }
        l_i[mt][r] = l_i[mt][r] * alpha + row_sum;  // per-thread partial sum, reduced over the quad at the end
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) acc[mt][dt][2 * r] *= alpha, acc[mt][dt][2 * r + 1] *= alpha;
      }

    // acc += P · Vj, P taken from the S registers as 16-bit A fragments.
#pragma unroll
    for (int kk = 0; kk < kNTiles; kk += 2) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) acc_to_a<T>(a[mt], s[mt][kk], s[mt][kk + 1]);
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        uint32_t bv[4];
        load_b_kn(bv, sV, kStride, kk * 8, dt * 8, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc[mt][dt], a[mt], bv[0], bv[1]);
          mma_16816<T>(acc[mt][dt + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  // out = acc / l_i (0 for rows that saw no key); lse = ln(l_i) + m_i·ln 2 (-inf for those rows). A NaN
  // score is dropped by fmaxf but not by exp2: l_i, and with it the row's out and lse, become NaN.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_i[mt][r]);
      inv[r] = inverse_denominator(l);
      const int64_t row = i0 + warp_row0 + mt * 16 + g + 8 * r;
      if (t == 0 && row < p.seq_q) lse[row] = lse_from_base2(m_i[mt][r], l);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) acc[mt][dt][2 * r] *= inv[r], acc[mt][dt][2 * r + 1] *= inv[r];
    }
    store_acc<kD, T>(out, p.out_stride.s, i0 + warp_row0 + mt * 16, p.seq_q, 0, head_dim, acc[mt], 1.0f, lane);
  }
}

}  // namespace attnext::cuda
