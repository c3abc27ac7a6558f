// CPU kernel of sam_fast::mask_postprocess (schema in csrc/ops.cpp, arithmetic in csrc/mask_postprocess.h).
//
// Masks run in parallel, one mask at a time per thread, in three passes over small buffers:
//   1. vertical: V[y][l] = sum_t wy[y][t] * L[ky[y] + t][l]    (H x Wl, contiguous in l: vectorised)
//   2. transpose V to VT (Wl x H), so that an output column is a contiguous combination of VT rows;
//   3. per output column x, in COCO's column-major order: col[y] = sum_t wx[x][t] * VT[kx[x] + t][y],
//      then the three threshold counts, the box and the run lengths straight from col.
// The full-resolution mask exists only one column at a time; the binary (P, H, W) output is written
// only when asked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../mask_postprocess.h"

namespace sam_fast {
namespace {

// Appends (value, length) runs; counts start with a (possibly empty) run of zeros.
struct RunLengths {
  std::vector<int64_t>& counts;
  uint8_t current = 0;
  int64_t run = 0;

  void push(uint8_t value, int64_t length) {
    if (length == 0) return;
    if (value == current) {
      run += length;
    } else {
      counts.push_back(run);
      current = value;
      run = length;
    }
  }
  void finish() { counts.push_back(run); }
};

// First index in [from, n) whose byte differs from `value` (0 or 1), else n. Eight bytes at a time:
// masks are long runs, so most words match and are skipped.
inline int64_t next_change(const uint8_t* bits, int64_t from, int64_t n, uint8_t value) {
  const uint64_t pattern = value ? 0x0101010101010101ull : 0ull;
  int64_t i = from;
  for (; i + 8 <= n; i += 8) {
    uint64_t word;
    std::memcpy(&word, bits + i, 8);
    const uint64_t diff = word ^ pattern;
    if (diff != 0) return i + (__builtin_ctzll(diff) >> 3);  // little-endian: lowest byte first
  }
  for (; i < n; ++i) {
    if (bits[i] != value) return i;
  }
  return n;
}

// One output column from four taps, with its three threshold counts and mask bytes. Cloned for AVX2
// (chosen at run time; no FMA, so values are bit-identical to the default clone).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void four_tap_column(const float* __restrict__ src, int64_t H, const float* w, float thr, float thr_hi,
                     float thr_lo, uint8_t* __restrict__ m, int32_t* area_out, int32_t* hi_out, int32_t* lo_out) {
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  const float* __restrict__ s0 = src;
  const float* __restrict__ s1 = src + H;
  const float* __restrict__ s2 = src + 2 * H;
  const float* __restrict__ s3 = src + 3 * H;
  int32_t area = 0, hi = 0, lo = 0;
  for (int64_t y = 0; y < H; ++y) {
    const float value = ((w0 * s0[y] + w1 * s1[y]) + w2 * s2[y]) + w3 * s3[y];
    const int32_t on = value > thr;
    m[y] = static_cast<uint8_t>(on);
    area += on;
    hi += value > thr_hi;
    lo += value > thr_lo;
  }
  *area_out = area;
  *hi_out = hi;
  *lo_out = lo;
}

// V[y][l] = sum_t wy[y][t] * L[ky[y] + t][l] for l < used_cols (H x used_cols). Cloned as above.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void vertical_pass(const float* __restrict__ L, int64_t Wl, const int32_t* start, const float* weight, int count,
                   int64_t H, int64_t used_cols, float* __restrict__ v) {
  for (int64_t y = 0; y < H; ++y) {
    float* __restrict__ out = v + y * used_cols;
    const float* w = weight + y * kPostprocessTaps;
    const float* src = L + static_cast<int64_t>(start[y]) * Wl;
    const float w0 = w[0];
    for (int64_t l = 0; l < used_cols; ++l) out[l] = w0 * src[l];
    for (int t = 1; t < count; ++t) {
      const float wt = w[t];
      const float* __restrict__ s = src + t * Wl;
      for (int64_t l = 0; l < used_cols; ++l) out[l] += wt * s[l];
    }
  }
}

struct MaskResult {
  int64_t area = 0, hi = 0, lo = 0;
  int64_t box[4] = {0, 0, 0, 0};
};

