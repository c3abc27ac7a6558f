// CPU kernels of sam_fast::sam_block_attention and sam_fast::window_bias_attention (schemas in csrc/ops.cpp).
// sam_block_attention: segment_anything's window / global attention with the decomposed rel-pos bias, read straight
// from a block's qkv tensor. Each (image, segment, head) gathers its keys once (padded positions read pad_k /
// pad_v), its real queries block by block; the two rel-pos terms of a block come from one small GEMM against each
// table, and are added inside the softmax row pass that sam_fast::rel_pos_attention uses
// (csrc/cpu/attention_rows.h); each output row goes straight to its place in out. window_bias_attention: TinyViT's
// window attention through the same gathers and row pass, its channel order and a dense per-head bias table.
// hiera_attention: SAM 2's Hiera window / global attention (no bias), its queries optionally max-pooled q_stride x
// q_stride within each window as they are gathered (the first block of a stage), the output on the pooled grid.
#include "attention_rows.h"

namespace sam_fast {
namespace {

// A rel-pos table (R, D) transposed to (D, Rp), columns R..Rp zero (Rp: R rounded up to 16), for rel_products.
std::vector<float> transposed_table(const float* tab, int64_t R, int64_t D) {
  const int64_t Rp = (R + 15) / 16 * 16;
  std::vector<float> out(D * Rp, 0.0f);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t d = 0; d < D; ++d) out[d * Rp + r] = tab[r * D + d];
  }
  return out;
}

// The products of n queries with every row of a rel-pos table: P[i][r] = sum_d qf[i][d] * tabT[d][r] for the Rp
// columns of tabT (D, Rp) (P's rows Rp floats apart). SAM's term for query offset i and key offset j is
// P[., i - j + a - 1]: one small GEMM against a table that stays in L1, instead of a different (a, D) slice of
// the table per query offset.
void rel_products_generic(const float* qf, int64_t n, int64_t D, const float* tabT, int64_t Rp, float* P) {
  for (int64_t i = 0; i < n; ++i) {
    float* o = P + i * Rp;
    std::fill(o, o + Rp, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const float x = qf[i * D + d];
      for (int64_t r = 0; r < Rp; ++r) o[r] += x * tabT[d * Rp + r];
    }
  }
}

#ifdef SAM_FAST_X86_AVX512
// The same in AVX-512: 8 queries x 32 columns at a time, 16 independent FMA chains of D steps.
__attribute__((target("avx512f"))) void rel_products_avx512(const float* qf, int64_t n, int64_t D,
                                                            const float* tabT, int64_t Rp, float* P) {
  constexpr int64_t kQ = 8;
  for (int64_t i0 = 0; i0 < n; i0 += kQ) {
    const int64_t nq = std::min(kQ, n - i0);
    const float* qr[kQ];
    for (int64_t r = 0; r < kQ; ++r) qr[r] = qf + (i0 + std::min(r, nq - 1)) * D;
    for (int64_t c0 = 0; c0 < Rp; c0 += 32) {
      const bool two = c0 + 16 < Rp;
      __m512 a0[kQ], a1[kQ];
      for (int64_t r = 0; r < kQ; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m512 t0 = _mm512_loadu_ps(tabT + d * Rp + c0);
        const __m512 t1 = two ? _mm512_loadu_ps(tabT + d * Rp + c0 + 16) : _mm512_setzero_ps();
        for (int64_t r = 0; r < kQ; ++r) {
          const __m512 x = _mm512_set1_ps(qr[r][d]);
          a0[r] = _mm512_fmadd_ps(x, t0, a0[r]);
          a1[r] = _mm512_fmadd_ps(x, t1, a1[r]);
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        _mm512_storeu_ps(P + (i0 + r) * Rp + c0, a0[r]);
        if (two) _mm512_storeu_ps(P + (i0 + r) * Rp + c0 + 16, a1[r]);
      }
    }
  }
}
#endif

void rel_products(const float* qf, int64_t n, int64_t D, const float* tabT, int64_t Rp, float* P) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return rel_products_avx512(qf, n, D, tabT, Rp, P);
#endif
  rel_products_generic(qf, n, D, tabT, Rp, P);
}

