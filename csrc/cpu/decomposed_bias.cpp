// CPU kernel of sam_fast::decomposed_bias (schema in csrc/ops.cpp): SAM's decomposed rel-pos bias written
// out in the layout the fused CPU attention reads as its mask.
//
// rel_h (..., ay) and rel_w (..., ax) -> out (..., ay * ax), out[..., i * ax + j] = rel_h[..., i] +
// rel_w[..., j], into a buffer the caller reuses chunk after chunk. PyTorch's broadcasting add does the same, but with an innermost dimension of only ax (14 for a
// SAM window) its loop runs at a fraction of memory speed. On x86-64 with AVX-512 (checked at run time)
// a row of rel_w sits in a register and each output run is one masked store; elsewhere a plain loop.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu.h"

#include <algorithm>
#include <vector>

namespace sam_fast {
namespace {

// A row's ax values of rel_w stay in one register (masked to ax lanes, 16 at a time); each of its ay
// outputs runs is one broadcast add and one masked store.
#ifdef SAM_FAST_X86_AVX512
__attribute__((target("avx512f"))) void bias_rows_f32_avx512(const float* h, const float* w, float* out,
                                                               int64_t begin, int64_t end, int64_t ay,
                                                               int64_t ax) {
  for (int64_t r = begin; r < end; ++r) {
    const float* hr = h + r * ay;
    const float* wr = w + r * ax;
    float* o = out + r * ay * ax;
    for (int64_t j0 = 0; j0 < ax; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, ax - j0);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      const __m512 wv = _mm512_maskz_loadu_ps(m, wr + j0);
      for (int64_t i = 0; i < ay; ++i) {
        _mm512_mask_storeu_ps(o + i * ax + j0, m, _mm512_add_ps(_mm512_set1_ps(hr[i]), wv));
      }
    }
  }
}
#endif

// one output row at a time, a plain loop (double, and CPUs without AVX-512)
template <typename T>
void bias_rows_generic(const T* h, const T* w, T* out, int64_t begin, int64_t end, int64_t ay, int64_t ax) {
  for (int64_t r = begin; r < end; ++r) {
    const T* hr = h + r * ay;
    const T* wr = w + r * ax;
    T* o = out + r * ay * ax;
    for (int64_t i = 0; i < ay; ++i) {
      const T hv = hr[i];
      T* oi = o + i * ax;
      for (int64_t j = 0; j < ax; ++j) oi[j] = hv + wr[j];
    }
  }
}

void bias_rows_f32(const float* h, const float* w, float* out, int64_t begin, int64_t end, int64_t ay,
                   int64_t ax) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return bias_rows_f32_avx512(h, w, out, begin, end, ay, ax);
#endif
  bias_rows_generic(h, w, out, begin, end, ay, ax);
}

}  // namespace

void decomposed_bias_cpu(const at::Tensor& rel_h, const at::Tensor& rel_w, at::Tensor out) {
  TORCH_CHECK(rel_h.dim() >= 1 && rel_h.dim() == rel_w.dim(),
              "decomposed_bias: rel_h and rel_w need the same number (>= 1) of dims, got ", rel_h.sizes(),
              " and ", rel_w.sizes());
  TORCH_CHECK(rel_h.sizes().slice(0, rel_h.dim() - 1) == rel_w.sizes().slice(0, rel_w.dim() - 1),
              "decomposed_bias: rel_h and rel_w need the same leading dims, got ", rel_h.sizes(), " and ",
              rel_w.sizes());
  TORCH_CHECK(rel_h.scalar_type() == rel_w.scalar_type() && rel_h.scalar_type() == out.scalar_type() &&
                  (rel_h.scalar_type() == at::kFloat || rel_h.scalar_type() == at::kDouble),
              "decomposed_bias: rel_h, rel_w and out must all be float32 or all float64, got ",
              rel_h.scalar_type(), ", ", rel_w.scalar_type(), " and ", out.scalar_type());
  const int64_t ay = rel_h.size(-1), ax = rel_w.size(-1);
  std::vector<int64_t> shape(rel_h.sizes().begin(), rel_h.sizes().end());
  shape.back() = ay * ax;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.is_contiguous(),
              "decomposed_bias: out must be a contiguous tensor of shape ", at::IntArrayRef(shape), ", got ",
              out.sizes());
  at::assert_no_overlap(out, rel_h);  // out is written while rel_h and rel_w are read
  at::assert_no_overlap(out, rel_w);
  const at::Tensor h = rel_h.contiguous();
  const at::Tensor w = rel_w.contiguous();
  const int64_t rows = ay == 0 ? 0 : h.numel() / ay;
  if (rows == 0 || ax == 0) return;
  // about 16K outputs per task: enough to amortise a task, small enough to split a 2 MB chunk
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, ay * ax));
  if (h.scalar_type() == at::kFloat) {
    const float* hp = h.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* op = out.data_ptr<float>();
    cpu::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { bias_rows_f32(hp, wp, op, b, e, ay, ax); });
  } else {
    const double* hp = h.data_ptr<double>();
    const double* wp = w.data_ptr<double>();
    double* op = out.data_ptr<double>();
    cpu::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { bias_rows_generic(hp, wp, op, b, e, ay, ax); });
  }
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) { m.impl("decomposed_bias", &decomposed_bias_cpu); }

}  // namespace sam_fast
