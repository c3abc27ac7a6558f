// The row machinery the CPU attention kernels share (csrc/cpu/rel_pos_attention.cpp,
// csrc/cpu/sam_block_attention.cpp): the softmax row pass with the decomposed rel-pos bias added inside it
// (plain and AVX-512), the per-block GEMMs in float32 and bfloat16 (FloatAttend / Bf16Attend), the row finish,
// and the key-grid index of small grids. Included by those two files only; everything here has internal linkage.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace sam_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896341f;

// The keys' (ay, ax) grid. For a grid of at most 16 x 16 (SAM's 14 x 14 windows) `iy` / `ix` hold each key's row
// and column (L entries, padded with zeros to a multiple of 16): the AVX-512 row pass then reads the logits in
// whole vectors and builds the bias of 16 keys with two register permutes, instead of one short masked vector
// per key row. nullptr otherwise.
struct KeyGrid {
  int64_t ay, ax;
  const int32_t* iy;
  const int32_t* ix;
};

// The row pass is built from two pieces over a range of keys [j0, j0 + n) of one row (s points at key j0's logit):
// bias_range() writes the biased logits s[j] = s[j] * scale + (h[j / ax] + w[j % ax]) in place and returns their
// maximum, exp_range() the numerators p[j] = exp(s[j] - mx) (p: s itself for float32, the bf16 row the second GEMM
// reads for bf16) and their float32 sum. softmax_row() runs them over a whole row; RunningRow over a row's chunks.
//
// A row whose logits hold a NaN or +inf (from q, k, the bias, the scale) is poisoned, as in PyTorch's softmax: its
// lse is NaN when a logit is NaN, else +inf, and finish_row() writes it as a NaN output row (sum NaN).
template <typename P>
float poisoned_row(int64_t L, P* p, float* sum, bool nan) {
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  std::fill(p, p + L, P(qnan));
  *sum = qnan;
  return nan ? qnan : -kNegInf;
}

inline float bias_range_generic(float* s, const KeyGrid& g, const float* h, const float* w, float scale, int64_t j0,
                                int64_t n, bool* nan) {
  float mx = kNegInf;
  bool bad = false;
  int64_t y = j0 / g.ax, x0 = j0 % g.ax;
  for (int64_t j = 0; j < n; ++y, x0 = 0) {  // one stretch of a key-grid row at a time: keys (y, x0..x1)
    const int64_t x1 = std::min(g.ax, x0 + (n - j));
    float* sy = s + j - x0;
    for (int64_t x = x0; x < x1; ++x) {
      const float t = sy[x] * scale + (h[y] + w[x]);
      sy[x] = t;
      bad = bad || std::isnan(t);
      mx = std::max(mx, t);
    }
    j += x1 - x0;
  }
  *nan = bad;
  return mx;
}

template <typename P>
float exp_range_generic(const float* s, int64_t n, float mx, P* p) {
  float acc = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = std::exp(s[j] - mx);
    p[j] = P(e);
    acc += e;
  }
  return acc;
}

#ifdef SAM_FAST_X86_AVX512
// exp(x) for x <= 0 (-inf included): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial
// (truncation error below 6e-9 relative, under float32's half ulp), times 2^n. Inputs below -104 give 0.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 floats -> bf16 (round to nearest even; the values here are finite), the first n of them stored at dst
__attribute__((target("avx512f"))) inline void store_bf16(at::BFloat16* dst, __mmask16 m, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  _mm512_mask_cvtepi32_storeu_epi16(dst, m, _mm512_srli_epi32(up, 16));
}

__attribute__((target("avx512f"))) inline void store_row(float* dst, __mmask16 m, __m512 x) {
  _mm512_mask_storeu_ps(dst, m, x);
}

// The bf16 numerators on CPUs with AVX512-BF16. The probabilities are rounded to bf16 (a relative step of 2^-8), so
// exp needs less than float32's precision: its Taylor polynomial stops at degree 5 (truncation below 3e-6
// relative), and vcvtneps2bf16 rounds to nearest even in one instruction (what store_bf16 does in five).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline float exp_range_bf16(const float* s, int64_t L,
                                                                                            float mx,
                                                                                            at::BFloat16* pr) {
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const int64_t n = std::min<int64_t>(16, L - j);
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vm), _mm512_set1_ps(-104.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 p = _mm512_set1_ps(1.0f / 120.0f);
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f));
    const __m512 e = _mm512_maskz_mov_ps(m, _mm512_scalef_ps(p, k));
    _mm256_mask_storeu_epi16(pr + j, m, (__m256i)_mm512_cvtneps_pbh(e));
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

template <typename P>
__attribute__((target("avx512f"))) float exp_range_avx512(const float* s, int64_t L, float mx, P* pr) {
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const int64_t n = std::min<int64_t>(16, L - j);
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vm));
    if constexpr (std::is_same_v<P, float>) {
      store_row(pr + j, m, e);
    } else {
      store_bf16(pr + j, m, e);
    }
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// logit * vs + bias: rounded twice (as a mask built ahead of time is added), or in base 2 (vs holding scale log2(e),
// the bias from tables already in base 2) in one multiply-add
template <bool kBase2>
__attribute__((target("avx512f"), always_inline)) inline __m512 biased_logit(__m512 logit, __m512 vs, __m512 bias) {
  if constexpr (kBase2) {
    return _mm512_fmadd_ps(logit, vs, bias);
  } else {
    return _mm512_add_ps(_mm512_mul_ps(logit, vs), bias);
  }
}

