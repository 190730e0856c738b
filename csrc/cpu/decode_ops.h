// The products and the online softmax of the decode-shaped forward (decode_impl.h): the scores in dot
// form (few rows: dot products along the head dim), P · Vj with Vj rows read in order, and the per-lane
// online softmax over Sᵀ, stored key-major with R lanes per key.
#pragma once

#include "cpu/tile_ops.h"

namespace attnext::cpu {
namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();

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

// The dot form's products on bf16 K read in pairs, for units without vdpbf16ps: 2W columns per step, whose
// even and odd elements widen by one shift and one mask each (V::load_bf16_pairs; the plain widening takes
// two instructions per W), against query rows stored in the same split order (split_columns).
template <class V>
struct SplitBf16Dot {
  using Q = float;
  struct Chunk {
    typename V::T even, odd;
  };
  static constexpr int kCols = 2 * V::W;
  static Chunk load_q(const float* q) { return {V::load(q), V::load(q + V::W)}; }
  static Chunk load_k(const Bf16* k) {
    Chunk c;
    V::load_bf16_pairs(reinterpret_cast<const uint16_t*>(k), c.even, c.odd);
    return c;
  }
  static typename V::T add_product(typename V::T acc, Chunk k, Chunk q) {
    return V::fma(k.odd, q.odd, V::fma(k.even, q.even, acc));
  }
};

// x[0, n) between natural and split column order: per 2W columns, the W even ones, then the W odd ones
// (join: back). n is a multiple of 2W.
template <class V>
void split_columns(float* x, int64_t n, bool join) {
  float tmp[2 * V::W];
  for (int64_t c = 0; c < n; c += 2 * V::W) {
    for (int i = 0; i < V::W; ++i) {
      if (join) tmp[2 * i] = x[c + i], tmp[2 * i + 1] = x[c + V::W + i];
      else tmp[i] = x[c + 2 * i], tmp[V::W + i] = x[c + 2 * i + 1];
    }
    std::copy_n(tmp, 2 * V::W, x + c);
  }
}

// Sᵀ = Kj · Qᵀ · mul for nk keys in dot form: lane i of each vector is key i / R against query row i % R.
// Per Dot::kCols columns, the R query chunks are loaded once and each of the W/R key chunks once: W
// accumulators take R·(W/R) products with no chain between them, and the W lane sums of the vector come
// out of one transpose_sum. Keys past nk (the last vector's padding) repeat key nk - 1 and are masked
// later. With one row (R = 1) the W keys of a vector are W rows of K: taken column by column they would
// be read W rows at a time, out of address order, which the hardware prefetchers do not follow; there each
// K row is read whole, in order, with the query chunks reloaded from L1. A key's sum is then one chain of
// FMAs; on 8-lane units (16 steps at D = 128, 64 cycles of FMA latency per key) it runs as two chains
// (the avx2 unit on a Zen 4 core: bf16 1.23-1.25x, fp32 1.06-1.10x, in the caches and from memory; on
// 16 lanes two chains ran 0.80-0.89x from memory). ahead.next() is called once per key chunk read
// (scores_dot_steps times).
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
      for (int kk = 0; kk < kKeys; ++kk) {
        typename V::T odd = V::zero();  // the second chain's sum (8-lane units)
        int64_t c = 0;
        if constexpr (V::W == 8) {
          for (; c + 2 * Dot::kCols <= Dp; c += 2 * Dot::kCols) {
            ahead.next(step++);
            acc[kk] = Dot::add_product(acc[kk], Dot::load_k(kj[kk] + c), Dot::load_q(q + c));
            ahead.next(step++);
            odd = Dot::add_product(odd, Dot::load_k(kj[kk] + c + Dot::kCols), Dot::load_q(q + c + Dot::kCols));
          }
        }
        for (; c < Dp; c += Dot::kCols) {
          ahead.next(step++);
          acc[kk] = Dot::add_product(acc[kk], Dot::load_k(kj[kk] + c), Dot::load_q(q + c));
        }
        if constexpr (V::W == 8) acc[kk] = V::add(acc[kk], odd);
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
  return scores_dot<V, Dot, 4>(k, k_stride, nk, q, Dp, mul, s_t, ahead);
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
  if constexpr (!std::is_same_v<TV, Bf16Split>)  // split rows come in multiples of 4 vectors
    for (; n < Dp; n += V::W) gemm_block<V, Rows, 1>(nk, p_t, 1, R, v + n, v_stride, acc + n, Dp, true, &ahead);
}

template <class V>
constexpr int kPassRows = std::max(1, 2 * V::kRows / 8);  // 16 accumulators on AVX-512

// With the rows as lanes (more than 4 rows on AVX-512, zmm or ymm) P · Vj runs in blocks of 4 rows x 4
// vectors, so each Vj element is loaded (and widened) once per 4 rows instead of per 2: +9-19% with 16 rows
// on a Zen 4 core. With 4 rows (the dot form) fp32 lost 2-10% that way: it keeps the 2 x 8 blocks. (bf16
// with D a multiple of 64 takes pv_pairs instead, decode_bf16_pairs.h.) With 32 registers: 16 accumulators
// and the loaded Vj vectors. AVX2's 16 registers hold 4 rows x 2 vectors (8 accumulators), which it takes
// from 4 rows on: its passes hold one row (8 vectors), so each Vj element was loaded once per row (bf16
// 4 rows, K/V from memory: 1.5x on a Zen 4 core running the avx2 unit).
template <class V>
constexpr int kQuadVecs = V::kRegisters == 32 ? 4 : 2;

template <class V>
constexpr bool pv_quads(int64_t rows, int64_t Dp) {
  const bool enough_rows = V::kRegisters == 32 ? rows > 4 : V::kRegisters == 16 && rows >= 4;
  return enough_rows && Dp % (kQuadVecs<V> * V::W) == 0;
}

template <class V>
constexpr int64_t pv_steps(int64_t rows, int64_t nk, int64_t Dp) {
  const int64_t blocks = Dp / (8 * V::W) + (Dp % (8 * V::W) >= 4 * V::W) + Dp % (4 * V::W) / V::W;
  const int64_t quads = pv_quads<V>(rows, Dp) ? rows / 4 : 0, rest = rows - 4 * quads;
  return (quads * (Dp / (kQuadVecs<V> * V::W)) + (rest + kPassRows<V> - 1) / kPassRows<V> * blocks) * nk;
}

template <class V, class TV>
void pv(int64_t rows, int64_t nk, const float* p_t, int64_t R, const TV* v, int64_t v_stride, float* acc, int64_t Dp,
        LinesAhead& ahead) {
  constexpr int kRows = kPassRows<V>;
  int64_t r = 0;
  if (pv_quads<V>(rows, Dp)) {
    for (; r + 4 <= rows; r += 4)
      for (int64_t n = 0; n < Dp; n += kQuadVecs<V> * V::W)
        gemm_block<V, 4, kQuadVecs<V>>(nk, p_t + r, 1, R, v + n, v_stride, acc + r * Dp + n, Dp, true, &ahead);
  }
  for (; r < rows; r += kRows) {
    if (r + kRows <= rows) pv_pass<V, kRows>(nk, p_t + r, R, v, v_stride, acc + r * Dp, Dp, ahead);
    else pv_pass<V, 1>(nk, p_t + r, R, v, v_stride, acc + r * Dp, Dp, ahead);
  }
}

// Online softmax over one key tile, per lane: m_new = max(m, max_j Sᵀ_j), Pᵀ = 2^(Sᵀ - m_new) in place,
// alpha = 2^(m - m_new), l ← l·alpha + Σ_j Pᵀ_j. The lane pattern repeats every max(R, W) floats; m and
// alpha hold the same value in every lane of a row, l its per-lane partial sums (folded at the end).
// lane_max (max(R, W) floats), when given: max_j Sᵀ_j per lane, taken as the scores were stored.
template <class V>
void online_softmax(float* s_t, int64_t n_vec, int64_t R, float* m, float* l, float* alpha,
                    const float* lane_max = nullptr) {
  using VT = typename V::T;
  const int64_t period = std::max<int64_t>(1, R / V::W);  // vectors per period of the pattern
  for (int64_t c = 0; c < period; ++c) {
    VT mx = V::set1(kNegInf), sum = V::zero();
    if (lane_max) mx = V::load(lane_max + c * V::W);
    else for (int64_t v = c; v < n_vec; v += period) mx = V::max(mx, V::load(s_t + v * V::W));
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

}  // namespace
}  // namespace attnext::cpu
