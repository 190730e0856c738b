// A torch-free timing loop over the CPU decode: one decode call after another, each on the next
// of enough copies of K and V to span 256 MiB, so that every call reads its K/V from memory. Prints the
// median call time, the K/V bytes read per second, the arithmetic rate (2 products of 2 flops per query
// row, key and column) and, beside them, a plain read of 256 MiB by as many threads (the ceiling).
// Meant for A/B runs of two builds taking turns, and for perf, away from Python and the dispatcher.
//
//   attnext_cpu_decode_loop DTYPE HQ HKV SQ SK [--calls N] [--copies N] [--threads N] [--evict] [--huge-pages]
//                           [--bshd]
//     DTYPE         float32 or bfloat16; D = 128
//     --calls N     calls per K/V copy (default 9)
//     --copies N    K/V copies to take turns (default: enough to span 256 MiB; 1 keeps a small K/V in the
//                   caches, which times the arithmetic instead of the stream)
//     --threads N   threads per call (default 1; started for each call, which adds tens of microseconds)
//     --evict       read 64 MiB of other data before each call (as a model's other layers would)
//     --huge-pages  ask for 2 MiB pages for K and V (madvise; needs transparent huge pages in madvise mode)
//     --bshd        K and V laid out (batch, key, head, dim), as FlashAttention's KV cache: a head's rows
//                   are HKV x D elements apart (default: (batch, head, key, dim), each head's rows together)
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/cpu_attention.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kHeadDim = 128;
constexpr size_t kPage = size_t{2} << 20;

int g_threads = 1;        // --threads
volatile float g_sink;  // keeps the reads of the probe and the eviction from being optimised away

// [0, n) in g_threads contiguous parts, the first on this thread and the others on threads started here.
void threads_for(int64_t n, void* ctx, attnext::RangeFn fn) {
  const int64_t parts = std::min<int64_t>(g_threads, n);
  std::vector<std::thread> others;
  for (int64_t t = 1; t < parts; ++t)
    others.emplace_back([=] { fn(ctx, n * t / parts, n * (t + 1) / parts); });
  if (n > 0) fn(ctx, 0, n / std::max<int64_t>(parts, 1));
  for (auto& thread : others) thread.join();
}

// Reads x[begin, end) with 16 independent sums (vectorised without reassociation); returns the sum.
float read_range(const float* x, size_t begin, size_t end) {
  float sums[16] = {};
  for (size_t i = begin; i + 16 <= end; i += 16)
    for (int lane = 0; lane < 16; ++lane) sums[lane] += x[i + lane];
  float total = 0.0f;
  for (float s : sums) total += s;
  return total;
}

// The first n floats of x, read by g_threads threads side by side (the bandwidth at that thread count).
float read_all(const std::vector<float>& x, size_t n) {
  std::vector<float> partial(g_threads, 0.0f);
  std::vector<std::thread> others;
  for (int t = 1; t < g_threads; ++t)
    others.emplace_back([&, t] { partial[t] = read_range(x.data(), n * t / g_threads, n * (t + 1) / g_threads); });
  partial[0] = read_range(x.data(), 0, n / g_threads);
  for (auto& thread : others) thread.join();
  float total = 0.0f;
  for (float s : partial) total += s;
  return total;
}

// `bytes` of memory aligned to 2 MiB, on 2 MiB pages if asked for.
char* aligned_buffer(size_t bytes, bool huge_pages) {
  const size_t size = (bytes + kPage - 1) / kPage * kPage;
  char* buffer = static_cast<char*>(std::aligned_alloc(kPage, size));
  if (buffer == nullptr) {
    std::fprintf(stderr, "attnext_cpu_decode_loop: could not allocate %zu bytes\n", size);
    std::exit(1);
  }
  madvise(buffer, size, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return buffer;
}

// `bytes` of random values of the element type.
char* random_buffer(size_t bytes, bool bf16, bool huge_pages, std::mt19937& rng) {
  char* buffer = aligned_buffer(bytes, huge_pages);
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < bytes / (bf16 ? 2 : 4); ++i) {
    const float value = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const uint16_t high = static_cast<uint16_t>(bits >> 16);
    if (bf16) std::memcpy(buffer + 2 * i, &high, 2);
    else std::memcpy(buffer + 4 * i, &value, 4);
  }
  return buffer;
}

