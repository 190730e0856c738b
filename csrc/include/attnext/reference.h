// Scalar double-precision reference of the contract: the ground truth for the C++ kernel tests.
// Contiguous (B, H, S, D) float inputs; results in double.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attnext/mask.h"

namespace attnext::reference {

struct Shape {
  int64_t batch, heads_q, heads_kv, seq_q, seq_k, head_dim;
};

// P_ij = softmax_j(scale · q_i · k_j) over the visible keys of row i; returns P and lse.
inline void probabilities(const Shape& s, const float* q, const float* k, double scale, const MaskSpec& m,
                          int64_t b, int64_t h, std::vector<double>& p, std::vector<double>& lse) {
  const int64_t hk = h / (s.heads_q / s.heads_kv);
  p.assign(s.seq_q * s.seq_k, 0.0);
  lse.assign(s.seq_q, -std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < s.seq_q; ++i) {
    const int64_t kb = key_begin(m, i, s.seq_k), ke = key_end(m, i, s.seq_k);
    if (ke <= kb) continue;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = kb; j < ke; ++j) {
      double dot = 0.0;
      for (int64_t d = 0; d < s.head_dim; ++d)
        dot += double(q[((b * s.heads_q + h) * s.seq_q + i) * s.head_dim + d]) *
               double(k[((b * s.heads_kv + hk) * s.seq_k + j) * s.head_dim + d]);
      p[i * s.seq_k + j] = dot * scale;
      mx = std::max(mx, dot * scale);
    }
    double sum = 0.0;
    for (int64_t j = kb; j < ke; ++j) sum += std::exp(p[i * s.seq_k + j] - mx);
    for (int64_t j = kb; j < ke; ++j) p[i * s.seq_k + j] = std::exp(p[i * s.seq_k + j] - mx) / sum;
    lse[i] = mx + std::log(sum);
  }
}

// out = P V, lse per row.
inline void forward(const Shape& s, const float* q, const float* k, const float* v, double scale, const MaskSpec& m,
                    std::vector<double>& out, std::vector<double>& lse) {
  out.assign(s.batch * s.heads_q * s.seq_q * s.head_dim, 0.0);
  lse.assign(s.batch * s.heads_q * s.seq_q, 0.0);
  std::vector<double> p, l;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads_q; ++h) {
      probabilities(s, q, k, scale, m, b, h, p, l);
      const int64_t hk = h / (s.heads_q / s.heads_kv);
      for (int64_t i = 0; i < s.seq_q; ++i) {
        lse[(b * s.heads_q + h) * s.seq_q + i] = l[i];
        for (int64_t d = 0; d < s.head_dim; ++d) {
          double acc = 0.0;
          for (int64_t j = 0; j < s.seq_k; ++j)
            acc += p[i * s.seq_k + j] * double(v[((b * s.heads_kv + hk) * s.seq_k + j) * s.head_dim + d]);
          out[((b * s.heads_q + h) * s.seq_q + i) * s.head_dim + d] = acc;
        }
      }
    }
}

// dQ, dK, dV for upstream gradient dout: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - rowsum(dP ∘ P)),
// dQ = scale · dS K, dK = scale · dSᵀ Q (dK, dV summed over each GQA group).
inline void backward(const Shape& s, const float* q, const float* k, const float* v, const float* dout, double scale,
                     const MaskSpec& m, std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
  const int64_t D = s.head_dim;
  dq.assign(s.batch * s.heads_q * s.seq_q * D, 0.0);
  dk.assign(s.batch * s.heads_kv * s.seq_k * D, 0.0);
  dv.assign(s.batch * s.heads_kv * s.seq_k * D, 0.0);
  std::vector<double> p, l, dp(s.seq_k);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads_q; ++h) {
      probabilities(s, q, k, scale, m, b, h, p, l);
      const int64_t hk = h / (s.heads_q / s.heads_kv);
      const int64_t qo = (b * s.heads_q + h) * s.seq_q * D, ko = (b * s.heads_kv + hk) * s.seq_k * D;
      for (int64_t i = 0; i < s.seq_q; ++i) {
        double delta = 0.0;
        for (int64_t j = 0; j < s.seq_k; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += double(dout[qo + i * D + d]) * double(v[ko + j * D + d]);
          dp[j] = dot;
          delta += dot * p[i * s.seq_k + j];
        }
        for (int64_t j = 0; j < s.seq_k; ++j) {
          const double pij = p[i * s.seq_k + j], ds = pij * (dp[j] - delta);
          for (int64_t d = 0; d < D; ++d) {
            dv[ko + j * D + d] += pij * double(dout[qo + i * D + d]);
            dq[qo + i * D + d] += scale * ds * double(k[ko + j * D + d]);
            dk[ko + j * D + d] += scale * ds * double(q[qo + i * D + d]);
          }
        }
      }
    }
}

}  // namespace attnext::reference
