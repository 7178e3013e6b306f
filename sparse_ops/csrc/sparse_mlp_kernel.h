// The sparse MLP gather-GEMV and its bandwidth floor, free of torch so that bench/csrc can time it
// standalone. See sparse_mlp.cpp for the layout and the Python binding.
//
// Two code paths, chosen when the file is compiled:
//  * AVX-512 (where the compiler targets it, -march=native on such a machine): hand-written
//    intrinsics. Work is done in chunks of 32 elements. fp32 rows load two 16-float vectors; bf16 rows
//    load 32 weights in one 512-bit load and decode them with one shift (even elements) and one mask
//    (odd elements), so x and the y accumulator are kept "chunk-permuted" (per chunk of 32: the 16
//    even elements, then the 16 odd ones) and put back in order at the end. One pass over the
//    selected rows computes the gate/up dot products of row n and, in the same loop, the
//    down-projection axpy of row n-1 (so three streams are in flight and no load waits on the
//    reduction of the current dots), with software prefetch of the rows a few steps ahead.
//  * Portable: plain loops for the compiler's vectoriser (AVX2, SSE, NEON, ...).
// Both accumulate in fp32. Threads (OpenMP) split the selected rows; each keeps its own y.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(SAM_VIZ_PORTABLE)
#include <immintrin.h>
#define SAM_VIZ_AVX512 1
#ifndef SAM_VIZ_PF_HINT
#define SAM_VIZ_PF_HINT _MM_HINT_T1   // rows ahead go to L2: L1 holds x, y and the rows being read
#endif
#ifndef SAM_VIZ_PF_BYTES
#define SAM_VIZ_PF_BYTES (16 * 1024)  // prefetch the row this many bytes of rows ahead (at least the next)
#endif
#else
#define SAM_VIZ_AVX512 0
#endif

namespace samviz {

enum Act : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.0f + std::exp(-v));
    case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
  }
}

inline const char* isa() { return SAM_VIZ_AVX512 ? "avx512" : "portable"; }

// Weights are float or uint16_t (bf16 bits). x [n_tok, d] fp32; gu [d_ff, groups * d]; down [d_ff, d_out].
template <typename W>
struct Problem {
  const float* x;
  int64_t n_tok, d;
  const W* gu;
  int64_t groups;
  const W* down;
  int64_t d_out;
  const float *bg, *bu, *bd;  // optional biases (nullptr = none)
  const int64_t* idx;          // [k] selected rows, -1 = none
  int64_t k;
  int64_t act;
  float* y;  // [n_tok, d_out]
  float* h;  // [n_tok, k]
};

// Rows a thread should have before a second thread pays for itself (a parallel region costs a few us).
inline int64_t threads_for(int64_t rows, int64_t row_bytes) {
  int64_t n = 1;
#ifdef _OPENMP
  n = omp_get_max_threads();
#endif
  const int64_t by_bytes = std::max<int64_t>(1, rows * row_bytes / (256 * 1024));
  return std::max<int64_t>(1, std::min<int64_t>({n, by_bytes, rows}));
}

