// Runs one attnext CUDA kernel configuration without Python or torch, for Nsight Compute and quick timing:
//   cmake -S . -B build/cuda -DATTNEXT_CUDA=ON && cmake --build build/cuda -j2
//   ./build/cuda/attnext_run_kernel --mode fwd --batch 4 --heads 16 --seq 4096 --head-dim 128 --dtype bf16
//   ncu --kernel-name regex:fwd_kernel --launch-skip 3 --launch-count 1 ./build/cuda/attnext_run_kernel ...
// Inputs are random normal values; it prints the median time of --iters calls (CUDA events) and TFLOP/s
// counted as FlashAttention does (forward 4·B·Hq·visible pairs·D, backward 2.5x).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attnext/mask.h"
#include "cuda/cuda_attention.h"

using namespace attnext;

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "attnext_run_kernel: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

void check_status(Status s, const char* what) {
  if (s != Status::kOk) {
    std::fprintf(stderr, "attnext_run_kernel: %s: %s%s%s\n", what, status_string(s),
                 s == Status::kCudaError ? ": " : "", s == Status::kCudaError ? cuda::last_error() : "");
    std::exit(1);
  }
}

struct Options {
  std::string mode = "fwd", dtype = "bf16", causal = "none";
  int64_t batch = 4, heads = 16, kv_heads = 0, seq_q = 4096, seq_k = 0, head_dim = 128;
  int warmup = 3, iters = 10;
  bool deterministic = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "attnext_run_kernel: %s\nusage: attnext_run_kernel [--mode fwd|bwd] [--dtype bf16|fp16] "
               "[--causal none|top_left|bottom_right] [--batch B] [--heads H] [--kv-heads H] [--seq S] "
               "[--seq-k S] [--head-dim D] [--warmup N] [--iters N] [--deterministic]\n",
               why.c_str());
  std::exit(2);
}

// A positive integer option value, or the usage message.
int64_t positive(const std::string& option, const std::string& v) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x <= 0) usage(option + " " + v + " is not supported (supported: an integer >= 1)");
  return x;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--deterministic") { o.deterministic = true; continue; }
    if (i + 1 >= argc) usage("option " + a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--mode") o.mode = v;
    else if (a == "--dtype") o.dtype = v;
    else if (a == "--causal") o.causal = v;
    else if (a == "--batch") o.batch = positive(a, v);
    else if (a == "--heads") o.heads = positive(a, v);
    else if (a == "--kv-heads") o.kv_heads = positive(a, v);
    else if (a == "--seq") o.seq_q = positive(a, v);
    else if (a == "--seq-k") o.seq_k = positive(a, v);
    else if (a == "--head-dim") o.head_dim = positive(a, v);
    else if (a == "--warmup") o.warmup = int(positive(a, v));
    else if (a == "--iters") o.iters = int(positive(a, v));
    else usage("unknown option " + a);
  }
  if (o.mode != "fwd" && o.mode != "bwd") usage("--mode " + o.mode + " is not supported (supported: fwd, bwd)");
  if (o.dtype != "bf16" && o.dtype != "fp16") usage("--dtype " + o.dtype + " is not supported (supported: bf16, fp16)");
  if (o.causal != "none" && o.causal != "top_left" && o.causal != "bottom_right")
    usage("--causal " + o.causal + " is not supported (supported: none, top_left, bottom_right)");
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  if (o.seq_k == 0) o.seq_k = o.seq_q;
  if (o.heads % o.kv_heads != 0)
    usage("--kv-heads " + std::to_string(o.kv_heads) + " is not supported (supported: divisors of --heads " +
          std::to_string(o.heads) + ")");
  return o;
}

