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
// Inputs: q (S, H, Lq, D), k and v (S, H, Lk, D), float32, any strides with the last one 1 (views of one qkv
// tensor are read in place); rel_h (S, H, Lq, ay) and rel_w (S, H, Lq, ax), contiguous, ay * ax = Lk (keys in
// row-major (key_y, key_x) order). Outputs: out (S, Lq, H, D) and lse (S, H, Lq), contiguous. A row that sees
// no key gets out 0 and lse -inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace sam_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Biased logits and softmax numerators of one row, in place: s[j] = s[j] * scale + (h[j / ax] + w[j % ax]),
// then s[j] = exp(s[j] - max). Returns the maximum (-inf when every key is masked: the row is then zeros) and
// writes the sum of the numerators.
float softmax_row_generic(float* s, int64_t ay, int64_t ax, const float* h, const float* w, float scale,
                          float* sum) {
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
    std::fill(s, s + L, 0.0f);
    *sum = 0.0f;
    return mx;
  }
  float acc = 0.0f;
  for (int64_t j = 0; j < L; ++j) {
    const float e = std::exp(s[j] - mx);
    s[j] = e;
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

__attribute__((target("avx512f"))) float softmax_row_avx512(float* s, int64_t ay, int64_t ax, const float* h,
                                                            const float* w, float scale, float* sum) {
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(kNegInf);
  for (int64_t x0 = 0; x0 < ax; x0 += 16) {
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
    std::fill(s, s + L, 0.0f);
    *sum = 0.0f;
    return mx;
  }
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const int64_t n = std::min<int64_t>(16, L - j);
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vm));
    _mm512_mask_storeu_ps(s + j, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  *sum = _mm512_reduce_add_ps(acc);
  return mx;
}
#endif

float softmax_row(float* s, int64_t ay, int64_t ax, const float* h, const float* w, float scale, float* sum) {
#ifdef SAM_FAST_HAVE_AVX512_PATH
  // SAM_FAST_CPU_NO_AVX512 (set, non-empty) takes the plain path on any CPU: how the tests check it here
  static const bool avx512 = __builtin_cpu_supports("avx512f") && !no_avx512_requested();
  if (avx512) return softmax_row_avx512(s, ay, ax, h, w, scale, sum);
#endif
  return softmax_row_generic(s, ay, ax, h, w, scale, sum);
}

// query rows per block: their logits over all Lk keys fill about 4 MiB, at least 1 row, at most 256 (the GEMMs
// run faster on taller blocks than they lose to the logits spilling out of L2: 64 rows ran 3% slower, 32 rows 27%
// slower than 256 on ViT-B's global block)
int64_t rows_per_block(int64_t Lq, int64_t Lk) {
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 22) / (std::max<int64_t>(1, Lk) * 4));
  return std::min<int64_t>({rows, int64_t{256}, std::max<int64_t>(1, Lq)});
}

}  // namespace

void rel_pos_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel_h,
                           const at::Tensor& rel_w, double scale, at::Tensor out, at::Tensor lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "rel_pos_attention: q, k, v must be 4-D (S, H, L, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const at::Tensor* all[] = {&q, &k, &v, &rel_h, &rel_w, &out, &lse};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "rel_pos_attention: every tensor must be float32 on the CPU, got ", t->scalar_type(), " on ",
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
  const int64_t ay = rel_h.size(3), ax = rel_w.size(3);
  const int64_t bq = rows_per_block(Lq, Lk);
  const int64_t nb = (Lq + bq - 1) / bq;
  const float fscale = static_cast<float>(scale);
  const float* hp = rel_h.data_ptr<float>();
  const float* wp = rel_w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, S * H * nb, 1, [&](int64_t begin, int64_t end) {
    at::Tensor logits = at::empty({bq, std::max<int64_t>(Lk, 1)}, q.options());
    at::Tensor acc = at::empty({bq, D}, q.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / (H * nb), h = (t / nb) % H, r0 = (t % nb) * bq;
      const int64_t n = std::min(bq, Lq - r0);
      at::Tensor sb = logits.narrow(0, 0, n);
      at::Tensor ob = acc.narrow(0, 0, n);
      const at::Tensor ks = k.select(0, s).select(0, h);
      if (Lk > 0) {
        at::mm_out(sb, q.select(0, s).select(0, h).narrow(0, r0, n), ks.t());
      }
      float* sp = sb.data_ptr<float>();
      float sums[256];
      float maxes[256];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = (s * H + h) * Lq + r0 + i;
        maxes[i] = Lk > 0 ? softmax_row(sp + i * Lk, ay, ax, hp + row * ay, wp + row * ax, fscale, &sums[i])
                          : kNegInf;
        if (Lk == 0) sums[i] = 0.0f;
      }
      if (Lk > 0) {
        at::mm_out(ob, sb, v.select(0, s).select(0, h));
      } else {
        ob.zero_();
      }
      const float* obp = ob.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i;
        const bool seen = sums[i] > 0.0f;
        const float inv = seen ? 1.0f / sums[i] : 0.0f;
        float* dst = op + ((s * Lq + r) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = obp[i * D + d] * inv;
        lp[(s * H + h) * Lq + r] = seen ? maxes[i] + std::log(sums[i]) : kNegInf;
      }
    }
  });
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) { m.impl("rel_pos_attention", &rel_pos_attention_cpu); }

}  // namespace sam_fast
