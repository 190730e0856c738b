// CPU kernels against the double reference, for every compiled unit this CPU can run.
// Plain C++ (no torch): run by CTest.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "expect.h"
#include "attnext/mask.h"
#include "attnext/params.h"
#include "attnext/reference.h"
#include "cpu/cpu_attention.h"
#include "cpu/tiling.h"

using namespace attnext;

namespace {

using test::expect;

// Splits [0, n) over two std::threads, as torch's pool would over its threads.
void two_threads(int64_t n, void* ctx, RangeFn fn) {
  const int64_t mid = n / 2;
  std::thread t([&] { if (mid > 0) fn(ctx, 0, mid); });
  if (n > mid) fn(ctx, mid, n);
  t.join();
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    m = std::max(m, std::fabs(double(a[i]) - b[i]));
  }
  return m;
}

std::vector<float> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

Strides contiguous(int64_t h, int64_t s, int64_t d) { return {h * s * d, s * d, d}; }

// cpu::backward of the forward p (same strides for the gradients as for the inputs), with its workspace.
Status run_backward(const FwdParams& p, const void* dout, void* dq, void* dk, void* dv) {
  BwdParams bp;
  bp.fwd = p;
  bp.dout = dout; bp.dq = dq; bp.dk = dk; bp.dv = dv;
  bp.dout_stride = bp.dq_stride = p.q_stride;
  bp.dk_stride = bp.dv_stride = p.k_stride;
  std::vector<float> ws(cpu::backward_workspace_size(p));
  bp.workspace = ws.data(); bp.workspace_floats = int64_t(ws.size());
  return cpu::backward(bp);
}

// bf16 storage: round to nearest even (the test data has no NaN), and back.
uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// x rounded to bf16: the bf16 bits, and their values in `rounded`.
std::vector<uint16_t> bf16_of(const std::vector<float>& x, std::vector<float>& rounded) {
  std::vector<uint16_t> h(x.size());
  rounded.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) rounded[i] = from_bf16(h[i] = to_bf16(x[i]));
  return h;
}

// The bf16 forward of p's problem against the double reference on the same (rounded) inputs: the output is
// rounded to bf16 and units may round P to bf16 (the avx512bf16 unit does), so it gets a bf16-sized bound.
void check_bf16_forward(const reference::Shape& sh, FwdParams p, const std::vector<float>& q,
                        const std::vector<float>& k, const std::vector<float>& v, double scale, const std::string& name) {
  std::vector<float> qr, kr, vr, out(q.size()), lse(sh.batch * sh.heads_q * sh.seq_q);
  std::vector<uint16_t> qh = bf16_of(q, qr), kh = bf16_of(k, kr), vh = bf16_of(v, vr), outh(q.size());
  p.q = qh.data(); p.k = kh.data(); p.v = vh.data(); p.out = outh.data(); p.lse = lse.data();
  p.dtype = DType::kBFloat16;
  expect(cpu::forward(p) == Status::kOk, name + ": bf16 forward status");
  std::vector<double> ref_out, ref_lse;
  reference::forward(sh, qr.data(), kr.data(), vr.data(), scale, p.mask, ref_out, ref_lse);
  for (size_t i = 0; i < out.size(); ++i) out[i] = from_bf16(outh[i]);
  const double err = max_abs_diff(out, ref_out);
  expect(err < 2e-2, name + ": bf16 out error " + std::to_string(err));
  for (size_t i = 0; i < lse.size(); ++i) {
    const bool both_inf = std::isinf(ref_lse[i]) && lse[i] == -INFINITY;
    if (both_inf || std::fabs(lse[i] - ref_lse[i]) < 1e-4) continue;
    expect(false, name + ": bf16 lse row " + std::to_string(i));
    break;
  }
}

