// The CPU units' vectorised 2^x against std::exp2 in double: the degree-5 series of the fp32 softmax
// (VecAvx2::exp2, VecAvx512::exp2) and the bf16 pair kernels' degree-3 one (exp2_bf16). Built with the
// avx512bf16 unit's flags; it uses AVX-512F/VL instructions only, and is skipped (exit code 77) on a CPU
// without them.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "expect.h"
#include "cpu/pair_ops.h"

namespace {

using attnext::test::expect;
using namespace attnext::cpu;

// exp2_fn over xs, `lanes` floats at a time (xs.size() a multiple of lanes).
template <class F>
std::vector<float> apply(const std::vector<float>& xs, int lanes, F exp2_fn) {
  std::vector<float> out(xs.size());
  for (size_t i = 0; i + lanes <= xs.size(); i += lanes) exp2_fn(xs.data() + i, out.data() + i);
  return out;
}

// Relative error at most max_rel on [-125, 8]; with exact_powers (a series whose constant term is 1), 2^n
// exact for whole n there; exactly 0 for x < zero_below and for -inf (masked scores).
template <class F>
void check_exp2(const char* name, int lanes, double max_rel, bool exact_powers, float zero_below, F exp2_fn) {
  std::vector<float> xs;
  for (double x = -125.0; x <= 8.0; x += 1.0 / 4096) xs.push_back(static_cast<float>(x));
  while (xs.size() % 16) xs.push_back(0.0f);
  const std::vector<float> ys = apply(xs, lanes, exp2_fn);
  double worst = 0.0;
  int inexact_powers = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double ref = std::exp2(static_cast<double>(xs[i]));
    worst = std::max(worst, std::abs(ys[i] / ref - 1.0));
    if (exact_powers && xs[i] == std::floor(xs[i]) && ys[i] != static_cast<float>(ref)) ++inexact_powers;
  }
  expect(worst <= max_rel, std::string(name) + ": relative error " + std::to_string(worst) + " > " +
                               std::to_string(max_rel));
  expect(inexact_powers == 0, std::string(name) + ": " + std::to_string(inexact_powers) + " powers of 2 inexact");

  std::vector<float> low(16, -INFINITY);  // -inf, then zero_below - 0.25, - 0.75, ...
  for (int i = 1; i < 16; ++i) low[i] = zero_below - 0.25f - 0.5f * static_cast<float>(i - 1);
  for (float y : apply(low, lanes, exp2_fn))
    expect(y == 0.0f, std::string(name) + ": 2^x not 0 below " + std::to_string(zero_below));
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512vl")) {
    std::printf("test_vector_exp: this CPU lacks AVX-512F/VL, skipped\n");
    return 77;
  }
  check_exp2("VecAvx2::exp2", 8, 2.5e-7, true, -127.0f, [](const float* x, float* y) {
    _mm256_storeu_ps(y, VecAvx2::exp2(_mm256_loadu_ps(x)));
  });
  check_exp2("VecAvx512::exp2", 16, 2.5e-7, true, -126.0f, [](const float* x, float* y) {
    _mm512_storeu_ps(y, VecAvx512::exp2(_mm512_loadu_ps(x)));
  });
  check_exp2("exp2_bf16", 16, 8e-5, false, -126.0f, [](const float* x, float* y) {
    _mm512_storeu_ps(y, exp2_bf16(_mm512_loadu_ps(x)));
  });
  return attnext::test::test_result("test_vector_exp");
}
