// CPU kernel of sam_fast::rel_pos_attention (schema in csrc/ops.cpp): softmax(scale * q k^T + bias) v for SAM's
// blocks, with the decomposed rel-pos bias added inside each block of rows instead of being written out.
//
// Per (segment, head) and block of query rows: one BLAS GEMM for the logits (q_block @ k^T, all keys of the
// segment: the block is sized so that its logits stay in L2), one pass per row that adds
// rel_h[row, key_y] + rel_w[row, key_x] and finds the maximum, one pass of exp and sum, one GEMM of the
// probabilities with v, and the rows scaled by 1 / sum on their way into the output. The bias therefore costs
// a few vector adds in a pass the softmax makes anyway, instead of a chunk of memory written and read back.
// Keys that must not be seen carry -inf in rel_h or rel_w (the caller folds its key mask into them).
//
// Inputs: q (S, H, Lq, D), k and v (S, H, Lk, D), float32 or bfloat16 (all three alike), any strides with the
// last one 1 (views of one qkv tensor are read in place); rel_h (S, H, Lq, ay) and rel_w (S, H, Lq, ax), float32,
// contiguous, ay * ax = Lk (keys in row-major (key_y, key_x) order). Outputs: out (S, Lq, H, D) in q's dtype and
// lse (S, H, Lq) float32, contiguous. A row that sees no key gets out 0 and lse -inf.
//
// bfloat16: both GEMMs take bf16 operands and accumulate in float32 (ATen's batch-reduce GEMM: oneDNN's AMX
// micro-kernel on B operands packed in VNNI pairs where the CPU has AMX, its bf16 -> fp32 GEMM elsewhere); the
// logits, bias, softmax and lse are float32, the probabilities are rounded to bf16 for the second GEMM (as
// PyTorch's fused CPU kernel does), and each output row is divided by its float32 sum before its one rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace sam_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The keys' (ay, ax) grid. For a grid of at most 16 x 16 (SAM's 14 x 14 windows) `iy` / `ix` hold each key's row
// and column (L entries, padded with zeros to a multiple of 16): the AVX-512 row pass then reads the logits in
// whole vectors and builds the bias of 16 keys with two register permutes, instead of one short masked vector
// per key row. nullptr otherwise.
struct KeyGrid {
  int64_t ay, ax;
  const int32_t* iy;
  const int32_t* ix;
};

// Biased logits and softmax numerators of one row: s[j] = s[j] * scale + (h[j / ax] + w[j % ax]) in place, then
// p[j] = exp(s[j] - max) (p: s itself for float32, the bf16 row the second GEMM reads for bf16). Returns the
// maximum (-inf when every key is masked: the row is then zeros) and writes the sum of the float32 numerators.
template <typename P>
float softmax_row_generic(float* s, const KeyGrid& g, const float* h, const float* w, float scale, P* p,
                          float* sum) {
  const int64_t ay = g.ay, ax = g.ax;
  float mx = kNegInf;
  for (int64_t y = 0; y < ay; ++y) {
    float* sy = s + y * ax;
    for (int64_t x = 0; x < ax; ++x) {
      const float t = sy[x] * scale + (h[y] + w[x]);
      sy[x] = t;
      mx = std::max(mx, t);
    }
  }
  const int64_t L = ay * ax;
  if (mx == kNegInf) {
    std::fill(p, p + L, P(0.0f));
    *sum = 0.0f;
    return mx;
  }
  float acc = 0.0f;
  for (int64_t j = 0; j < L; ++j) {
    const float e = std::exp(s[j] - mx);
    p[j] = P(e);
    acc += e;
  }
  *sum = acc;
  return mx;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SAM_FAST_HAVE_AVX512_PATH 1

bool no_avx512_requested() {
  const char* flag = std::getenv("SAM_FAST_CPU_NO_AVX512");
  return flag != nullptr && flag[0] != '\0';
}

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

template <typename P>
__attribute__((target("avx512f"))) float softmax_row_avx512(float* s, const KeyGrid& g, const float* h,
                                                            const float* w, float scale, P* pr, float* sum) {
  const int64_t ay = g.ay, ax = g.ax;
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(kNegInf);
  if (g.iy != nullptr) {  // a small grid: whole vectors over the flat row, the bias by permutes
    const __m512 hv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << ay) - 1u), h);
    const __m512 wv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << ax) - 1u), w);
    const int64_t L = ay * ax;
    for (int64_t j = 0; j < L; j += 16) {
      const int64_t n = std::min<int64_t>(16, L - j);
      const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
      const __m512 bias = _mm512_add_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(g.iy + j), hv),
                                        _mm512_permutexvar_ps(_mm512_loadu_si512(g.ix + j), wv));
      const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), vs), bias);
      _mm512_mask_storeu_ps(s + j, m, t);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, t);
    }
  }
  for (int64_t x0 = 0; g.iy == nullptr && x0 < ax; x0 += 16) {
    const int64_t n = std::min<int64_t>(16, ax - x0);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(m, w + x0);
    for (int64_t y = 0; y < ay; ++y) {
      float* p = s + y * ax + x0;
      // the bias is summed first, then added to the scaled logit: the rounding of a mask built ahead of time
      const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, p), vs),
                                     _mm512_add_ps(_mm512_set1_ps(h[y]), wv));
      _mm512_mask_storeu_ps(p, m, t);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, t);
    }
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  const int64_t L = ay * ax;
  if (mx == kNegInf) {
    std::fill(pr, pr + L, P(0.0f));
    *sum = 0.0f;
    return mx;
  }
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
  *sum = _mm512_reduce_add_ps(acc);
  return mx;
}
#endif