struct AlignedBuf {
  float* p = nullptr;
  explicit AlignedBuf(size_t n) {
    p = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
    std::memset(p, 0, ((n * sizeof(float) + 63) / 64) * 64);
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---------------------------------------------------------------------------------------------
// Portable path
// ---------------------------------------------------------------------------------------------
template <typename W>
inline float dot_portable(const float* __restrict x, const W* __restrict w, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += x[i] * to_f32(w[i]);
  return acc;
}

template <typename W>
inline void axpy_portable(float a, const W* __restrict w, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * to_f32(w[i]);
}

template <typename W>
void rows_portable(const Problem<W>& p, const int64_t* slots, int64_t n, float* acc /*[n_tok, d_out]*/) {
  const int64_t row = p.groups * p.d;
  for (int64_t q = 0; q < n; ++q) {
    const int64_t s = slots[q], j = p.idx[s];
    if (q + 1 < n) {
      __builtin_prefetch(p.gu + p.idx[slots[q + 1]] * row, 0, 1);
      __builtin_prefetch(p.down + p.idx[slots[q + 1]] * p.d_out, 0, 1);
    }
    const W* g = p.gu + j * row;
    for (int64_t t = 0; t < p.n_tok; ++t) {
      const float* xt = p.x + t * p.d;
      float v = activate(dot_portable(xt, g, p.d) + (p.bg ? p.bg[j] : 0.0f), p.act);
      if (p.groups == 2) v *= dot_portable(xt, g + p.d, p.d) + (p.bu ? p.bu[j] : 0.0f);
      p.h[t * p.k + s] = v;
      axpy_portable(v, p.down + j * p.d_out, acc + t * p.d_out, p.d_out);
    }
  }
}

#if SAM_VIZ_AVX512
// ---------------------------------------------------------------------------------------------
// AVX-512 path: chunks of 32 elements
// ---------------------------------------------------------------------------------------------
constexpr int64_t CH = 32;
inline int64_t chunks(int64_t n) { return (n + CH - 1) / CH; }

// Load chunk c of a row as two fp32 vectors (lo, hi); `m` masks elements past the row's end.
inline void load_chunk(const float* w, int64_t c, int64_t n, __m512& lo, __m512& hi) {
  const float* p = w + c * CH;
  const int64_t left = n - c * CH;
  if (left >= CH) {
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  } else {
    const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0;
    lo = _mm512_maskz_loadu_ps(m0, p);
    hi = _mm512_maskz_loadu_ps(m1, p + 16);
  }
}
// bf16: one 512-bit load of 32 weights; even elements -> lo (shift), odd elements -> hi (mask).
inline void load_chunk(const uint16_t* w, int64_t c, int64_t n, __m512& lo, __m512& hi) {
  const uint16_t* p = w + c * CH;
  const int64_t left = n - c * CH;
  __m512i v;
  if (left >= CH) v = _mm512_loadu_si512(p);
  else v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << left) - 1), p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void load_chunk_full(const float* w, int64_t c, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(w + c * CH);
  hi = _mm512_loadu_ps(w + c * CH + 16);
}
inline void load_chunk_full(const uint16_t* w, int64_t c, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_loadu_si512(w + c * CH);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Chunk-permuted copies: identity for fp32; for bf16 each chunk holds its even then odd elements.
template <typename W>
inline int64_t permuted_index(int64_t i) {
  if (sizeof(W) == 4) return i;
  const int64_t c = i / CH, r = i % CH;
  return c * CH + (r % 2) * 16 + r / 2;
}

template <typename W>
inline void prefetch_row(const W* p, int64_t bytes_from, int64_t bytes_to) {
  const char* b = reinterpret_cast<const char*>(p);
  for (int64_t o = bytes_from; o < bytes_to; o += 64) _mm_prefetch(b + o, SAM_VIZ_PF_HINT);
}

inline float hsum(__m512 a) { return _mm512_reduce_add_ps(a); }

// One token (n_tok == 1), pipelined: the dots of row q and the axpy of row q-1 in one loop.
// xp, acc: chunk-permuted, padded to chunks(d) * CH and chunks(d_out) * CH.
template <typename W>
void rows_avx512_one(const Problem<W>& p, const int64_t* slots, int64_t n, const float* xp, float* acc) {
  const int64_t d = p.d, d_out = p.d_out, row = p.groups * d;
  const bool glu = p.groups == 2;
  const int64_t cd = chunks(d), co = chunks(d_out);
  const int64_t full_d = d / CH, full_o = d_out / CH;
  const int64_t fused = std::min(full_d, full_o);
  // Prefetch: spread over the loop, chunk c of each stream of the row `dist` steps ahead.
  const int64_t row_bytes = (row + d_out) * static_cast<int64_t>(sizeof(W));
  const int64_t dist = std::max<int64_t>(1, (SAM_VIZ_PF_BYTES + row_bytes - 1) / row_bytes);
  const int64_t lines_per_chunk = (CH * static_cast<int64_t>(sizeof(W))) / 64;  // 2 fp32, 1 bf16
  float h_prev = 0.0f;
  const W* down_prev = nullptr;
  // Before the loop, bring in the first rows.
  for (int64_t q = 0; q < std::min(n, dist); ++q) {
    const int64_t j = p.idx[slots[q]];
    prefetch_row(p.gu + j * row, 0, row * static_cast<int64_t>(sizeof(W)));
    prefetch_row(p.down + j * d_out, 0, d_out * static_cast<int64_t>(sizeof(W)));
  }
  for (int64_t q = 0; q <= n; ++q) {
    const bool have = q < n;
    const int64_t j = have ? p.idx[slots[q]] : 0;
    const W* g = p.gu + j * row;
    const W* u = g + d;
    const W* nxt_g = nullptr;
    const W* nxt_d = nullptr;
    if (q + dist < n) {
      const int64_t jn = p.idx[slots[q + dist]];
      nxt_g = p.gu + jn * row;
      nxt_d = p.down + jn * d_out;
    }
    __m512 ag0 = _mm512_setzero_ps(), ag1 = _mm512_setzero_ps();
    __m512 au0 = _mm512_setzero_ps(), au1 = _mm512_setzero_ps();
    const __m512 hv = _mm512_set1_ps(h_prev);
    int64_t c = 0;
    if (have && down_prev) {
      for (; c < fused; ++c) {
        if (nxt_g) {
          const char* pg = reinterpret_cast<const char*>(nxt_g + c * CH);
          const char* pd = reinterpret_cast<const char*>(nxt_d + c * CH);
          for (int64_t l = 0; l < lines_per_chunk; ++l) {
            _mm_prefetch(pg + 64 * l, SAM_VIZ_PF_HINT);
            if (glu) _mm_prefetch(pg + static_cast<int64_t>(sizeof(W)) * d + 64 * l, SAM_VIZ_PF_HINT);
            _mm_prefetch(pd + 64 * l, SAM_VIZ_PF_HINT);
          }
        }
        const __m512 x0 = _mm512_load_ps(xp + c * CH), x1 = _mm512_load_ps(xp + c * CH + 16);
        __m512 w0, w1;
        load_chunk_full(g, c, w0, w1);
        ag0 = _mm512_fmadd_ps(x0, w0, ag0);
        ag1 = _mm512_fmadd_ps(x1, w1, ag1);
        if (glu) {
          load_chunk_full(u, c, w0, w1);
          au0 = _mm512_fmadd_ps(x0, w0, au0);
          au1 = _mm512_fmadd_ps(x1, w1, au1);
        }
        load_chunk_full(down_prev, c, w0, w1);
        float* a = acc + c * CH;
        _mm512_store_ps(a, _mm512_fmadd_ps(hv, w0, _mm512_load_ps(a)));
        _mm512_store_ps(a + 16, _mm512_fmadd_ps(hv, w1, _mm512_load_ps(a + 16)));
      }
    }
    if (have) {  // the rest of the dots (all of them when nothing was fused)
      for (int64_t cc = c; cc < cd; ++cc) {
        if (nxt_g && cc < full_d) {
          const char* pg = reinterpret_cast<const char*>(nxt_g + cc * CH);
          for (int64_t l = 0; l < lines_per_chunk; ++l) {
            _mm_prefetch(pg + 64 * l, SAM_VIZ_PF_HINT);
            if (glu) _mm_prefetch(pg + static_cast<int64_t>(sizeof(W)) * d + 64 * l, SAM_VIZ_PF_HINT);
          }
        }
        const __m512 x0 = _mm512_load_ps(xp + cc * CH), x1 = _mm512_load_ps(xp + cc * CH + 16);
        __m512 w0, w1;
        load_chunk(g, cc, d, w0, w1);
        ag0 = _mm512_fmadd_ps(x0, w0, ag0);
        ag1 = _mm512_fmadd_ps(x1, w1, ag1);
        if (glu) {
          load_chunk(u, cc, d, w0, w1);
          au0 = _mm512_fmadd_ps(x0, w0, au0);
          au1 = _mm512_fmadd_ps(x1, w1, au1);
        }
      }
    }
    if (down_prev) {  // the rest of the previous row's axpy
      for (int64_t cc = (have ? c : 0); cc < co; ++cc) {
        if (nxt_d && cc < full_o) {
          const char* pd = reinterpret_cast<const char*>(nxt_d + cc * CH);
          for (int64_t l = 0; l < lines_per_chunk; ++l) _mm_prefetch(pd + 64 * l, SAM_VIZ_PF_HINT);
        }
        __m512 w0, w1;
        load_chunk(down_prev, cc, d_out, w0, w1);
        float* a = acc + cc * CH;
        _mm512_store_ps(a, _mm512_fmadd_ps(hv, w0, _mm512_load_ps(a)));
        _mm512_store_ps(a + 16, _mm512_fmadd_ps(hv, w1, _mm512_load_ps(a + 16)));
      }
    }
    if (!have) break;
    float v = activate(hsum(_mm512_add_ps(ag0, ag1)) + (p.bg ? p.bg[j] : 0.0f), p.act);
    if (glu) v *= hsum(_mm512_add_ps(au0, au1)) + (p.bu ? p.bu[j] : 0.0f);
    p.h[slots[q]] = v;
    h_prev = v;
    down_prev = p.down + j * d_out;
  }
}

// Several tokens sharing the rows (the union of their sets): each row is read once from memory, then
// reused from L1/L2 for every token.
template <typename W>
void rows_avx512_many(const Problem<W>& p, const int64_t* slots, int64_t n, const float* xp, float* acc) {
  const int64_t d = p.d, d_out = p.d_out, row = p.groups * d;
  const bool glu = p.groups == 2;
  const int64_t cd = chunks(d), co = chunks(d_out), xs = cd * CH, ys = co * CH;
  for (int64_t q = 0; q < n; ++q) {
    const int64_t s = slots[q], j = p.idx[s];
    const W* g = p.gu + j * row;
    const W* u = g + d;
    const W* dn = p.down + j * d_out;
    if (q + 1 < n) {
      const int64_t jn = p.idx[slots[q + 1]];
      prefetch_row(p.gu + jn * row, 0, row * static_cast<int64_t>(sizeof(W)));
      prefetch_row(p.down + jn * d_out, 0, d_out * static_cast<int64_t>(sizeof(W)));
    }
    for (int64_t t = 0; t < p.n_tok; ++t) {
      const float* xt = xp + t * xs;
      __m512 ag0 = _mm512_setzero_ps(), ag1 = _mm512_setzero_ps();
      __m512 au0 = _mm512_setzero_ps(), au1 = _mm512_setzero_ps();
      for (int64_t c = 0; c < cd; ++c) {
        const __m512 x0 = _mm512_load_ps(xt + c * CH), x1 = _mm512_load_ps(xt + c * CH + 16);
        __m512 w0, w1;
        load_chunk(g, c, d, w0, w1);
        ag0 = _mm512_fmadd_ps(x0, w0, ag0);
        ag1 = _mm512_fmadd_ps(x1, w1, ag1);
        if (glu) {
          load_chunk(u, c, d, w0, w1);
          au0 = _mm512_fmadd_ps(x0, w0, au0);
          au1 = _mm512_fmadd_ps(x1, w1, au1);
        }
      }
      float v = activate(hsum(_mm512_add_ps(ag0, ag1)) + (p.bg ? p.bg[j] : 0.0f), p.act);
      if (glu) v *= hsum(_mm512_add_ps(au0, au1)) + (p.bu ? p.bu[j] : 0.0f);
      p.h[t * p.k + s] = v;
      const __m512 hv = _mm512_set1_ps(v);
      float* at = acc + t * ys;
      for (int64_t c = 0; c < co; ++c) {
        __m512 w0, w1;
        load_chunk(dn, c, d_out, w0, w1);
        _mm512_store_ps(at + c * CH, _mm512_fmadd_ps(hv, w0, _mm512_load_ps(at + c * CH)));
        _mm512_store_ps(at + c * CH + 16, _mm512_fmadd_ps(hv, w1, _mm512_load_ps(at + c * CH + 16)));
      }
    }
  }
}
#endif  // SAM_VIZ_AVX512

// ---------------------------------------------------------------------------------------------
// Driver: one shared index set for p.n_tok tokens.
// ---------------------------------------------------------------------------------------------
template <typename W>
void run(const Problem<W>& p) {
  std::vector<int64_t> slots;
  slots.reserve(static_cast<size_t>(p.k));
  for (int64_t s = 0; s < p.k; ++s) {
    if (p.idx[s] >= 0) slots.push_back(s);
    else for (int64_t t = 0; t < p.n_tok; ++t) p.h[t * p.k + s] = 0.0f;
  }
  const int64_t n = static_cast<int64_t>(slots.size());
  const int64_t row_bytes = (p.groups * p.d + p.d_out) * static_cast<int64_t>(sizeof(W));
  const int64_t n_threads = threads_for(n, row_bytes);
#if SAM_VIZ_AVX512
  const int64_t xs = chunks(p.d) * CH, ys = chunks(p.d_out) * CH;
  AlignedBuf xp(static_cast<size_t>(p.n_tok * xs));
  for (int64_t t = 0; t < p.n_tok; ++t)
    for (int64_t i = 0; i < p.d; ++i) xp.p[t * xs + permuted_index<W>(i)] = p.x[t * p.d + i];
#else
  const int64_t ys = p.d_out;
#endif
  AlignedBuf partial(static_cast<size_t>(n_threads * p.n_tok * ys));
#pragma omp parallel num_threads(n_threads)
  {
    int64_t tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    const int64_t lo = n * tid / n_threads, hi = n * (tid + 1) / n_threads;
    float* acc = partial.p + tid * p.n_tok * ys;
#if SAM_VIZ_AVX512
    if (p.n_tok == 1) rows_avx512_one(p, slots.data() + lo, hi - lo, xp.p, acc);
    else rows_avx512_many(p, slots.data() + lo, hi - lo, xp.p, acc);
#else
    rows_portable(p, slots.data() + lo, hi - lo, acc);
#endif
  }
  for (int64_t t = 0; t < p.n_tok; ++t) {
    float* yt = p.y + t * p.d_out;
    for (int64_t i = 0; i < p.d_out; ++i) {
#if SAM_VIZ_AVX512
      const int64_t pi = permuted_index<W>(i);
#else
      const int64_t pi = i;
#endif
      float v = p.bd ? p.bd[i] : 0.0f;
      for (int64_t th = 0; th < n_threads; ++th) v += partial.p[(th * p.n_tok + t) * ys + pi];
      yt[i] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The floor: read the selected rows of gu and down once, as fast as this machine reads memory:
// the same thread split and prefetch as the kernel, several independent vector accumulators, and
// nothing else. Returns the sum so that the reads cannot be optimised away.
// ---------------------------------------------------------------------------------------------
template <typename W>
double read_rows(const W* gu, int64_t row, const W* down, int64_t d_out, const int64_t* idx, int64_t k) {
  const int64_t row_bytes = (row + d_out) * static_cast<int64_t>(sizeof(W));
  const int64_t n_threads = threads_for(k, row_bytes);
  double total = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(+ : total)
  {
    int64_t tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    const int64_t lo = k * tid / n_threads, hi = k * (tid + 1) / n_threads;
#if SAM_VIZ_AVX512
    // The kernel's access pattern without its arithmetic: the gate, up and down rows of one neuron
    // read side by side (three streams in flight), the rows `dist` steps ahead prefetched, raw
    // 512-bit words summed into independent accumulators (the floor is bytes, fp32 or bf16 alike).
    const int64_t gb = row * static_cast<int64_t>(sizeof(W)), db = d_out * static_cast<int64_t>(sizeof(W));
    const int64_t half = gb / 2;  // gate | up when the row holds two (GLU); one stream of gb otherwise
    const int64_t dist = std::max<int64_t>(1, (SAM_VIZ_PF_BYTES + row_bytes - 1) / row_bytes);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0;
    for (int64_t s = lo; s < hi; ++s) {
      const char* pg = reinterpret_cast<const char*>(gu + idx[s] * row);
      const char* pd = reinterpret_cast<const char*>(down + idx[s] * d_out);
      const char* ng = s + dist < hi ? reinterpret_cast<const char*>(gu + idx[s + dist] * row) : nullptr;
      const char* nd = s + dist < hi ? reinterpret_cast<const char*>(down + idx[s + dist] * d_out) : nullptr;
      const int64_t common = std::min(half, db) / 64 * 64;
      for (int64_t o = 0; o < common; o += 64) {
        if (ng) {
          _mm_prefetch(ng + o, SAM_VIZ_PF_HINT);
          _mm_prefetch(ng + half + o, SAM_VIZ_PF_HINT);
          _mm_prefetch(nd + o, SAM_VIZ_PF_HINT);
        }
        a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(pg + o));
        a1 = _mm512_add_epi32(a1, _mm512_loadu_si512(pg + half + o));
        a2 = _mm512_add_epi32(a2, _mm512_loadu_si512(pd + o));
      }
      // what is left of each stream (rows of unequal length, tails), a byte at a time past 64
      for (const auto& [b, from, to] : {std::make_tuple(pg, common, half), std::make_tuple(pg + half, common, gb - half),
                                        std::make_tuple(pd, common, db)}) {
        int64_t o = from;
        for (; o + 64 <= to; o += 64) a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(b + o));
        for (; o < to; ++o) a1 = _mm512_add_epi32(a1, _mm512_set1_epi32(b[o]));
      }
    }
    a0 = _mm512_add_epi32(_mm512_add_epi32(a0, a1), a2);
    total += static_cast<double>(_mm512_reduce_add_epi32(a0));
#else
    float acc = 0.0f;
    for (int64_t s = lo; s < hi; ++s) {
      const W* a = gu + idx[s] * row;
      const W* b = down + idx[s] * d_out;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < row; ++i) acc += to_f32(a[i]);
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < d_out; ++i) acc += to_f32(b[i]);
    }
    total += acc;
#endif
  }
  return total;
}

}  // namespace samviz
