// Building blocks of the CPU kernels, written once over a vector unit V (VecAvx2, VecAvx512,
// VecScalar): element conversion, tile packing, the register-blocked micro-kernel and the softmax
// row passes. Everything sits in an anonymous namespace: each ISA translation unit compiles its own
// private copy with its own instruction set, so no symbol built for one ISA can leak into another.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "attnext/params.h"

namespace attnext::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16-bit storage types; arithmetic always happens in fp32.
struct Bf16 { uint16_t bits; };
struct Half { uint16_t bits; };
// bf16 rows read in split order (gemm_block's B): each 2W elements widen as pairs (V::load_bf16_pairs) into
// the W even columns, then the W odd ones, so the product's columns come out in that order too.
struct Bf16Split { uint16_t bits; };

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch tiles start on a 64-byte line, so that rows a whole number of vectors long are read and written
// as whole vectors that never straddle two lines (malloc gives 16 bytes: on a Zen 4 core the AVX2 fp32
// forward lost 9-10% to input rows read 16 bytes off a line). One malloc of 64 bytes more per buffer, the
// line inside it, and malloc's pointer kept just before that line (aligned operator new took 0.6-0.8 µs
// more per decode call of 32 KV heads, which allocates a few buffers per call).
template <class T>
struct LineAllocator {
  using value_type = T;
  static constexpr uintptr_t kLine = 64;
  LineAllocator() = default;
  template <class U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* raw = std::malloc(n * sizeof(T) + kLine);
    if (raw == nullptr) throw std::bad_alloc();
    const uintptr_t line = (reinterpret_cast<uintptr_t>(raw) + kLine) & ~(kLine - 1);  // > raw + 8
    reinterpret_cast<void**>(line)[-1] = raw;
    return reinterpret_cast<T*>(line);
  }
  void deallocate(T* p, size_t) { std::free(reinterpret_cast<void**>(p)[-1]); }
  template <class U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <class T>
using LineVector = std::vector<T, LineAllocator<T>>;

template <class V>
struct Convert {
  static float to_float(float x) { return x; }
  static float to_float(Bf16 x) {
    const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static float to_float(Half x) { return V::half_to_float(x.bits); }

  static void store(float f, float* dst) { *dst = f; }
  static void store(float f, Bf16* dst) {  // round to nearest even; NaN stays NaN
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) { dst->bits = static_cast<uint16_t>((bits >> 16) | 0x40u); return; }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    dst->bits = static_cast<uint16_t>(bits >> 16);
  }
  static void store(float f, Half* dst) { dst->bits = V::float_to_half(f); }
};

// V::W consecutive elements widened to fp32 in registers.
template <class V>
typename V::T load_float(const float* p) { return V::load(p); }
template <class V>
typename V::T load_float(const Bf16* p) { return V::load_bf16(reinterpret_cast<const uint16_t*>(p)); }
template <class V>
typename V::T load_float(const Half* p) { return V::load_half(reinterpret_cast<const uint16_t*>(p)); }

// dst[r][c] = src[r * row_stride + c] * mul for r < rows, c < cols; columns [cols, ld) are zero.
template <class V, class T>
void pack_rows(const T* src, int64_t row_stride, int64_t rows, int64_t cols, float mul, float* dst, int64_t ld) {
  const typename V::T mv = V::set1(mul);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    float* d = dst + r * ld;
    int64_t c = 0;
    for (; c + V::W <= cols; c += V::W) V::store(d + c, V::mul(load_float<V>(s + c), mv));
    for (; c < cols; ++c) d[c] = Convert<V>::to_float(s[c]) * mul;
    for (int64_t c = cols; c < ld; ++c) d[c] = 0.0f;
  }
}