// whether an environment flag is set (non-empty), read at each call
bool env_flag(const char* name) {
  const char* flag = std::getenv(name);
  return flag != nullptr && flag[0] != '\0';
}

bool avx512_rows() {
#ifdef SAM_FAST_HAVE_AVX512_PATH
  // SAM_FAST_CPU_NO_AVX512 (set, non-empty) takes the plain path on any CPU: how the tests check it here
  static const bool avx512 = __builtin_cpu_supports("avx512f") && !no_avx512_requested();
  return avx512;
#else
  return false;
#endif
}

template <typename P>
float softmax_row(float* s, const KeyGrid& g, const float* h, const float* w, float scale, P* p, float* sum) {
#ifdef SAM_FAST_HAVE_AVX512_PATH
  if (avx512_rows()) return softmax_row_avx512(s, g, h, w, scale, p, sum);
#endif
  return softmax_row_generic(s, g, h, w, scale, p, sum);
}

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


// The rows of one block into out (row stride ld) and lse: acc / sum, rounded once to out's dtype; lse = max +
// log(sum), or -inf (with out 0) for a row that saw no key.
template <typename T>
void write_rows(const float* acc, int64_t n, int64_t D, const float* sums, const float* maxes, T* dst, int64_t ld,
                float* lse) {
  for (int64_t i = 0; i < n; ++i) {
    const bool seen = sums[i] > 0.0f;
    const float inv = seen ? 1.0f / sums[i] : 0.0f;
    T* row = dst + i * ld;
    for (int64_t d = 0; d < D; ++d) row[d] = T(acc[i * D + d] * inv);
    lse[i] = seen ? maxes[i] + std::log(sums[i]) : kNegInf;
  }
}

// VNNI panels for the bf16 path's AMX GEMMs (see attend_bf16), in AVX-512 (every CPU with AMX has F, BW and VL),
// or the scalar loops below them (SAM_FAST_CPU_NO_AVX512, as for the row pass).
#ifdef SAM_FAST_HAVE_AVX512_PATH
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

void pack_kt_panel(const at::BFloat16* k, int64_t ldk, int64_t D, int64_t w, int64_t ld, at::BFloat16* out) {
#ifdef SAM_FAST_HAVE_AVX512_PATH
  if (avx512_rows()) return pack_kt_panel_avx512(k, ldk, D, w, ld, out);
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
#ifdef SAM_FAST_HAVE_AVX512_PATH
  static const bool bw = avx512_rows() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (bw) return pack_v_panel_avx512(v, ldv, L, w, ld, out);
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

// The float32 path: at::mm_out (MKL's SGEMM) for both GEMMs, the probabilities left in the logits' buffer.
void attend_float(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* hp, const float* wp,
                  const KeyGrid& g, float scale, float* op, float* lp) {
  const int64_t ay = g.ay, ax = g.ax;
  const int64_t S = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t bq = rows_per_block(Lq, Lk, kFloatBlockBytes);
  const int64_t nb = (Lq + bq - 1) / bq;
  at::parallel_for(0, S * H * nb, 1, [&](int64_t begin, int64_t end) {
    at::Tensor logits = at::empty({bq, Lk}, q.options());
    at::Tensor acc = at::empty({bq, D}, q.options());
    float sums[256];
    float maxes[256];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / (H * nb), h = (t / nb) % H, r0 = (t % nb) * bq;
      const int64_t n = std::min(bq, Lq - r0);
      at::Tensor sb = logits.narrow(0, 0, n);
      at::Tensor ob = acc.narrow(0, 0, n);
      at::mm_out(sb, q.select(0, s).select(0, h).narrow(0, r0, n), k.select(0, s).select(0, h).t());
      float* sp = sb.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = (s * H + h) * Lq + r0 + i;
        maxes[i] = softmax_row(sp + i * Lk, g, hp + row * ay, wp + row * ax, scale, sp + i * Lk, &sums[i]);
      }
      at::mm_out(ob, sb, v.select(0, s).select(0, h));
      write_rows(ob.data_ptr<float>(), n, D, sums, maxes, op + ((s * Lq + r0) * H + h) * D, H * D,
                 lp + (s * H + h) * Lq + r0);
    }
  });
}