template <typename scalar_t>
void postprocess_one(const scalar_t* logits, const PostprocessGeometry& g, const AxisTaps& ty, const AxisTaps& tx,
                     int64_t used_cols, float thr, float thr_hi, float thr_lo, bool want_rle, bool* mask_out,
                     std::vector<float>& low, std::vector<float>& v, std::vector<float>& vt,
                     std::vector<float>& col, std::vector<uint8_t>& bits, std::vector<int64_t>& counts,
                     MaskResult& res) {
  const int64_t H = g.out_h, W = g.out_w, Wl = g.low_w;
  // Low-resolution logits as float (a view when they already are).
  const float* L;
  if (std::is_same<scalar_t, float>::value) {
    L = reinterpret_cast<const float*>(logits);
  } else {
    for (int64_t i = 0; i < g.low_h * Wl; ++i) low[i] = static_cast<float>(logits[i]);
    L = low.data();
  }
  // 1. vertical pass over the low-resolution columns any output column reads.
  vertical_pass(L, Wl, ty.start.data(), ty.weight.data(), ty.count, H, used_cols, v.data());
  // 2. blocked transpose (H x used_cols) -> (used_cols x H).
  constexpr int64_t B = 32;
  for (int64_t y0 = 0; y0 < H; y0 += B) {
    const int64_t y1 = std::min(y0 + B, H);
    for (int64_t l0 = 0; l0 < used_cols; l0 += B) {
      const int64_t l1 = std::min(l0 + B, used_cols);
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t l = l0; l < l1; ++l) vt[l * H + y] = v[y * used_cols + l];
    }
  }
  // 3. columns in RLE order.
  RunLengths rle{counts};
  if (want_rle) rle.push(0, g.x0 * g.frame_h);
  const int64_t tail = g.frame_h - g.y0 - H;
  int64_t ymin = std::numeric_limits<int64_t>::max(), ymax = -1, xmin = -1, xmax = -1;
  float* c = col.data();
  uint8_t* m = bits.data();
  for (int64_t x = 0; x < W; ++x) {
    const float* w = &tx.weight[x * kPostprocessTaps];
    const float* src = &vt[static_cast<int64_t>(tx.start[x]) * H];
    int32_t area = 0, hi = 0, lo = 0;
    if (tx.count == kPostprocessTaps) {
      // The common case in one pass (same operation order as the general loop below, so the same
      // values): four taps, the three thresholds, the mask bytes; int32 counts keep it vectorisable.
      four_tap_column(src, H, w, thr, thr_hi, thr_lo, m, &area, &hi, &lo);
    } else {
      for (int64_t y = 0; y < H; ++y) c[y] = w[0] * src[y];
      for (int t = 1; t < tx.count; ++t) {
        const float wt = w[t];
        const float* s = src + t * H;
        for (int64_t y = 0; y < H; ++y) c[y] += wt * s[y];
      }
      for (int64_t y = 0; y < H; ++y) {
        const float value = c[y];
        const uint8_t on = value > thr;
        m[y] = on;
        area += on;
        hi += value > thr_hi;
        lo += value > thr_lo;
      }
    }
    res.area += area;
    res.hi += hi;
    res.lo += lo;
    if (mask_out != nullptr) {
      for (int64_t y = 0; y < H; ++y) mask_out[y * W + x] = m[y];
    }
    if (area == 0) {
      if (want_rle) rle.push(0, g.frame_h);
      continue;
    }
    if (xmin < 0) xmin = x;
    xmax = x;
    if (want_rle) rle.push(0, g.y0);
    // Walk the runs of this column.
    int64_t y = 0;
    uint8_t value = m[0];
    while (y < H) {
      const int64_t end = next_change(m, y, H, value);
      if (value) {
        ymin = std::min(ymin, y);
        ymax = std::max(ymax, end - 1);
      }
      if (want_rle) rle.push(value, end - y);
      y = end;
      value ^= 1;
    }
    if (want_rle) rle.push(0, tail);
  }
  if (want_rle) {
    rle.push(0, (g.frame_w - g.x0 - W) * g.frame_h);
    rle.finish();
  }
  if (xmin >= 0) {
    res.box[0] = xmin;
    res.box[1] = ymin;
    res.box[2] = xmax;
    res.box[3] = ymax;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_postprocess_cpu(
    const at::Tensor& logits, at::IntArrayRef padded_size, at::IntArrayRef input_size, at::IntArrayRef original_size,
    at::IntArrayRef rle_frame, double mask_threshold, double stability_offset, bool return_rle, bool return_masks) {
  TORCH_CHECK(logits.device().is_cpu(), "sam_fast::mask_postprocess: expected a CPU tensor, got ", logits.device());
  const PostprocessGeometry g = check_mask_postprocess_args(logits, padded_size, input_size, original_size, rle_frame);
  const at::Tensor src = logits.contiguous();
  const int64_t P = src.size(0);
  const AxisTaps ty = composite_taps(g.low_h, g.padded_h, g.crop_h, g.out_h);
  const AxisTaps tx = composite_taps(g.low_w, g.padded_w, g.crop_w, g.out_w);
  int64_t used_cols = 0;
  for (int64_t x = 0; x < g.out_w; ++x) used_cols = std::max<int64_t>(used_cols, tx.start[x] + tx.count);
  // Comparisons happen in float32, as torch compares a float tensor with a Python scalar.
  const float thr = static_cast<float>(mask_threshold);
  const float thr_hi = static_cast<float>(mask_threshold + stability_offset);
  const float thr_lo = static_cast<float>(mask_threshold - stability_offset);

  at::Tensor stability = at::empty({P}, logits.options().dtype(at::kFloat));
  at::Tensor area = at::empty({P}, logits.options().dtype(at::kLong));
  at::Tensor boxes = at::empty({P, 4}, logits.options().dtype(at::kLong));
  at::Tensor masks = return_masks ? at::empty({P, g.out_h, g.out_w}, logits.options().dtype(at::kBool))
                                  : at::empty({0}, logits.options().dtype(at::kBool));
  std::vector<std::vector<int64_t>> counts(return_rle ? P : 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mask_postprocess_cpu", [&] {
    const scalar_t* base = src.data_ptr<scalar_t>();
    float* stab = stability.data_ptr<float>();
    int64_t* ar = area.data_ptr<int64_t>();
    int64_t* bx = boxes.data_ptr<int64_t>();
    bool* mk = return_masks ? masks.data_ptr<bool>() : nullptr;
    cpu::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> low(std::is_same<scalar_t, float>::value ? 0 : g.low_h * g.low_w);
      std::vector<float> v(g.out_h * used_cols), vt(used_cols * g.out_h), col(g.out_h);
      std::vector<uint8_t> bits(g.out_h);
      std::vector<int64_t> scratch;
      for (int64_t p = begin; p < end; ++p) {
        MaskResult res;
        std::vector<int64_t>& cts = return_rle ? counts[p] : scratch;
        postprocess_one<scalar_t>(base + p * g.low_h * g.low_w, g, ty, tx, used_cols, thr, thr_hi, thr_lo,
                                  return_rle, mk ? mk + p * g.out_h * g.out_w : nullptr, low, v, vt, col, bits,
                                  cts, res);
        // segment_anything divides the int32 counts as float32 (0 / 0 is NaN, as there).
        stab[p] = static_cast<float>(res.hi) / static_cast<float>(res.lo);
        ar[p] = res.area;
        for (int i = 0; i < 4; ++i) bx[p * 4 + i] = res.box[i];
      }
    });
  });

  at::Tensor offsets = at::zeros({return_rle ? P + 1 : 1}, logits.options().dtype(at::kLong));
  int64_t total = 0;
  if (return_rle) {
    int64_t* off = offsets.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) {
      off[p] = total;
      total += static_cast<int64_t>(counts[p].size());
    }
    off[P] = total;
  }
  at::Tensor rle_counts = at::empty({total}, logits.options().dtype(at::kLong));
  if (return_rle) {
    int64_t* out = rle_counts.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    cpu::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) std::copy(counts[p].begin(), counts[p].end(), out + off[p]);
    });
  }
  return {stability, area, boxes, rle_counts, offsets, masks};
}

