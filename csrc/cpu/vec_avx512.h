// 16-lane fp32 vector for AVX-512F, and an 8-lane one on AVX-512VL. Included only by the AVX-512 translation units.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/vec_avx2.h"

namespace attnext::cpu {
namespace {

// 8 fp32 lanes in ymm registers, all 32 of them with AVX-512VL: the decode's unit for 5-8 query rows per KV
// head, which would leave half of every 16-lane vector empty (on a Zen 4 core two ymm FMAs per cycle
// match one zmm FMA).
struct VecYmm : VecAvx2 {
  static constexpr int kRows = 8;  // micro-kernel rows: 8 x 2 vectors = 16 accumulators of 32 ymm
  static constexpr int kRegisters = 32;
  static constexpr const char* kName = "avx512 (ymm)";
};

struct VecAvx512 {
  using T = __m512;
  using Narrow = VecYmm;  // half the lanes, for problems that fill only half of them
  static constexpr int W = 16;     // fp32 lanes
  static constexpr int kRows = 8;  // micro-kernel rows: 8 x 2 vectors = 16 accumulators of 32 zmm
  static constexpr int kRegisters = 32;  // vector registers
  static constexpr const char* kName = "avx512";

  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
  static float reduce_add(T x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(T x) { return _mm512_reduce_max_ps(x); }
  template <int S>  // lane i <- lane i ^ S
  static T swap(T x) {
    if constexpr (S == 1) return _mm512_permute_ps(x, 0xB1);
    else if constexpr (S == 2) return _mm512_permute_ps(x, 0x4E);
    else if constexpr (S == 4) return _mm512_shuffle_f32x4(x, x, 0xB1);
    else return _mm512_shuffle_f32x4(x, x, 0x4E);
  }
  template <int S>  // lane i from a where bit S of i is clear, from b where it is set
  static T pick(T a, T b) {
    constexpr __mmask16 high = S == 1 ? 0xAAAA : S == 2 ? 0xCCCC : S == 4 ? 0xF0F0 : 0xFF00;
    return _mm512_mask_blend_ps(high, a, b);
  }

  // 2^x: x = n + f with n = round(x), |f| <= 1/2; 2^f by kExp2Series (vec_avx2.h) or another series
  // (highest power first), times 2^n by vscalefps. x < -126 (masked scores: -inf) gives exactly 0.
  static T exp2(T x) { return exp2_series(x, kExp2Series); }
  template <size_t N>
  static T exp2_series(T x, const float (&series)[N]) {
    const T n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm512_sub_ps(x, n);
    T p = _mm512_set1_ps(series[0]);
    for (size_t i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(series[i]));
    const __mmask16 visible = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
    return _mm512_maskz_scalef_ps(visible, p, n);
  }

  static T load_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  }
  static void load_bf16_pairs(const uint16_t* p, T& even, T& odd) {  // as VecAvx2::load_bf16_pairs
    const __m512i x = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static T load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
};

}  // namespace
}  // namespace attnext::cpu
