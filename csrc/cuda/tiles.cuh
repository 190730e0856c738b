// The kernels and their tile configuration per head-dim bucket: what launch.cuh launches, and what the
// CPU emulation test (tests/cpp/test_cuda_emulated.cpp) runs.
#pragma once

#include <type_traits>

#include "cuda/bwd_dq_kernel.cuh"
#include "cuda/bwd_kernel.cuh"
#include "cuda/fwd_kernel.cuh"

namespace attnext::cuda {

// Tile configurations by head-dim bucket. Forward: 128 query rows (4 warps of 32) up to D = 128, 64 above;
// 64 keys per step (32 for D = 96, 128, for registers). Backward: 64 keys x 64 queries with dKj/dVj split
// over 2 warps along D, fewer queries (D = 192) or keys (D = 256) where registers and shared memory run
// short. The launcher takes the first backward configuration that fits the GPU's shared memory per block:
// Bwd (two Qi/dOi stages), BwdOneStage, BwdSmall (D = 256 only: smaller tiles for 99 KiB GPUs); for the
// deterministic dQ pass, BwdDq (two Kj/Vj stages), then BwdDqOneStage.
template <class T, int kD>
struct Tiles {
  using Fwd = FwdConfig<T, kD, (kD <= 128 ? 128 : 64), (kD == 96 || kD == 128 ? 32 : 64), 4>;
  static constexpr int kBwdM = kD == 192 ? 32 : 64, kBwdN = kD == 256 ? 32 : 64;
  static constexpr int kBwdWarpsD = kD == 32 ? 1 : kD == 256 ? 4 : 2;
  using Bwd = BwdConfig<T, kD, kBwdM, kBwdN, kBwdWarpsD, 2>;
  using BwdOneStage = BwdConfig<T, kD, kBwdM, kBwdN, kBwdWarpsD, 1>;
  using BwdSmall = std::conditional_t<kD == 256, BwdConfig<T, kD, 32, 32, 2, 1>, BwdOneStage>;
  using BwdDq = BwdDqConfig<T, kD, (kD <= 128 ? 64 : 32), 2>;
  using BwdDqOneStage = BwdDqConfig<T, kD, (kD <= 128 ? 64 : 32), 1>;
};

}  // namespace attnext::cuda
