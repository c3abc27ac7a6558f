// CPU kernels of the W8A8 path: the CPU implementations of sam_fast::quantize_per_token, ::quantize_static and
// ::layer_norm_quantize (one schema per op for every device, defined with the Triton kernels in
// sam_fast/ops/int8_linear.py), and the CPU-only ops around torch._int_mm's int32 accumulator and the AMX GEMM
// (schemas in csrc/ops.cpp): the epilogue, the AMX weight panels, the AMX GEMM with its epilogue per tile.
//
// The numerics are the reference's (sam_fast/reference/int8_linear.py) operation for operation: IEEE fp32
// division and round-half-even for quantisation, NaN -> 0 and +-inf -> +-127, a NaN scale for a row holding
// either; the epilogue's ((float(acc) * a_scale) * w_scale) + bias in separate fp32 roundings (this file is
// built for baseline x86-64, so nothing is contracted into an FMA). What is PyTorch's own in the reference
// (the LayerNorm, the exact-erf GELU) is PyTorch's here too: ATen's kernels run on a block of rows that is
// still in cache, inside the one pass over the data, instead of as separate passes over whole tensors.
// Quantisation and the epilogue without GELU therefore equal the reference bit for bit; GELU and LayerNorm
// equal it up to where ATen's vectorised and scalar loops split a row (rounding level).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace sam_fast {
namespace {

constexpr float kQmax = 127.0f;

// clamp(round(v / s), -127, 127) with NaN -> 0 (the reference's quantize)
inline int8_t quantize_one(float v, float s) {
  const float r = std::nearbyint(v / s);
  if (std::isnan(r)) return 0;
  return static_cast<int8_t>(std::min(kQmax, std::max(-kQmax, r)));
}

// max|row| / 127 (1 for an all-zero row, NaN for a row holding NaN or +-inf)
template <typename T>
inline float row_scale(const T* row, int64_t K) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float v = static_cast<float>(row[k]);
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  const float s = amax / kQmax;
  return s == 0.0f ? 1.0f : s;
}

template <typename T>
inline void quantize_row(const T* row, int64_t K, float s, int8_t* q) {
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_one(static_cast<float>(row[k]), s);
}

// fp32 rows on AVX-512 (checked at run time; this file is otherwise built for baseline x86-64, where
// round-half-even is a libm call per value): the same IEEE division, rounding, NaN and clamp rules,
// 16 values at a time, masked tails.
#ifdef SAM_FAST_X86_AVX512
__attribute__((target("avx512f"))) float row_scale_avx512(const float* row, int64_t K) {
  __m512 amax = _mm512_setzero_ps();
  __m512 bad = _mm512_setzero_ps();  // x - x is NaN exactly where x is NaN or +-inf
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, row + k);
    bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  if (_mm512_cmp_ps_mask(bad, bad, _CMP_UNORD_Q)) return std::numeric_limits<float>::quiet_NaN();
  const float s = _mm512_reduce_max_ps(amax) / kQmax;
  return s == 0.0f ? 1.0f : s;
}

__attribute__((target("avx512f"))) void quantize_row_avx512(const float* row, int64_t K, float s, int8_t* q) {
  const __m512 vs = _mm512_set1_ps(s);
  const __m512 hi = _mm512_set1_ps(kQmax), lo = _mm512_set1_ps(-kQmax);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, row + k), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // NaN -> 0
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, _mm512_cvtps_epi32(r));
  }
}
#endif

inline float row_scale_f32(const float* row, int64_t K) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return row_scale_avx512(row, K);
#endif
  return row_scale(row, K);
}

inline void quantize_row_f32(const float* row, int64_t K, float s, int8_t* q) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return quantize_row_avx512(row, K, s, q);
#endif
  quantize_row(row, K, s, q);
}


// ((float(acc) * as) * ws[n]) + bias[n]: three separate fp32 roundings, as the reference's three ops
void dequantize_row_generic(const int32_t* acc, int64_t N, float as, const float* ws, const float* bias, float* y) {
  if (bias) {
    for (int64_t n = 0; n < N; ++n) y[n] = (static_cast<float>(acc[n]) * as) * ws[n] + bias[n];
  } else {
    for (int64_t n = 0; n < N; ++n) y[n] = (static_cast<float>(acc[n]) * as) * ws[n];
  }
}

