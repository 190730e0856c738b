// The vector unit's own FMA ceiling: twelve independent accumulator chains (enough to cover the FMA
// latency on current cores) on the calling thread. Benchmarks report kernel throughput against it.
#pragma once

#include <chrono>
#include <cstdint>

namespace attnext::cpu {
namespace {

template <class V>
double fma_peak_impl(int64_t iters) {
  constexpr int kChains = 12;
  typename V::T acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = V::set1(1.0f + 1e-3f * static_cast<float>(i));
  const typename V::T b = V::set1(0.999999f), c = V::set1(1e-6f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = V::fma(acc[i], b, c);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sum = 0.0f;
  for (int i = 0; i < kChains; ++i) sum += V::reduce_add(acc[i]);
  volatile float sink = sum;  // keeps the chains alive
  (void)sink;
  return 2.0 * V::W * kChains * static_cast<double>(iters) / seconds / 1e9;
}

}  // namespace
}  // namespace attnext::cpu
