// Portable 8-lane fp32 "vector" of plain floats: the unit for CPUs without AVX2 (and for other
// architectures). The compiler vectorises the lane loops with whatever baseline ISA it targets.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace attnext::cpu {
namespace {

struct VecScalar {
  struct T {
    float x[8];
  };
  static constexpr int W = 8;
  static constexpr int kRows = 4;
  static constexpr int kRegisters = 0;  // none: the lanes are plain arrays
  using Narrow = void;  // no narrower unit (vec_avx512.h)
  static constexpr const char* kName = "scalar";

  template <class F>
  static T map(F f) {
    T r;
    for (int i = 0; i < W; ++i) r.x[i] = f(i);
    return r;
  }
  static T zero() { return set1(0.0f); }
  static T set1(float v) { return map([&](int) { return v; }); }
  static T load(const float* p) { T r; std::memcpy(r.x, p, sizeof(r.x)); return r; }
  static void store(float* p, T a) { std::memcpy(p, a.x, sizeof(a.x)); }
  static T add(T a, T b) { return map([&](int i) { return a.x[i] + b.x[i]; }); }
  static T sub(T a, T b) { return map([&](int i) { return a.x[i] - b.x[i]; }); }
  static T mul(T a, T b) { return map([&](int i) { return a.x[i] * b.x[i]; }); }
  static T max(T a, T b) { return map([&](int i) { return a.x[i] > b.x[i] ? a.x[i] : b.x[i]; }); }
  static T fma(T a, T b, T c) { return map([&](int i) { return a.x[i] * b.x[i] + c.x[i]; }); }
  template <int S>  // lane i <- lane i ^ S
  static T swap(T a) { return map([&](int i) { return a.x[i ^ S]; }); }
  template <int S>  // lane i from a where bit S of i is clear, from b where it is set
  static T pick(T a, T b) { return map([&](int i) { return (i & S) ? b.x[i] : a.x[i]; }); }
  static T exp2(T a) { return map([&](int i) { return a.x[i] < -126.0f ? 0.0f : std::exp2(a.x[i]); }); }
  static float reduce_add(T a) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += a.x[i];
    return s;
  }
  static float reduce_max(T a) {
    float s = a.x[0];
    for (int i = 1; i < W; ++i) s = a.x[i] > s ? a.x[i] : s;
    return s;
  }

  static T load_bf16(const uint16_t* p) {
    return map([&](int i) {
      const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    });
  }
  static T load_half(const uint16_t* p) { return map([&](int i) { return half_to_float(p[i]); }); }

  // IEEE binary16 <-> binary32 in software, round to nearest even.
  static float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    float mag;
    if (exp == 0) mag = std::ldexp(static_cast<float>(man), -24);
    else if (exp == 31) mag = man ? NAN : INFINITY;
    else mag = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
    uint32_t bits;
    std::memcpy(&bits, &mag, 4);
    bits |= sign;
    std::memcpy(&mag, &bits, 4);
    return mag;
  }
  static uint16_t float_to_half(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const float a = std::fabs(f);
    if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
    if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);
    if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24
      return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)));
    }
    int e;
    const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    uint32_t man = static_cast<uint32_t>(std::nearbyint(m * 2048.0f));  // 11 significant bits
    if (man == 2048u) { man = 1024u; ++e; }
    const uint32_t exp = static_cast<uint32_t>(e + 14);
    if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | (exp << 10) | (man & 0x3ffu));
  }
};

}  // namespace
}  // namespace attnext::cpu