// A device buffer of n 16-bit values drawn from a normal distribution.
void* random_device_buffer(int64_t n, bool half, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<uint16_t> host(n);
  for (auto& x : host) {
    const float f = normal(rng);
    if (half) {
      const __half h = __float2half_rn(f);
      std::memcpy(&x, &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(f);
      std::memcpy(&x, &h, 2);
    }
  }
  void* dev = nullptr;
  check_cuda(cudaMalloc(&dev, n * 2), "cudaMalloc");
  check_cuda(cudaMemcpy(dev, host.data(), n * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  return dev;
}

void* device_buffer(int64_t bytes) {
  void* dev = nullptr;
  check_cuda(cudaMalloc(&dev, std::max<int64_t>(bytes, 16)), "cudaMalloc");
  return dev;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const bool half = o.dtype == "fp16";
  const MaskKind kind = o.causal == "none" ? MaskKind::kNone
                        : o.causal == "top_left" ? MaskKind::kCausalTopLeft : MaskKind::kCausalBottomRight;
  const int64_t D = o.head_dim, nq = o.batch * o.heads * o.seq_q * D, nk = o.batch * o.kv_heads * o.seq_k * D;
  std::mt19937 rng(0);

  FwdParams p;
  p.q = random_device_buffer(nq, half, rng);
  p.k = random_device_buffer(nk, half, rng);
  p.v = random_device_buffer(nk, half, rng);
  p.out = device_buffer(nq * 2);
  p.lse = static_cast<float*>(device_buffer(o.batch * o.heads * o.seq_q * 4));
  p.q_stride = p.out_stride = {o.heads * o.seq_q * D, o.seq_q * D, D};
  p.k_stride = p.v_stride = {o.kv_heads * o.seq_k * D, o.seq_k * D, D};
  p.batch = o.batch; p.heads_q = o.heads; p.heads_kv = o.kv_heads;
  p.seq_q = o.seq_q; p.seq_k = o.seq_k; p.head_dim = D;
  p.dtype = half ? DType::kFloat16 : DType::kBFloat16;
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.mask = make_mask(kind, o.seq_q, o.seq_k, -1, -1);

  cudaStream_t stream;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  check_status(cuda::forward(p, stream), "forward");
  BwdParams bp;
  if (o.mode == "bwd") {
    bp.fwd = p;
    bp.dout = random_device_buffer(nq, half, rng);
    bp.dq = device_buffer(nq * 2);
    bp.dk = device_buffer(nk * 2);
    bp.dv = device_buffer(nk * 2);
    bp.dout_stride = bp.dq_stride = p.q_stride;
    bp.dk_stride = bp.dv_stride = p.k_stride;
    bp.workspace_floats = cuda::backward_workspace_floats(p, o.deterministic);
    bp.workspace = static_cast<float*>(device_buffer(bp.workspace_floats * 4));
  }
  auto run = [&] {
    if (o.mode == "fwd") check_status(cuda::forward(p, stream), "forward");
    else check_status(cuda::backward(bp, o.deterministic, stream), "backward");
  };

  for (int i = 0; i < o.warmup; ++i) run();
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> ms(o.iters);
  for (int i = 0; i < o.iters; ++i) {
    check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
    run();
    check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    check_cuda(cudaEventElapsedTime(&ms[i], start, stop), "cudaEventElapsedTime");
  }
  std::sort(ms.begin(), ms.end());
  const float median = ms[ms.size() / 2];

  // Visible (query, key) pairs, counted exactly from the mask rule.
  double pairs = 0.0;
  for (int64_t i = 0; i < o.seq_q; ++i)
    pairs += double(std::max<int64_t>(0, key_end(p.mask, i, o.seq_k) - key_begin(p.mask, i, o.seq_k)));
  const double flops = 4.0 * o.batch * o.heads * pairs * D * (o.mode == "bwd" ? 2.5 : 1.0);
  std::printf("attnext %s %s B%lld H%lld/%lld Sq%lld Sk%lld D%lld %s%s: %.3f ms, %.1f TFLOP/s\n", o.mode.c_str(),
              o.dtype.c_str(), (long long)o.batch, (long long)o.heads, (long long)o.kv_heads, (long long)o.seq_q,
              (long long)o.seq_k, (long long)D, o.causal.c_str(), o.deterministic ? " deterministic" : "", median,
              flops / (median * 1e-3) / 1e12);
  return 0;
}