// bias_range in AVX-512. On a small grid (KeyGrid's iy / ix; j0 a multiple of 16) whole vectors over the flat row,
// the bias of 16 keys by two permutes; otherwise one stretch of a key-grid row at a time, the bias summed first, then
// added to the scaled logit (the rounding of a mask built ahead of time). kBase2: the same logits times log2(e) from
// h and w already times log2(e), in one multiply-add, for exp2_range_bf16.
template <bool kBase2 = false>
__attribute__((target("avx512f"))) inline float bias_range_avx512(float* s, const KeyGrid& g, const float* h,
                                                                  const float* w, float scale, int64_t j0, int64_t n,
                                                                  bool* nan) {
  const __m512 vs = _mm512_set1_ps(kBase2 ? scale * kLog2e : scale);
  __m512 vmax = _mm512_set1_ps(kNegInf);
  __mmask16 bad = 0;  // lanes that saw a NaN logit (max_ps would drop it)
  if (g.iy != nullptr) {
    const __m512 hv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << g.ay) - 1u), h);
    const __m512 wv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << g.ax) - 1u), w);
    for (int64_t j = 0; j < n; j += 16) {
      const int64_t c = std::min<int64_t>(16, n - j);
      const __mmask16 m = static_cast<__mmask16>(c == 16 ? 0xffffu : (1u << c) - 1u);
      const __m512 bias = _mm512_add_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(g.iy + j0 + j), hv),
                                        _mm512_permutexvar_ps(_mm512_loadu_si512(g.ix + j0 + j), wv));
      const __m512 t = biased_logit<kBase2>(_mm512_maskz_loadu_ps(m, s + j), vs, bias);
      _mm512_mask_storeu_ps(s + j, m, t);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, t);
      bad |= _mm512_mask_cmp_ps_mask(m, t, t, _CMP_UNORD_Q);
    }
  } else {
    int64_t y = j0 / g.ax, x0 = j0 % g.ax;
    for (int64_t j = 0; j < n; ++y, x0 = 0) {  // keys (y, x0..x1) at sy[x0..x1]
      const int64_t x1 = std::min(g.ax, x0 + (n - j));
      float* sy = s + j - x0;
      const __m512 hy = _mm512_set1_ps(h[y]);
      int64_t x = x0;
      for (; x + 16 <= x1; x += 16) {
        const __m512 t = biased_logit<kBase2>(_mm512_loadu_ps(sy + x), vs, _mm512_add_ps(hy, _mm512_loadu_ps(w + x)));
        _mm512_storeu_ps(sy + x, t);
        vmax = _mm512_max_ps(vmax, t);
        bad |= _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q);
      }
      if (x < x1) {
        const __mmask16 m = static_cast<__mmask16>((1u << (x1 - x)) - 1u);
        const __m512 t = biased_logit<kBase2>(_mm512_maskz_loadu_ps(m, sy + x), vs,
                                              _mm512_add_ps(hy, _mm512_maskz_loadu_ps(m, w + x)));
        _mm512_mask_storeu_ps(sy + x, m, t);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, t);
        bad |= _mm512_mask_cmp_ps_mask(m, t, t, _CMP_UNORD_Q);
      }
      j += x1 - x0;
    }
  }
  *nan = bad != 0;
  return _mm512_reduce_max_ps(vmax);
}

// 2^x for x <= 0 (-inf included) to bf16's needs: 2^k 2^r, k the nearest integer, |r| <= 1/2, 2^r by its degree-4
// Taylor polynomial (truncation below 5e-5 relative, an eightieth of bf16's rounding step). Below -150: 0.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, k);
  __m512 p = _mm512_set1_ps(0.0096181291f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.0555041087f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.240226507f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.693147181f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// The bf16 numerators from base-2 logits (bias_range_avx512<true>): p[j] = 2^(u[j] - m), rounded to nearest even by
// vcvtneps2bf16. Returns the sum of the float32 values. Full vectors unmasked, the tail masked.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline float exp2_range_bf16(const float* u, int64_t L,
                                                                                             float m,
                                                                                             at::BFloat16* pr) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= L; j += 16) {
    const __m512 e = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(u + j), vm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
    acc = _mm512_add_ps(acc, e);
  }
  if (j < L) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (L - j)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp2_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, u + j), vm)));
    _mm256_mask_storeu_epi16(pr + j, mk, (__m256i)_mm512_cvtneps_pbh(e));
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

inline float bias_range(float* s, const KeyGrid& g, const float* h, const float* w, float scale, int64_t j0, int64_t n,
                        bool* nan) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return bias_range_avx512(s, g, h, w, scale, j0, n, nan);
#endif
  return bias_range_generic(s, g, h, w, scale, j0, n, nan);
}