// The bf16 backward (after the bf16 forward) against the double reference on the same rounded inputs and dO:
// gradients are rounded to bf16 and units may round P and dS to bf16 (the avx512bf16 unit does), so each gets
// a bf16-sized bound relative to its largest reference value.
void check_bf16_backward(const reference::Shape& sh, FwdParams p, const std::vector<float>& q,
                         const std::vector<float>& k, const std::vector<float>& v, const std::vector<float>& dout,
                         double scale, const std::string& name) {
  std::vector<float> qr, kr, vr, dor, lse(sh.batch * sh.heads_q * sh.seq_q);
  std::vector<uint16_t> qh = bf16_of(q, qr), kh = bf16_of(k, kr), vh = bf16_of(v, vr), doh = bf16_of(dout, dor);
  std::vector<uint16_t> outh(q.size()), dqh(q.size()), dkh(k.size()), dvh(v.size());
  p.q = qh.data(); p.k = kh.data(); p.v = vh.data(); p.out = outh.data(); p.lse = lse.data();
  p.dtype = DType::kBFloat16;
  expect(cpu::forward(p) == Status::kOk, name + ": bf16 forward status");
  expect(run_backward(p, doh.data(), dqh.data(), dkh.data(), dvh.data()) == Status::kOk,
         name + ": bf16 backward status");
  std::vector<double> ref[3];
  reference::backward(sh, qr.data(), kr.data(), vr.data(), dor.data(), scale, p.mask, ref[0], ref[1], ref[2]);
  const std::vector<uint16_t>* got[3] = {&dqh, &dkh, &dvh};
  for (int g = 0; g < 3; ++g) {
    std::vector<float> x(got[g]->size());
    double peak = 1.0;
    for (size_t i = 0; i < x.size(); ++i) x[i] = from_bf16((*got[g])[i]), peak = std::max(peak, std::fabs(ref[g][i]));
    const double err = max_abs_diff(x, ref[g]);
    expect(err < 2e-2 * peak, name + ": bf16 grad " + "qkv"[g] + " error " + std::to_string(err) + " (peak " +
                                  std::to_string(peak) + ")");
  }
}

void run_case(reference::Shape sh, MaskKind kind, int64_t left, int64_t right, cpu::Isa isa) {
  std::mt19937 rng(1234 + sh.seq_q * 7 + sh.seq_k);
  const int64_t nq = sh.batch * sh.heads_q * sh.seq_q * sh.head_dim;
  const int64_t nk = sh.batch * sh.heads_kv * sh.seq_k * sh.head_dim;
  auto q = randn(nq, rng), k = randn(nk, rng), v = randn(nk, rng), dout = randn(nq, rng);
  const double scale = 1.0 / std::sqrt(double(sh.head_dim));
  const MaskSpec mask = make_mask(kind, sh.seq_q, sh.seq_k, left, right);

  std::vector<float> out(nq), lse(sh.batch * sh.heads_q * sh.seq_q), dq(nq), dk(nk), dv(nk);
  FwdParams p;
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.out = out.data(); p.lse = lse.data();
  p.q_stride = p.out_stride = contiguous(sh.heads_q, sh.seq_q, sh.head_dim);
  p.k_stride = p.v_stride = contiguous(sh.heads_kv, sh.seq_k, sh.head_dim);
  p.batch = sh.batch; p.heads_q = sh.heads_q; p.heads_kv = sh.heads_kv;
  p.seq_q = sh.seq_q; p.seq_k = sh.seq_k; p.head_dim = sh.head_dim;
  p.dtype = DType::kFloat32; p.scale = float(scale); p.mask = mask;
  p.num_threads = 2; p.parallel_for = two_threads;

  const std::string name = std::string(cpu::isa_name(isa)) + " B" + std::to_string(sh.batch) + " Hq" +
                           std::to_string(sh.heads_q) + " Hkv" + std::to_string(sh.heads_kv) + " Sq" +
                           std::to_string(sh.seq_q) + " Sk" + std::to_string(sh.seq_k) + " D" +
                           std::to_string(sh.head_dim) + " mask" + std::to_string(int(kind));
  expect(cpu::forward(p) == Status::kOk, name + ": forward status");
  std::vector<double> ref_out, ref_lse, ref_dq, ref_dk, ref_dv;
  reference::forward(sh, q.data(), k.data(), v.data(), scale, mask, ref_out, ref_lse);
  const double err = max_abs_diff(out, ref_out);
  expect(err < 2e-5, name + ": out error " + std::to_string(err));
  for (size_t i = 0; i < lse.size(); ++i) {
    const bool both_inf = std::isinf(ref_lse[i]) && lse[i] == -INFINITY;
    expect(both_inf || std::fabs(lse[i] - ref_lse[i]) < 2e-5, name + ": lse row " + std::to_string(i));
    if (!both_inf && std::fabs(lse[i] - ref_lse[i]) >= 2e-5) break;
  }
  check_bf16_forward(sh, p, q, k, v, scale, name);
  check_bf16_backward(sh, p, q, k, v, dout, scale, name);

  // The gradients start as NaN: every element must be written (dQ may be added up in dq itself).
  for (auto* g : {&dq, &dk, &dv}) std::fill(g->begin(), g->end(), NAN);
  expect(run_backward(p, dout.data(), dq.data(), dk.data(), dv.data()) == Status::kOk, name + ": backward status");
  reference::backward(sh, q.data(), k.data(), v.data(), dout.data(), scale, mask, ref_dq, ref_dk, ref_dv);
  const double eq = max_abs_diff(dq, ref_dq), ek = max_abs_diff(dk, ref_dk), ev = max_abs_diff(dv, ref_dv);
  expect(eq < 1e-4 && ek < 1e-4 && ev < 1e-4,
         name + ": grad errors " + std::to_string(eq) + " " + std::to_string(ek) + " " + std::to_string(ev));
}