// One axis of the decomposed bias from the products: out[i][j] = P[i][off[i] - j + a - 1] for j < a (out's rows
// a floats apart), off[i] the query's offset along the axis.
void rel_terms(const float* P, int64_t n, int64_t Rp, const int32_t* off, int64_t a, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* p = P + i * Rp + off[i] + a - 1;
    float* o = out + i * a;
    for (int64_t j = 0; j < a; ++j) o[j] = p[-j];
  }
}

#ifdef SAM_FAST_X86_AVX512
// A short copy inline: 64 bytes a step, the tail masked. A row is 28-160 bytes here, where libc's memcpy call cost
// more than the copy (14% of a bf16 window block's time).
__attribute__((target("avx512f,avx512bw"))) inline void copy_bytes_avx512(void* dst, const void* src, int64_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(d + i, _mm512_loadu_si512(s + i));
  if (i < n) {
    const __mmask64 m = (uint64_t{1} << (n - i)) - 1;
    _mm512_mask_storeu_epi8(d + i, m, _mm512_maskz_loadu_epi8(m, s + i));
  }
}
#endif

// Rows fetched ahead of the gathers (software prefetch): a token's q, k and v lie 3C channels from the next token's,
// and a window's tokens one grid row apart every sw of them, where the hardware prefetchers did not follow (the
// gathers took 14% of a bf16 window block; with q, k and v prefetched 16 rows ahead its median fell from 13.7 to
// 10.5-11.5 ms on ViT-B, the global block from 107 to 103 ms, on the AMX Xeon)
constexpr int64_t kPrefetchRows = 16;

// One gathered row of D values: src + bias (bias nullptr: a plain copy), rounded once to T.
template <typename T>
void gather_row(T* dst, const T* src, const T* bias, int64_t D) {
  if (bias == nullptr) {
#ifdef SAM_FAST_X86_AVX512
    if (cpu::avx512_bw_vl()) return copy_bytes_avx512(dst, src, D * static_cast<int64_t>(sizeof(T)));
#endif
    std::memcpy(dst, src, D * sizeof(T));
    return;
  }
  for (int64_t d = 0; d < D; ++d) dst[d] = T(static_cast<float>(src[d]) + static_cast<float>(bias[d]));
}

// Where head h's q, k and v lie in a token's 3 * C channels: q at h * head_stride, k and v k_off / v_off after it.
// segment_anything's qkv linear writes (3, heads, D): {D, C, 2C}; TinyViT's writes (heads, 3, D): {3D, D, 2D}.
struct QkvLayout {
  int64_t head_stride, k_off, v_off;
};

// The bias of a segment's logits: SAM's decomposed rel-pos terms from the tables (transposed: thT, twT), or, when
// `dense` is set, one (L, L) float32 table per head (heads, L, L), L = sh * sw, row = the query's place in its
// window: TinyViT's learned per-offset bias, expanded.
struct SegmentBias {
  const float* thT;
  const float* twT;
  const float* dense;
};

// The max over the q_stride x q_stride cell at (y, x) of a token grid of q rows (rows sH / sW apart, each of D values),
// plus bias (nullptr: none), rounded once to T. Rounding is monotone, so this is the max of the biased rows.
template <typename T>
void pooled_row(T* dst, const T* src, int64_t sH, int64_t sW, int64_t y, int64_t x, int64_t s, const T* bias,
                int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    float m = static_cast<float>(src[y * sH + x * sW + d]);
    for (int64_t dy = 0; dy < s; ++dy) {
      for (int64_t dx = 0; dx < s; ++dx) m = std::max(m, static_cast<float>(src[(y + dy) * sH + (x + dx) * sW + d]));
    }
    dst[d] = T(bias == nullptr ? m : m + static_cast<float>(bias[d]));
  }
}