template <typename P>
float exp_range(const float* s, int64_t n, float mx, P* p) {
#ifdef SAM_FAST_X86_AVX512
  if constexpr (!std::is_same_v<P, float>) {
    if (cpu::avx512_bf16()) return exp_range_bf16(s, n, mx, p);
  }
  if (cpu::avx512()) return exp_range_avx512(s, n, mx, p);
#endif
  return exp_range_generic(s, n, mx, p);
}

// One whole row: the biased logits in place, the numerators in p, their sum in *sum. Returns the maximum (-inf when
// every key is masked: the row is then zeros) or, for a poisoned row, the lse poisoned_row() gives it.
template <typename P>
float softmax_row(float* s, const KeyGrid& g, const float* h, const float* w, float scale, P* p, float* sum) {
  const int64_t L = g.ay * g.ax;
  bool nan = false;
  const float mx = bias_range(s, g, h, w, scale, 0, L, &nan);
  if (nan || mx == -kNegInf) return poisoned_row(L, p, sum, nan);
  if (mx == kNegInf) {
    std::fill(p, p + L, P(0.0f));
    *sum = 0.0f;
    return mx;
  }
  *sum = exp_range(s, L, mx, p);
  return mx;
}

// One row's softmax over its keys chunk by chunk (flash attention's running form): the maximum and float32 sum so
// far, and whether a chunk poisoned the row. add() takes the next chunk's logits and returns the factor the row's
// output accumulated so far must be multiplied by (the old maximum's numerators rescaled to the new one; 1 when the
// maximum did not move); its numerators are relative to the running maximum, so they stay in [0, 1]. With `base2`
// (bf16 numerators on a CPU with AVX512-BF16) the logits, the maximum and the exponentials are in base 2
// (bias_range_avx512<true>, exp2_range_bf16; h and w given times log2(e)): the multiply by log2(e) folds into the
// scale, and the exponential needs fewer steps; total() turns the maximum back.
struct RunningRow {
  float mx = kNegInf, sum = 0.0f;
  bool nan = false, inf = false, base2 = false;

  template <typename P>
  float add(float* s, const KeyGrid& g, const float* h, const float* w, float scale, int64_t j0, int64_t n, P* p) {
    bool chunk_nan = false;
    float cm;
#ifdef SAM_FAST_X86_AVX512
    if (base2) {
      cm = bias_range_avx512<true>(s, g, h, w, scale, j0, n, &chunk_nan);
    } else
#endif
    {
      cm = bias_range(s, g, h, w, scale, j0, n, &chunk_nan);
    }
    nan = nan || chunk_nan;
    inf = inf || cm == -kNegInf;
    const float m = std::max(mx, cm);
    if (nan || inf || m == kNegInf) {  // poisoned (the output is NaN whatever it accumulates), or nothing seen yet
      std::fill(p, p + n, P(0.0f));
      return 1.0f;
    }
    float alpha = 1.0f, part;
#ifdef SAM_FAST_X86_AVX512
    if constexpr (std::is_same_v<P, at::BFloat16>) {
      if (base2) {
        if (m > mx) alpha = std::exp2(mx - m);  // exp2(-inf) = 0: nothing accumulated before
        part = exp2_range_bf16(s, n, m, p);
      }
    }
    if (!base2)
#endif
    {
      if (m > mx) alpha = std::exp(mx - m);
      part = exp_range(s, n, m, p);
    }
    sum = sum * alpha + part;
    mx = m;
    return alpha;
  }

  // the row's totals as softmax_row gives them: its sum (NaN when poisoned) and maximum (the poisoned lse)
  float total(float* out_sum) const {
    if (nan || inf) {
      *out_sum = std::numeric_limits<float>::quiet_NaN();
      return nan ? std::numeric_limits<float>::quiet_NaN() : -kNegInf;
    }
    *out_sum = sum;
    return base2 && mx != kNegInf ? mx * 0.693147180559945309f : mx;
  }
};
// Query rows per block: their float32 logits over all Lk keys fill about `budget` bytes; at least 1 row, at most
// 256. float32 (kFloatBlockBytes, 4 MiB): MKL's GEMMs run faster on taller blocks than they lose to the logits
// spilling out of L2 (64 rows ran 3% slower, 32 rows 27% slower than 256 on ViT-B's global block). bf16
// (kBf16BlockBytes, 1 MiB): the AMX GEMMs are fast enough that the logits' trips to memory dominated; 1 MiB of
// logits plus their bf16 probabilities stay in a 2 MiB L2 (4 MiB blocks ran 10-15% slower, 256 KiB ones 35%).
constexpr int64_t kFloatBlockBytes = int64_t{1} << 22;
constexpr int64_t kBf16BlockBytes = int64_t{1} << 20;

int64_t rows_per_block(int64_t Lq, int64_t Lk, int64_t budget) {
  const int64_t rows = std::max<int64_t>(1, budget / (std::max<int64_t>(1, Lk) * 4));
  return std::min<int64_t>({rows, int64_t{256}, std::max<int64_t>(1, Lq)});
}