#ifdef SAM_FAST_X86_AVX512
__attribute__((target("avx512f"))) void dequantize_row_avx512(const int32_t* acc, int64_t N, float as, const float* ws,
                                                                const float* bias, float* y) {
  const __m512 vas = _mm512_set1_ps(as);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = N - n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1u);
    __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, acc + n)), vas);
    t = _mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, ws + n));
    if (bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, bias + n));
    _mm512_mask_storeu_ps(y + n, m, t);
  }
}
#endif

inline void dequantize_row(const int32_t* acc, int64_t N, float as, const float* ws, const float* bias, float* y) {
#ifdef SAM_FAST_X86_AVX512
  if (cpu::avx512()) return dequantize_row_avx512(acc, N, as, ws, bias, y);
#endif
  dequantize_row_generic(acc, N, as, ws, bias, y);
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, ": x must be 2-D (M, K), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              name, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// rows per block: about `elems` values, at least one row
inline int64_t block_rows(int64_t K, int64_t elems) { return std::max<int64_t>(1, elems / std::max<int64_t>(1, K)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& scale) {
  check_rows(x_in, "quantize_rows");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  float static_scale = 0.0f;
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == 1, "quantize_rows: a static scale must hold one value, got ", scale->sizes());
    static_scale = scale->to(at::kFloat).item<float>();
  }
  // per row: its own scale, or the static one - NaN for a row holding NaN or +-inf either way, so that the GEMM's
  // output row is NaN (int8 holds no NaN: such a row's values quantise to 0 and +-127)
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0 || K == 0) {
    s.fill_(scale.has_value() ? static_scale : 1.0f);
    return {q, s};
  }
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  const bool dynamic = !scale.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rows_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    cpu::parallel_for(0, M, block_rows(K, 16384), [&](int64_t b, int64_t e) {
      // bf16 / fp16 rows widened to float32 first (exactly), for the float32 row functions' AVX-512 paths: the
      // scalar ones cost 1.7 ns a value (an int8 model's bf16 attention output, 65 ms of ViT-B's encoder)
      std::vector<float> wide(std::is_same_v<scalar_t, float> ? 0 : K);
      for (int64_t m = b; m < e; ++m) {
        const float* row;
        if constexpr (std::is_same_v<scalar_t, float>) {  // (not a template here: the cast compiles for every type)
          row = reinterpret_cast<const float*>(xp + m * K);
        } else {
          for (int64_t k = 0; k < K; ++k) wide[k] = static_cast<float>(xp[m * K + k]);
          row = wide.data();
        }
        const float own = row_scale_f32(row, K);  // NaN exactly when the row holds NaN or +-inf
        const float rs = dynamic ? own : static_scale;
        sp[m] = std::isnan(own) ? own : rs;
        quantize_row_f32(row, K, rs, qp + m * K);
      }
    });
  });
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> layer_norm_quantize_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias, double eps) {
  check_rows(x_in, "layer_norm_quantize");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  for (const auto* t : {&weight, &bias}) {
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 1 && (*t)->size(0) == K), "layer_norm_quantize: ",
                t == &weight ? "weight" : "bias", " must be a (K = ", K, ",) tensor, got ",
                t->has_value() ? (*t)->sizes() : at::IntArrayRef{});
  }
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  // the reference normalises x.float() with float weights: so do the blocks
  const c10::optional<at::Tensor> w = weight.has_value() ? c10::optional<at::Tensor>(weight->to(at::kFloat)) : c10::nullopt;
  const c10::optional<at::Tensor> bb = bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  // a block of rows (about 32K values, 128 KB in fp32) is normalised by ATen's own LayerNorm while it is in
  // cache, then scaled and quantised; ATen runs single-threaded inside this parallel region
  cpu::parallel_for(0, M, block_rows(K, 32768), [&](int64_t b, int64_t e) {
    const at::Tensor y = at::layer_norm(x.narrow(0, b, e - b).to(at::kFloat), {K}, w, bb, eps).contiguous();
    const float* yp = y.data_ptr<float>();
    for (int64_t m = b; m < e; ++m) {
      const float* row = yp + (m - b) * K;
      const float rs = row_scale_f32(row, K);
      sp[m] = rs;
      quantize_row_f32(row, K, rs, qp + m * K);
    }
  });
  return {q, s};
}