// COCO compressed strings of a batch of RLEs: (chars uint8, offsets (P + 1,) int64).
std::tuple<at::Tensor, at::Tensor> rle_to_string_cpu(const at::Tensor& counts, const at::Tensor& offsets) {
  TORCH_CHECK(counts.device().is_cpu() && offsets.device().is_cpu(),
              "sam_fast::rle_to_string: expected CPU tensors, got ", counts.device(), " and ", offsets.device());
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kLong,
              "sam_fast::rle_to_string: expected 1-d int64 counts, got ", counts.scalar_type(), " of shape ",
              counts.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "sam_fast::rle_to_string: expected 1-d int64 offsets with P + 1 >= 1 entries, got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  const at::Tensor c = counts.contiguous();
  const at::Tensor o = offsets.contiguous();
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* op = o.data_ptr<int64_t>();
  const int64_t P = o.size(0) - 1;
  TORCH_CHECK(op[0] == 0 && op[P] == c.size(0), "sam_fast::rle_to_string: offsets must run from 0 to len(counts) = ",
              c.size(0), ", got ", op[0], " .. ", op[P]);
  std::vector<char> chars;
  at::Tensor char_offsets = at::empty({P + 1}, o.options());
  int64_t* co = char_offsets.data_ptr<int64_t>();
  co[0] = 0;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(op[p + 1] >= op[p], "sam_fast::rle_to_string: offsets must be non-decreasing, got ", op[p], " then ",
                op[p + 1]);
    append_coco_string(cp + op[p], op[p + 1] - op[p], chars);
    co[p + 1] = static_cast<int64_t>(chars.size());
  }
  at::Tensor out = at::empty({static_cast<int64_t>(chars.size())}, o.options().dtype(at::kByte));
  if (!chars.empty()) std::memcpy(out.data_ptr<uint8_t>(), chars.data(), chars.size());
  return {out, char_offsets};
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) {
  m.impl("mask_postprocess", &mask_postprocess_cpu);
  m.impl("rle_to_string", &rle_to_string_cpu);
}

}  // namespace sam_fast