// One finished row: acc / sum, rounded once to dst's dtype. Returns the row's lse, max + log(sum), or -inf (with
// the row 0) for a row that saw no key; a poisoned row (NaN sum) is NaN, with the lse poisoned_row() chose.
template <typename T>
float finish_row(const float* acc, int64_t D, float sum, float mx, T* dst) {
  if (std::isnan(sum)) {
    std::fill(dst, dst + D, T(sum));
    return mx;
  }
  const bool seen = sum > 0.0f;
  const float inv = seen ? 1.0f / sum : 0.0f;
  for (int64_t d = 0; d < D; ++d) dst[d] = T(acc[d] * inv);
  return seen ? mx + std::log(sum) : kNegInf;
}

// VNNI panels for the bf16 path's AMX GEMMs (see Bf16Attend), in AVX-512 (every CPU with AMX has F, BW and VL),
// or the scalar loops below them (SAM_FAST_CPU_NO_AVX512, as for the row pass).
#ifdef SAM_FAST_X86_AVX512
// k^T panel: (D / 2, ld) 32-bit pairs, [p][j] = (k[j][2p], k[j][2p + 1]) for the w <= 64 keys at k (row stride
// ldk), zero for j in [w, ld). Sixteen keys of one pair at a time: one gather of 32-bit words, one store.
__attribute__((target("avx512f"))) void pack_kt_panel_avx512(const at::BFloat16* k, int64_t ldk, int64_t D,
                                                               int64_t w, int64_t ld, at::BFloat16* out) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  const int32_t step = static_cast<int32_t>(ldk * 2);  // bytes between keys
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j0 = 0; j0 < ld; j0 += 16) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, w - j0));
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    const __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j0))),
                                           _mm512_set1_epi32(step));
    for (int64_t p = 0; p < D / 2; ++p) {
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, k + 2 * p, 1);
      _mm512_storeu_si512(dst + p * ld + j0, words);
    }
  }
}

// v panel: (ceil(L / 2), ld) 32-bit pairs, [p][c] = (v[2p][c], v[2p + 1][c]) for the w <= 64 channels at v (row
// stride ldv, L rows; a missing odd row and the columns in [w, ld) are zero)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_v_panel_avx512(const at::BFloat16* v, int64_t ldv, int64_t L,
                                                              int64_t w, int64_t ld, at::BFloat16* out) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t p = 0; p < (L + 1) / 2; ++p) {
    const at::BFloat16* r0 = v + 2 * p * ldv;
    const bool odd = 2 * p + 1 < L;
    for (int64_t c0 = 0; c0 < ld; c0 += 16) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, w - c0));
      const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + c0));
      const __m512i hi = odd ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + ldv + c0))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + p * ld + c0, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}
#endif

#ifdef SAM_FAST_X86_AVX512
// C (n, w) = A (n, 2 * K2) times B (2 * K2, w) in AVX512-BF16, for CPUs without AMX: A bf16 row-major (row stride
// lda), B one VNNI panel as the packers above write it ((K2, ld) 32-bit pairs, ld = w rounded up to 16, at most 64),
// C float32 (row stride ldc), its w columns overwritten (add: added to). R rows by NV vectors of 16 columns in registers (4 x 4: 16
// accumulators, 4 panel vectors, one broadcast pair of A); each step over a pair of the reduction is one vdpbf16ps
// per accumulator. The products of two bf16 are exact in float32; vdpbf16ps rounds its sums to nearest even and
// flushes denormals, within the tolerance the bf16 path already has.
template <int R, int NV>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void dot_rows_bf16(
    const at::BFloat16* a, int64_t lda, int64_t K2, const uint32_t* B, int64_t ld, int64_t w, float* c,
    int64_t ldc, bool add) {
  __m512 acc[R][NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, w - 16 * v));
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    for (int r = 0; r < R; ++r) acc[r][v] = add ? _mm512_maskz_loadu_ps(m, c + r * ldc + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * ld + 16 * v);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::min<int64_t>(16, w - 16 * v);
    if (n <= 0) break;
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, m, acc[r][v]);
  }
}

template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dot_panel_bf16_nv(
    const at::BFloat16* a, int64_t lda, int64_t n, int64_t K2, const uint32_t* B, int64_t ld, int64_t w, float* c,
    int64_t ldc, bool add) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) dot_rows_bf16<4, NV>(a + i * lda, lda, K2, B, ld, w, c + i * ldc, ldc, add);
  for (; i < n; ++i) dot_rows_bf16<1, NV>(a + i * lda, lda, K2, B, ld, w, c + i * ldc, ldc, add);
}

void dot_panel_bf16(const at::BFloat16* a, int64_t lda, int64_t n, int64_t K2, const at::BFloat16* panel,
                    int64_t ld, int64_t w, float* c, int64_t ldc, bool add) {
  const uint32_t* B = reinterpret_cast<const uint32_t*>(panel);
  switch (ld / 16) {
    case 1: return dot_panel_bf16_nv<1>(a, lda, n, K2, B, ld, w, c, ldc, add);
    case 2: return dot_panel_bf16_nv<2>(a, lda, n, K2, B, ld, w, c, ldc, add);
    case 3: return dot_panel_bf16_nv<3>(a, lda, n, K2, B, ld, w, c, ldc, add);
    default: return dot_panel_bf16_nv<4>(a, lda, n, K2, B, ld, w, c, ldc, add);
  }
}
#endif

