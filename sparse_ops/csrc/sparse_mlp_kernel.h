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
#ifndef SAM_VIZ_PF_EVERY
#define SAM_VIZ_PF_EVERY 64           // bytes of a stream per prefetch instruction (128 measured slower)
#endif
#ifndef SAM_VIZ_PAIR
#define SAM_VIZ_PAIR 1                // several rows per step where d == d_out is a whole number of chunks
#endif
#ifndef SAM_VIZ_ROWS
#define SAM_VIZ_ROWS 4                // ... this many (12 streams in flight; 3-5% faster than 2 with x and
                                      // the accumulator skewed, measured side by side in one process)
#endif
#ifndef SAM_VIZ_FLOOR_ROWS
#define SAM_VIZ_FLOOR_ROWS 4          // rows the floor reads side by side (4: 0-7% faster than 2, 3-11%
                                      // faster than 1: the floor is the fastest read of the rows we have)
#endif
#ifndef SAM_VIZ_SKEW_X
#define SAM_VIZ_SKEW_X 1024           // page offset of x, relative to the weight rows' (bytes)
#endif
#ifndef SAM_VIZ_SKEW_ACC
#define SAM_VIZ_SKEW_ACC 3072         // page offset of each thread's y accumulator, relative to the rows'
                                      // (0/0 measured 3-6% slower at small k, other choices alike)
#endif
#ifndef SAM_VIZ_PF_BYTES
#define SAM_VIZ_PF_BYTES (16 * 1024)  // prefetch the row this many bytes of rows ahead (at least the next)
#endif
#else
#define SAM_VIZ_AVX512 0
#endif

namespace samviz {

// CLAMPED_SWIGLU (gpt-oss): gate side g = min(v, limit), g * sigmoid(alpha * g); up side
// clamp(u, -limit, limit) + 1 (see up_side).
enum Act : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3, CLAMPED_SWIGLU = 4 };

inline float activate(float v, int64_t act, float limit, float alpha) {
  switch (act) {
    case SILU: return v / (1.0f + std::exp(-v));
    case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case CLAMPED_SWIGLU: {
      const float g = std::min(v, limit);
      return g / (1.0f + std::exp(-alpha * g));
    }
    default: return v > 0.0f ? v : 0.0f;
  }
}