namespace {

// The epilogue's operands, checked (messages name the op and the input scale's argument) and in float32: the input
// scale (one value or M), the weight scale and bias (N values each), and an int8 output's scale.
struct EpilogueArgs {
  at::Tensor a_scale, w_scale, bias;  // (owners of the data below)
  float o_scale = 1.0f;
  const float* asp = nullptr;  // input scale: asp[m] per row, or asp[0] for all
  bool per_row = false;
  const float* wsp = nullptr;
  const float* bp = nullptr;  // nullptr: no bias
};

EpilogueArgs epilogue_args(const char* op, const char* a_name, int64_t M, int64_t N, const at::Tensor& a_scale_in,
                           const at::Tensor& w_scale_in, const c10::optional<at::Tensor>& bias_in,
                           at::ScalarType out_dtype, const c10::optional<at::Tensor>& out_scale) {
  EpilogueArgs r;
  r.a_scale = a_scale_in.to(at::kFloat).contiguous();
  r.w_scale = w_scale_in.to(at::kFloat).contiguous();
  TORCH_CHECK(r.a_scale.numel() == 1 || (r.a_scale.dim() == 1 && r.a_scale.size(0) == M), op, ": ", a_name,
              " must hold one value or M = ", M, " values, got ", r.a_scale.sizes());
  TORCH_CHECK(r.w_scale.numel() == N, op, ": w_scale must hold N = ", N, " values, got ", r.w_scale.sizes());
  if (bias_in.has_value()) {
    r.bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(r.bias.numel() == N, op, ": bias must hold N = ", N, " values, got ", r.bias.sizes());
  }
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kChar,
              op, ": out_dtype must be float32, bfloat16, float16 or int8, got ", out_dtype);
  if (out_dtype == at::kChar) {
    TORCH_CHECK(out_scale.has_value() && out_scale->numel() == 1, op, ": an int8 output needs out_scale");
    r.o_scale = out_scale->to(at::kFloat).item<float>();
  }
  r.asp = r.a_scale.data_ptr<float>();
  r.per_row = r.a_scale.numel() != 1;  // one value applies to every row, whatever its shape
  r.wsp = r.w_scale.data_ptr<float>();
  r.bp = r.bias.defined() ? r.bias.data_ptr<float>() : nullptr;
  return r;
}

// The epilogue; in_place: a float32 result written over the (contiguous) int32 accumulator itself, each row
// dequantised vector by vector (every vector is loaded before its results are stored)
at::Tensor epilogue(const at::Tensor& acc_in, const at::Tensor& a_scale_in, const at::Tensor& w_scale_in,
                    const c10::optional<at::Tensor>& bias_in, bool gelu, at::ScalarType out_dtype,
                    const c10::optional<at::Tensor>& out_scale, bool in_place) {
  TORCH_CHECK(acc_in.dim() == 2 && acc_in.scalar_type() == at::kInt, "int8_epilogue: acc must be 2-D int32, got ",
              acc_in.scalar_type(), " ", acc_in.sizes());
  const at::Tensor acc = acc_in.contiguous();
  const int64_t M = acc.size(0), N = acc.size(1);
  const EpilogueArgs args =
      epilogue_args("int8_epilogue", "a_scale", M, N, a_scale_in, w_scale_in, bias_in, out_dtype, out_scale);
  const float o_scale = args.o_scale;
  at::Tensor out = in_place ? acc.view(at::kFloat) : at::empty({M, N}, acc.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* asp = args.asp;
  const bool per_row = args.per_row;
  const float* wsp = args.wsp;
  const float* bp = args.bp;
  // blocks of about 64K outputs (256 KB of fp32): dequantised straight into a float32 output, otherwise into
  // a buffer that stays in cache through the GELU and the final cast or re-quantisation
  cpu::parallel_for(0, M, block_rows(N, 65536), [&](int64_t b, int64_t e) {
    at::Tensor buf = out_dtype == at::kFloat ? out.narrow(0, b, e - b) : at::empty({e - b, N}, acc.options().dtype(at::kFloat));
    float* y = buf.data_ptr<float>();
    for (int64_t m = b; m < e; ++m) {
      dequantize_row(ap + m * N, N, per_row ? asp[m] : asp[0], wsp, bp, y + (m - b) * N);
    }
    if (gelu) at::gelu_(buf);
    const int64_t count = (e - b) * N;
    switch (out_dtype) {
      case at::kFloat:
        break;
      case at::kBFloat16: {
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + b * N;
        for (int64_t i = 0; i < count; ++i) o[i] = c10::BFloat16(y[i]);
        break;
      }
      case at::kHalf: {
        c10::Half* o = out.data_ptr<c10::Half>() + b * N;
        for (int64_t i = 0; i < count; ++i) o[i] = c10::Half(y[i]);
        break;
      }
      default:
        quantize_row_f32(y, count, o_scale, out.data_ptr<int8_t>() + b * N);
    }
  });
  return out;
}

}  // namespace

