// The CUDA kernels of csrc/cuda, compiled unchanged for the CPU emulation of tests/cpp/cuda_emu (threads as
// fibers, warp collectives computed lane by lane with the PTX ISA's fragment maps) and checked against the
// double reference: forward, and backward with atomic and with deterministic dQ, for every head-dim bucket,
// fp16 and bf16, odd sizes, both causal alignments, windows, GQA, the bshd layout and rows without keys.
// What it cannot show: timing and the hardware itself (copies land at their wait, warps drift between
// barriers, so missing synchronisation does show).
#include "emu_runtime.h"

#include <random>
#include <string>

#include "expect.h"
#include "attnext/reference.h"
#include "cuda/tiles.cuh"

namespace attnext::cuda {
alignas(16) unsigned char smem[256 * 1024];  // the blocks' shared memory (blocks run one at a time)
}

using namespace attnext;
using namespace attnext::cuda;

namespace {

using test::expect;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Values rounded to T, kept both as T (kernel input) and as float (reference input).
template <class T>
struct Rounded {
  std::vector<T> t;
  std::vector<float> f;
  Rounded(size_t n, std::mt19937& rng) : t(n), f(n) {
    std::normal_distribution<float> normal;
    for (size_t i = 0; i < n; ++i) {
      t[i] = from_float<T>(normal(rng));
      f[i] = to_float(t[i]);
    }
  }
};

// max |got - ref| / (1 + max |ref|), NaN-aware; got is read with the given (b, h, s) strides.
template <class G>
double rel_error(const G& got, const std::vector<double>& ref, const reference::Shape& sh, int64_t heads, int64_t seq,
                 Strides st) {
  double err = 0.0, scale = 0.0;
  for (int64_t b = 0; b < sh.batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s < seq; ++s)
        for (int64_t d = 0; d < sh.head_dim; ++d) {
          const double r = ref[((b * heads + h) * seq + s) * sh.head_dim + d];
          const double x = got(b * st.b + h * st.h + s * st.s + d);
          if (std::isnan(x)) return INFINITY;
          err = std::fmax(err, std::fabs(x - r));
          scale = std::fmax(scale, std::fabs(r));
        }
  return err / (1.0 + scale);
}

Strides strides(int64_t heads, int64_t seq, int64_t d, bool bshd) {
  return bshd ? Strides{seq * heads * d, d, heads * d} : Strides{heads * seq * d, seq * d, d};
}

// The reference's (b, h, s, d)-contiguous copy of a tensor stored with strides st.
std::vector<float> to_bhsd(const std::vector<float>& x, int64_t batch, int64_t heads, int64_t seq, int64_t d,
                           Strides st) {
  std::vector<float> out(x.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s < seq; ++s)
        for (int64_t c = 0; c < d; ++c) out[((b * heads + h) * seq + s) * d + c] = x[b * st.b + h * st.h + s * st.s + c];
  return out;
}

// Backward configurations: 0 Tiles::Bwd and BwdDq (two stages), 1 BwdOneStage and BwdDqOneStage,
// 2 BwdSmall and BwdDqOneStage.
template <class T, int kD, int kBwdVariant = 0>
void run_case(const char* dtype, reference::Shape sh, MaskKind kind, int64_t left, int64_t right, bool bshd) {
  using Tl = Tiles<T, kD>;
  using Fwd = typename Tl::Fwd;
  const std::string name = std::string(dtype) + " D" + std::to_string(sh.head_dim) + " (bucket " +
                           std::to_string(kD) + ") B" + std::to_string(sh.batch) + " Hq" +
                           std::to_string(sh.heads_q) + " Hkv" + std::to_string(sh.heads_kv) + " Sq" +
                           std::to_string(sh.seq_q) + " Sk" + std::to_string(sh.seq_k) + " mask" +
                           std::to_string(int(kind)) + (bshd ? " bshd" : "") + " bwd variant " + std::to_string(kBwdVariant);
  const bool half = std::is_same_v<T, __half>;
  const double tol_out = half ? 4e-3 : 2e-2, tol_grad = half ? 1e-2 : 5e-2;
  std::mt19937 rng(99 + sh.seq_q * 13 + sh.seq_k + kD);
  const int64_t D = sh.head_dim, nq = sh.batch * sh.heads_q * sh.seq_q * D, nk = sh.batch * sh.heads_kv * sh.seq_k * D;
  Rounded<T> q(nq, rng), k(nk, rng), v(nk, rng), dout(nq, rng);
  const double scale = 1.0 / std::sqrt(double(D));
  const MaskSpec mask = make_mask(kind, sh.seq_q, sh.seq_k, left, right);

  // Forward, outputs and shared memory poisoned with NaN bit patterns.
  std::vector<T> out(nq, T{0xFFFF});
  std::vector<float> lse(sh.batch * sh.heads_q * sh.seq_q, NAN);
  FwdParams p;
  p.q = q.t.data(); p.k = k.t.data(); p.v = v.t.data(); p.out = out.data(); p.lse = lse.data();
  p.q_stride = p.out_stride = strides(sh.heads_q, sh.seq_q, D, bshd);
  p.k_stride = p.v_stride = strides(sh.heads_kv, sh.seq_k, D, bshd);
  p.batch = sh.batch; p.heads_q = sh.heads_q; p.heads_kv = sh.heads_kv;
  p.seq_q = sh.seq_q; p.seq_k = sh.seq_k; p.head_dim = D;
  p.dtype = half ? DType::kFloat16 : DType::kBFloat16;
  p.scale = float(scale); p.mask = mask;
  std::memset(smem, 0xFF, sizeof(smem));
  emu::launch(dim3(unsigned(ceil_div(sh.seq_q, Fwd::kBlockM)), unsigned(sh.heads_q), unsigned(sh.batch)),
              dim3(Fwd::kThreads), [&] { fwd_kernel<Fwd>(p); });

  std::vector<double> ref_out, ref_lse, ref_dq, ref_dk, ref_dv;
  const auto rq = to_bhsd(q.f, sh.batch, sh.heads_q, sh.seq_q, D, p.q_stride);
  const auto rk = to_bhsd(k.f, sh.batch, sh.heads_kv, sh.seq_k, D, p.k_stride);
  const auto rv = to_bhsd(v.f, sh.batch, sh.heads_kv, sh.seq_k, D, p.v_stride);
  const auto rdout = to_bhsd(dout.f, sh.batch, sh.heads_q, sh.seq_q, D, p.q_stride);
  reference::forward(sh, rq.data(), rk.data(), rv.data(), scale, mask, ref_out, ref_lse);
  auto out_at = [&](int64_t i) { return double(to_float(out[i])); };
  const double e_out = rel_error(out_at, ref_out, sh, sh.heads_q, sh.seq_q, p.out_stride);
  expect(e_out <= tol_out, name + ": forward out error " + std::to_string(e_out));
  for (size_t i = 0; i < lse.size(); ++i) {
    const bool ok = std::isinf(ref_lse[i]) ? lse[i] == -INFINITY : std::fabs(lse[i] - ref_lse[i]) < 1e-3 * (1 + std::fabs(ref_lse[i]));
    if (!ok) {
      expect(false, name + ": lse row " + std::to_string(i) + " " + std::to_string(lse[i]) + " vs " +
                        std::to_string(ref_lse[i]));
      break;
    }
  }

  // Backward, both dQ paths: preprocess, key-block pass, then the dQ convert or the deterministic dQ pass.
  reference::backward(sh, rq.data(), rk.data(), rv.data(), rdout.data(), scale, mask, ref_dq, ref_dk, ref_dv);
  for (bool deterministic : {false, true}) {
    using Bwd = std::conditional_t<kBwdVariant == 0, typename Tl::Bwd,
                                   std::conditional_t<kBwdVariant == 1, typename Tl::BwdOneStage, typename Tl::BwdSmall>>;
    using Dq = std::conditional_t<kBwdVariant == 0, typename Tl::BwdDq, typename Tl::BwdDqOneStage>;
    std::vector<T> dq(nq, T{0xFFFF}), dk(nk, T{0xFFFF}), dv(nk, T{0xFFFF});
    std::vector<float> workspace(sh.batch * sh.heads_q * sh.seq_q * (1 + D), NAN);
    BwdParams bp;
    bp.fwd = p;
    bp.dout = dout.t.data(); bp.dq = dq.data(); bp.dk = dk.data(); bp.dv = dv.data();
    bp.dout_stride = bp.dq_stride = p.q_stride;
    bp.dk_stride = bp.dv_stride = p.k_stride;
    BwdWork w;
    w.delta = workspace.data();
    w.dq_accum = deterministic ? nullptr : workspace.data() + sh.batch * sh.heads_q * sh.seq_q;
    const dim3 rows(unsigned(ceil_div(sh.seq_q, kPreprocessRows)), unsigned(sh.heads_q), unsigned(sh.batch));
    std::memset(smem, 0xFF, sizeof(smem));
    emu::launch(rows, dim3(128), [&] { bwd_preprocess_kernel<T>(bp, w); });
    emu::launch(dim3(unsigned(ceil_div(sh.seq_k, Bwd::kBlockN)), unsigned(sh.heads_kv), unsigned(sh.batch)),
                dim3(Bwd::kThreads), [&] { bwd_kernel<Bwd>(bp, w); });
    if (deterministic)
      emu::launch(dim3(unsigned(ceil_div(sh.seq_q, Dq::kBlockM)), unsigned(sh.heads_q), unsigned(sh.batch)),
                  dim3(Dq::kThreads), [&] { bwd_dq_kernel<Dq>(bp, w); });
    else
      emu::launch(rows, dim3(128), [&] { bwd_convert_dq_kernel<T>(bp, w); });
    const std::string tag = name + (deterministic ? " deterministic" : " atomic");
    auto at = [](const std::vector<T>& x) { return [&x](int64_t i) { return double(to_float(x[i])); }; };
    const double eq = rel_error(at(dq), ref_dq, sh, sh.heads_q, sh.seq_q, bp.dq_stride);
    const double ek = rel_error(at(dk), ref_dk, sh, sh.heads_kv, sh.seq_k, bp.dk_stride);
    const double ev = rel_error(at(dv), ref_dv, sh, sh.heads_kv, sh.seq_k, bp.dv_stride);
    expect(eq <= tol_grad && ek <= tol_grad && ev <= tol_grad,
           tag + ": backward errors dq " + std::to_string(eq) + " dk " + std::to_string(ek) + " dv " + std::to_string(ev));
  }
}

// A NaN in q row 3 makes every score of that row NaN; a NaN in k row 5 makes the scores of every row
// that sees key 5 NaN (causal top-left: rows 5 on). Those rows' out and lse must be NaN, the others finite.
template <class T, int kD>
void run_nan_case(const char* dtype) {
  using Fwd = typename Tiles<T, kD>::Fwd;
  const int64_t S = 40, D = kD, n = S * D;
  std::mt19937 rng(7);
  Rounded<T> q(n, rng), k(n, rng), v(n, rng);
  q.t[3 * D + 1] = from_float<T>(NAN);
  k.t[5 * D + 2] = from_float<T>(NAN);
  for (const MaskKind kind : {MaskKind::kNone, MaskKind::kCausalTopLeft}) {
    std::vector<T> out(n, T{0});
    std::vector<float> lse(S, 0.0f);
    FwdParams p;
    p.q = q.t.data(); p.k = k.t.data(); p.v = v.t.data(); p.out = out.data(); p.lse = lse.data();
    p.q_stride = p.k_stride = p.v_stride = p.out_stride = strides(1, S, D, false);
    p.batch = p.heads_q = p.heads_kv = 1;
    p.seq_q = p.seq_k = S; p.head_dim = D;
    p.dtype = std::is_same_v<T, __half> ? DType::kFloat16 : DType::kBFloat16;
    p.scale = 0.125f; p.mask = make_mask(kind, S, S, -1, -1);
    emu::launch(dim3(unsigned(ceil_div(S, Fwd::kBlockM)), 1, 1), dim3(Fwd::kThreads), [&] { fwd_kernel<Fwd>(p); });
    for (int64_t i = 0; i < S; ++i) {
      const bool nan_row = i == 3 || kind == MaskKind::kNone || i >= 5;
      const bool out_nan = std::isnan(to_float(out[i * D])), lse_nan = std::isnan(lse[i]);
      expect(out_nan == nan_row && lse_nan == nan_row,
             std::string(dtype) + " NaN inputs, mask " + std::to_string(int(kind)) + ": row " + std::to_string(i) +
                 " out " + std::to_string(to_float(out[i * D])) + " lse " + std::to_string(lse[i]));
    }
  }
}

template <class T>
void run_dtype(const char* dtype) {
  run_nan_case<T, 64>(dtype);
  using M = MaskKind;
  run_case<T, 32>(dtype, {1, 2, 1, 37, 70, 32}, M::kCausalTopLeft, -1, -1, false);
  run_case<T, 64>(dtype, {2, 4, 2, 70, 37, 40}, M::kCausalBottomRight, -1, -1, false);  // rows without keys
  run_case<T, 64>(dtype, {1, 2, 2, 130, 65, 64}, M::kNone, -1, -1, true);
  run_case<T, 96>(dtype, {1, 2, 1, 33, 100, 96}, M::kWindow, 7, 3, false);
  run_case<T, 128>(dtype, {1, 3, 1, 65, 129, 128}, M::kCausalBottomRight, -1, -1, true);
  run_case<T, 192>(dtype, {1, 2, 2, 47, 47, 136}, M::kCausalTopLeft, -1, -1, false);
  run_case<T, 256>(dtype, {1, 2, 1, 20, 45, 256}, M::kWindow, -1, 5, false);
  run_case<T, 256, 2>(dtype, {1, 2, 2, 33, 40, 200}, M::kCausalBottomRight, -1, -1, false);
  run_case<T, 128, 1>(dtype, {2, 4, 2, 100, 80, 120}, M::kCausalTopLeft, -1, -1, false);
  run_case<T, 64>(dtype, {1, 4, 1, 1, 1, 64}, M::kNone, -1, -1, false);
  run_case<T, 128>(dtype, {1, 8, 2, 17, 203, 72}, M::kCausalBottomRight, 9, -1, false);  // window on causal
}

}  // namespace

int main() {
  run_dtype<__half>("fp16");
  run_dtype<__nv_bfloat16>("bf16");
  return test::test_result("cuda kernels (emulated)");
}