// What multiplies the activated gate in a GLU: the up projection as it is, or clamped and shifted.
inline float up_side(float u, int64_t act, float limit) {
  return act == CLAMPED_SWIGLU ? std::min(std::max(u, -limit), limit) + 1.0f : u;
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
  float limit = 0.0f, alpha = 0.0f;  // CLAMPED_SWIGLU's parameters

  float gate(float v) const { return activate(v, act, limit, alpha); }
  float up(float u) const { return up_side(u, act, limit); }
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

inline int64_t thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Per-thread scratch that grows and is reused across calls (no allocation on the hot path).
inline float* scratch(int slot, size_t n) {
  struct Buf {
    float* p = nullptr;
    size_t cap = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[2];
  Buf& b = bufs[slot];
  if (b.cap < n) {
    std::free(b.p);
    b.cap = std::max<size_t>(n, 4096);
    b.p = static_cast<float*>(std::aligned_alloc(64, ((b.cap * sizeof(float) + 63) / 64) * 64));
  }
  return b.p;
}

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
      float v = p.gate(dot_portable(xt, g, p.d) + (p.bg ? p.bg[j] : 0.0f));
      if (p.groups == 2) v *= p.up(dot_portable(xt, g + p.d, p.d) + (p.bu ? p.bu[j] : 0.0f));
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

// Adds chunk c of x . gate_j (and of x . up_j) to the accumulators; elements past d are masked.
template <typename W>
inline void dot_chunk(const float* xp, const W* g, const W* u, bool glu, int64_t c, int64_t d, __m512& ag0,
                      __m512& ag1, __m512& au0, __m512& au1) {
  const __m512 x0 = _mm512_load_ps(xp + c * CH), x1 = _mm512_load_ps(xp + c * CH + 16);
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
  // One prefetch per SAM_VIZ_PF_EVERY bytes of each stream: 128 lets the L2's adjacent-line
  // prefetcher bring the pair, and halves the prefetch instructions (they fill the core's window).
  const int64_t chunk_bytes = CH * static_cast<int64_t>(sizeof(W));                 // 128 fp32, 64 bf16
  const int64_t lines_per_chunk = std::max<int64_t>(1, chunk_bytes / SAM_VIZ_PF_EVERY);
  const int64_t pf_step = SAM_VIZ_PF_EVERY > chunk_bytes ? SAM_VIZ_PF_EVERY / chunk_bytes : 1;  // chunks
  const int64_t pf_mask = pf_step - 1;
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
        if (nxt_g && (c & pf_mask) == 0) {
          const char* pg = reinterpret_cast<const char*>(nxt_g + c * CH);
          const char* pd = reinterpret_cast<const char*>(nxt_d + c * CH);
          for (int64_t l = 0; l < lines_per_chunk; ++l) {
            _mm_prefetch(pg + SAM_VIZ_PF_EVERY * l, SAM_VIZ_PF_HINT);
            if (glu) _mm_prefetch(pg + static_cast<int64_t>(sizeof(W)) * d + SAM_VIZ_PF_EVERY * l, SAM_VIZ_PF_HINT);
            _mm_prefetch(pd + SAM_VIZ_PF_EVERY * l, SAM_VIZ_PF_HINT);
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
        if (nxt_g && cc < full_d && (cc & pf_mask) == 0) {
          const char* pg = reinterpret_cast<const char*>(nxt_g + cc * CH);
          for (int64_t l = 0; l < lines_per_chunk; ++l) {
            _mm_prefetch(pg + SAM_VIZ_PF_EVERY * l, SAM_VIZ_PF_HINT);
            if (glu) _mm_prefetch(pg + static_cast<int64_t>(sizeof(W)) * d + SAM_VIZ_PF_EVERY * l, SAM_VIZ_PF_HINT);
          }
        }
        dot_chunk(xp, g, u, glu, cc, d, ag0, ag1, au0, au1);
      }
    }
    if (down_prev) {  // the rest of the previous row's axpy
      for (int64_t cc = (have ? c : 0); cc < co; ++cc) {
        if (nxt_d && cc < full_o && (cc & pf_mask) == 0) {
          const char* pd = reinterpret_cast<const char*>(nxt_d + cc * CH);
          for (int64_t l = 0; l < lines_per_chunk; ++l) _mm_prefetch(pd + SAM_VIZ_PF_EVERY * l, SAM_VIZ_PF_HINT);
        }
        __m512 w0, w1;
        load_chunk(down_prev, cc, d_out, w0, w1);
        float* a = acc + cc * CH;
        _mm512_store_ps(a, _mm512_fmadd_ps(hv, w0, _mm512_load_ps(a)));
        _mm512_store_ps(a + 16, _mm512_fmadd_ps(hv, w1, _mm512_load_ps(a + 16)));
      }
    }
    if (!have) break;
    float v = p.gate(hsum(_mm512_add_ps(ag0, ag1)) + (p.bg ? p.bg[j] : 0.0f));
    if (glu) v *= p.up(hsum(_mm512_add_ps(au0, au1)) + (p.bu ? p.bu[j] : 0.0f));
    p.h[slots[q]] = v;
    h_prev = v;
    down_prev = p.down + j * d_out;
  }
}

// One token, R rows per step (d == d_out, whole chunks: every real LLM shape): the dots of R rows
// and the axpys of the R rows before them in one loop, so x and the y accumulator are loaded and
// stored once per R rows. Fewer instructions per byte leave more of the core's window for loads in
// flight, and 3R streams are read side by side. Rows left over go through rows_avx512_one.
template <typename W, int R>
void rows_avx512_multi(const Problem<W>& p, const int64_t* slots, int64_t n, const float* xp, float* acc) {
  const int64_t d = p.d, row = p.groups * d, nc = d / CH;
  const bool glu = p.groups == 2;
  const int64_t row_bytes = (row + d) * static_cast<int64_t>(sizeof(W));
  const int64_t dist = std::max<int64_t>(1, (SAM_VIZ_PF_BYTES + R * row_bytes - 1) / (R * row_bytes));  // steps
  const int64_t chunk_bytes = CH * static_cast<int64_t>(sizeof(W));
  const int64_t lines = std::max<int64_t>(1, chunk_bytes / 64);
  const int64_t steps = n / R;
  const int64_t ub = static_cast<int64_t>(sizeof(W)) * d;  // byte offset of up_j within a gu row
  for (int64_t q = 0; q < std::min(steps, dist); ++q)
    for (int r = 0; r < R; ++r) {
      const int64_t j = p.idx[slots[R * q + r]];
      prefetch_row(p.gu + j * row, 0, row * static_cast<int64_t>(sizeof(W)));
      prefetch_row(p.down + j * d, 0, d * static_cast<int64_t>(sizeof(W)));
    }
  float hprev[R] = {};
  const W* dprev[R] = {};
  bool have_prev = false;
  for (int64_t q = 0; q <= steps; ++q) {
    const bool have = q < steps;
    int64_t j[R];
    const W* g[R];
    const char* ng[R];
    const char* nd[R];
    const bool pf = q + dist < steps;
    for (int r = 0; r < R; ++r) {
      j[r] = have ? p.idx[slots[R * q + r]] : 0;
      g[r] = p.gu + j[r] * row;
      const int64_t jn = pf ? p.idx[slots[R * (q + dist) + r]] : 0;
      ng[r] = reinterpret_cast<const char*>(p.gu + jn * row);
      nd[r] = reinterpret_cast<const char*>(p.down + jn * d);
    }
    __m512 s0[R], s1[R], u0[R], u1[R], hv[R];
    for (int r = 0; r < R; ++r) {
      s0[r] = s1[r] = u0[r] = u1[r] = _mm512_setzero_ps();
      hv[r] = _mm512_set1_ps(hprev[r]);
    }
    for (int64_t c = 0; c < nc; ++c) {
      if (pf) {
        const int64_t o = c * chunk_bytes;
        for (int64_t l = 0; l < lines; ++l)
          for (int r = 0; r < R; ++r) {
            _mm_prefetch(ng[r] + o + 64 * l, SAM_VIZ_PF_HINT);
            if (glu) _mm_prefetch(ng[r] + ub + o + 64 * l, SAM_VIZ_PF_HINT);
            _mm_prefetch(nd[r] + o + 64 * l, SAM_VIZ_PF_HINT);
          }
      }
      __m512 w0, w1;
      if (have) {
        const __m512 x0 = _mm512_load_ps(xp + c * CH), x1 = _mm512_load_ps(xp + c * CH + 16);
        for (int r = 0; r < R; ++r) {
          load_chunk_full(g[r], c, w0, w1);
          s0[r] = _mm512_fmadd_ps(x0, w0, s0[r]);
          s1[r] = _mm512_fmadd_ps(x1, w1, s1[r]);
          if (glu) {
            load_chunk_full(g[r] + d, c, w0, w1);
            u0[r] = _mm512_fmadd_ps(x0, w0, u0[r]);
            u1[r] = _mm512_fmadd_ps(x1, w1, u1[r]);
          }
        }
      }
      if (have_prev) {
        float* a = acc + c * CH;
        __m512 y0 = _mm512_load_ps(a), y1 = _mm512_load_ps(a + 16);
        for (int r = 0; r < R; ++r) {
          load_chunk_full(dprev[r], c, w0, w1);
          y0 = _mm512_fmadd_ps(hv[r], w0, y0);
          y1 = _mm512_fmadd_ps(hv[r], w1, y1);
        }
        _mm512_store_ps(a, y0);
        _mm512_store_ps(a + 16, y1);
      }
    }
    if (!have) break;
    for (int r = 0; r < R; ++r) {
      float v = p.gate(hsum(_mm512_add_ps(s0[r], s1[r])) + (p.bg ? p.bg[j[r]] : 0.0f));
      if (glu) v *= p.up(hsum(_mm512_add_ps(u0[r], u1[r])) + (p.bu ? p.bu[j[r]] : 0.0f));
      p.h[slots[R * q + r]] = v;
      hprev[r] = v;
      dprev[r] = p.down + j[r] * d;
    }
    have_prev = true;
  }
  if (n % R) rows_avx512_one(p, slots + steps * R, n % R, xp, acc);
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
        dot_chunk(xt, g, u, glu, c, d, ag0, ag1, au0, au1);
      }
      float v = p.gate(hsum(_mm512_add_ps(ag0, ag1)) + (p.bg ? p.bg[j] : 0.0f));
      if (glu) v *= p.up(hsum(_mm512_add_ps(au0, au1)) + (p.bu ? p.bu[j] : 0.0f));
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
#if SAM_VIZ_AVX512
// x (in order) -> chunk-permuted, zero-padded to whole chunks.
template <typename W>
inline void permute_in(const float* x, int64_t d, float* xp) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t c = 0; c < chunks(d); ++c) {
    const int64_t left = std::min<int64_t>(CH, d - c * CH);
    const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= CH ? 0xFFFF : (left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0);
    const __m512 a = _mm512_maskz_loadu_ps(m0, x + c * CH), b = _mm512_maskz_loadu_ps(m1, x + c * CH + 16);
    if (sizeof(W) == 4) {
      _mm512_store_ps(xp + c * CH, a);
      _mm512_store_ps(xp + c * CH + 16, b);
    } else {
      _mm512_store_ps(xp + c * CH, _mm512_permutex2var_ps(a, even, b));
      _mm512_store_ps(xp + c * CH + 16, _mm512_permutex2var_ps(a, odd, b));
    }
  }
}