at::Tensor int8_epilogue_cpu(const at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& w_scale,
                             const c10::optional<at::Tensor>& bias, bool gelu, at::ScalarType out_dtype,
                             const c10::optional<at::Tensor>& out_scale) {
  return epilogue(acc, a_scale, w_scale, bias, gelu, out_dtype, out_scale, false);
}

// float32 epilogue written over acc's own memory (acc's int32 bits become the float32 result, read back with
// acc.view(torch.float32)): a fresh int32 accumulator is the only large allocation, as for a float GEMM
void int8_epilogue_cpu_(at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias, bool gelu) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.is_contiguous(),
              "int8_epilogue_: acc must be a contiguous 2-D int32 tensor, got ", acc.scalar_type(), " ",
              acc.sizes());
  epilogue(acc, a_scale, w_scale, bias, gelu, at::kFloat, c10::nullopt, true);
}

// ---- AMX int8 GEMM with the epilogue fused per tile ----
//
// torch._int_mm writes the whole int32 accumulator to memory and the epilogue reads it back: at ViT-B's widths
// that round trip costs about as much as the GEMM. Here oneDNN's AMX micro-kernel (ATen's batch-reduce GEMM,
// signed int8 x signed int8 -> int32) computes one tile of up to 128 rows x 64 columns into a per-thread buffer,
// and the tile is dequantised (+ bias, + GELU, then the cast or int8 re-quantisation) into the output while it is
// still in L1. The int32 sums are exact, so the result equals the _int_mm path bit for bit (GELU to rounding
// level: ATen's GELU on a tile, or on the whole output when that is float32).
//
// The weight (N, K) is packed once (sam_fast::int8_pack_amx) into panels of 64 output channels, each
// (K / 4, 64, 4): [p][c][e] = w[c0 + c][4p + e], the VNNI layout AMX's int8 dot products read, channels past N
// zero. K must be a multiple of 4; CPUs without AMX get an empty tensor and the caller keeps torch._int_mm.
//
// Without AMX, on AVX512-VNNI, the same panels and the same fused epilogue serve vnni_tile below in place of
// oneDNN's micro-kernel: torch._int_mm there leaves the int32 accumulator's round trip through memory, which costs
// as much as the GEMM at SAM's widths.
namespace {
constexpr int64_t kAmxPanel = 64;
constexpr int64_t kAmxRows = 128;

bool amx_int8() { return cpu::amx(at::kChar); }
bool vnni_int8() { return cpu::avx512_vnni(); }
bool panel_gemm() { return amx_int8() || vnni_int8(); }

#ifdef SAM_FAST_X86_AVX512
// R rows of x (row stride K) times one (K / 4, 64, 4) panel into `tile` (row stride 64), exact int32. vpdpbusd
// multiplies unsigned by signed bytes: x's bytes go in shifted by 128 (x ^ 0x80 = x + 128 as u8), and 128 times each
// channel's weight sum (`shift`) comes off again. Sixteen channels per vector, four vectors per row.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline void vnni_rows(
    const int8_t* x, int64_t K, const __m512i* B, const __m512i* shift, int32_t* tile) {
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  }
  for (int64_t p = 0; p < K / 4; ++p) {
    const __m512i b0 = _mm512_loadu_si512(B + 4 * p), b1 = _mm512_loadu_si512(B + 4 * p + 1);
    const __m512i b2 = _mm512_loadu_si512(B + 4 * p + 2), b3 = _mm512_loadu_si512(B + 4 * p + 3);
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * K + 4 * p, 4);
      const __m512i a = _mm512_xor_si512(_mm512_set1_epi32(quad), flip);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) {
      _mm512_storeu_si512(tile + r * kAmxPanel + 16 * v, _mm512_sub_epi32(acc[r][v], shift[v]));
    }
  }
}