void pack_kt_panel(const at::BFloat16* k, int64_t ldk, int64_t D, int64_t w, int64_t ld, at::BFloat16* out) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return pack_kt_panel_avx512(k, ldk, D, w, ld, out);
#endif
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < ld; ++j) {
    for (int64_t p = 0; p < D / 2; ++p) {
      uint32_t word = 0;
      if (j < w) std::memcpy(&word, k + j * ldk + 2 * p, 4);
      dst[p * ld + j] = word;
    }
  }
}

void pack_v_panel(const at::BFloat16* v, int64_t ldv, int64_t L, int64_t w, int64_t ld, at::BFloat16* out) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512_bw_vl()) return pack_v_panel_avx512(v, ldv, L, w, ld, out);
#endif
  const at::BFloat16 zero(0.0f);
  for (int64_t p = 0; p < (L + 1) / 2; ++p) {
    at::BFloat16* o = out + p * ld * 2;
    for (int64_t c = 0; c < ld; ++c) {
      o[2 * c] = c < w ? v[2 * p * ldv + c] : zero;
      o[2 * c + 1] = c < w && 2 * p + 1 < L ? v[(2 * p + 1) * ldv + c] : zero;
    }
  }
}

#ifdef SAM_FAST_X86_AVX512
// C (R rows, w <= 16 * NV columns, row stride ldc) = A (R rows, K, row stride lda) B (K rows of w columns, row stride
// ldb), float32: R x NV accumulators, each step over the reduction loads NV vectors of B (masked past w, so B needs
// no padding) and broadcasts one element of A per row. The attention's GEMMs at small head dims, where MKL's SGEMM
// (tuned for wide operands) ran at a third of the FMA rate: q k^T with K = the head dim, p v with w = the head dim.
template <int R, int NV>
__attribute__((target("avx512f"), always_inline)) inline void gemm_rows_f32(const float* a, int64_t lda, int64_t K,
                                                                            const float* b, int64_t ldb, int64_t w,
                                                                            float* c, int64_t ldc) {
  __m512 acc[R][NV];
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::min<int64_t>(16, w - 16 * v);
    m[v] = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
    for (int r = 0; r < R; ++r) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < K; ++p) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(m[v], b + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + p]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, m[v], acc[r][v]);
  }
}

// Rows of A in tiles of R (the tile that keeps loads and multiply-adds balanced at NV vectors), then one at a time.
template <int R, int NV>
__attribute__((target("avx512f"))) void gemm_cols_f32(const float* a, int64_t lda, int64_t n, int64_t K,
                                                      const float* b, int64_t ldb, int64_t w, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + R <= n; i += R) gemm_rows_f32<R, NV>(a + i * lda, lda, K, b, ldb, w, c + i * ldc, ldc);
  for (; i < n; ++i) gemm_rows_f32<1, NV>(a + i * lda, lda, K, b, ldb, w, c + i * ldc, ldc);
}

// C (n, w) = A (n, K) B (K, w), float32, every stride a row stride, C overwritten: 64 columns of B at a time.
void gemm_f32_avx512(const float* a, int64_t lda, int64_t n, int64_t K, const float* b, int64_t ldb, int64_t w,
                     float* c, int64_t ldc) {
  for (int64_t c0 = 0; c0 < w; c0 += 64) {
    const int64_t cw = std::min<int64_t>(64, w - c0);
    switch ((cw + 15) / 16) {
      case 1: gemm_cols_f32<8, 1>(a, lda, n, K, b + c0, ldb, cw, c + c0, ldc); break;
      case 2: gemm_cols_f32<6, 2>(a, lda, n, K, b + c0, ldb, cw, c + c0, ldc); break;
      case 3: gemm_cols_f32<4, 3>(a, lda, n, K, b + c0, ldb, cw, c + c0, ldc); break;
      default: gemm_cols_f32<4, 4>(a, lda, n, K, b + c0, ldb, cw, c + c0, ldc); break;
    }
  }
}
#endif

// Head dims up to this take FloatAttend's own AVX-512 GEMMs instead of MKL's (SlimSAM's pruned heads, TinyViT's 32).
constexpr int64_t kOwnGemmMaxHeadDim = 32;

// One thread's attention over one segment's keys, block of query rows by block: logits = q k^T, the biased
// softmax of each row (softmax_row; h / w: the rows' rel-pos terms, ay / ax floats per row), acc = p v. After
// block(), acc() holds the n rows' unnormalised outputs (D floats each) and sums / maxes their softmax sums and
// maxima. keys() names the segment's k and v (row strides ldk, ldv; they must stay in place until the next
// keys()).
//
// float32: at::mm_out (MKL's SGEMM) for both GEMMs, the probabilities left in the logits' buffer. With AVX-512 and a
// head dim of at most kOwnGemmMaxHeadDim, gemm_f32_avx512 instead, on k^T transposed once per keys() and v in place.
class FloatAttend {
 public:
  FloatAttend(int64_t bq, int64_t Lk, int64_t D)
      : own_(own_gemm(D)), Lk_(Lk), D_(D), logits_(bq * Lk), acc_(bq * D), kt_own_(own_ ? D * Lk : 0) {}

  static bool own_gemm(int64_t D) {
#ifdef SAM_FAST_X86_AVX512
    return D <= kOwnGemmMaxHeadDim && cpu::avx512();
#else
    (void)D;
    return false;
#endif
  }