void test_mask_rules() {
  const MaskSpec tl = make_mask(MaskKind::kCausalTopLeft, 3, 5, -1, -1);
  expect(key_begin(tl, 0, 5) == 0 && key_end(tl, 0, 5) == 1 && key_end(tl, 2, 5) == 3, "top-left causal rows");
  const MaskSpec br = make_mask(MaskKind::kCausalBottomRight, 3, 5, -1, -1);
  expect(key_end(br, 0, 5) == 3 && key_end(br, 2, 5) == 5, "bottom-right causal rows");
  const MaskSpec br_long_q = make_mask(MaskKind::kCausalBottomRight, 5, 3, -1, -1);
  expect(key_end(br_long_q, 1, 3) == 0 && key_end(br_long_q, 2, 3) == 1, "bottom-right, Sq > Sk: empty rows");
  const MaskSpec win = make_mask(MaskKind::kWindow, 4, 4, 1, 0);
  expect(key_begin(win, 3, 4) == 2 && key_end(win, 3, 4) == 4, "window (1, 0)");
  expect(row_begin(tl, 2, 3) == 2 && row_end(tl, 2, 3) == 3, "rows seeing a key, top-left");
  expect(row_begin(win, 1, 4) == 1 && row_end(win, 1, 4) == 3, "rows seeing a key, window");
  expect(tile_fully_visible(tl, 2, 3, 0, 2, 5) && !tile_fully_visible(tl, 0, 3, 0, 2, 5), "fully visible tiles");
}

// When the FMA forward requests each next key tile ahead: back-to-back rows, tiles past the L1, no mask
// that bounds the keys; this tile and the next one (K and V) then fit half of a 1 MiB L2.
void test_forward_tiling() {
  struct Case { int64_t head_dim; DType dtype; bool strided, causal, prefetch; };
  const Case cases[] = {{128, DType::kFloat32, false, false, true}, {256, DType::kFloat32, false, false, true},
                        {144, DType::kFloat32, false, false, true}, {64, DType::kFloat32, false, false, true},
                        {128, DType::kFloat16, false, false, true}, {32, DType::kFloat32, false, false, false},
                        {64, DType::kBFloat16, false, false, false}, {128, DType::kFloat32, true, false, false},
                        {256, DType::kFloat32, false, true, false}};
  for (const Case& c : cases) {
    FwdParams p;
    p.batch = 1; p.heads_q = p.heads_kv = 4; p.seq_q = p.seq_k = 2048; p.head_dim = c.head_dim;
    p.dtype = c.dtype; p.num_threads = 1;
    p.k_stride = p.v_stride = c.strided ? Strides{p.seq_k * 4 * c.head_dim, c.head_dim, 4 * c.head_dim}
                                        : contiguous(p.heads_kv, p.seq_k, c.head_dim);
    p.mask = make_mask(c.causal ? MaskKind::kCausalTopLeft : MaskKind::kNone, p.seq_q, p.seq_k, -1, -1);
    const bool fp32 = c.dtype == DType::kFloat32;
    const cpu::Tiling t = cpu::choose_forward_tiling(p, fp32);
    const std::string name = "forward tiling D" + std::to_string(c.head_dim) + (fp32 ? " fp32" : " 16-bit") +
                             (c.strided ? " strided" : "") + (c.causal ? " causal" : "");
    expect(t.prefetch_next == c.prefetch, name + ": requests the next key tile ahead");
    if (t.prefetch_next)
      expect(2 * 2 * t.block_k * c.head_dim * (fp32 ? 4 : 2) <= (int64_t{512} << 10),
             name + ": this key tile and the next within 512 KiB");
  }
}

