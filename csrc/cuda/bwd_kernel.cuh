// FlashAttention-2 backward on the tensor cores (sm_80+), in three passes:
//   1. bwd_preprocess_kernel: Delta_i = rowsum(dOi ∘ Oi) - dlse_i (0 for rows that see no key), and the
//      fp32 dQ accumulator zeroed.
//   2. bwd_kernel: one thread block per (key block, KV head, batch). Kj and Vj stay in shared memory while
//      the block walks every query block that sees them, for every query head of the GQA group, keeping
//      dKj and dVj in registers; dQi receives each block's share through fp32 atomics.
//   3. bwd_convert_dq_kernel: dQ = scale · accumulator, in the input dtype.
// deterministic=True replaces the atomics by bwd_dq_kernel, one block per query block that recomputes
// S and dP for its own rows: no two blocks write the same dQ element, so the result is bitwise repeatable.
//
// With P = exp2(S·scale·log2 e - lse·log2 e), dP = dO·Vᵀ and dS = P ∘ (dP - Delta):
//   dV = Pᵀ·dO,   dK = scale · dSᵀ·Q,   dQ = scale · dS·K.
#pragma once

#include "attnext/blocks.h"
#include "attnext/params.h"
#include "cuda/tile.cuh"

namespace attnext::cuda {

// What the backward passes share besides BwdParams: fp32 (B, Hq, Sq) Delta and (B, Hq, Sq, D) dQ accumulator.
struct BwdWork {
  float* delta = nullptr;
  float* dq_accum = nullptr;
};

constexpr int kPreprocessRows = 16;  // rows per block of the preprocess and convert passes (4 warps)

template <class T>
__global__ void __launch_bounds__(128) bwd_preprocess_kernel(const BwdParams p, const BwdWork w) {
  const FwdParams& f = p.fwd;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, bh = b * f.heads_q + h;
  const T* out = static_cast<const T*>(f.out) + b * f.out_stride.b + h * f.out_stride.h;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride.b + h * p.dout_stride.h;
  for (int r = warp; r < kPreprocessRows; r += 4) {
    const int64_t row = int64_t(blockIdx.x) * kPreprocessRows + r;
    if (row >= f.seq_q) break;
    float sum = 0.0f;  // rowsum(dO ∘ O), each lane a strided part of the row
    for (int64_t d = lane; d < f.head_dim; d += 32)
      sum += to_float(out[row * f.out_stride.s + d]) * to_float(dout[row * p.dout_stride.s + d]);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    // A row that sees no key has P = 0: its Delta must not carry a NaN/inf dlse into dS = P (dP - Delta).
    const int64_t at = bh * f.seq_q + row;
    if (lane == 0) w.delta[at] = f.lse[at] == -INFINITY ? 0.0f : sum - (p.dlse ? p.dlse[at] : 0.0f);
    if (w.dq_accum)
      for (int64_t d = lane; d < f.head_dim; d += 32) w.dq_accum[(bh * f.seq_q + row) * f.head_dim + d] = 0.0f;
  }
}

template <class T>
__global__ void __launch_bounds__(128) bwd_convert_dq_kernel(const BwdParams p, const BwdWork w) {
  const FwdParams& f = p.fwd;
  const int64_t b = blockIdx.z, h = blockIdx.y, bh = b * f.heads_q + h;
  T* dq = static_cast<T*>(p.dq) + b * p.dq_stride.b + h * p.dq_stride.h;
  for (int64_t x = threadIdx.x; x < kPreprocessRows * f.head_dim; x += 128) {
    const int64_t row = int64_t(blockIdx.x) * kPreprocessRows + x / f.head_dim, d = x % f.head_dim;
    if (row < f.seq_q) dq[row * p.dq_stride.s + d] = from_float<T>(w.dq_accum[(bh * f.seq_q + row) * f.head_dim + d] * f.scale);
  }
}

// kStages: shared-memory buffers for Qi, dOi (2: the next query block's copy overlaps this one's products).
template <class T_, int kD_, int kBlockM_, int kBlockN_, int kWarpsD_, int kStages_ = 2>
struct BwdConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarpsD = kWarpsD_, kStages = kStages_;
  static constexpr int kWarpsN = kBlockN / 16;       // warps along the keys of Sᵀ, dKj, dVj
  static constexpr int kWarps = kWarpsN * kWarpsD, kThreads = 32 * kWarps;
  static constexpr int kMw = kBlockM / kWarpsD;      // queries (columns of Sᵀ) per warp
  static constexpr int kDw = kD / kWarpsD;           // columns of dKj, dVj per warp
  static constexpr int kDqRowTiles = kBlockM / 16;   // dQi is split over the warps as row tiles x column chunks
  static constexpr int kDqCols = kD / (kWarps / kDqRowTiles);
  static constexpr int kStride = tile_stride<kD>(), kPStride = kBlockM + 8;
  static constexpr int kSmemBytes = (2 * kBlockN + 2 * kStages * kBlockM) * kStride * int(sizeof(T)) +
                                    2 * kBlockN * kPStride * int(sizeof(T)) + 2 * kStages * kBlockM * int(sizeof(float));
  static_assert(kMw % 16 == 0 && kDw % 16 == 0 && kWarps % kDqRowTiles == 0 && kDqCols % 16 == 0 &&
                (kStages == 1 || kStages == 2), "bad backward tiling");
};

