// The GPU kernels' block scheduling and online-softmax arithmetic (attnext/blocks.h), checked on the CPU
// against brute force: which key blocks a query block visits, which tiles skip the element mask, and the
// base-2 online softmax that the forward and backward kernels run per row.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "expect.h"
#include "attnext/blocks.h"

using namespace attnext;

namespace {

using test::expect;

bool visible(const MaskSpec& m, int64_t i, int64_t j, int64_t seq_k) {
  return j >= key_begin(m, i, seq_k) && j < key_end(m, i, seq_k);
}

// Any visible pair in rows [i0, i1) x keys [j0, j1)?
bool any_visible(const MaskSpec& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t seq_k) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j)
      if (visible(m, i, j, seq_k)) return true;
  return false;
}

std::vector<MaskSpec> masks(int64_t sq, int64_t sk) {
  std::vector<MaskSpec> out;
  for (int kind = 0; kind <= 2; ++kind) out.push_back(make_mask(MaskKind(kind), sq, sk, -1, -1));
  const int64_t windows[][2] = {{0, 0}, {3, 0}, {0, 5}, {17, 2}, {-1, 4}, {9, -1}, {64, 64}};
  for (auto& w : windows) out.push_back(make_mask(MaskKind::kWindow, sq, sk, w[0], w[1]));
  out.push_back(make_mask(MaskKind::kCausalBottomRight, sq, sk, 7, -1));
  return out;
}

void test_block_ranges() {
  const int64_t sizes[][2] = {{1, 1}, {17, 113}, {113, 17}, {203, 203}, {64, 130}, {130, 64}, {1, 300}, {257, 3}};
  const int64_t tiles[][2] = {{128, 64}, {64, 32}, {16, 16}, {64, 64}};
  for (auto& sz : sizes)
    for (const MaskSpec& m : masks(sz[0], sz[1]))
      for (auto& tl : tiles) {
        const int64_t sq = sz[0], sk = sz[1], bm = tl[0], bn = tl[1];
        const std::string where = "sq " + std::to_string(sq) + " sk " + std::to_string(sk) + " offset " +
                                  std::to_string(m.offset) + " window (" + std::to_string(m.left) + ", " +
                                  std::to_string(m.right) + ") tile " + std::to_string(bm) + "x" + std::to_string(bn);
        for (int64_t i0 = 0; i0 < sq; i0 += bm) {
          const int64_t i1 = std::min(i0 + bm, sq);
          const BlockRange r = key_block_range(m, i0, i1, sk, bn);
          for (int64_t n = 0; n * bn < sk; ++n) {
            const int64_t j0 = n * bn, j1 = std::min(j0 + bn, sk);
            const bool needed = any_visible(m, i0, i1, j0, j1, sk);
            const bool in_range = n >= r.first && n < r.end;
            expect(!needed || in_range, "key block " + std::to_string(n) + " skipped but visible: " + where);
            if (in_range && (n == r.first || n == r.end - 1))
              expect(needed, "key range end " + std::to_string(n) + " has nothing visible: " + where);
            // A tile without the element mask must be visible everywhere and end at or before seq_k.
            if (!tile_needs_mask(m, i0, i1, j0, j0 + bn, sk)) {
              expect(j0 + bn <= sk, "unmasked tile past seq_k: " + where);
              for (int64_t i = i0; i < i1; ++i)
                for (int64_t j = j0; j < j1; ++j) expect(visible(m, i, j, sk), "unmasked tile hides a pair: " + where);
            }
            for (int64_t i = i0; i < i1; ++i) {
              const TileKeys keys = tile_keys(m, i, j0, int(bn), sk);
              for (int64_t j = j0; j < j0 + bn; ++j)
                expect(keys.contains(int(j - j0)) == (j < sk && visible(m, i, j, sk)), "tile_keys: " + where);
            }
          }
        }
        for (int64_t j0 = 0; j0 < sk; j0 += bn) {
          const int64_t j1 = std::min(j0 + bn, sk);
          const BlockRange r = query_block_range(m, j0, j1, sq, bm);
          for (int64_t n = 0; n * bm < sq; ++n) {
            const bool needed = any_visible(m, n * bm, std::min(n * bm + bm, sq), j0, j1, sk);
            expect(!needed || (n >= r.first && n < r.end), "query block skipped but visible: " + where);
          }
        }
      }
}