// The bf16 path: ATen's batch-reduce GEMM with bf16 operands and a float32 result. Where the CPU has AMX
// (could_pack), oneDNN's micro-kernel reads B packed in VNNI pairs, in panels of at most 64 columns (the widths
// its packing takes); k^T and v are packed once per (segment, head) a thread visits, and reused by every block of
// rows. Elsewhere the same call runs oneDNN's bf16 GEMM on plain row-major B (k^T then a transposed copy).
void attend_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* hp, const float* wp,
                 const KeyGrid& g, float scale, at::BFloat16* op, float* lp) {
  const int64_t ay = g.ay, ax = g.ax;
  using at::BFloat16;
  namespace blas = at::native::cpublas;
  const int64_t S = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t bq = rows_per_block(Lq, Lk, kBf16BlockBytes);
  const int64_t nb = (Lq + bq - 1) / bq;
  // (SAM_FAST_CPU_NO_AMX takes the plain GEMM: how the tests reach it on a CPU with AMX)
  const bool vnni = blas::could_pack(at::kBFloat16) && D % 2 == 0 && !env_flag("SAM_FAST_CPU_NO_AMX");
  constexpr int64_t kPanel = 64;
  // the second GEMM's reduction runs over the keys: an even count for VNNI pairs (a zero key at the end)
  const int64_t Lk2 = vnni ? Lk + (Lk & 1) : Lk;
  const auto panel_ld = [](int64_t cols) { return (cols + 15) / 16 * 16; };  // 16, 32, 48 or 64
  const BFloat16* qp = q.const_data_ptr<BFloat16>();
  const BFloat16* kp = k.const_data_ptr<BFloat16>();
  const BFloat16* vp = v.const_data_ptr<BFloat16>();
  at::parallel_for(0, S * H * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(bq * Lk), acc(bq * D);
    std::vector<BFloat16> probs(bq * Lk2), kt(vnni ? 0 : D * Lk);
    std::vector<BFloat16> kpack(vnni ? D * (Lk + kPanel) : 0), vpack(vnni ? Lk2 * (D + kPanel) : 0);
    float sums[256];
    float maxes[256];
    int64_t packed = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / (H * nb), h = (t / nb) % H, r0 = (t % nb) * bq;
      const int64_t n = std::min(bq, Lq - r0);
      const BFloat16* kb = kp + s * k.stride(0) + h * k.stride(1);
      const BFloat16* vb = vp + s * v.stride(0) + h * v.stride(1);
      const int64_t ldk = k.stride(2), ldv = v.stride(2);
      if (packed != s * H + h) {
        if (vnni) {
          // VNNI pairs, the layout oneDNN's micro-kernel reads (what cpublas::pack writes), built straight from k
          // and v: a (Kd, N) operand's panel of up to 64 columns is (Kd / 2, ld, 2), element [p][c][e] = B[2p + e][c],
          // ld = its width rounded up to 16, columns past the width zero
          for (int64_t c0 = 0; c0 < Lk; c0 += kPanel) {  // k^T (D, Lk): [p][j][e] = k[c0 + j][2p + e]
            const int64_t w = std::min(kPanel, Lk - c0);
            pack_kt_panel(kb + c0 * ldk, ldk, D, w, panel_ld(w), kpack.data() + D * c0);
          }
          for (int64_t c0 = 0; c0 < D; c0 += kPanel) {  // v (Lk2, D): [p][c][e] = v[2p + e][c0 + c], v[Lk] = 0
            const int64_t w = std::min(kPanel, D - c0);
            pack_v_panel(vb + c0, ldv, Lk, w, panel_ld(w), vpack.data() + Lk2 * c0);
          }
        } else {
          for (int64_t j = 0; j < Lk; ++j) {
            for (int64_t d = 0; d < D; ++d) kt[d * Lk + j] = kb[j * ldk + d];
          }
        }
        packed = s * H + h;
      }
      const BFloat16* qb = qp + s * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
      if (vnni) {
        for (int64_t c0 = 0; c0 < Lk; c0 += kPanel) {
          const int64_t w = std::min(kPanel, Lk - c0);
          blas::brgemm(n, w, D, q.stride(2), panel_ld(w), Lk, false, qb, kpack.data() + D * c0, logits.data() + c0,
                       true);
        }
      } else {
        blas::brgemm(n, Lk, D, q.stride(2), Lk, Lk, false, qb, kt.data(), logits.data(), false);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = (s * H + h) * Lq + r0 + i;
        maxes[i] = softmax_row(logits.data() + i * Lk, g, hp + row * ay, wp + row * ax, scale,
                               probs.data() + i * Lk2, &sums[i]);
        if (Lk2 != Lk) probs[i * Lk2 + Lk] = BFloat16(0.0f);
      }
      if (vnni) {
        for (int64_t c0 = 0; c0 < D; c0 += kPanel) {
          const int64_t w = std::min(kPanel, D - c0);
          blas::brgemm(n, w, Lk2, Lk2, panel_ld(w), D, false, probs.data(), vpack.data() + Lk2 * c0, acc.data() + c0,
                       true);
        }
      } else {
        blas::brgemm(n, D, Lk, Lk, ldv, D, false, probs.data(), vb, acc.data(), false);
      }
      write_rows(acc.data(), n, D, sums, maxes, op + ((s * Lq + r0) * H + h) * D, H * D,
                 lp + (s * H + h) * Lq + r0);
    }
    if (vnni) blas::brgemm_release(true);
  });
}

}  // namespace