// `rows` rows of x (row stride K, K a multiple of 4) times the panel at `panel` into tile (rows x 64 int32)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void vnni_tile(int64_t rows, int64_t K,
                                                                               const int8_t* x, const int8_t* panel,
                                                                               int32_t* tile) {
  const __m512i* B = reinterpret_cast<const __m512i*>(panel);
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i shift[4];
  for (int v = 0; v < 4; ++v) shift[v] = _mm512_setzero_si512();
  for (int64_t p = 0; p < K / 4; ++p) {  // each channel's weight sum, four bytes per lane at a time
    for (int v = 0; v < 4; ++v) shift[v] = _mm512_dpbusd_epi32(shift[v], ones, _mm512_loadu_si512(B + 4 * p + v));
  }
  for (int v = 0; v < 4; ++v) shift[v] = _mm512_slli_epi32(shift[v], 7);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) vnni_rows<4>(x + r * K, K, B, shift, tile + r * kAmxPanel);
  for (; r < rows; ++r) vnni_rows<1>(x + r * K, K, B, shift, tile + r * kAmxPanel);
}
#endif
}  // namespace

at::Tensor int8_pack_amx(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.device().is_cpu(),
              "int8_pack_amx: w must be a 2-D int8 CPU tensor, got ", w.scalar_type(), " ", w.sizes(), " on ",
              w.device());
  const int64_t N = w.size(0), K = w.size(1);
  if (!panel_gemm() || K == 0 || K % 4 != 0 || N == 0) return at::empty({0}, w.options());
  const at::Tensor wc = w.contiguous();
  const int64_t panels = (N + kAmxPanel - 1) / kAmxPanel;
  at::Tensor out = at::zeros({panels * K * kAmxPanel}, w.options());
  const int8_t* wp = wc.data_ptr<int8_t>();
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int8_t>());
  cpu::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
    for (int64_t pn = b; pn < e; ++pn) {
      const int64_t c0 = pn * kAmxPanel, width = std::min(kAmxPanel, N - c0);
      uint32_t* dst = o + pn * K * kAmxPanel / 4;
      for (int64_t c = 0; c < width; ++c) {
        for (int64_t p = 0; p < K / 4; ++p) std::memcpy(dst + p * kAmxPanel + c, wp + (c0 + c) * K + 4 * p, 4);
      }
    }
  });
  return out;
}

namespace {
// x (contiguous) after the checks both panel GEMM ops make: x a 2-D int8 CPU tensor, w_packed int8_pack_amx's
// panels of an (N, K) weight, a panel GEMM on this CPU
at::Tensor checked_panel_input(const char* op, const at::Tensor& x_in, const at::Tensor& w_packed, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kChar && x_in.device().is_cpu(), op,
              ": x must be a 2-D int8 CPU tensor, got ", x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(1);
  const int64_t panels = (N + kAmxPanel - 1) / kAmxPanel;
  TORCH_CHECK(N >= 1 && K % 4 == 0 && K > 0 && w_packed.scalar_type() == at::kChar && w_packed.dim() == 1 &&
                  w_packed.is_contiguous() && w_packed.numel() == panels * K * kAmxPanel,
              op, ": w_packed must be sam_fast::int8_pack_amx of an (N = ", N, ", K = ", K,
              ") weight (contiguous), K a multiple of 4, got ", w_packed.numel(), " values with strides ",
              w_packed.strides());
  TORCH_CHECK(panel_gemm(), op, ": this CPU has no AMX int8 nor AVX512-VNNI, or they are switched off "
              "(SAM_FAST_CPU_NO_AMX, SAM_FAST_CPU_NO_AVX512)");
  return x;
}

// one tile: `rows` rows of x (row stride K) times the panel at `panel` (`width` real channels) into tile (rows x 64
// int32), by oneDNN's AMX micro-kernel or vpdpbusd
inline void panel_tile(bool amx, int64_t rows, int64_t width, int64_t K, const int8_t* x, const int8_t* panel,
                       int32_t* tile) {
  if (amx) {
    at::native::cpublas::brgemm(rows, width, K, K, kAmxPanel, kAmxPanel, false, x, panel, tile, true);
    return;
  }
#ifdef SAM_FAST_X86_AVX512
  vnni_tile(rows, K, x, panel, tile);
#else
  (void)rows;
  (void)width;
  (void)K;
  (void)x;
  (void)panel;
  (void)tile;
#endif
}
}  // namespace