// y[i] = bias[i] + sum over threads of the chunk-permuted partial accumulators, back in order.
template <typename W>
inline void reduce_out(const float* partial, int64_t n_parts, int64_t part_stride, int64_t d_out, const float* bd,
                       float* y) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t c = 0; c < chunks(d_out); ++c) {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (int64_t t = 0; t < n_parts; ++t) {
      lo = _mm512_add_ps(lo, _mm512_load_ps(partial + t * part_stride + c * CH));
      hi = _mm512_add_ps(hi, _mm512_load_ps(partial + t * part_stride + c * CH + 16));
    }
    __m512 a = lo, b = hi;
    if (sizeof(W) == 2) {
      a = _mm512_permutex2var_ps(lo, first, hi);
      b = _mm512_permutex2var_ps(lo, second, hi);
    }
    const int64_t left = std::min<int64_t>(CH, d_out - c * CH);
    const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= CH ? 0xFFFF : (left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0);
    if (bd) {
      a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m0, bd + c * CH));
      b = _mm512_add_ps(b, _mm512_maskz_loadu_ps(m1, bd + c * CH + 16));
    }
    _mm512_mask_storeu_ps(y + c * CH, m0, a);
    _mm512_mask_storeu_ps(y + c * CH + 16, m1, b);
  }
}
#endif