void rel_pos_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel_h,
                           const at::Tensor& rel_w, double scale, at::Tensor out, at::Tensor lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "rel_pos_attention: q, k, v must be 4-D (S, H, L, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  const at::Tensor* data[] = {&q, &k, &v, &out};
  for (const at::Tensor* t : data) {
    TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && t->scalar_type() == dt && t->device().is_cpu(),
                "rel_pos_attention: q, k, v and out must be all float32 or all bfloat16 on the CPU, got ",
                t->scalar_type(), " on ", t->device(), " (q: ", dt, ")");
  }
  const at::Tensor* stats[] = {&rel_h, &rel_w, &lse};
  for (const at::Tensor* t : stats) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "rel_pos_attention: rel_h, rel_w and lse must be float32 on the CPU, got ", t->scalar_type(), " on ",
                t->device());
  }
  const int64_t S = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == S && k.size(1) == H && k.size(3) == D,
              "rel_pos_attention: k and v must be (S, H, Lk, D) = (", S, ", ", H, ", Lk, ", D, "), got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "rel_pos_attention: q, k, v need a contiguous last dim");
  TORCH_CHECK(rel_h.dim() == 4 && rel_w.dim() == 4 && rel_h.is_contiguous() && rel_w.is_contiguous() &&
                  rel_h.sizes().slice(0, 3) == q.sizes().slice(0, 3) &&
                  rel_w.sizes().slice(0, 3) == q.sizes().slice(0, 3) && rel_h.size(3) * rel_w.size(3) == Lk,
              "rel_pos_attention: rel_h and rel_w must be contiguous (S, H, Lq, ay) and (S, H, Lq, ax) with ay * ax = "
              "Lk = ", Lk, ", got ", rel_h.sizes(), " and ", rel_w.sizes());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({S, Lq, H, D}),
              "rel_pos_attention: out must be a contiguous (S, Lq, H, D) tensor, got ", out.sizes());
  TORCH_CHECK(lse.is_contiguous() && lse.sizes() == at::IntArrayRef({S, H, Lq}),
              "rel_pos_attention: lse must be a contiguous (S, H, Lq) tensor, got ", lse.sizes());
  if (S == 0 || H == 0 || Lq == 0) return;
  if (Lk == 0) {  // no key anywhere: every row is out 0, lse -inf
    out.zero_();
    lse.fill_(kNegInf);
    return;
  }
  if (D == 0) {  // no channels: the logits are the bias alone, and out is empty
    lse.copy_(at::logsumexp((rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2), -1));
    return;
  }
  const int64_t ay = rel_h.size(3), ax = rel_w.size(3);
  const float fscale = static_cast<float>(scale);
  const float* hp = rel_h.const_data_ptr<float>();
  const float* wp = rel_w.const_data_ptr<float>();
  std::vector<int32_t> iy, ix;
  KeyGrid g{ay, ax, nullptr, nullptr};
  if (ay <= 16 && ax <= 16 && avx512_rows()) {
    const int64_t padded = (Lk + 15) / 16 * 16;
    iy.assign(padded, 0);
    ix.assign(padded, 0);
    for (int64_t j = 0; j < Lk; ++j) {
      iy[j] = static_cast<int32_t>(j / ax);
      ix[j] = static_cast<int32_t>(j % ax);
    }
    g.iy = iy.data();
    g.ix = ix.data();
  }
  if (dt == at::kFloat) {
    attend_float(q, k, v, hp, wp, g, fscale, out.data_ptr<float>(), lse.data_ptr<float>());
  } else {
    attend_bf16(q, k, v, hp, wp, g, fscale, out.data_ptr<at::BFloat16>(), lse.data_ptr<float>());
  }
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) { m.impl("rel_pos_attention", &rel_pos_attention_cpu); }

}  // namespace sam_fast
