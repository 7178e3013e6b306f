// Sparse MLP for a batch-1 decoder (Deja Vu / TEAL style gather-GEMV), reading only the selected
// rows of a prepared layout:
//   gu   [d_ff, G * d]  row j = gate_j followed by up_j (G = 2, GLU) or in_j (G = 1): one pass reads both
//   down [d_ff, d_out]  row j = W_down[:, j] (rows of W_down^T)
// For tokens sharing one index set (one token, or the union of a few, as Deja Vu batches):
//   h[t, s] = act(x_t . gate_j + bg_j) * (x_t . up_j + bu_j),  y_t = sum_s h[t, s] down_j (+ bd)
// fp32 or bf16 weights, fp32 accumulation. The kernel itself is in sparse_mlp_kernel.h (AVX-512
// intrinsics where the build targets them, a portable vectoriser path elsewhere). act 4 is gpt-oss's
// clamped SwiGLU, with its limit and alpha.
// Also a projection with a sparse input (sparse_input_kernel.h): y_t = sum over the selected input
// channels i of x_t[i] wt_i (+ b), wt [d_in, d_out] = rows of W^T.
#include <torch/extension.h>

#include "sparse_input_kernel.h"
#include "sparse_mlp_kernel.h"

namespace {

const float* opt_ptr(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

void check(const torch::Tensor& x, const torch::Tensor& gu, int64_t groups, const torch::Tensor& down,
           const torch::Tensor& idx) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: [n, d] fp32 contiguous");
  TORCH_CHECK(gu.is_contiguous() && down.is_contiguous(), "prepared weights must be contiguous");
  TORCH_CHECK(gu.scalar_type() == down.scalar_type(), "gate/up and down must share a dtype");
  TORCH_CHECK(gu.scalar_type() == torch::kFloat32 || gu.scalar_type() == torch::kBFloat16, "weights: fp32 or bf16");
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.is_contiguous(), "idx: int64 contiguous");
  TORCH_CHECK(groups == 1 || groups == 2, "groups is 1 or 2");
  TORCH_CHECK(gu.size(1) == groups * x.size(1) && gu.size(0) == down.size(0), "weight shapes do not match x");
  const int64_t d_ff = gu.size(0), n = idx.numel();
  const int64_t* p = idx.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= p[i] >= -1 && p[i] < d_ff;
  TORCH_CHECK(ok, "idx out of range");
}

template <typename W>
samviz::Problem<W> problem(const float* x, int64_t n, int64_t d, const torch::Tensor& gu, int64_t groups,
                           const torch::Tensor& down, const c10::optional<torch::Tensor>& bg,
                           const c10::optional<torch::Tensor>& bu, const c10::optional<torch::Tensor>& bd,
                           const int64_t* idx, int64_t k, int64_t act, double limit, double alpha, float* y,
                           float* h) {
  return samviz::Problem<W>{x, n, d, reinterpret_cast<const W*>(gu.data_ptr()), groups,
                            reinterpret_cast<const W*>(down.data_ptr()), down.size(1), opt_ptr(bg), opt_ptr(bu),
                            opt_ptr(bd), idx, k, act, y, h, static_cast<float>(limit), static_cast<float>(alpha)};
}

}  // namespace

// x [n, d] fp32; idx [k] int64 shared by the n tokens (-1 = none), into y [n, d_out] and h [n, k] (fp32,
// contiguous): no allocation per call.
void sparse_mlp_out(torch::Tensor x, torch::Tensor gu, int64_t groups, torch::Tensor down,
                    c10::optional<torch::Tensor> bg, c10::optional<torch::Tensor> bu, c10::optional<torch::Tensor> bd,
                    torch::Tensor idx, int64_t act, double limit, double alpha, torch::Tensor y, torch::Tensor h) {
  check(x, gu, groups, down, idx);
  TORCH_CHECK(idx.dim() == 1, "idx: [k]");
  const int64_t n = x.size(0), d = x.size(1), k = idx.size(0);
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.numel() == n * down.size(1), "y: [n, d_out]");
  TORCH_CHECK(h.scalar_type() == torch::kFloat32 && h.is_contiguous() && h.numel() == n * k, "h: [n, k]");
  if (gu.scalar_type() == torch::kFloat32)
    samviz::run(problem<float>(x.data_ptr<float>(), n, d, gu, groups, down, bg, bu, bd, idx.data_ptr<int64_t>(), k,
                               act, limit, alpha, y.data_ptr<float>(), h.data_ptr<float>()));
  else
    samviz::run(problem<uint16_t>(x.data_ptr<float>(), n, d, gu, groups, down, bg, bu, bd, idx.data_ptr<int64_t>(),
                                  k, act, limit, alpha, y.data_ptr<float>(), h.data_ptr<float>()));
}

// x [n, d] fp32; idx [k] int64 shared by the n tokens (-1 = none). Returns (y [n, d_out], h [n, k]).
std::vector<torch::Tensor> sparse_mlp(torch::Tensor x, torch::Tensor gu, int64_t groups, torch::Tensor down,
                                      c10::optional<torch::Tensor> bg, c10::optional<torch::Tensor> bu,
                                      c10::optional<torch::Tensor> bd, torch::Tensor idx, int64_t act, double limit,
                                      double alpha) {
  TORCH_CHECK(x.dim() == 2 && idx.dim() == 1, "x: [n, d], idx: [k]");
  auto y = torch::empty({x.size(0), down.size(1)}, x.options());
  auto h = torch::empty({x.size(0), idx.size(0)}, x.options());
  sparse_mlp_out(x, gu, groups, down, bg, bu, bd, idx, act, limit, alpha, y, h);
  return {y, h};
}