template <class C>
__global__ void __launch_bounds__(C::kThreads) bwd_kernel(const BwdParams p, const BwdWork w) {
  using T = typename C::T;
  constexpr int kD = C::kD, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStride = C::kStride;
  constexpr int kPStride = C::kPStride, kMw = C::kMw, kDw = C::kDw, kDqCols = C::kDqCols;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlockN * kStride;
  T* sQ_stages = sV + kBlockN * kStride;                   // [kStages][kBlockM][kStride]
  T* sdO_stages = sQ_stages + C::kStages * kBlockM * kStride;
  T* sP = sdO_stages + C::kStages * kBlockM * kStride;      // Pᵀ, [key][query]
  T* sdS = sP + kBlockN * kPStride;                         // dSᵀ, [key][query]
  float* s_lse2_stages = reinterpret_cast<float*>(sdS + kBlockN * kPStride);  // [kStages][kBlockM]
  float* s_delta_stages = s_lse2_stages + C::kStages * kBlockM;

  const FwdParams& f = p.fwd;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int wn = warp % C::kWarpsN, wd = warp / C::kWarpsN;
  const int64_t b = blockIdx.z, hk = blockIdx.y, group = f.heads_q / f.heads_kv;
  const int64_t j0 = int64_t(blockIdx.x) * kBlockN, j1 = min(j0 + kBlockN, f.seq_k);
  const int head_dim = int(f.head_dim);
  const float scale_log2 = f.scale * 1.44269504088896341f;

  load_tile<kBlockN, kD, C::kThreads>(sK, static_cast<const T*>(f.k) + b * f.k_stride.b + hk * f.k_stride.h,
                                       f.k_stride.s, j0, f.seq_k, head_dim);
  load_tile<kBlockN, kD, C::kThreads>(sV, static_cast<const T*>(f.v) + b * f.v_stride.b + hk * f.v_stride.h,
                                       f.v_stride.s, j0, f.seq_k, head_dim);
  cp_async_commit();

  // The block's steps: every query block that sees Kj, for every query head of the GQA group.
  const BlockRange qblocks = query_block_range(f.mask, j0, j1, f.seq_q, kBlockM);
  const int64_t blocks_per_head = qblocks.end - qblocks.first, steps = group * blocks_per_head;
  auto step_head = [&](int64_t step) { return hk * group + step / blocks_per_head; };
  auto step_row0 = [&](int64_t step) { return (qblocks.first + step % blocks_per_head) * kBlockM; };
  // Issues the copies of step's Qi and dOi into stage `stage`, and stores its lse·log2 e and Delta there.
  auto load_step = [&](int64_t step, int stage) {
    const int64_t h = step_head(step), i0 = step_row0(step), bh = b * f.heads_q + h;
    load_tile<kBlockM, kD, C::kThreads>(sQ_stages + stage * kBlockM * kStride,
                                         static_cast<const T*>(f.q) + b * f.q_stride.b + h * f.q_stride.h,
                                         f.q_stride.s, i0, f.seq_q, head_dim);
    load_tile<kBlockM, kD, C::kThreads>(sdO_stages + stage * kBlockM * kStride,
                                         static_cast<const T*>(p.dout) + b * p.dout_stride.b + h * p.dout_stride.h,
                                         p.dout_stride.s, i0, f.seq_q, head_dim);
    cp_async_commit();
    for (int x = threadIdx.x; x < kBlockM; x += C::kThreads) {
      const bool in = i0 + x < f.seq_q;  // padding rows get P = 0
      s_lse2_stages[stage * kBlockM + x] = in ? lse_to_base2_offset(f.lse[bh * f.seq_q + i0 + x]) : INFINITY;
      s_delta_stages[stage * kBlockM + x] = in ? w.delta[bh * f.seq_q + i0 + x] : 0.0f;
    }
  };

  float dk[kDw / 8][4] = {}, dv[kDw / 8][4] = {};
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t h = step_head(step), bh = b * f.heads_q + h;
    const int64_t i0 = step_row0(step), i1 = min(i0 + kBlockM, f.seq_q);
    const int stage = C::kStages == 1 ? 0 : int(step % 2);
    __syncthreads();  // every warp is done with the previous step: its stage, Pᵀ and dSᵀ may be overwritten
    if (C::kStages == 1 || step == 0) load_step(step, stage);
    if (C::kStages == 2 && step + 1 < steps) {
      load_step(step + 1, 1 - stage);  // the next step's copies overlap this step's products
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this step's Qi, dOi, lse and Delta are in shared memory for every warp
    const T* sQ = sQ_stages + stage * kBlockM * kStride;
    const T* sdO = sdO_stages + stage * kBlockM * kStride;
    const float* s_lse2 = s_lse2_stages + stage * kBlockM;
    const float* s_delta = s_delta_stages + stage * kBlockM;

    // Sᵀ = Kj · Qiᵀ and dPᵀ = Vj · dOiᵀ: this warp's 16 keys x kMw queries.
    float st[kMw / 8][4] = {}, dpt[kMw / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD; kk += 16) {
      uint32_t ak[4], av[4];
      load_a(ak, sK, kStride, 16 * wn, kk, lane);
      load_a(av, sV, kStride, 16 * wn, kk, lane);
#pragma unroll
      for (int nt = 0; nt < kMw / 8; nt += 2) {
        uint32_t bq[4], bo[4];
        load_b_nk(bq, sQ, kStride, wd * kMw + nt * 8, kk, lane);
        load_b_nk(bo, sdO, kStride, wd * kMw + nt * 8, kk, lane);
        mma_16816<T>(st[nt], ak, bq[0], bq[1]);
        mma_16816<T>(st[nt + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dpt[nt], av, bo[0], bo[1]);
        mma_16816<T>(dpt[nt + 1], av, bo[2], bo[3]);
      }
    }

    // Pᵀ = exp2(Sᵀ·scale·log2 e - lse·log2 e) (0 where masked), dSᵀ = Pᵀ ∘ (dPᵀ - Delta), both to shared memory.
    const bool masked = tile_needs_mask(f.mask, i0, i1, j0, j0 + kBlockN, f.seq_k);
#pragma unroll
    for (int nt = 0; nt < kMw / 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int key_local = 16 * wn + g + 8 * r;
        float pv[2], dsv[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = wd * kMw + nt * 8 + 2 * t + c;
          const bool visible = !masked || tile_keys(f.mask, i0 + col, j0, kBlockN, f.seq_k).contains(key_local);
          pv[c] = visible ? fast_exp2(st[nt][2 * r + c] * scale_log2 - s_lse2[col]) : 0.0f;
          dsv[c] = pv[c] * (dpt[nt][2 * r + c] - s_delta[col]);
        }
        const int at = key_local * kPStride + wd * kMw + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(sP + at) = pack2<T>(pv[0], pv[1]);
        *reinterpret_cast<uint32_t*>(sdS + at) = pack2<T>(dsv[0], dsv[1]);
      }
    __syncthreads();

    // dVj += Pᵀ · dOi and dKj += dSᵀ · Qi: this warp's 16 keys x kDw columns.
#pragma unroll
    for (int kk = 0; kk < kBlockM; kk += 16) {
      uint32_t ap[4], ads[4];
      load_a(ap, sP, kPStride, 16 * wn, kk, lane);
      load_a(ads, sdS, kPStride, 16 * wn, kk, lane);
#pragma unroll
      for (int dt = 0; dt < kDw / 8; dt += 2) {
        uint32_t bo[4], bq[4];
        load_b_kn(bo, sdO, kStride, kk, wd * kDw + dt * 8, lane);
        load_b_kn(bq, sQ, kStride, kk, wd * kDw + dt * 8, lane);
        mma_16816<T>(dv[dt], ap, bo[0], bo[1]);
        mma_16816<T>(dv[dt + 1], ap, bo[2], bo[3]);
        mma_16816<T>(dk[dt], ads, bq[0], bq[1]);
        mma_16816<T>(dk[dt + 1], ads, bq[2], bq[3]);
      }
    }

    // dQi += dS · Kj (unscaled; the convert pass applies scale): a 16-row x kDqCols share per warp.
    if (w.dq_accum) {
      const int rt = warp % C::kDqRowTiles, col0 = (warp / C::kDqRowTiles) * kDqCols;
      float dq[kDqCols / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kBlockN; kk += 16) {
        uint32_t a[4];
        load_a_trans(a, sdS, kPStride, 16 * rt, kk, lane);
#pragma unroll
        for (int dt = 0; dt < kDqCols / 8; dt += 2) {
          uint32_t bk[4];
          load_b_kn(bk, sK, kStride, kk, col0 + dt * 8, lane);
          mma_16816<T>(dq[dt], a, bk[0], bk[1]);
          mma_16816<T>(dq[dt + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int dt = 0; dt < kDqCols / 8; ++dt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t row = i0 + 16 * rt + g + 8 * r;
          const int col = col0 + dt * 8 + 2 * t;
          if (row < f.seq_q && col < head_dim) {
            float* dst = w.dq_accum + (bh * f.seq_q + row) * f.head_dim + col;
            atomicAdd(dst, dq[dt][2 * r]);
            atomicAdd(dst + 1, dq[dt][2 * r + 1]);
          }
        }
    }
  }
  cp_async_wait<0>();  // K and V copies are complete even when no query block saw this key block

  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_stride.b + hk * p.dk_stride.h;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_stride.b + hk * p.dv_stride.h;
  store_acc<kDw, T>(dk_out, p.dk_stride.s, j0 + 16 * wn, f.seq_k, wd * kDw, head_dim, dk, f.scale, lane);
  store_acc<kDw, T>(dv_out, p.dv_stride.s, j0 + 16 * wn, f.seq_k, wd * kDw, head_dim, dv, 1.0f, lane);
}

}  // namespace attnext::cuda
