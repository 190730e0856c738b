// A CPU emulation of the CUDA execution model, enough to run attnext's kernels (csrc/cuda/*.cuh) unchanged
// in a C++ test: every thread of a block is a fiber (ucontext) on one OS thread, scheduled round-robin;
// __syncthreads and the warp-collective operations (ldmatrix, mma, shuffles) are barriers at which the
// fibers meet. Blocks run one after another. cp.async copies land in shared memory only when their thread
// waits for their group, so a read of shared memory without the wait and the barrier that a GPU needs sees
// stale (poisoned) data; what the emulation cannot show is timing.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

template <class T>
T min(T a, T b) { return a < b ? a : b; }

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

// A 16-byte cp.async in flight: its source bytes are read when it is issued, written to shared memory
// only when the issuing thread waits for its group (so a read before wait + barrier sees stale data).
struct Copy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  std::vector<Copy> uncommitted;
  std::vector<std::vector<Copy>> committed;  // oldest first
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 thread_idx;
  bool done = false;
  int waiting = 0;  // 0 runnable, 1 at a warp barrier, 2 at a block barrier
  uint64_t generation = 0;
};

// The block being run: its fibers, barrier counters and the per-warp exchange slots of collectives.
struct Block {
  dim3 grid, block_idx, block_dim;
  std::vector<Fiber> fibers;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_generation;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<unsigned char> slots;  // [warp][lane][kSlotBytes]
  int current = 0;
  ucontext_t scheduler;
  std::function<void()> body;
};

constexpr size_t kSlotBytes = 64;

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

inline Fiber& self() { return block()->fibers[block()->current]; }
inline int lane() { return int(self().thread_idx.x) % kWarpSize; }
inline int warp() { return int(self().thread_idx.x) / kWarpSize; }

inline void park(int kind, uint64_t generation) {
  Fiber& f = self();
  f.waiting = kind;
  f.generation = generation;
  swapcontext(&f.ctx, &block()->scheduler);
}

// The 32 lanes of the calling warp meet here.
inline void warp_sync() {
  Block& b = *block();
  const int w = warp();
  if (++b.warp_arrived[w] == kWarpSize) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
    return;
  }
  park(1, b.warp_generation[w]);
}

// This thread's committed copy groups land, all but the newest `keep`.
inline void complete_copies(size_t keep) {
  Fiber& f = self();
  while (f.committed.size() > keep) {
    for (const Copy& c : f.committed.front()) std::memcpy(c.dst, c.bytes, 16);
    f.committed.erase(f.committed.begin());
  }
}

// Every thread of the block meets here.
inline void block_sync() {
  Block& b = *block();
  if (++b.block_arrived == int(b.fibers.size())) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  park(2, b.block_generation);
}

inline unsigned char* slot(int w, int l) { return &block()->slots[(size_t(w) * kWarpSize + l) * kSlotBytes]; }

// A warp collective: each lane publishes `mine`, then reads any lane's value through `read(lane)`.
template <class In, class Fn>
void exchange(const In& mine, Fn&& use) {
  static_assert(sizeof(In) <= kSlotBytes, "slot too small");
  const int w = warp();
  std::memcpy(slot(w, lane()), &mine, sizeof(In));
  warp_sync();
  use([w](int l) {
    In v;
    std::memcpy(&v, slot(w, l), sizeof(In));
    return v;
  });
  warp_sync();  // nobody overwrites a slot before every lane has read it
}

inline void trampoline() {
  block()->body();
  self().committed.push_back(std::move(self().uncommitted));
  complete_copies(0);
  self().done = true;
}

// Runs body once per thread of every block of the grid, blocks in order.
inline void launch(dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  const int threads = int(block_dim.x);
  Block b;
  b.grid = grid;
  b.block_dim = block_dim;
  b.body = body;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        b.fibers.assign(threads, Fiber());
        b.warp_arrived.assign((threads + kWarpSize - 1) / kWarpSize, 0);
        b.warp_generation.assign(b.warp_arrived.size(), 0);
        b.block_arrived = 0;
        b.slots.assign(b.warp_arrived.size() * kWarpSize * kSlotBytes, 0);
        block() = &b;
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.thread_idx = dim3(t);
          f.stack.resize(kStackBytes);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, trampoline, 0);
        }
        // Each warp runs as far as it can (to a block barrier or its end) before the next one starts, in
        // an order that alternates between blocks: warps drift apart as far as the barriers let them, so
        // a missing barrier shows as a read of data another warp has not written yet, or already replaced.
        const int warps = int(b.warp_arrived.size());
        const bool reversed = (x + y + z) % 2 == 1;
        for (int finished = 0; finished < threads;) {
          bool progress = false;
          for (int i = 0; i < warps; ++i) {
            const int w = reversed ? warps - 1 - i : i;
            for (bool warp_progress = true; warp_progress;) {
              warp_progress = false;
              for (int t = w * kWarpSize; t < std::min(threads, (w + 1) * kWarpSize); ++t) {
                Fiber& f = b.fibers[t];
                const bool released = !f.done && (f.waiting == 0 ||
                                      (f.waiting == 1 && b.warp_generation[w] != f.generation) ||
                                      (f.waiting == 2 && b.block_generation != f.generation));
                if (!released) continue;
                f.waiting = 0;
                b.current = t;
                swapcontext(&b.scheduler, &f.ctx);
                warp_progress = progress = true;
              }
            }
          }
          finished = 0;
          for (const Fiber& f : b.fibers) finished += f.done;
          if (!progress && finished < threads) {
            std::fprintf(stderr, "emu: deadlock in block (%u, %u, %u): threads wait at different barriers\n", x, y, z);
            std::abort();
          }
        }
        block() = nullptr;
      }
}

}  // namespace emu

#define threadIdx (emu::self().thread_idx)
#define blockIdx (emu::block()->block_idx)
#define gridDim (emu::block()->grid)
#define blockDim (emu::block()->block_dim)

inline void __syncthreads() { emu::block_sync(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float x, int offset) {
  float out = 0.0f;
  emu::exchange(x, [&](auto read) { out = read(emu::lane() ^ offset); });
  return out;
}

inline float atomicAdd(float* p, float v) {  // one OS thread: a plain add is atomic here
  const float old = *p;
  *p = old + v;
  return old;
}