// x[i][l] <-> x[l][i] for V::W vectors x (a W x W transpose in registers): at each stride S, rows i and
// i + S (bit S of i clear) exchange the blocks of S lanes that lie off the diagonal.
template <class V, int S = V::W / 2>
[[gnu::always_inline]] inline void transpose_block(typename V::T* x) {
#pragma GCC unroll 16
  for (int i = 0; i < V::W; ++i) {
    if (i & S) continue;
    const typename V::T a = x[i], b = x[i + S];
    x[i] = V::template pick<S>(a, V::template swap<S>(b));
    x[i + S] = V::template pick<S>(V::template swap<S>(a), b);
  }
  if constexpr (S > 1) transpose_block<V, S / 2>(x);
}

// dst[c][r] = src[r * row_stride + c] * mul for r < rows, c < cols (a transpose); rows [rows, ld) are
// zero. Whole W x W blocks go through registers; the edges element by element.
template <class V, class T>
void pack_transposed(const T* src, int64_t row_stride, int64_t rows, int64_t cols, float mul, float* dst,
                     int64_t ld) {
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, 0.0f);
  const typename V::T mv = V::set1(mul);
  int64_t r = 0;
  for (; r + V::W <= rows; r += V::W) {
    int64_t c = 0;
    for (; c + V::W <= cols; c += V::W) {
      typename V::T x[V::W];
#pragma GCC unroll 16
      for (int i = 0; i < V::W; ++i) x[i] = load_float<V>(src + (r + i) * row_stride + c);
      transpose_block<V>(x);
#pragma GCC unroll 16
      for (int i = 0; i < V::W; ++i) V::store(dst + (c + i) * ld + r, V::mul(x[i], mv));
    }
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + V::W; ++i) dst[c * ld + i] = Convert<V>::to_float(src[i * row_stride + c]) * mul;
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = Convert<V>::to_float(src[r * row_stride + c]) * mul;
}

// dst[r * row_stride + c] = src[r][c] * mul, converted to the storage type.
template <class V, class T>
void unpack_rows(const float* src, int64_t ld, int64_t rows, int64_t cols, float mul, T* dst, int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) Convert<V>::store(src[r * ld + c] * mul, dst + r * row_stride + c);
}

// Asks the caches for rows [0, rows) of a strided matrix ahead of their use (one request per 64-byte
// line), into L2 rather than L1 (locality 1: prefetcht2 on x86), so that they do not evict the tile in use.
template <class T>
inline void prefetch_rows(const T* src, int64_t row_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(src + r * row_stride);
    for (int64_t byte = 0; byte < cols * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(row + byte, 0, 1);
  }
}

// The lines of one span of memory, [line, end), requested in address order, `count` of them at each step k
// of a product with k & mask == 0: the memory system always has the next rows in flight while the core
// computes, and the requests never pile up (a burst of them stalls the core on the miss queue, then
// leaves memory idle).
struct LinesAhead {
  const char* line;
  const char* end;
  int64_t mask, count;
  void next(int64_t step) {
    if ((step & mask) != 0) return;
    for (int64_t i = 0; i < count && line < end; ++i, line += 64) __builtin_prefetch(line, 0, 1);
  }
};

// A LinesAhead over n rows of row_bytes, stride bytes apart, spread over `steps` calls of next(): paced when
// the rows lie back to back, otherwise requested here at once.
inline LinesAhead lines_ahead(const void* first, int64_t n, int64_t stride, int64_t row_bytes, int64_t steps) {
  const char* begin = static_cast<const char*>(first);
  // Nothing to request (yet): a mask no step number clears makes next() return at once.
  LinesAhead ahead{begin, begin, std::numeric_limits<int64_t>::max(), 1};
  if (n <= 0) return ahead;
  if (stride != row_bytes) {
    prefetch_rows(begin, stride, n, row_bytes);
    return ahead;
  }
  ahead.end = begin + n * row_bytes;
  ahead.mask = 0;
  const int64_t lines = (n * row_bytes + 63) / 64;
  while (ahead.count * std::max<int64_t>(steps, 1) < lines) ahead.count *= 2;
  while ((ahead.mask + 1) * 2 * lines <= steps) ahead.mask = ahead.mask * 2 + 1;
  return ahead;
}

