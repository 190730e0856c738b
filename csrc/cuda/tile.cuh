// Shared-memory tiles and MMA fragments of the Ampere+ kernels.
// A tile holds rows of kD 16-bit elements with a row stride of kD + 8: the 16 padding bytes put the 8 rows
// that one ldmatrix reads into 8 different bank groups.
#pragma once

#include "cuda/ptx.cuh"

namespace attnext::cuda {

template <int kD>
__host__ __device__ constexpr int tile_stride() { return kD + 8; }

// cp.async a tile of kRows rows x kD columns from global rows [row0, row0 + kRows) of a matrix with
// n_rows rows of head_dim elements (row stride in elements); rows and columns outside it are zero-filled.
template <int kRows, int kD, int kThreads, class T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t row_stride, int64_t row0, int64_t n_rows,
                                          int head_dim) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < n_rows && col < head_dim;
    const T* from = valid ? src + (row0 + r) * row_stride + col : src;
    cp_async_16(tile + r * tile_stride<kD>() + col, from, valid);
  }
}

// A fragment (16x16 at row0, k0) of a row-major tile.
template <class T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int stride, int row0, int k0, int lane) {
  ldmatrix_x4(a, tile + (row0 + lane % 16) * stride + k0 + (lane / 16) * 8);
}

// A fragment (16x16 at i0, j0) of A = Sᵀ, where the tile stores S row-major ([j][i]).
template <class T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int stride, int i0, int j0,
                                             int lane) {
  ldmatrix_x4_trans(a, tile + (j0 + (lane / 16) * 8 + lane % 8) * stride + i0 + ((lane / 8) % 2) * 8);
}

// B fragments of two adjacent n-tiles (n0 and n0 + 8) at k0, where the tile stores B transposed, as rows
// of n ([n][k]: K for Q·Kᵀ). b[0], b[1] belong to n-tile n0; b[2], b[3] to n0 + 8.
template <class T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int stride, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane / 16) * 8 + lane % 8) * stride + k0 + ((lane / 8) % 2) * 8);
}

// The same where the tile stores B as rows of k ([k][n]: V for P·V).
template <class T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int stride, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + lane % 16) * stride + n0 + (lane / 16) * 8);
}

// Two fp32 accumulator tiles (16x8 each, adjacent in n) become one 16-bit A fragment (16x16): the
// register-level reuse of a product's output as the next product's input.
template <class T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Stores an fp32 accumulator tile (16 x kCols at row0, col0 of a row-major global matrix), rounded to T;
// rows >= n_rows and columns >= n_cols are left out. scale multiplies every value.
template <int kCols, class T>
__device__ __forceinline__ void store_acc(T* dst, int64_t row_stride, int64_t row0, int64_t n_rows, int col0,
                                          int n_cols, const float (&acc)[kCols / 8][4], float scale, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < kCols / 8; ++nt) {
    const int col = col0 + nt * 8 + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + g + 8 * h;
      if (row < n_rows && col < n_cols) {
        const uint32_t v = pack2<T>(acc[nt][2 * h] * scale, acc[nt][2 * h + 1] * scale);
        *reinterpret_cast<uint32_t*>(dst + row * row_stride + col) = v;
      }
    }
  }
}

}  // namespace attnext::cuda
