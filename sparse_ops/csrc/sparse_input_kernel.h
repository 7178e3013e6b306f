// A linear projection with a sparse input (TEAL, R-Sparse, Q-Sparse): y = sum over the selected
// input channels i of x_i * W[:, i] (+ b), reading only the selected rows of W^T:
//   wt [d_in, d_out]  row i = W[:, i], one contiguous row per input channel
// so the bytes read are the selected rows' and nothing else. Torch-free, like sparse_mlp_kernel.h,
// whose helpers (chunks, bf16 decoding, thread split, per-thread accumulators) it reuses: threads
// (OpenMP) split the selected rows, each keeps its own y, and the partial ys are summed at the end.
// On the AVX-512 path R rows are added per step (the accumulator is loaded and stored once per R
// rows, R + 1 streams in flight) with the rows `dist` steps ahead prefetched, as the MLP kernel does.
#pragma once

#include "sparse_mlp_kernel.h"

namespace samviz {

template <typename W>
struct InputProblem {
  const float* x;       // [d_in] one token
  int64_t d_in;
  const W* wt;          // [d_in, d_out]
  int64_t d_out;
  const float* bias;    // [d_out], nullptr = none
  const int64_t* idx;   // [k] selected input channels, -1 = none
  int64_t k;
  float* y;             // [d_out]
};

#if SAM_VIZ_AVX512
// acc += sum over the RR rows w[r] of a[r] * w[r] (acc chunk-permuted for bf16, as load_chunk
// decodes); nxt: the rows to prefetch, or nullptr.
template <typename W, int RR>
inline void add_rows(const W* const* w, const __m512* a, const char* const* nxt, int64_t d_out, float* acc) {
  const int64_t full = d_out / CH, co = chunks(d_out);
  const int64_t chunk_bytes = CH * static_cast<int64_t>(sizeof(W));
  const int64_t lines = std::max<int64_t>(1, chunk_bytes / 64);
  for (int64_t c = 0; c < co; ++c) {
    if (nxt)
      for (int64_t l = 0; l < lines; ++l)
        for (int r = 0; r < RR; ++r) _mm_prefetch(nxt[r] + c * chunk_bytes + 64 * l, SAM_VIZ_PF_HINT);
    float* y = acc + c * CH;
    __m512 y0 = _mm512_load_ps(y), y1 = _mm512_load_ps(y + 16), w0, w1;
    for (int r = 0; r < RR; ++r) {
      if (c < full) load_chunk_full(w[r], c, w0, w1);
      else load_chunk(w[r], c, d_out, w0, w1);
      y0 = _mm512_fmadd_ps(a[r], w0, y0);
      y1 = _mm512_fmadd_ps(a[r], w1, y1);
    }
    _mm512_store_ps(y, y0);
    _mm512_store_ps(y + 16, y1);
  }
}

template <typename W, int R>
void input_rows_avx512(const InputProblem<W>& p, const int64_t* sel, int64_t n, float* acc) {
  const int64_t row_bytes = p.d_out * static_cast<int64_t>(sizeof(W));
  const int64_t dist = std::max<int64_t>(1, (SAM_VIZ_PF_BYTES + R * row_bytes - 1) / (R * row_bytes));  // steps
  for (int64_t q = 0; q < std::min(n, R * dist); ++q) prefetch_row(p.wt + sel[q] * p.d_out, 0, row_bytes);
  int64_t s = 0;
  for (; s + R <= n; s += R) {
    const W* w[R];
    __m512 a[R];
    const char* nxt[R];
    const bool pf = s + R * dist + R <= n;
    for (int r = 0; r < R; ++r) {
      w[r] = p.wt + sel[s + r] * p.d_out;
      a[r] = _mm512_set1_ps(p.x[sel[s + r]]);
      nxt[r] = pf ? reinterpret_cast<const char*>(p.wt + sel[s + R * dist + r] * p.d_out) : nullptr;
    }
    add_rows<W, R>(w, a, pf ? nxt : nullptr, p.d_out, acc);
  }
  for (; s < n; ++s) {  // rows left over (already prefetched): one at a time
    const W* w[1] = {p.wt + sel[s] * p.d_out};
    const __m512 a[1] = {_mm512_set1_ps(p.x[sel[s]])};
    add_rows<W, 1>(w, a, nullptr, p.d_out, acc);
  }
}
#endif

template <typename W>
void run_input(const InputProblem<W>& p) {
  int64_t* sel = reinterpret_cast<int64_t*>(scratch(0, static_cast<size_t>(2 * p.k + 16)));
  int64_t n = 0;
  for (int64_t s = 0; s < p.k; ++s)
    if (p.idx[s] >= 0) sel[n++] = p.idx[s];
  const int64_t n_threads = threads_for(n, p.d_out * static_cast<int64_t>(sizeof(W)));
#if SAM_VIZ_AVX512
  const int64_t ys = chunks(p.d_out) * CH;
  const int64_t part_stride = (ys + 1023) / 1024 * 1024;  // each thread's accumulator on its own page
  float* partial = skewed(scratch(1, static_cast<size_t>(n_threads * part_stride + 1024)),
                          reinterpret_cast<uintptr_t>(p.wt) + SAM_VIZ_SKEW_ACC);
#else
  const int64_t ys = p.d_out, part_stride = ys;
  float* partial = scratch(1, static_cast<size_t>(n_threads * ys));
#endif
#pragma omp parallel num_threads(n_threads)
  {
    const int64_t tid = thread_id();
    const int64_t lo = n * tid / n_threads, hi = n * (tid + 1) / n_threads;
    float* acc = partial + tid * part_stride;
    std::memset(acc, 0, static_cast<size_t>(ys) * sizeof(float));
#if SAM_VIZ_AVX512
    input_rows_avx512<W, SAM_VIZ_ROWS>(p, sel + lo, hi - lo, acc);
#else
    for (int64_t q = lo; q < hi; ++q) {
      if (q + 1 < hi) __builtin_prefetch(p.wt + sel[q + 1] * p.d_out, 0, 1);
      axpy_portable(p.x[sel[q]], p.wt + sel[q] * p.d_out, acc, p.d_out);
    }
#endif
  }
#if SAM_VIZ_AVX512
  reduce_out<W>(partial, n_threads, part_stride, p.d_out, p.bias, p.y);
#else
  for (int64_t i = 0; i < p.d_out; ++i) {
    float v = p.bias ? p.bias[i] : 0.0f;
    for (int64_t th = 0; th < n_threads; ++th) v += partial[th * ys + i];
    p.y[i] = v;
  }
#endif
}

#if SAM_VIZ_AVX512
// The floor's inner loop: R rows read side by side, the rows `dist` steps ahead prefetched, raw
// 512-bit words summed (the kernel's access pattern without its arithmetic).
template <typename W, int R>
double floor_input(const W* wt, int64_t d_out, const int64_t* idx, int64_t k) {
  const int64_t rb = d_out * static_cast<int64_t>(sizeof(W)), body = rb / 64 * 64;
  const int64_t dist = std::max<int64_t>(1, (SAM_VIZ_PF_BYTES + R * rb - 1) / (R * rb));
  __m512i a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();
  int64_t tail = 0, s = 0;
  for (; s + R <= k; s += R) {
    const char *p[R], *nx[R];
    const bool pf = s + R * dist + R <= k;
    for (int r = 0; r < R; ++r) {
      p[r] = reinterpret_cast<const char*>(wt + idx[s + r] * d_out);
      nx[r] = pf ? reinterpret_cast<const char*>(wt + idx[s + R * dist + r] * d_out) : nullptr;
    }
    for (int64_t o = 0; o < body; o += 64)
      for (int r = 0; r < R; ++r) {
        if (pf) _mm_prefetch(nx[r] + o, SAM_VIZ_PF_HINT);
        a[r] = _mm512_add_epi32(a[r], _mm512_loadu_si512(p[r] + o));
      }
    for (int r = 0; r < R; ++r)
      for (int64_t o = body; o < rb; ++o) tail += p[r][o];
  }
  for (; s < k; ++s) {
    const char* p = reinterpret_cast<const char*>(wt + idx[s] * d_out);
    for (int64_t o = 0; o < body; o += 64) a[0] = _mm512_add_epi32(a[0], _mm512_loadu_si512(p + o));
    for (int64_t o = body; o < rb; ++o) tail += p[o];
  }
  for (int r = 1; r < R; ++r) a[0] = _mm512_add_epi32(a[0], a[r]);
  return static_cast<double>(_mm512_reduce_add_epi32(a[0])) + static_cast<double>(tail);
}
#endif

// The floor: read the selected rows of wt once, with the kernel's thread split, and nothing else.
// Returns a sum of the bits so that the reads cannot be dropped.
template <typename W>
double read_input_rows(const W* wt, int64_t d_out, const int64_t* idx, int64_t k) {
  const int64_t n_threads = threads_for(k, d_out * static_cast<int64_t>(sizeof(W)));
  double total = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(+ : total)
  {
    const int64_t tid = thread_id();
    const int64_t lo = k * tid / n_threads, hi = k * (tid + 1) / n_threads;
#if SAM_VIZ_AVX512
    total += floor_input<W, SAM_VIZ_FLOOR_ROWS>(wt, d_out, idx + lo, hi - lo);
#else
    float acc = 0.0f;
    for (int64_t s = lo; s < hi; ++s) {
      const W* a = wt + idx[s] * d_out;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < d_out; ++i) acc += to_f32(a[i]);
    }
    total += acc;
#endif
  }
  return total;
}

}  // namespace samviz
