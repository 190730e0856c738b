// Emulated <cuda_fp16.h> for the CPU kernel emulation: IEEE half with round-to-nearest-even (F16C).
#pragma once

#include <immintrin.h>

#include <cstdint>

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline __half __float2half_rn(float f) { return {static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))}; }
inline float __half2float(__half h) { return _cvtsh_ss(h.bits); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