  void keys(const float* k, int64_t ldk, const float* v, int64_t ldv) {
    if (own_) {
      for (int64_t j = 0; j < Lk_; ++j) {
        for (int64_t d = 0; d < D_; ++d) kt_own_[d * Lk_ + j] = k[j * ldk + d];
      }
      v_own_ = v;
      ldv_ = ldv;
      return;
    }
    const auto opt = at::TensorOptions().dtype(at::kFloat);
    kt_ = at::from_blob(const_cast<float*>(k), {Lk_, D_}, {ldk, 1}, opt).t();
    v_ = at::from_blob(const_cast<float*>(v), {Lk_, D_}, {ldv, 1}, opt);
  }

  void block(const float* q, int64_t ldq, int64_t n, const float* h, const float* w, const KeyGrid& g, float scale,
             float* sums, float* maxes) {
#ifdef SAM_FAST_X86_AVX512
    if (own_) {
      float* sp = logits_.data();
      gemm_f32_avx512(q, ldq, n, D_, kt_own_.data(), Lk_, Lk_, sp, Lk_);
      for (int64_t i = 0; i < n; ++i) {
        maxes[i] = softmax_row(sp + i * Lk_, g, h + i * g.ay, w + i * g.ax, scale, sp + i * Lk_, &sums[i]);
      }
      gemm_f32_avx512(sp, Lk_, n, Lk_, v_own_, ldv_, D_, acc_.data(), D_);
      return;
    }
#endif
    const auto opt = at::TensorOptions().dtype(at::kFloat);
    at::Tensor s = at::from_blob(logits_.data(), {n, Lk_}, opt);
    at::Tensor o = at::from_blob(acc_.data(), {n, D_}, opt);
    at::mm_out(s, at::from_blob(const_cast<float*>(q), {n, D_}, {ldq, 1}, opt), kt_);
    float* sp = logits_.data();
    for (int64_t i = 0; i < n; ++i) {
      maxes[i] = softmax_row(sp + i * Lk_, g, h + i * g.ay, w + i * g.ax, scale, sp + i * Lk_, &sums[i]);
    }
    at::mm_out(o, s, v_);
  }

  const float* acc() const { return acc_.data(); }

 private:
  bool own_;
  int64_t Lk_, D_;
  std::vector<float> logits_, acc_, kt_own_;
  const float* v_own_ = nullptr;
  int64_t ldv_ = 0;
  at::Tensor kt_, v_;
};

// bf16, three ways to the same float32 results. Where the CPU has AMX (could_pack), ATen's batch-reduce GEMM runs
// oneDNN's micro-kernel on B packed in VNNI pairs, in panels of at most 64 columns (the widths its packing takes);
// keys() packs k^T and v once per segment, and every block of rows reuses them. Where it has AVX512-BF16 but no AMX,
// the same panels go through dot_panel_bf16 (vdpbf16ps: twice float32's multiply-adds per instruction; ATen's GEMM
// there converts to float32 and runs at float32's speed). Elsewhere ATen's GEMM runs on plain row-major B (k^T then a
// transposed copy). The probabilities are rounded to bf16 for the second GEMM (as PyTorch's fused CPU kernel does).
//
// On AMX a segment of more than kChunkMax keys is taken chunk_keys() keys at a time, flash attention's
// way: a block's logits over one chunk stay in cache through both GEMMs and the row pass, each row keeps a running
// maximum and sum (RunningRow), and its output accumulated so far is rescaled when the maximum moves. Whole rows of
// 4096 keys (SAM's global blocks) made the first GEMM write, and the row pass read twice, a megabyte of logits per
// block: the chunks (with the base-2 row pass) ran the global block 1.2x faster on a Xeon with AMX
// (docs/maintainers/design.md). Smaller segments (windows) are one chunk: the same loop without rescaling.
class Bf16Attend {
 public:
  enum class Gemm { kAmx, kDot, kPlain };

  Bf16Attend(int64_t bq, int64_t Lk, int64_t D)
      : gemm_(gemm_for(D)),
        vnni_(gemm_ != Gemm::kPlain),
        Lk_(Lk),
        D_(D),
        // the second GEMM's reduction runs over the keys: an even count for VNNI pairs (a zero key at the end)
        Lk2_(vnni_ ? Lk + (Lk & 1) : Lk),
        kc_(chunk_keys(gemm_, Lk, D)),
        pld_(vnni_ ? kc_ + (kc_ & 1) : Lk),
        logits_(bq * kc_),
        acc_(bq * D),
        probs_(bq * pld_),
        kt_(vnni_ ? 0 : D * Lk),
        kpack_(vnni_ ? D * (Lk + kPanel) : 0),
        vpack_(vnni_ ? Lk2_ * (D + kPanel) : 0),
        base2_(vnni_ && cpu::avx512_bf16()),
        rows_(vnni_ ? bq : 0, RunningRow{kNegInf, 0.0f, false, false, base2_}) {}

  Bf16Attend(const Bf16Attend&) = delete;
  Bf16Attend& operator=(const Bf16Attend&) = delete;

