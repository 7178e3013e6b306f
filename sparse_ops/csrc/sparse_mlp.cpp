// Sparse MLP for a batch-1 decoder (Deja Vu / TEAL style gather-GEMV), reading only the selected
// rows of a prepared layout:
//   gu   [d_ff, G * d]  row j = gate_j followed by up_j (G = 2, GLU) or in_j (G = 1): one pass reads both
//   down [d_ff, d_out]  row j = W_down[:, j] (rows of W_down^T)
// For tokens sharing one index set (one token, or the union of a few, as Deja Vu batches):
//   h[t, s] = act(x_t . gate_j + bg_j) * (x_t . up_j + bu_j),  y_t = sum_s h[t, s] down_j (+ bd)
// fp32 or bf16 weights (decoded to fp32 by a 16-bit shift), fp32 accumulation. OpenMP splits the
// selected rows across threads, each with its own y accumulator, reduced at the end. Dot products
// are written for the compiler's vectoriser (-O3, the build machine's SIMD width: AVX-512 where the
// machine has it, AVX2 or SSE elsewhere), with the next row prefetched.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum Act : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.0f + std::exp(-v));
    case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
  }
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename W>
inline float dot(const float* __restrict x, const W* __restrict w, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += x[i] * load(w, i);
  return acc;
}

template <typename W>
inline void axpy(float a, const W* __restrict w, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * load(w, i);
}

template <typename W>
void run(const float* x, int64_t n_tok, int64_t d, const W* gu, int64_t groups, const W* down, int64_t d_out,
         const float* bg, const float* bu, const float* bd, const int64_t* idx, int64_t k, int64_t act,
         float* y, float* h) {
  const int64_t row = groups * d;
  int64_t n_threads = 1;
#ifdef _OPENMP
  n_threads = std::min<int64_t>(omp_get_max_threads(), std::max<int64_t>(1, k / 16));
#endif
  std::vector<float> partial(static_cast<size_t>(n_threads * n_tok * d_out), 0.0f);
#pragma omp parallel num_threads(n_threads)
  {
    int64_t tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* acc = partial.data() + tid * n_tok * d_out;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < k; ++s) {
      const int64_t j = idx[s];
      if (j < 0) continue;
      const W* g = gu + j * row;
      if (s + 1 < k && idx[s + 1] >= 0) {
        __builtin_prefetch(gu + idx[s + 1] * row, 0, 1);
        __builtin_prefetch(down + idx[s + 1] * d_out, 0, 1);
      }
      for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * d;
        float v = activate(dot(xt, g, d) + (bg ? bg[j] : 0.0f), act);
        if (groups == 2) v *= dot(xt, g + d, d) + (bu ? bu[j] : 0.0f);
        h[t * k + s] = v;
        axpy(v, down + j * d_out, acc + t * d_out, d_out);
      }
    }
  }
  for (int64_t t = 0; t < n_tok; ++t) {
    float* yt = y + t * d_out;
    for (int64_t i = 0; i < d_out; ++i) {
      float v = bd ? bd[i] : 0.0f;
      for (int64_t p = 0; p < n_threads; ++p) v += partial[(p * n_tok + t) * d_out + i];
      yt[i] = v;
    }
  }
}

const float* opt_ptr(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

}  // namespace

// x [n, d] fp32 contiguous; gu [d_ff, groups * d] and down [d_ff, d_out] fp32 or bf16 contiguous;
// idx [k] int64 (one index set shared by the n tokens, -1 = none). Returns (y [n, d_out], h [n, k]).
std::vector<torch::Tensor> sparse_mlp(torch::Tensor x, torch::Tensor gu, int64_t groups, torch::Tensor down,
                                      c10::optional<torch::Tensor> bg, c10::optional<torch::Tensor> bu,
                                      c10::optional<torch::Tensor> bd, torch::Tensor idx, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: [n, d] fp32 contiguous");
  TORCH_CHECK(gu.is_contiguous() && down.is_contiguous(), "prepared weights must be contiguous");
  TORCH_CHECK(gu.scalar_type() == down.scalar_type(), "gate/up and down must share a dtype");
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.dim() == 1 && idx.is_contiguous(), "idx: [k] int64");
  TORCH_CHECK(groups == 1 || groups == 2, "groups is 1 or 2");
  const int64_t n = x.size(0), d = x.size(1), k = idx.size(0), d_out = down.size(1);
  TORCH_CHECK(gu.size(1) == groups * d && gu.size(0) == down.size(0), "weight shapes do not match x");
  auto y = torch::empty({n, d_out}, x.options());
  auto h = torch::zeros({n, k}, x.options());
  if (gu.scalar_type() == torch::kFloat32) {
    run<float>(x.data_ptr<float>(), n, d, gu.data_ptr<float>(), groups, down.data_ptr<float>(), d_out, opt_ptr(bg),
               opt_ptr(bu), opt_ptr(bd), idx.data_ptr<int64_t>(), k, act, y.data_ptr<float>(), h.data_ptr<float>());
  } else {
    TORCH_CHECK(gu.scalar_type() == torch::kBFloat16, "weights: fp32 or bf16");
    run<uint16_t>(x.data_ptr<float>(), n, d, reinterpret_cast<const uint16_t*>(gu.data_ptr()), groups,
                  reinterpret_cast<const uint16_t*>(down.data_ptr()), d_out, opt_ptr(bg), opt_ptr(bu), opt_ptr(bd),
                  idx.data_ptr<int64_t>(), k, act, y.data_ptr<float>(), h.data_ptr<float>());
  }
  return {y, h};
}

// The floor: read the same rows once (gate/up and down), summing in registers; returns the sum so
// the compiler cannot drop the reads.
double read_rows(torch::Tensor gu, torch::Tensor down, torch::Tensor idx) {
  const int64_t k = idx.size(0), row = gu.size(1), d_out = down.size(1);
  const int64_t* ix = idx.data_ptr<int64_t>();
  double total = 0.0;
  auto body = [&](auto* g, auto* dn) {
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (int64_t s = 0; s < k; ++s) {
      float acc = 0.0f;
      const auto* a = g + ix[s] * row;
      const auto* b = dn + ix[s] * d_out;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < row; ++i) acc += load(a, i);
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < d_out; ++i) acc += load(b, i);
      total += acc;
    }
  };
  if (gu.scalar_type() == torch::kFloat32) body(gu.data_ptr<float>(), down.data_ptr<float>());
  else body(reinterpret_cast<const uint16_t*>(gu.data_ptr()), reinterpret_cast<const uint16_t*>(down.data_ptr()));
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_mlp", &sparse_mlp, "sparse MLP over one shared index set (fp32/bf16 weights)");
  m.def("read_rows", &read_rows, "read the selected rows once (bandwidth floor)");
}