// The forward's recurrence over key blocks, per row: m_i, l_i, acc in base 2, against double precision.
void test_online_softmax() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial % 97, block = 1 + trial % 13;
    const double masked_share = (trial % 5) / 4.0;  // 1.0: the row sees nothing
    std::vector<float> s(n), v(n);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int j = 0; j < n; ++j) {
      s[j] = u(rng) < masked_share ? -INFINITY : normal(rng);
      v[j] = normal(rng);
    }
    float m_i = -INFINITY, l_i = 0.0f, acc = 0.0f;
    for (int j0 = 0; j0 < n; j0 += block) {
      const int j1 = std::min(j0 + block, n);
      float row_max = m_i;
      for (int j = j0; j < j1; ++j) row_max = std::fmax(row_max, s[j]);
      const float alpha = softmax_rescale(m_i, row_max), offset = softmax_offset(row_max);
      m_i = row_max;
      float row_sum = 0.0f, pv = 0.0f;
      for (int j = j0; j < j1; ++j) {
        const float p = exp2f(s[j] - offset);
        row_sum += p;
        pv += p * v[j];
      }
      l_i = l_i * alpha + row_sum;
      acc = acc * alpha + pv;
    }
    double mx = -INFINITY, l = 0.0, o = 0.0;
    for (int j = 0; j < n; ++j) mx = std::fmax(mx, double(s[j]));
    for (int j = 0; j < n; ++j)
      if (s[j] != -INFINITY) l += std::exp2(s[j] - mx), o += std::exp2(s[j] - mx) * v[j];
    const float lse = lse_from_base2(m_i, l_i), out = l_i > 0.0f ? acc / l_i : 0.0f;
    const std::string where = "trial " + std::to_string(trial);
    expect(!std::isnan(lse) && !std::isnan(out), "NaN in online softmax: " + where);
    if (l == 0.0) {
      expect(lse == -INFINITY && out == 0.0f && l_i == 0.0f, "row with no key: lse -inf and out 0: " + where);
      continue;
    }
    const double ref_lse = (mx + std::log2(l)) * std::log(2.0), ref_out = o / l;
    expect(std::fabs(lse - ref_lse) < 1e-4 * (1.0 + std::fabs(ref_lse)), "lse: " + where);
    expect(std::fabs(out - ref_out) < 1e-4 * (1.0 + std::fabs(ref_out)), "out: " + where);
    // The backward recomputes P_j = exp2(s_j - lse·log2 e); they must sum to 1.
    double p_sum = 0.0;
    for (int j = 0; j < n; ++j) p_sum += exp2f(s[j] - lse_to_base2_offset(lse));
    expect(std::fabs(p_sum - 1.0) < 1e-4, "backward P does not sum to 1: " + where);
  }
  expect(lse_to_base2_offset(-INFINITY) == INFINITY && exp2f(1.0f - lse_to_base2_offset(-INFINITY)) == 0.0f,
         "a row with no key gets P = 0 in the backward");
}

void test_head_dim_buckets() {
  expect(cuda_head_dim_bucket(8) == 32 && cuda_head_dim_bucket(32) == 32 && cuda_head_dim_bucket(40) == 64,
         "buckets up to 64");
  expect(cuda_head_dim_bucket(96) == 96 && cuda_head_dim_bucket(104) == 128 && cuda_head_dim_bucket(136) == 192,
         "buckets 96..192");
  expect(cuda_head_dim_bucket(256) == 256 && cuda_head_dim_bucket(264) == 0 && cuda_head_dim_bucket(0) == 0 &&
             cuda_head_dim_bucket(60) == 0,
         "unsupported head dims");
}

}  // namespace

int main() {
  test_block_ranges();
  test_online_softmax();
  test_head_dim_buckets();
  return test::test_result("blocks");
}