at::Tensor int8_linear_amx(const at::Tensor& x_in, const at::Tensor& x_scale_in, const at::Tensor& w_packed,
                           int64_t N, const at::Tensor& w_scale_in, const c10::optional<at::Tensor>& bias_in,
                           bool gelu, at::ScalarType out_dtype, const c10::optional<at::Tensor>& out_scale) {
  const at::Tensor x = checked_panel_input("int8_linear_amx", x_in, w_packed, N);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t panels = (N + kAmxPanel - 1) / kAmxPanel;
  const bool amx = amx_int8();
  const EpilogueArgs args =
      epilogue_args("int8_linear_amx", "x_scale", M, N, x_scale_in, w_scale_in, bias_in, out_dtype, out_scale);
  const float o_scale = args.o_scale;
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0) return out;
  // dequantised straight into the output; a float32 output's GELU then runs once over the whole of it (ATen's
  // kernel on each 128 x 64 tile cost more in calls than in arithmetic: 121 ms of ViT-B's 1.4 s int8 encoder)
  const bool direct = out_dtype == at::kFloat;
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* wp = w_packed.data_ptr<int8_t>();
  const float* asp = args.asp;
  const bool per_row = args.per_row;
  const float* wsp = args.wsp;
  const float* bp = args.bp;
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t osize = out.element_size();
  const int64_t row_blocks = (M + kAmxRows - 1) / kAmxRows;
  // tasks: row block major, panel minor (a thread's consecutive tiles share their rows of x)
  cpu::parallel_for(0, row_blocks * panels, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> tile(kAmxRows * kAmxPanel);
    std::vector<float> act(direct ? 0 : kAmxRows * kAmxPanel);
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = (t / panels) * kAmxRows, c0 = (t % panels) * kAmxPanel;
      const int64_t rows = std::min(kAmxRows, M - m0), width = std::min(kAmxPanel, N - c0);
      panel_tile(amx, rows, width, K, xp + m0 * K, wp + c0 * K, tile.data());
      const float* wsc = wsp + c0;
      const float* bc = bp != nullptr ? bp + c0 : nullptr;
      if (direct) {
        for (int64_t r = 0; r < rows; ++r) {
          dequantize_row(tile.data() + r * kAmxPanel, width, per_row ? asp[m0 + r] : asp[0], wsc, bc,
                         reinterpret_cast<float*>(op + ((m0 + r) * N + c0) * osize));
        }
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(tile.data() + r * kAmxPanel, width, per_row ? asp[m0 + r] : asp[0], wsc, bc,
                       act.data() + r * width);
      }
      if (gelu) {
        at::Tensor a = at::from_blob(act.data(), {rows, width}, at::TensorOptions().dtype(at::kFloat));
        at::gelu_(a);
      }
      for (int64_t r = 0; r < rows; ++r) {  // the cast or re-quantisation of the unfused epilogue, per row
        const float* y = act.data() + r * width;
        char* dst = op + ((m0 + r) * N + c0) * osize;
        switch (out_dtype) {
          case at::kFloat:
            std::memcpy(dst, y, width * sizeof(float));
            break;
          case at::kBFloat16:
            for (int64_t i = 0; i < width; ++i) reinterpret_cast<c10::BFloat16*>(dst)[i] = c10::BFloat16(y[i]);
            break;
          case at::kHalf:
            for (int64_t i = 0; i < width; ++i) reinterpret_cast<c10::Half*>(dst)[i] = c10::Half(y[i]);
            break;
          default:
            quantize_row_f32(y, width, o_scale, reinterpret_cast<int8_t*>(dst));
        }
      }
    }
    if (amx) at::native::cpublas::brgemm_release(true);
  });
  if (direct && gelu) at::gelu_(out);
  return out;
}