// One request per 4 KiB page of [first, first + bytes), well ahead of the stream that will read the pages
// whole (paced requests or the hardware prefetchers): each page's address translation happens here, off
// that stream's path.
inline void request_pages(const void* first, int64_t bytes) {
  const char* begin = static_cast<const char*>(first);
  for (int64_t byte = 0; byte < bytes; byte += 4096) __builtin_prefetch(begin + byte, 0, 1);
}

// Micro-kernel: an R x (NV·W) block of C (+)= Σ_k A(m, k) · B[k][n], with A(m, k) = a[m·a_rs + k·a_cs]
// broadcast from memory and B rows loaded as vectors (16-bit B widened in registers, Bf16Split by pairs).
// The accumulators stay in registers for all K; every loop over R or NV is unrolled so that the compiler
// keeps acc in registers from the first load to the last store (a rolled loop sends it through the stack).
// ahead->next(k) runs at each step k (a caller's paced prefetch); NoAhead compiles to nothing. With col_max,
// col_max[0, NV·W) ← max(col_max, the block's rows of C) as C is stored: the column maxima that the
// online softmax of Sᵀ needs, taken while the scores are still in registers.
struct NoAhead {
  void next(int64_t) {}
};

template <class V, int R, int NV, class TB = float, class Ahead = NoAhead>
inline void gemm_block(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const TB* b, int64_t ldb,
                       float* c, int64_t ldc, bool accumulate, Ahead* ahead = nullptr, float* col_max = nullptr) {
  typename V::T acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? V::load(c + r * ldc + v * V::W) : V::zero();
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (!std::is_same_v<Ahead, NoAhead>) ahead->next(k);
    typename V::T bk[NV];
    if constexpr (std::is_same_v<TB, Bf16Split>) {
      static_assert(NV % 2 == 0, "split bf16 rows are read two vectors at a time");
#pragma GCC unroll 16
      for (int v = 0; v < NV; v += 2)
        V::load_bf16_pairs(reinterpret_cast<const uint16_t*>(b + k * ldb + v * V::W), bk[v], bk[v + 1]);
    } else {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) bk[v] = load_float<V>(b + k * ldb + v * V::W);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const typename V::T ar = V::set1(a[r * a_rs + k * a_cs]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(ar, bk[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) V::store(c + r * ldc + v * V::W, acc[r][v]);
  if (col_max) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      typename V::T mx = V::load(col_max + v * V::W);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) mx = V::max(mx, acc[r][v]);
      V::store(col_max + v * V::W, mx);
    }
  }
}

template <class V, int R, class Ahead>
inline void gemm_rows(int rows, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate, Ahead* ahead, float* col_max) {
  if constexpr (R > 1) {
    if (rows < R) return gemm_rows<V, R - 1>(rows, N, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, ahead, col_max);
  }
  int64_t n = 0;
  for (; n + 2 * V::W <= N; n += 2 * V::W)
    gemm_block<V, R, 2>(K, a, a_rs, a_cs, b + n, ldb, c + n, ldc, accumulate, ahead, col_max ? col_max + n : nullptr);
  if (n < N)
    gemm_block<V, R, 1>(K, a, a_rs, a_cs, b + n, ldb, c + n, ldc, accumulate, ahead, col_max ? col_max + n : nullptr);
}

// C[M][N] (+)= A · B for an M x K matrix A given by strides (a_rs, a_cs) and row-major B (K x N).
// N must be a multiple of V::W (tiles are padded to it). ahead->next(k) runs at each micro-kernel step,
// gemm_steps(M, N, K) times in all. col_max (N floats), when given: the column maxima of C folded into it.
template <class V, class Ahead = NoAhead>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate, Ahead* ahead = nullptr, float* col_max = nullptr) {
  for (int64_t m = 0; m < M; m += V::kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(V::kRows, M - m));
    gemm_rows<V, V::kRows>(rows, N, K, a + m * a_rs, a_rs, a_cs, b, ldb, c + m * ldc, ldc, accumulate, ahead,
                           col_max);
  }
}