  ~Bf16Attend() {
    if (gemm_ == Gemm::kAmx) at::native::cpublas::brgemm_release(true);
  }

  void keys(const at::BFloat16* k, int64_t ldk, const at::BFloat16* v, int64_t ldv) {
    if (vnni_) {
      // VNNI pairs, the layout oneDNN's micro-kernel reads (what cpublas::pack writes), built straight from k and
      // v: a (Kd, N) operand's panel of up to 64 columns is (Kd / 2, ld, 2), element [p][c][e] = B[2p + e][c],
      // ld = its width rounded up to 16, columns past the width zero
      for (int64_t c0 = 0; c0 < Lk_; c0 += kPanel) {  // k^T (D, Lk): [p][j][e] = k[c0 + j][2p + e]
        const int64_t w = std::min(kPanel, Lk_ - c0);
        pack_kt_panel(k + c0 * ldk, ldk, D_, w, panel_ld(w), kpack_.data() + D_ * c0);
      }
      for (int64_t c0 = 0; c0 < D_; c0 += kPanel) {  // v (Lk2, D): [p][c][e] = v[2p + e][c0 + c], v[Lk] = 0
        const int64_t w = std::min(kPanel, D_ - c0);
        pack_v_panel(v + c0, ldv, Lk_, w, panel_ld(w), vpack_.data() + Lk2_ * c0);
      }
    } else {
      for (int64_t j = 0; j < Lk_; ++j) {
        for (int64_t d = 0; d < D_; ++d) kt_[d * Lk_ + j] = k[j * ldk + d];
      }
      v_ = v;
      ldv_ = ldv;
    }
  }