// x [n, d] fp32; idx [n, k] int64, each token its own set (-1 = none): the kernel registry's signature.
std::vector<torch::Tensor> sparse_mlp_tokens(torch::Tensor x, torch::Tensor gu, int64_t groups, torch::Tensor down,
                                             c10::optional<torch::Tensor> bg, c10::optional<torch::Tensor> bu,
                                             c10::optional<torch::Tensor> bd, torch::Tensor idx, int64_t act,
                                             double limit, double alpha) {
  check(x, gu, groups, down, idx);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0), "idx: [n, k]");
  const int64_t n = x.size(0), d = x.size(1), k = idx.size(1), d_out = down.size(1);
  auto y = torch::empty({n, d_out}, x.options());
  auto h = torch::empty({n, k}, x.options());
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x.data_ptr<float>() + t * d;
    const int64_t* it = idx.data_ptr<int64_t>() + t * k;
    float* yt = y.data_ptr<float>() + t * d_out;
    float* ht = h.data_ptr<float>() + t * k;
    if (gu.scalar_type() == torch::kFloat32)
      samviz::run(problem<float>(xt, 1, d, gu, groups, down, bg, bu, bd, it, k, act, limit, alpha, yt, ht));
    else
      samviz::run(problem<uint16_t>(xt, 1, d, gu, groups, down, bg, bu, bd, it, k, act, limit, alpha, yt, ht));
  }
  return {y, h};
}

// The floor: read the same rows once (gate/up and down) and nothing else; returns a sum of the
// bits so the reads cannot be dropped.
double read_rows(torch::Tensor gu, torch::Tensor down, torch::Tensor idx) {
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.dim() == 1 && idx.is_contiguous(), "idx: [k] int64");
  TORCH_CHECK(gu.is_contiguous() && down.is_contiguous() && gu.scalar_type() == down.scalar_type(), "weights");
  if (gu.scalar_type() == torch::kFloat32)
    return samviz::read_rows(gu.data_ptr<float>(), gu.size(1), down.data_ptr<float>(), down.size(1),
                             idx.data_ptr<int64_t>(), idx.size(0));
  TORCH_CHECK(gu.scalar_type() == torch::kBFloat16, "weights: fp32 or bf16");
  return samviz::read_rows(reinterpret_cast<const uint16_t*>(gu.data_ptr()), gu.size(1),
                           reinterpret_cast<const uint16_t*>(down.data_ptr()), down.size(1),
                           idx.data_ptr<int64_t>(), idx.size(0));
}

// x [n, d_in] fp32; wt [d_in, d_out] (rows of W^T) fp32 or bf16; bias [d_out] fp32 or None; idx [n, k] int64,
// each token its own set of input channels (-1 = none). Returns y [n, d_out] fp32.
torch::Tensor sparse_input(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias, torch::Tensor idx) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: [n, d_in] fp32 contiguous");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.size(0) == x.size(1), "wt: [d_in, d_out] contiguous");
  TORCH_CHECK(wt.scalar_type() == torch::kFloat32 || wt.scalar_type() == torch::kBFloat16, "wt: fp32 or bf16");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.scalar_type() == torch::kInt64 && idx.is_contiguous(),
              "idx: [n, k] int64 contiguous");
  const int64_t n = x.size(0), d_in = x.size(1), d_out = wt.size(1), k = idx.size(1);
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == d_out),
              "bias: [d_out] fp32 contiguous");
  const int64_t* ip = idx.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0; i < n * k; ++i) ok &= ip[i] >= -1 && ip[i] < d_in;
  TORCH_CHECK(ok, "idx out of range");
  auto y = torch::empty({n, d_out}, x.options());
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x.data_ptr<float>() + t * d_in;
    float* yt = y.data_ptr<float>() + t * d_out;
    if (wt.scalar_type() == torch::kFloat32)
      samviz::run_input(samviz::InputProblem<float>{xt, d_in, wt.data_ptr<float>(), d_out, opt_ptr(bias), ip + t * k,
                                                    k, yt});
    else
      samviz::run_input(samviz::InputProblem<uint16_t>{xt, d_in, reinterpret_cast<const uint16_t*>(wt.data_ptr()),
                                                       d_out, opt_ptr(bias), ip + t * k, k, yt});
  }
  return y;
}

// The input kernel's floor: read the selected rows of wt once (idx [k] int64, all valid) and nothing else.
double read_input_rows(torch::Tensor wt, torch::Tensor idx) {
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.dim() == 1 && idx.is_contiguous(), "idx: [k] int64");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "wt: [d_in, d_out] contiguous");
  if (wt.scalar_type() == torch::kFloat32)
    return samviz::read_input_rows(wt.data_ptr<float>(), wt.size(1), idx.data_ptr<int64_t>(), idx.size(0));
  TORCH_CHECK(wt.scalar_type() == torch::kBFloat16, "wt: fp32 or bf16");
  return samviz::read_input_rows(reinterpret_cast<const uint16_t*>(wt.data_ptr()), wt.size(1),
                                 idx.data_ptr<int64_t>(), idx.size(0));
}

std::string isa() { return samviz::isa(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_mlp", &sparse_mlp, "sparse MLP over one shared index set (fp32/bf16 weights)");
  m.def("sparse_mlp_out", &sparse_mlp_out, "sparse_mlp into given y and h");
  m.def("sparse_mlp_tokens", &sparse_mlp_tokens, "sparse MLP, each token with its own index set");
  m.def("read_rows", &read_rows, "read the selected rows once (bandwidth floor)");
  m.def("sparse_input", &sparse_input, "a projection with a sparse input, each token with its own set");
  m.def("read_input_rows", &read_input_rows, "read the selected rows of W^T once (the input kernel's floor)");
  m.def("isa", &isa, "which code path was compiled: avx512 or portable");
}