// Tasks (image, segment, head, block of rows). A segment is a (sh, sw) window of the grid (the whole grid for a
// global block); its keys are gathered once per segment and head (positions past the grid read pad_k / pad_v),
// its real queries block by block, with their bias rows computed from the gathered rows (rel-pos) or copied from
// the dense table; each output row goes straight to its place in out (B, Hg, Wg, heads * D). With qkv_bias (3 * C
// values, in qkv's channel order), qkv holds x W^T alone and every row read from it gets its part of the bias as
// it is gathered. A dense bias runs the row pass over a 1 x L key grid: the row's zero "h" term plus its bias row;
// no bias at all (every table nullptr) runs it with both terms zero. With q_stride s > 1 (no bias; sh and sw
// multiples of s) a segment's queries are the s x s max-pools of its grid cells, the output grid is (Hg / s, Wg / s)
// (floor: a pooled cell past it is not computed) and out is (B, Hg / s, Wg / s, heads * D).
template <typename T>
void attend_grid(const at::Tensor& qkv, int64_t heads, int64_t sh, int64_t sw, const QkvLayout& lay,
                 const SegmentBias& bias, const T* qkv_bias, const T* pad_k, const T* pad_v, float scale, T* op,
                 int64_t qs = 1) {
  const bool dense = bias.dense != nullptr;
  const bool flat = dense || bias.thT == nullptr;  // the row pass over a 1 x L key grid
  const int64_t rhp = (2 * sh - 1 + 15) / 16 * 16, rwp = (2 * sw - 1 + 15) / 16 * 16;
  const int64_t B = qkv.size(0), Hg = qkv.size(1), Wg = qkv.size(2), C = qkv.size(3) / 3, D = C / heads;
  const int64_t sB = qkv.stride(0), sH = qkv.stride(1), sW = qkv.stride(2);
  const int64_t nsy = (Hg + sh - 1) / sh, nsx = (Wg + sw - 1) / sw, Lk = sh * sw;
  const int64_t Hq = Hg / qs, Wq = Wg / qs, qh = sh / qs, qw = sw / qs;  // the (pooled) query grid and segment
  const int64_t bq = block_rows<T>(qh * qw, Lk, D);
  const int64_t nb = (qh * qw + bq - 1) / bq;
  KeyGrid g{flat ? 1 : sh, flat ? Lk : sw, nullptr, nullptr};
  std::vector<int32_t> iy, ix;
  if (!flat) small_grid_index(g, iy, ix);
  const T* base = qkv.const_data_ptr<T>();
  cpu::parallel_for(0, B * nsy * nsx * heads * nb, 1, [&](int64_t begin, int64_t end) {
    Attend<T> att(bq, Lk, D);
    std::vector<T> kbuf(Lk * D), vbuf(Lk * D), qbuf(bq * D);
    std::vector<float> qf(std::is_same_v<T, float> || flat ? 0 : bq * D), rh(bq * g.ay, 0.0f), rw(bq * g.ax, 0.0f);
    std::vector<float> prod(flat ? 0 : bq * std::max(rhp, rwp));
    std::vector<int32_t> sy(bq), sx(bq);
    std::vector<T*> dst(bq);
    float sums[256];
    float maxes[256];
    int64_t loaded = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t % nb, h = (t / nb) % heads, seg = t / (nb * heads);
      const int64_t b = seg / (nsy * nsx), y0 = (seg / nsx) % nsy * sh, x0 = seg % nsx * sw;
      const int64_t nry = std::min(qh, Hq - y0 / qs), nrx = std::min(qw, Wq - x0 / qs);
      const int64_t r0 = rb * bq, n = nry <= 0 || nrx <= 0 ? 0 : std::min(bq, nry * nrx - r0);
      if (n <= 0) continue;  // a block of rows past a partial window's real queries
      const T* img = base + b * sB + h * lay.head_stride;
      const T* bias_q = qkv_bias == nullptr ? nullptr : qkv_bias + h * lay.head_stride;
      const T* bias_k = qkv_bias == nullptr ? nullptr : bias_q + lay.k_off;
      const T* bias_v = qkv_bias == nullptr ? nullptr : bias_q + lay.v_off;
      if (loaded != seg * heads + h) {
        for (int64_t j = 0; j < Lk; ++j) {
          const int64_t y = y0 + j / sw, x = x0 + j % sw;
          const bool real = y < Hg && x < Wg;
#ifdef SAM_FAST_X86_AVX512
          if (j + kPrefetchRows < Lk) {  // rows a token's 3C channels apart: out of the prefetchers' reach
            const int64_t yp = y0 + (j + kPrefetchRows) / sw, xp = x0 + (j + kPrefetchRows) % sw;
            if (yp < Hg && xp < Wg) {
              const char* row = reinterpret_cast<const char*>(img + yp * sH + xp * sW);
              for (int64_t b = 0; b < static_cast<int64_t>(D * sizeof(T)); b += 64) {
                _mm_prefetch(row + lay.k_off * sizeof(T) + b, _MM_HINT_T0);
                _mm_prefetch(row + lay.v_off * sizeof(T) + b, _MM_HINT_T0);
              }
            }
          }
#endif
          if (real) {
            gather_row(kbuf.data() + j * D, img + y * sH + x * sW + lay.k_off, bias_k, D);
            gather_row(vbuf.data() + j * D, img + y * sH + x * sW + lay.v_off, bias_v, D);
          } else {
            std::memcpy(kbuf.data() + j * D, pad_k + h * D, D * sizeof(T));
            std::memcpy(vbuf.data() + j * D, pad_v + h * D, D * sizeof(T));
          }
        }
        att.keys(kbuf.data(), D, vbuf.data(), D);
        loaded = seg * heads + h;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t qy = (r0 + i) / nrx, qx = (r0 + i) % nrx;
#ifdef SAM_FAST_X86_AVX512
        if (qs == 1 && i + kPrefetchRows < n) {
          const int64_t ahead = r0 + i + kPrefetchRows;
          const char* row = reinterpret_cast<const char*>(img + (y0 + ahead / nrx) * sH + (x0 + ahead % nrx) * sW);
          for (int64_t b = 0; b < static_cast<int64_t>(D * sizeof(T)); b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
        }
#endif
        if (qs == 1) {
          gather_row(qbuf.data() + i * D, img + (y0 + qy) * sH + (x0 + qx) * sW, bias_q, D);
        } else {
          pooled_row(qbuf.data() + i * D, img, sH, sW, y0 + qy * qs, x0 + qx * qs, qs, bias_q, D);
        }
        sy[i] = static_cast<int32_t>(qy);
        sx[i] = static_cast<int32_t>(qx);
        dst[i] = op + ((b * Hq + y0 / qs + qy) * Wq + x0 / qs + qx) * C + h * D;
        if (dense) std::memcpy(rw.data() + i * Lk, bias.dense + (h * Lk + qy * sw + qx) * Lk, Lk * sizeof(float));
      }
      if (flat) {
        att.block(qbuf.data(), D, n, rh.data(), rw.data(), g, scale, sums, maxes);
        for (int64_t i = 0; i < n; ++i) finish_row(att.acc() + i * D, D, sums[i], maxes[i], dst[i]);
        continue;
      }
      const float* qfp;
      if constexpr (std::is_same_v<T, float>) {
        qfp = qbuf.data();
      } else {
        for (int64_t e = 0; e < n * D; ++e) qf[e] = static_cast<float>(qbuf[e]);
        qfp = qf.data();
      }
      // SAM's terms: the unscaled q against the tables, added to the scaled logits
      rel_products(qfp, n, D, bias.thT, rhp, prod.data());
      rel_terms(prod.data(), n, rhp, sy.data(), sh, rh.data());
      rel_products(qfp, n, D, bias.twT, rwp, prod.data());
      rel_terms(prod.data(), n, rwp, sx.data(), sw, rw.data());
      att.block(qbuf.data(), D, n, rh.data(), rw.data(), g, scale, sums, maxes);
      for (int64_t i = 0; i < n; ++i) finish_row(att.acc() + i * D, D, sums[i], maxes[i], dst[i]);
    }
  });
}