  void block(const at::BFloat16* q, int64_t ldq, int64_t n, const float* h, const float* w, const KeyGrid& g,
             float scale, float* sums, float* maxes) {
    if (!vnni_) {
      namespace blas = at::native::cpublas;
      blas::brgemm(n, Lk_, D_, ldq, Lk_, Lk_, false, q, kt_.data(), logits_.data(), false);
      for (int64_t i = 0; i < n; ++i) {
        maxes[i] = softmax_row(logits_.data() + i * Lk_, g, h + i * g.ay, w + i * g.ax, scale,
                               probs_.data() + i * Lk_, &sums[i]);
      }
      blas::brgemm(n, D_, Lk_, Lk_, ldv_, D_, false, probs_.data(), v_, acc_.data(), false);
      return;
    }
    if (base2_) {  // the rows' bias terms in base 2 (see RunningRow)
      h2_.resize(n * g.ay);
      w2_.resize(n * g.ax);
      for (int64_t e = 0; e < n * g.ay; ++e) h2_[e] = h[e] * kLog2e;
      for (int64_t e = 0; e < n * g.ax; ++e) w2_[e] = w[e] * kLog2e;
      h = h2_.data();
      w = w2_.data();
    }
    for (int64_t c0 = 0; c0 < Lk_; c0 += kc_) {
      const int64_t cw = std::min(kc_, Lk_ - c0);
      // the last chunk's reduction takes the zero key of an odd count (c0 and kc_ are multiples of kPanel)
      const int64_t red = c0 + cw == Lk_ ? Lk2_ - c0 : cw;
      for (int64_t p0 = c0; p0 < c0 + cw; p0 += kPanel) {
        const int64_t pw = std::min(kPanel, c0 + cw - p0);
        gemm(q, ldq, n, D_, kpack_.data() + D_ * p0, panel_ld(pw), pw, logits_.data() + (p0 - c0), kc_, false);
      }
      for (int64_t i = 0; i < n; ++i) {
        at::BFloat16* p = probs_.data() + i * pld_;
        const float alpha = rows_[i].add(logits_.data() + i * kc_, g, h + i * g.ay, w + i * g.ax, scale, c0, cw, p);
        if (red != cw) p[cw] = at::BFloat16(0.0f);
        if (c0 > 0 && alpha != 1.0f) {
          float* a = acc_.data() + i * D_;
          for (int64_t d = 0; d < D_; ++d) a[d] *= alpha;
        }
      }
      for (int64_t d0 = 0; d0 < D_; d0 += kPanel) {  // keys c0.. of v's panel: pair c0 / 2 on
        const int64_t dw = std::min(kPanel, D_ - d0);
        gemm(probs_.data(), pld_, n, red, vpack_.data() + Lk2_ * d0 + c0 * panel_ld(dw), panel_ld(dw), dw,
             acc_.data() + d0, D_, c0 > 0);
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      maxes[i] = rows_[i].total(&sums[i]);
      rows_[i] = RunningRow{kNegInf, 0.0f, false, false, base2_};
    }
  }

  const float* acc() const { return acc_.data(); }

 private:
  static constexpr int64_t kPanel = 64;
  static constexpr int64_t kChunkMax = 512;  // segments up to this many keys: one chunk
  static int64_t panel_ld(int64_t cols) { return (cols + 15) / 16 * 16; }  // 16, 32, 48 or 64

  // the GEMMs for head dim D (AMX switched off takes the dot-product path, AVX-512 switched off the plain GEMM: how
  // the tests reach each on a CPU that has more)
  static Gemm gemm_for(int64_t D) {
    if (D % 2 != 0) return Gemm::kPlain;
    if (cpu::amx(at::kBFloat16)) return Gemm::kAmx;
    return cpu::avx512_bf16() ? Gemm::kDot : Gemm::kPlain;
  }

  // Keys per chunk on AMX: the whole segment up to kChunkMax, else a multiple of kPanel. ViT-B's global block (head
  // dim 64)
  // ran fastest at 256 (128: 3% slower, 512: 9%); SlimSAM-77's (14) at 1024 (512: 15% slower, behind whole rows),
  // where the GEMMs are cheap and each call's fixed cost counts. The dot-product GEMMs (no AMX) keep whole rows:
  // chunks ran ViT-B's global block 4% slower there (measured with AMX switched off).
  static int64_t chunk_keys(Gemm gemm, int64_t Lk, int64_t D) {
    if (gemm == Gemm::kPlain) return Lk;
    if (const int64_t forced = forced_chunk(); forced > 0) return std::min(forced, Lk);
    return gemm == Gemm::kAmx && Lk > kChunkMax ? (D > 32 ? 256 : 1024) : Lk;
  }

  // SAM_FAST_CPU_ATTENTION_CHUNK: keys per chunk on either VNNI path (a positive multiple of kPanel), whatever the
  // segment and the CPU; unset or empty: the rule above. How the tests reach chunked rows on a CPU without AMX, and
  // how the lengths above were compared.
  static int64_t forced_chunk() {
    const char* raw = std::getenv("SAM_FAST_CPU_ATTENTION_CHUNK");
    if (raw == nullptr || *raw == '\0') return 0;
    char* end = nullptr;
    const long long v = std::strtoll(raw, &end, 10);
    TORCH_CHECK(*end == '\0' && v > 0 && v % kPanel == 0 && v <= (int64_t{1} << 20),
                "SAM_FAST_CPU_ATTENTION_CHUNK must be a positive multiple of ", kPanel, " keys, got '", raw, "'");
    return static_cast<int64_t>(v);
  }

 public:
  // Query rows per block: whole rows, float32 logits of about kBf16BlockBytes; chunked rows, 256 (the rows share
  // each chunk's packed keys while they are in L1; 128 ran 5-15% slower on ViT-B's global block).
  static int64_t block_rows(int64_t Lq, int64_t Lk, int64_t D) {
    if (chunk_keys(gemm_for(D), Lk, D) == Lk) return rows_per_block(Lq, Lk, kBf16BlockBytes);
    return std::min<int64_t>(256, std::max<int64_t>(1, Lq));
  }

 private:

  // C (n, w) = A (n, K) B for one VNNI panel B (K even; its ld columns, w of them real), overwritten or added to
  void gemm(const at::BFloat16* a, int64_t lda, int64_t n, int64_t K, const at::BFloat16* panel, int64_t ld,
            int64_t w, float* c, int64_t ldc, bool add) const {
    if (gemm_ == Gemm::kAmx) {
      at::native::cpublas::brgemm(n, w, K, lda, ld, ldc, add, a, panel, c, true);
      return;
    }
#ifdef SAM_FAST_X86_AVX512
    dot_panel_bf16(a, lda, n, K / 2, panel, ld, w, c, ldc, add);
#else
    TORCH_CHECK(false, "the AVX512-BF16 path needs an x86-64 build");
#endif
  }

  Gemm gemm_;
  bool vnni_;
  int64_t Lk_, D_, Lk2_, kc_, pld_;
  std::vector<float> logits_, acc_;
  std::vector<at::BFloat16> probs_, kt_, kpack_, vpack_;
  bool base2_;
  std::vector<RunningRow> rows_;
  std::vector<float> h2_, w2_;
  const at::BFloat16* v_ = nullptr;
  int64_t ldv_ = 0;
};

template <typename T>
using Attend = std::conditional_t<std::is_same_v<T, float>, FloatAttend, Bf16Attend>;

// Query rows per block for q's dtype: float32 logits over Lk keys of about kFloatBlockBytes, or Bf16Attend's choice.
template <typename T>
int64_t block_rows(int64_t Lq, int64_t Lk, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return rows_per_block(Lq, Lk, kFloatBlockBytes);
  } else {
    return Bf16Attend::block_rows(Lq, Lk, D);
  }
}

// The key grid's row / column of each key, for grids of at most 16 x 16 on the AVX-512 row pass (see KeyGrid):
// fills iy / ix and points g at them.
void small_grid_index(KeyGrid& g, std::vector<int32_t>& iy, std::vector<int32_t>& ix) {
  if (g.ay > 16 || g.ax > 16 || !cpu::avx512()) return;
  const int64_t L = g.ay * g.ax;
  const int64_t padded = (L + 15) / 16 * 16;
  iy.assign(padded, 0);
  ix.assign(padded, 0);
  for (int64_t j = 0; j < L; ++j) {
    iy[j] = static_cast<int32_t>(j / g.ax);
    ix[j] = static_cast<int32_t>(j % g.ax);
  }
  g.iy = iy.data();
  g.ix = ix.data();
}

// ---- sam_fast::sam_block_attention: SAM's window / global attention read straight from the qkv tensor ----

}  // namespace
}  // namespace sam_fast
