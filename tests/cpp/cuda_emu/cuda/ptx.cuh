// Emulated csrc/cuda/ptx.cuh: the same wrappers with the semantics of the PTX ISA, computed lane by lane
// on the CPU (tests/cpp/cuda_emu/emu_runtime.h). It shadows the real header through the include path.
// Fragment maps, with g = lane / 4 and t = lane % 4: A a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..),
// a3 (g+8, 2t+8..); B b0 (k = 2t.., n = g), b1 (k = 2t+8.., n = g); C c0, c1 (g, 2t..), c2, c3 (g+8, 2t..).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "emu_runtime.h"

namespace attnext::cuda {

// Asynchronous copies: queued by the issuing thread, landed by its wait (emu::complete_copies).
inline void cp_async_16(void* dst, const void* src, bool valid) {
  emu::Copy c{dst, {}};
  if (valid) std::memcpy(c.bytes, src, 16);
  emu::self().uncommitted.push_back(c);
}
inline void cp_async_commit() {
  emu::Fiber& f = emu::self();
  f.committed.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}
template <int n>
inline void cp_async_wait() { emu::complete_copies(n); }

namespace detail {
inline uint16_t element(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * col, 2);
  return v;
}
inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

template <bool kTrans>
inline void ldmatrix(uint32_t (&r)[4], const void* row) {
  emu::exchange(row, [&](auto read) {
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int m = 0; m < 4; ++m) {
      if (!kTrans)  // (row g, cols 2t, 2t+1) of matrix m
        r[m] = pair(element(read(8 * m + g), 2 * t), element(read(8 * m + g), 2 * t + 1));
      else  // (rows 2t, 2t+1, col g) of matrix m
        r[m] = pair(element(read(8 * m + 2 * t), g), element(read(8 * m + 2 * t + 1), g));
    }
  });
}
}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { detail::ldmatrix<false>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { detail::ldmatrix<true>(r, row); }

template <class T>
inline float to_float(T x);
template <>
inline float to_float<__half>(__half x) { return __half2float(x); }
template <>
inline float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
inline T from_float(float x);
template <>
inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <class T>
inline float half_of(uint32_t reg, int high) { return to_float(T{static_cast<uint16_t>(high ? reg >> 16 : reg)}); }

struct MmaInputs {
  uint32_t a[4], b0, b1;
};

// c += a · b, every product exact and the sum of 16 in double (the tensor cores keep at least fp32).
template <class T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaInputs mine{{a[0], a[1], a[2], a[3]}, b0, b1};
  emu::exchange(mine, [&](auto read) {
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) {
        const MmaInputs ta = read((row % 8) * 4 + (k % 8) / 2);  // lane holding A(row, k)
        const float av = half_of<T>(ta.a[(row >= 8) + 2 * (k >= 8)], k % 2);
        const MmaInputs tb = read(col * 4 + (k % 8) / 2);  // lane holding B(k, col)
        const float bv = half_of<T>(k >= 8 ? tb.b1 : tb.b0, k % 2);
        sum += double(av) * double(bv);
      }
      c[e] = float(double(c[e]) + sum);
    }
  });
}

template <class T>
inline uint32_t pack2(float x, float y) {
  return detail::pair(from_float<T>(x).bits, from_float<T>(y).bits);
}

inline float fast_exp2(float x) { return exp2f(x); }

inline float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

inline float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace attnext::cuda