// The padded keys' k and v (zeros when neither is given), checked: both or neither, (heads, D) in qkv's dtype.
std::pair<at::Tensor, at::Tensor> pad_kv(const char* op, const std::optional<at::Tensor>& pad_k,
                                         const std::optional<at::Tensor>& pad_v, const at::Tensor& qkv,
                                         int64_t heads, int64_t D) {
  TORCH_CHECK(pad_k.has_value() == pad_v.has_value(), op, ": give both pad_k and pad_v, or neither");
  if (!pad_k.has_value()) {
    at::Tensor zeros = at::zeros({heads, D}, qkv.options());
    return {zeros, zeros};
  }
  for (const at::Tensor* t : {&*pad_k, &*pad_v}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->device().is_cpu() && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef({heads, D}),
                op, ": pad_k and pad_v must be contiguous (", heads, ", ", D, ") ", qkv.scalar_type(),
                " tensors on the CPU, got ", t->sizes(), " ", t->scalar_type());
  }
  return {*pad_k, *pad_v};
}

}  // namespace

void sam_block_attention_cpu(const at::Tensor& qkv, int64_t heads, int64_t window, const at::Tensor& rel_pos_h,
                             const at::Tensor& rel_pos_w, const std::optional<at::Tensor>& qkv_bias,
                             const std::optional<at::Tensor>& pad_k,
                             const std::optional<at::Tensor>& pad_v, double scale, at::Tensor out) {
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(qkv.dim() == 4 && (dt == at::kFloat || dt == at::kBFloat16) && qkv.device().is_cpu(),
              "sam_block_attention: qkv must be a 4-D (B, Hg, Wg, 3 * C) float32 or bfloat16 tensor on the CPU, got ",
              qkv.sizes(), " ", dt, " on ", qkv.device());
  TORCH_CHECK(heads >= 1 && qkv.size(3) > 0 && qkv.size(3) % (3 * heads) == 0,
              "sam_block_attention: qkv's last dim must be 3 * heads * head_dim with heads >= 1, got ", qkv.size(3),
              " for heads = ", heads);
  TORCH_CHECK(qkv.stride(3) == 1, "sam_block_attention: qkv needs a contiguous last dim");
  TORCH_CHECK(window >= 0, "sam_block_attention: window must be >= 0 (0: global attention), got ", window);
  const int64_t B = qkv.size(0), Hg = qkv.size(1), Wg = qkv.size(2), C = qkv.size(3) / 3, D = C / heads;
  TORCH_CHECK(out.scalar_type() == dt && out.device().is_cpu() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({B, Hg, Wg, C}),
              "sam_block_attention: out must be a contiguous (", B, ", ", Hg, ", ", Wg, ", ", C, ") ", dt,
              " tensor on the CPU, got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
  at::assert_no_overlap(out, qkv);
  if (B == 0 || Hg == 0 || Wg == 0) return;
  const int64_t sh = window > 0 ? window : Hg, sw = window > 0 ? window : Wg;
  const at::Tensor* tables[] = {&rel_pos_h, &rel_pos_w};
  const int64_t spans[] = {2 * sh - 1, 2 * sw - 1};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *tables[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() &&
                    t.sizes() == at::IntArrayRef({spans[i], D}),
                "sam_block_attention: ", i == 0 ? "rel_pos_h" : "rel_pos_w", " must be a contiguous float32 (",
                spans[i], ", ", D, ") table on the CPU (2 * segment - 1 offsets), got ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device());
  }
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->scalar_type() == dt && qkv_bias->device().is_cpu() && qkv_bias->is_contiguous() &&
                    qkv_bias->dim() == 1 && qkv_bias->size(0) == 3 * C,
                "sam_block_attention: qkv_bias must be a contiguous (", 3 * C, ",) ", dt, " tensor on the CPU, got ",
                qkv_bias->sizes(), " ", qkv_bias->scalar_type(), " on ", qkv_bias->device());
  }
  const auto [pk, pv] = pad_kv("sam_block_attention", pad_k, pad_v, qkv, heads, D);
  for (const at::Tensor* t : {&rel_pos_h, &rel_pos_w, &pk, &pv}) at::assert_no_overlap(out, *t);
  if (qkv_bias.has_value()) at::assert_no_overlap(out, *qkv_bias);
  const std::vector<float> thT = transposed_table(rel_pos_h.const_data_ptr<float>(), 2 * sh - 1, D);
  const std::vector<float> twT = transposed_table(rel_pos_w.const_data_ptr<float>(), 2 * sw - 1, D);
  const float fscale = static_cast<float>(scale);
  const QkvLayout lay{D, C, 2 * C};
  const SegmentBias bias{thT.data(), twT.data(), nullptr};
  if (dt == at::kFloat) {
    attend_grid(qkv, heads, sh, sw, lay, bias, qkv_bias.has_value() ? qkv_bias->const_data_ptr<float>() : nullptr,
                pk.const_data_ptr<float>(), pv.const_data_ptr<float>(), fscale, out.data_ptr<float>());
  } else {
    attend_grid(qkv, heads, sh, sw, lay, bias,
                qkv_bias.has_value() ? qkv_bias->const_data_ptr<at::BFloat16>() : nullptr,
                pk.const_data_ptr<at::BFloat16>(), pv.const_data_ptr<at::BFloat16>(), fscale,
                out.data_ptr<at::BFloat16>());
  }
}