// The backward's workspace: Delta, plus n_acc split dQ accumulators of d_pad floats per row, none where fp32
// dQ is added up in dq itself (one split, head dim a multiple of 16).
void test_backward_workspace() {
  struct Case { int64_t heads, seq, head_dim; DType dtype; int threads; int64_t n_acc; };
  const Case cases[] = {{4, 2048, 64, DType::kFloat32, 1, 0},  {4, 2048, 128, DType::kFloat32, 2, 0},
                        {4, 2048, 40, DType::kFloat32, 1, 1},  {4, 2048, 64, DType::kBFloat16, 1, 1},
                        {1, 2048, 64, DType::kFloat32, 2, 4},  {1, 64, 64, DType::kFloat32, 2, 0},
                        {1, 200, 64, DType::kFloat32, 2, 0},   {1, 2048, 64, DType::kBFloat16, 2, 4}};
  for (const Case& c : cases) {
    FwdParams p;
    p.batch = 1; p.heads_q = p.heads_kv = c.heads; p.seq_q = p.seq_k = c.seq; p.head_dim = c.head_dim;
    p.dtype = c.dtype; p.num_threads = c.threads;
    const int64_t rows = p.batch * p.heads_q * p.seq_q, d_pad = (c.head_dim + 15) / 16 * 16;
    const std::string name = std::string("backward workspace ") + (c.dtype == DType::kFloat32 ? "fp32" : "bf16") +
                             " H" + std::to_string(c.heads) + " S" + std::to_string(c.seq) + " D" +
                             std::to_string(c.head_dim) + " threads " + std::to_string(c.threads);
    expect(cpu::backward_workspace_size(p) == rows * (1 + c.n_acc * d_pad),
           name + ": Delta and " + std::to_string(c.n_acc) + " dQ accumulators");
  }
}

}  // namespace

int main() {
  test_mask_rules();
  test_forward_tiling();
  test_backward_workspace();
  const reference::Shape shapes[] = {
      {1, 1, 1, 1, 1, 1},     {1, 2, 1, 17, 17, 3},    {2, 4, 2, 113, 67, 40}, {1, 3, 3, 65, 130, 64},
      {1, 8, 1, 70, 203, 16}, {1, 2, 2, 129, 64, 130}, {1, 1, 1, 5, 0, 8},     {1, 2, 1, 1, 300, 72},  {1, 2, 1, 530, 300, 24}, {1, 1, 1, 300, 530, 144},
      {1, 8, 2, 3, 700, 64},  {2, 4, 4, 4, 150, 40},  {1, 4, 1, 2, 1000, 128}, {3, 2, 1, 1, 33, 16},
      {1, 4, 4, 1, 1000, 128}, {1, 8, 2, 1, 77, 128}, {2, 6, 2, 1, 45, 128},  // decode: 1, 4 and 3 rows per KV head
      {1, 4, 4, 9, 5, 16},  // fp32 dQ in place, with rows that see no key (bottom-right causal, Sq > Sk)
  };
  const MaskKind kinds[] = {MaskKind::kNone, MaskKind::kCausalTopLeft, MaskKind::kCausalBottomRight,
                            MaskKind::kWindow};
  int units = 0;
  for (int i = 0; i < cpu::kNumIsas; ++i) {
    const auto isa = static_cast<cpu::Isa>(i);
    if (!cpu::set_isa(isa)) continue;
    ++units;
    std::printf("unit %s\n", cpu::isa_name(isa));
    for (const auto& sh : shapes)
      for (const auto kind : kinds) run_case(sh, kind, kind == MaskKind::kWindow ? 9 : -1, kind == MaskKind::kWindow ? 4 : -1, isa);
  }
  expect(units >= 1, "at least one runnable unit");
  return test::test_result("cpu kernels");
}