template <class V>
constexpr int64_t gemm_steps(int64_t M, int64_t N, int64_t K) {
  return (M + V::kRows - 1) / V::kRows * ((N + 2 * V::W - 1) / (2 * V::W)) * K;
}

// Sets the scores of row i that are not visible to -inf: keys outside [key_begin, key_end) and the
// padding columns [nk, nk_pad). Only tiles on a mask boundary need the per-key part.
inline void mask_row(float* s, int64_t j0, int64_t nk, int64_t nk_pad, int64_t kb, int64_t ke, bool full) {
  if (!full) {
    const int64_t lo = std::clamp<int64_t>(kb - j0, 0, nk), hi = std::clamp<int64_t>(ke - j0, lo, nk);
    std::fill(s, s + lo, kNegInf);
    std::fill(s + hi, s + nk, kNegInf);
  }
  std::fill(s + nk, s + nk_pad, kNegInf);
}

// Lane i of the result = Σ of the lanes of x[i], for the V::W vectors x: a butterfly that halves the
// vector count at each step (pairs merged at lane stride S: lanes with bit S clear carry a, set carry b).
// Inlined so that x stays in registers.
template <class V, int S = V::W / 2>
[[gnu::always_inline]] inline typename V::T transpose_sum(typename V::T* x) {
  for (int i = 0; i < S; ++i) {
    const typename V::T a = x[i], b = x[i + S];
    x[i] = V::add(V::template pick<S>(a, b), V::template swap<S>(V::template pick<S>(b, a)));
  }
  if constexpr (S > 1) return transpose_sum<V, S / 2>(x);
  else return x[0];
}

// op over the lanes that are equal modulo `period` (a power of two): every lane gets its class's result.
template <class V, class Op>
typename V::T fold_lanes(typename V::T x, int64_t period, Op op) {
  if constexpr (V::W > 8) if (period <= 8) x = op(x, V::template swap<8>(x));
  if constexpr (V::W > 4) if (period <= 4) x = op(x, V::template swap<4>(x));
  if (period <= 2) x = op(x, V::template swap<2>(x));
  if (period <= 1) x = op(x, V::template swap<1>(x));
  return x;
}

// max_c s[c] over n floats, a multiple of V::W: two chains of maxima, half the latency of one.
template <class V>
float row_max(const float* s, int64_t n) {
  typename V::T m0 = V::set1(kNegInf), m1 = m0;
  int64_t c = 0;
  for (; c + 2 * V::W <= n; c += 2 * V::W) {
    m0 = V::max(m0, V::load(s + c));
    m1 = V::max(m1, V::load(s + c + V::W));
  }
  if (c < n) m0 = V::max(m0, V::load(s + c));
  return V::reduce_max(V::max(m0, m1));
}

// s[c] = 2^(s[c] - shift) in place; returns Σ s[c]. -inf scores give exactly 0.
template <class V>
float exp2_row(float* s, int64_t n, float shift) {
  const typename V::T sh = V::set1(shift);
  typename V::T sum = V::zero();
  for (int64_t c = 0; c < n; c += V::W) {
    const typename V::T p = V::exp2(V::sub(V::load(s + c), sh));
    V::store(s + c, p);
    sum = V::add(sum, p);
  }
  return V::reduce_add(sum);
}

template <class V>
void scale_row(float* x, int64_t n, float alpha) {
  const typename V::T a = V::set1(alpha);
  for (int64_t c = 0; c < n; c += V::W) V::store(x + c, V::mul(V::load(x + c), a));
}

// Rows of a tile are handed out heavy-light-heavy-light so that contiguous task ranges stay balanced
// under causal masks: 0, n-1, 1, n-2, ...
inline int64_t zigzag(int64_t idx, int64_t n) { return (idx % 2 == 0) ? idx / 2 : n - 1 - idx / 2; }

}  // namespace
}  // namespace attnext::cpu
