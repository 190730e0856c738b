// 8-lane fp32 vector for AVX2 + FMA + F16C. Included by the AVX2 translation unit, and by the AVX-512 ones
// (vec_avx512.h) for their 8-lane vector.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <iterator>

namespace attnext::cpu {
namespace {

// 2^f for |f| <= 1/2 as a degree-5 series, highest power first (relative error at most 2.1e-7, under two
// fp32 roundings), shared by the exp2 of the AVX2 and AVX-512 units. Its constant term is exactly 1, so
// 2^0 = 1: the online softmax skips the rescale of rows whose maximum did not move, and a rescale by
// 1 + 2^-23 per tile would weigh early keys against late ones.
constexpr float kExp2Series[] = {1.3266970386e-3f, 9.6754597455e-3f, 5.5507426160e-2f,
                                 2.4022121754e-1f, 6.9314694916e-1f, 1.0f};

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

  // 2^x: x = n + f with n = round(x), |f| <= 1/2; 2^f by kExp2Series, times 2^n built in the exponent
  // bits. Adding 1.5·2^23 + 127 rounds x to an integer in the low mantissa bits, already biased by 127,
  // which the shift by 23 moves into the exponent field. x is clamped at -127 first: -inf (masked scores)
  // gives exactly 0.
  static T exp2(T x) {
    const T magic = _mm256_set1_ps(12582912.0f + 127.0f);
    const T xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // NaN stays NaN (maxps returns its second operand)
    const T t = _mm256_add_ps(xc, magic);
    const T f = _mm256_sub_ps(xc, _mm256_sub_ps(t, magic));
    T p = _mm256_set1_ps(kExp2Series[0]);
    for (size_t i = 1; i < std::size(kExp2Series); ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Series[i]));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }

  static T load_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  }
  // 2W bf16 as their W even and W odd elements, each pair's 32 bits widened by one shift and one mask
  // (the decode's split order; used by VecYmm, decode_tile.h kSplitBf16).
  static void load_bf16_pairs(const uint16_t* p, T& even, T& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static T load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
};

}  // namespace
}  // namespace attnext::cpu