// TinyViT's window attention (schema in csrc/ops.cpp): the machinery above with its channel layout and a dense bias.
void window_bias_attention_cpu(const at::Tensor& qkv, int64_t heads, int64_t window, const at::Tensor& bias,
                               const std::optional<at::Tensor>& pad_k, const std::optional<at::Tensor>& pad_v,
                               double scale, at::Tensor out) {
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(qkv.dim() == 4 && (dt == at::kFloat || dt == at::kBFloat16) && qkv.device().is_cpu(),
              "window_bias_attention: qkv must be a 4-D (B, Hg, Wg, 3 * C) float32 or bfloat16 tensor on the CPU, "
              "got ", qkv.sizes(), " ", dt, " on ", qkv.device());
  TORCH_CHECK(heads >= 1 && qkv.size(3) > 0 && qkv.size(3) % (3 * heads) == 0,
              "window_bias_attention: qkv's last dim must be 3 * heads * head_dim with heads >= 1, got ", qkv.size(3),
              " for heads = ", heads);
  TORCH_CHECK(qkv.stride(3) == 1, "window_bias_attention: qkv needs a contiguous last dim");
  TORCH_CHECK(window >= 1 && window <= 64, "window_bias_attention: window must be in [1, 64], got ", window);
  const int64_t B = qkv.size(0), Hg = qkv.size(1), Wg = qkv.size(2), C = qkv.size(3) / 3, D = C / heads;
  const int64_t L = window * window;
  TORCH_CHECK(out.scalar_type() == dt && out.device().is_cpu() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({B, Hg, Wg, C}),
              "window_bias_attention: out must be a contiguous (", B, ", ", Hg, ", ", Wg, ", ", C, ") ", dt,
              " tensor on the CPU, got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.device().is_cpu() && bias.is_contiguous() &&
                  bias.sizes() == at::IntArrayRef({heads, L, L}),
              "window_bias_attention: bias must be a contiguous float32 (", heads, ", ", L, ", ", L,
              ") tensor on the CPU, got ", bias.sizes(), " ", bias.scalar_type(), " on ", bias.device());
  const auto [pk, pv] = pad_kv("window_bias_attention", pad_k, pad_v, qkv, heads, D);
  for (const at::Tensor* t : {&qkv, &bias, &pk, &pv}) at::assert_no_overlap(out, *t);
  if (B == 0 || Hg == 0 || Wg == 0) return;
  const QkvLayout lay{3 * D, D, 2 * D};
  const SegmentBias dense{nullptr, nullptr, bias.const_data_ptr<float>()};
  const float fscale = static_cast<float>(scale);
  if (dt == at::kFloat) {
    attend_grid<float>(qkv, heads, window, window, lay, dense, nullptr, pk.const_data_ptr<float>(),
                       pv.const_data_ptr<float>(), fscale, out.data_ptr<float>());
  } else {
    attend_grid<at::BFloat16>(qkv, heads, window, window, lay, dense, nullptr, pk.const_data_ptr<at::BFloat16>(),
                              pv.const_data_ptr<at::BFloat16>(), fscale, out.data_ptr<at::BFloat16>());
  }
}