// A copy of `bytes` at `source`, on memory of its own.
char* copy_buffer(const char* source, size_t bytes, bool huge_pages) {
  char* buffer = aligned_buffer(bytes, huge_pages);
  std::memcpy(buffer, source, bytes);
  return buffer;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s float32|bfloat16 HQ HKV SQ SK [--calls N] [--copies N] [--threads N] [--evict] "
                 "[--huge-pages] [--bshd]\n",
                 argv[0]);
    return 2;
  }
  const std::string dtype = argv[1];
  if (dtype != "float32" && dtype != "bfloat16") {
    std::fprintf(stderr, "attnext_cpu_decode_loop: dtype %s is not float32 or bfloat16\n", dtype.c_str());
    return 2;
  }
  const bool bf16 = dtype == "bfloat16";
  const int64_t hq = std::atoll(argv[2]), hkv = std::atoll(argv[3]), sq = std::atoll(argv[4]), sk = std::atoll(argv[5]);
  int calls = 9;
  int64_t copies = 0;
  bool evict = false, huge_pages = false, bshd = false;
  for (int i = 6; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--calls" && i + 1 < argc) calls = std::atoi(argv[++i]);
    else if (arg == "--copies" && i + 1 < argc) copies = std::atoll(argv[++i]);
    else if (arg == "--threads" && i + 1 < argc) g_threads = std::atoi(argv[++i]);
    else if (arg == "--evict") evict = true;
    else if (arg == "--huge-pages") huge_pages = true;
    else if (arg == "--bshd") bshd = true;
    else { std::fprintf(stderr, "attnext_cpu_decode_loop: unknown argument %s\n", arg.c_str()); return 2; }
  }
  if (hq <= 0 || hkv <= 0 || hq % hkv != 0 || sq <= 0 || sk <= 0 || calls <= 0 || copies < 0 ||
      g_threads <= 0) {
    std::fprintf(stderr, "attnext_cpu_decode_loop: need HQ a multiple of HKV, all sizes, --calls, --copies and "
                         "--threads > 0\n");
    return 2;
  }

  const size_t elem = bf16 ? 2 : 4, kv_bytes = size_t(hkv * sk * kHeadDim) * elem;
  if (copies == 0) copies = std::max<int64_t>(1, (int64_t{256} << 20) / int64_t(2 * kv_bytes) + 1);
  std::mt19937 rng(0);
  std::vector<char*> k, v;
  k.push_back(random_buffer(kv_bytes, bf16, huge_pages, rng));
  v.push_back(random_buffer(kv_bytes, bf16, huge_pages, rng));
  for (int64_t c = 1; c < copies; ++c) {  // the same values at other addresses: each call reads from memory
    k.push_back(copy_buffer(k[0], kv_bytes, huge_pages));
    v.push_back(copy_buffer(v[0], kv_bytes, huge_pages));
  }
  char* q = random_buffer(size_t(hq * sq * kHeadDim) * elem, bf16, false, rng);
  std::vector<char> out(size_t(hq * sq * kHeadDim) * elem);
  std::vector<float> lse(size_t(hq * sq));
  std::vector<float> other(size_t{64} << 20, 1.0f);  // 256 MiB: the bandwidth probe; its first 64 MiB evict

  attnext::FwdParams p;
  p.q = q;
  p.out = out.data();
  p.lse = lse.data();
  p.q_stride = p.out_stride = {hq * sq * kHeadDim, sq * kHeadDim, kHeadDim};
  p.k_stride = p.v_stride = bshd ? attnext::Strides{hkv * sk * kHeadDim, kHeadDim, hkv * kHeadDim}
                                 : attnext::Strides{hkv * sk * kHeadDim, sk * kHeadDim, kHeadDim};
  p.batch = 1, p.heads_q = hq, p.heads_kv = hkv, p.seq_q = sq, p.seq_k = sk, p.head_dim = kHeadDim;
  p.dtype = bf16 ? attnext::DType::kBFloat16 : attnext::DType::kFloat32;
  p.scale = 1.0f / std::sqrt(float(kHeadDim));
  p.num_threads = g_threads;
  p.parallel_for = threads_for;

  std::vector<double> call_s, probe_gbs;
  float sink = 0.0f;
  for (int64_t i = 0; i < calls * copies; ++i) {
    if (evict) sink += read_all(other, other.size() / 4);
    p.k = k[i % copies];
    p.v = v[i % copies];
    const auto t0 = Clock::now();
    const attnext::Status status = attnext::cpu::forward(p);
    call_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    if (status != attnext::Status::kOk) {
      std::fprintf(stderr, "attnext_cpu_decode_loop: forward failed: %s\n", attnext::status_string(status));
      return 1;
    }
    if (i % std::max<int64_t>(copies, calls) == 0) {  // once per pass over the copies, or once in all
      const auto r0 = Clock::now();
      sink += read_all(other, other.size());
      probe_gbs.push_back(other.size() * 4 / std::chrono::duration<double>(Clock::now() - r0).count() / 1e9);
    }
  }
  const double t = median(call_s);
  const double flops = 4.0 * double(hq * sq * sk * kHeadDim);
  std::printf("%s Hq %ld Hkv %ld Sq %ld Sk %ld D %ld, %d thread(s), %ld copies: %.3f ms, K/V %.1f GB/s, "
              "%.1f GFLOP/s, read probe %.1f GB/s%s%s%s\n",
              dtype.c_str(), long(hq), long(hkv), long(sq), long(sk), long(kHeadDim), g_threads, long(copies),
              t * 1e3, 2 * kv_bytes / t / 1e9, flops / t / 1e9, median(probe_gbs), evict ? ", evict" : "",
              huge_pages ? ", huge pages" : "", bshd ? ", bshd" : "");
  g_sink = sink;
  for (int64_t c = 0; c < copies; ++c) {
    std::free(k[c]);
    std::free(v[c]);
  }
  std::free(q);
  return 0;
}