// quantize_per_token(int8_linear_amx(x, ..., gelu, float32)) without the float32 output: a thread takes a block of
// 128 rows across every panel into its own (128, N) float32 buffer (dequantised tile by tile), runs the GELU over
// the block, and quantises each row with its own scale, so the hidden activation of an int8 MLP is written once, in
// int8, with no N-wide float32 tensor in memory (on ViT-B: 50 MB per block, allocated fresh each call, whose page
// faults cost more than the GEMM).
std::tuple<at::Tensor, at::Tensor> int8_linear_amx_quantize(const at::Tensor& x_in, const at::Tensor& x_scale_in,
                                                            const at::Tensor& w_packed, int64_t N,
                                                            const at::Tensor& w_scale_in,
                                                            const c10::optional<at::Tensor>& bias_in, bool gelu) {
  const at::Tensor x = checked_panel_input("int8_linear_amx_quantize", x_in, w_packed, N);
  const int64_t M = x.size(0), K = x.size(1);
  const bool amx = amx_int8();
  const EpilogueArgs args = epilogue_args("int8_linear_amx_quantize", "x_scale", M, N, x_scale_in, w_scale_in,
                                          bias_in, at::kFloat, c10::nullopt);
  at::Tensor q = at::empty({M, N}, x.options());
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* wp = w_packed.data_ptr<int8_t>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  const int64_t row_blocks = (M + kAmxRows - 1) / kAmxRows;
  cpu::parallel_for(0, row_blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> tile(kAmxRows * kAmxPanel);
    std::vector<float> act(kAmxRows * N);
    for (int64_t rb = b; rb < e; ++rb) {
      const int64_t m0 = rb * kAmxRows, rows = std::min(kAmxRows, M - m0);
      for (int64_t c0 = 0; c0 < N; c0 += kAmxPanel) {
        const int64_t width = std::min(kAmxPanel, N - c0);
        panel_tile(amx, rows, width, K, xp + m0 * K, wp + c0 * K, tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          dequantize_row(tile.data() + r * kAmxPanel, width, args.per_row ? args.asp[m0 + r] : args.asp[0],
                         args.wsp + c0, args.bp != nullptr ? args.bp + c0 : nullptr, act.data() + r * N + c0);
        }
      }
      if (gelu) {
        at::Tensor block = at::from_blob(act.data(), {rows, N}, at::TensorOptions().dtype(at::kFloat));
        at::gelu_(block);
      }
      for (int64_t r = 0; r < rows; ++r) {  // quantize_per_token's rule: NaN scale for a row holding NaN or +-inf
        const float* y = act.data() + r * N;
        const float own = row_scale_f32(y, N);
        sp[m0 + r] = own;
        quantize_row_f32(y, N, own, qp + (m0 + r) * N);
      }
    }
    if (amx) at::native::cpublas::brgemm_release(true);
  });
  return {q, s};
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) {
  m.impl("quantize_per_token", [](const at::Tensor& x) { return quantize_rows_cpu(x, c10::nullopt); });
  m.impl("quantize_static", [](const at::Tensor& x, const at::Tensor& scale) { return quantize_rows_cpu(x, scale); });
  m.impl("layer_norm_quantize", &layer_norm_quantize_cpu);
  m.impl("int8_epilogue", &int8_epilogue_cpu);
  m.impl("int8_epilogue_", &int8_epilogue_cpu_);
  m.impl("int8_pack_amx", &int8_pack_amx);
  m.impl("int8_linear_amx", &int8_linear_amx);
  m.impl("int8_linear_amx_quantize", &int8_linear_amx_quantize);
}

}  // namespace sam_fast