// SAM 2's Hiera attention (schema in csrc/ops.cpp): the machinery above without a bias, SAM's channel order, and the
// queries max-pooled q_stride x q_stride within each segment where q_stride > 1.
void hiera_attention_cpu(const at::Tensor& qkv, int64_t heads, int64_t window, int64_t q_stride,
                         const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& pad_k,
                         const std::optional<at::Tensor>& pad_v, double scale, at::Tensor out) {
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(qkv.dim() == 4 && (dt == at::kFloat || dt == at::kBFloat16) && qkv.device().is_cpu(),
              "hiera_attention: qkv must be a 4-D (B, Hg, Wg, 3 * C) float32 or bfloat16 tensor on the CPU, got ",
              qkv.sizes(), " ", dt, " on ", qkv.device());
  TORCH_CHECK(heads >= 1 && qkv.size(3) > 0 && qkv.size(3) % (3 * heads) == 0,
              "hiera_attention: qkv's last dim must be 3 * heads * head_dim with heads >= 1, got ", qkv.size(3),
              " for heads = ", heads);
  TORCH_CHECK(qkv.stride(3) == 1, "hiera_attention: qkv needs a contiguous last dim");
  TORCH_CHECK(window >= 0, "hiera_attention: window must be >= 0 (0: global attention), got ", window);
  TORCH_CHECK(q_stride >= 1 && (window == 0 || window % q_stride == 0),
              "hiera_attention: q_stride must be >= 1 and divide the window, got q_stride = ", q_stride,
              " for window = ", window);
  const int64_t B = qkv.size(0), Hg = qkv.size(1), Wg = qkv.size(2), C = qkv.size(3) / 3, D = C / heads;
  const int64_t Hq = Hg / q_stride, Wq = Wg / q_stride;
  TORCH_CHECK(out.scalar_type() == dt && out.device().is_cpu() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({B, Hq, Wq, C}),
              "hiera_attention: out must be a contiguous (", B, ", ", Hq, ", ", Wq, ", ", C, ") ", dt,
              " tensor on the CPU, got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->scalar_type() == dt && qkv_bias->device().is_cpu() && qkv_bias->is_contiguous() &&
                    qkv_bias->dim() == 1 && qkv_bias->size(0) == 3 * C,
                "hiera_attention: qkv_bias must be a contiguous (", 3 * C, ",) ", dt, " tensor on the CPU, got ",
                qkv_bias->sizes(), " ", qkv_bias->scalar_type(), " on ", qkv_bias->device());
    at::assert_no_overlap(out, *qkv_bias);
  }
  const auto [pk, pv] = pad_kv("hiera_attention", pad_k, pad_v, qkv, heads, D);
  for (const at::Tensor* t : {&qkv, &pk, &pv}) at::assert_no_overlap(out, *t);
  if (B == 0 || Hq == 0 || Wq == 0) return;
  const int64_t sh = window > 0 ? window : Hg, sw = window > 0 ? window : Wg;
  const QkvLayout lay{D, C, 2 * C};
  const SegmentBias none{nullptr, nullptr, nullptr};
  const float fscale = static_cast<float>(scale);
  if (dt == at::kFloat) {
    attend_grid(qkv, heads, sh, sw, lay, none, qkv_bias.has_value() ? qkv_bias->const_data_ptr<float>() : nullptr,
                pk.const_data_ptr<float>(), pv.const_data_ptr<float>(), fscale, out.data_ptr<float>(), q_stride);
  } else {
    attend_grid(qkv, heads, sh, sw, lay, none,
                qkv_bias.has_value() ? qkv_bias->const_data_ptr<at::BFloat16>() : nullptr,
                pk.const_data_ptr<at::BFloat16>(), pv.const_data_ptr<at::BFloat16>(), fscale,
                out.data_ptr<at::BFloat16>(), q_stride);
  }
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) {
  m.impl("hiera_attention", &hiera_attention_cpu);
  m.impl("sam_block_attention", &sam_block_attention_cpu);
  m.impl("window_bias_attention", &window_bias_attention_cpu);
}

}  // namespace sam_fast