#if SAM_VIZ_AVX512
// The first address at or after `from` whose offset within its 4 KiB page is `target`'s (rounded to a
// cache line). With x, the accumulator and the weight rows all at one page offset, small calls
// measured 3-6% slower; the likely causes are 4K aliasing (the store buffer compares only the low 12
// address bits, so loads of the rows can wait on the accumulator's stores) and L1 set conflicts.
inline float* skewed(float* from, uintptr_t target) {
  const uintptr_t f = reinterpret_cast<uintptr_t>(from), want = target & 4032;  // 4032 = 4095 & ~63
  return reinterpret_cast<float*>(f + ((want - (f & 4095)) & 4095));
}
#endif

template <typename W>
void run(const Problem<W>& p) {
  int64_t* slots = reinterpret_cast<int64_t*>(scratch(0, static_cast<size_t>(2 * p.k + 16)));
  int64_t n = 0;
  for (int64_t s = 0; s < p.k; ++s) {
    if (p.idx[s] >= 0) slots[n++] = s;
    else for (int64_t t = 0; t < p.n_tok; ++t) p.h[t * p.k + s] = 0.0f;
  }
  const int64_t row_bytes = (p.groups * p.d + p.d_out) * static_cast<int64_t>(sizeof(W));
  const int64_t n_threads = threads_for(n, row_bytes);
#if SAM_VIZ_AVX512
  const int64_t xs = chunks(p.d) * CH, ys = chunks(p.d_out) * CH;
  // Each thread's accumulator starts on its own page, at a page offset away from the weight rows'
  // (all rows of a real model start at one offset mod 4096): see skewed().
  const int64_t part_stride = (p.n_tok * ys + 1023) / 1024 * 1024;
  float* base = scratch(1, static_cast<size_t>(p.n_tok * xs + 1024 + n_threads * part_stride + 1024));
  const uintptr_t wo = reinterpret_cast<uintptr_t>(p.gu);
  float* xp = skewed(base, wo + SAM_VIZ_SKEW_X);
  float* partial = skewed(xp + p.n_tok * xs, wo + SAM_VIZ_SKEW_ACC);
  for (int64_t t = 0; t < p.n_tok; ++t) permute_in<W>(p.x + t * p.d, p.d, xp + t * xs);
#else
  const int64_t ys = p.d_out;
  float* partial = scratch(1, static_cast<size_t>(n_threads * p.n_tok * ys));
#endif
#pragma omp parallel num_threads(n_threads)
  {
    const int64_t tid = thread_id();
    const int64_t lo = n * tid / n_threads, hi = n * (tid + 1) / n_threads;
#if SAM_VIZ_AVX512
    float* acc = partial + tid * part_stride;
#else
    float* acc = partial + tid * p.n_tok * ys;
#endif
    std::memset(acc, 0, static_cast<size_t>(p.n_tok * ys) * sizeof(float));
#if SAM_VIZ_AVX512
    if (p.n_tok == 1 && p.d == p.d_out && p.d % CH == 0 && SAM_VIZ_PAIR)
      rows_avx512_multi<W, SAM_VIZ_ROWS>(p, slots + lo, hi - lo, xp, acc);
    else if (p.n_tok == 1)
      rows_avx512_one(p, slots + lo, hi - lo, xp, acc);
    else rows_avx512_many(p, slots + lo, hi - lo, xp, acc);
#else
    rows_portable(p, slots + lo, hi - lo, acc);
#endif
  }
  for (int64_t t = 0; t < p.n_tok; ++t) {
#if SAM_VIZ_AVX512
    reduce_out<W>(partial + t * ys, n_threads, part_stride, p.d_out, p.bd, p.y + t * p.d_out);
#else
    float* yt = p.y + t * p.d_out;
    for (int64_t i = 0; i < p.d_out; ++i) {
      float v = p.bd ? p.bd[i] : 0.0f;
      for (int64_t th = 0; th < n_threads; ++th) v += partial[(th * p.n_tok + t) * ys + i];
      yt[i] = v;
    }
#endif
  }
}

