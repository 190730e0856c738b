// 8-lane fp32 vector for AVX2 + FMA + F16C. Included by the AVX2 translation unit, and by the AVX-512 ones
// (vec_avx512.h) for their 8-lane vector.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace attnext::cpu {
namespace {

struct VecAvx2 {
  using T = __m256;
  using Narrow = void;  // no narrower unit (vec_avx512.h)
  static constexpr int W = 8;      // fp32 lanes
  static constexpr int kRows = 6;  // micro-kernel rows: 6 x 2 vectors = 12 accumulators of 16 ymm
  static constexpr int kRegisters = 16;  // vector registers
  static constexpr const char* kName = "avx2";

  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c

  static float reduce_add(T x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float reduce_max(T x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  template <int S>  // lane i <- lane i ^ S
  static T swap(T x) {
    if constexpr (S == 1) return _mm256_permute_ps(x, 0xB1);
    else if constexpr (S == 2) return _mm256_permute_ps(x, 0x4E);
    else return _mm256_permute2f128_ps(x, x, 1);
  }
  template <int S>  // lane i from a where bit S of i is clear, from b where it is set
  static T pick(T a, T b) { return _mm256_blend_ps(a, b, S == 1 ? 0xAA : S == 2 ? 0xCC : 0xF0); }

  // 2^x: x = n + f with n = round(x), |f| <= 1/2; 2^f by its degree-6 Taylor series in f·ln2
  // (relative error < 2e-7), 2^n written into the exponent bits. x < -126 gives exactly 0.
  static T exp2(T x) {
    const T xc = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    const T n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm256_sub_ps(xc, n);
    T p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const T r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ), r);
  }

  static T load_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  }
  static T load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
};

}  // namespace
}  // namespace attnext::cpu