#if SAM_VIZ_AVX512
// What the 64-byte steps of floor_rows leave of each stream (rows of unequal length, tails).
inline int64_t tail_sum(const char* pg, const char* pd, int64_t common, int64_t half, int64_t gb, int64_t db) {
  int64_t t = 0;
  for (const auto& [b, from, to] : {std::make_tuple(pg, common, half), std::make_tuple(pg + half, common, gb - half),
                                    std::make_tuple(pd, common, db)})
    for (int64_t o = from; o < to; ++o) t += b[o];
  return t;
}
#endif

#if SAM_VIZ_AVX512
// The kernel's access pattern without its arithmetic: the gate, up and down rows of R neurons read
// side by side (3R streams in flight, as the kernel reads 3 x SAM_VIZ_ROWS), the rows `dist` steps ahead
// prefetched, raw 512-bit words summed into independent accumulators (bytes: fp32 or bf16 alike).
template <typename W, int R>
double floor_rows(const W* gu, int64_t row, const W* down, int64_t d_out, const int64_t* idx, int64_t k) {
  const int64_t gb = row * static_cast<int64_t>(sizeof(W)), db = d_out * static_cast<int64_t>(sizeof(W));
  const int64_t half = gb / 2;  // gate | up (GLU); for one stream of gb the halves are read alike
  const int64_t row_bytes = gb + db;
  const int64_t dist = std::max<int64_t>(1, (SAM_VIZ_PF_BYTES + R * row_bytes - 1) / (R * row_bytes));
  const int64_t common = std::min(half, db) / 64 * 64;
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0;
  int64_t s = 0;
  for (; s + R <= k; s += R) {
    const char *pg[R], *pd[R], *ng[R], *nd[R];
    const bool pf = s + R * dist + R <= k;
    for (int r = 0; r < R; ++r) {
      pg[r] = reinterpret_cast<const char*>(gu + idx[s + r] * row);
      pd[r] = reinterpret_cast<const char*>(down + idx[s + r] * d_out);
      ng[r] = pf ? reinterpret_cast<const char*>(gu + idx[s + R * dist + r] * row) : nullptr;
      nd[r] = pf ? reinterpret_cast<const char*>(down + idx[s + R * dist + r] * d_out) : nullptr;
    }
    for (int64_t o = 0; o < common; o += 64) {
      for (int r = 0; r < R; ++r) {
        if (pf) {
          _mm_prefetch(ng[r] + o, SAM_VIZ_PF_HINT);
          _mm_prefetch(ng[r] + half + o, SAM_VIZ_PF_HINT);
          _mm_prefetch(nd[r] + o, SAM_VIZ_PF_HINT);
        }
        a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(pg[r] + o));
        a1 = _mm512_add_epi32(a1, _mm512_loadu_si512(pg[r] + half + o));
        a2 = _mm512_add_epi32(a2, _mm512_loadu_si512(pd[r] + o));
      }
    }
    for (int r = 0; r < R; ++r) a0 = _mm512_add_epi32(a0, _mm512_set1_epi64(tail_sum(pg[r], pd[r], common, half, gb, db)));
  }
  for (; s < k; ++s) {  // rows left over: one at a time
    const char* pg = reinterpret_cast<const char*>(gu + idx[s] * row);
    const char* pd = reinterpret_cast<const char*>(down + idx[s] * d_out);
    for (int64_t o = 0; o < common; o += 64) {
      a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(pg + o));
      a1 = _mm512_add_epi32(a1, _mm512_loadu_si512(pg + half + o));
      a2 = _mm512_add_epi32(a2, _mm512_loadu_si512(pd + o));
    }
    a0 = _mm512_add_epi32(a0, _mm512_set1_epi64(tail_sum(pg, pd, common, half, gb, db)));
  }
  a0 = _mm512_add_epi32(_mm512_add_epi32(a0, a1), a2);
  return static_cast<double>(_mm512_reduce_add_epi32(a0));
}
#endif

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
    const int64_t tid = thread_id();
    const int64_t lo = k * tid / n_threads, hi = k * (tid + 1) / n_threads;
#if SAM_VIZ_AVX512
    total += floor_rows<W, SAM_VIZ_FLOOR_ROWS>(gu, row, down, d_out, idx + lo, hi - lo);
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
