// Shared arithmetic of sam_fast::mask_postprocess for the CPU and CUDA kernels.
//
// segment_anything turns low-resolution mask logits L (P, Hl, Wl) into masks of the original image
// with two bilinear resizes (align_corners=False): to the padded encoder input (Sh, Sw), a crop to
// the resized image (h, w), and a resize to the original size (H, W). Each resize is linear and
// separable, so the composition is too: output row y reads at most three consecutive low-resolution
// rows, and output column x at most three consecutive low-resolution columns,
//
//     value(y, x) = sum_i sum_j wy[y][i] * wx[x][j] * L[ky[y] + i, kx[x] + j].
//
// The composite taps are built from the very same per-stage taps as ATen's upsample_bilinear2d
// (LinearTap in resize_rel_pos.h: float scale in / out, source index clamped at 0), so the values
// equal segment_anything's up to float rounding (about 1e-7 relative): a mask pixel can differ only
// where the logit lies that close to a threshold. Nothing at full resolution is ever stored in float.
//
// RLE follows COCO: column-major (Fortran) order, counts alternate runs of 0 and 1 starting with 0.
// A mask of size (H, W) can be placed at (x0, y0) inside a larger (IH, IW) frame of zeros (the
// automatic mask generator's uncrop) and the RLE is then that of the frame.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "resize_rel_pos.h"

namespace sam_fast {

// Composite taps of the two resizes along one axis: out_len positions, each reading `count`
// consecutive low-resolution indices from start[i] (count = min(4, low_len); unused taps weigh 0).
// With an upsampling first stage (low_len <= padded_len) the real taps span at most 3 indices.
constexpr int kPostprocessTaps = 4;

struct AxisTaps {
  std::vector<int32_t> start;  // (out_len,)
  std::vector<float> weight;   // (out_len, kPostprocessTaps)
  int count;
};

// low_len -> padded_len (stage 1), crop to crop_len, -> out_len (stage 2).
inline AxisTaps composite_taps(int64_t low_len, int64_t padded_len, int64_t crop_len, int64_t out_len) {
  AxisTaps taps;
  taps.start.resize(out_len);
  taps.weight.assign(out_len * kPostprocessTaps, 0.0f);
  taps.count = static_cast<int>(low_len < kPostprocessTaps ? low_len : kPostprocessTaps);
  const float scale1 = static_cast<float>(low_len) / static_cast<float>(padded_len);
  const float scale2 = static_cast<float>(crop_len) / static_cast<float>(out_len);
  for (int64_t i = 0; i < out_len; ++i) {
    const LinearTap<float> outer = linear_tap<float>(i, crop_len, scale2);
    const int64_t rows[2] = {outer.i0, outer.i1};
    const float outer_w[2] = {outer.w0, outer.w1};
    const LinearTap<float> first = linear_tap<float>(rows[0], low_len, scale1);
    int64_t base = first.i0;
    // Keep every tap inside [0, low_len): near the end the window slides left.
    if (base + kPostprocessTaps > low_len) base = low_len - kPostprocessTaps > 0 ? low_len - kPostprocessTaps : 0;
    taps.start[i] = static_cast<int32_t>(base);
    float* w = &taps.weight[i * kPostprocessTaps];
    for (int a = 0; a < 2; ++a) {
      const LinearTap<float> inner = linear_tap<float>(rows[a], low_len, scale1);
      const int64_t k[2] = {inner.i0, inner.i1};
      const float inner_w[2] = {inner.w0, inner.w1};
      for (int b = 0; b < 2; ++b) {
        const int64_t slot = k[b] - base;
        TORCH_CHECK(slot >= 0 && slot < taps.count,
                    "sam_fast::mask_postprocess: internal tap window overflow (low ", low_len, ", padded ",
                    padded_len, ", crop ", crop_len, ", out ", out_len, ")");
        w[slot] += outer_w[a] * inner_w[b];
      }
    }
  }
  return taps;
}

struct PostprocessGeometry {
  int64_t low_h, low_w;        // logits (P, low_h, low_w)
  int64_t padded_h, padded_w;  // first resize target
  int64_t crop_h, crop_w;      // crop after the first resize
  int64_t out_h, out_w;        // second resize target: the masks' size
  int64_t x0, y0;              // placement of the masks in the RLE frame
  int64_t frame_h, frame_w;    // the RLE frame
};

inline PostprocessGeometry check_mask_postprocess_args(const at::Tensor& logits, at::IntArrayRef padded_size,
                                                       at::IntArrayRef input_size, at::IntArrayRef original_size,
                                                       at::IntArrayRef rle_frame) {
  TORCH_CHECK(logits.dim() == 3, "sam_fast::mask_postprocess: expected logits of shape (P, h, w), got ",
              logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "sam_fast::mask_postprocess: expected float32, float16 or bfloat16 logits, got ", st);
  TORCH_CHECK(padded_size.size() == 2 && input_size.size() == 2 && original_size.size() == 2,
              "sam_fast::mask_postprocess: padded_size, input_size and original_size must have 2 entries");
  TORCH_CHECK(rle_frame.size() == 4, "sam_fast::mask_postprocess: rle_frame must be (x0, y0, frame_h, frame_w), got ",
              rle_frame);
  PostprocessGeometry g{logits.size(1), logits.size(2), padded_size[0], padded_size[1], input_size[0],
                        input_size[1], original_size[0], original_size[1], rle_frame[0], rle_frame[1],
                        rle_frame[2], rle_frame[3]};
  TORCH_CHECK(g.low_h >= 1 && g.low_w >= 1, "sam_fast::mask_postprocess: empty logits of shape ", logits.sizes());
  TORCH_CHECK(g.padded_h >= g.low_h && g.padded_w >= g.low_w,
              "sam_fast::mask_postprocess: padded_size ", padded_size, " must be at least the logits' size (",
              g.low_h, ", ", g.low_w, ")");
  TORCH_CHECK(g.crop_h >= 1 && g.crop_w >= 1 && g.crop_h <= g.padded_h && g.crop_w <= g.padded_w,
              "sam_fast::mask_postprocess: input_size ", input_size, " must lie within padded_size ", padded_size);
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, "sam_fast::mask_postprocess: original_size must be positive, got ",
              original_size);
  TORCH_CHECK(g.x0 >= 0 && g.y0 >= 0 && g.x0 + g.out_w <= g.frame_w && g.y0 + g.out_h <= g.frame_h,
              "sam_fast::mask_postprocess: masks of size (", g.out_h, ", ", g.out_w, ") placed at (x0, y0) = (", g.x0,
              ", ", g.y0, ") do not fit the RLE frame (", g.frame_h, ", ", g.frame_w, ")");
  return g;
}

// Per-mask outputs, shared by both kernels.
struct PostprocessOutputs {
  at::Tensor stability;  // (P,) float32
  at::Tensor area;       // (P,) int64
  at::Tensor boxes;      // (P, 4) int64, XYXY inclusive, zeros for an empty mask
  at::Tensor rle_counts;   // (sum of counts,) int64
  at::Tensor rle_offsets;  // (P + 1,) int64
  at::Tensor masks;        // (P, H, W) bool, or (0,) when not asked
};

// The compressed COCO string of one RLE (pycocotools' rleToString format): each count, minus the
// count two places back from the third one on, as a little-endian sequence of 5-bit groups with a
// continuation bit (0x20) and a sign bit in the last group (0x10), each group offset by '0'.
inline void append_coco_string(const int64_t* counts, int64_t n, std::vector<char>& out) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t value = counts[i] - (i > 2 ? counts[i - 2] : 0);
    bool more = true;
    while (more) {
      int64_t group = value & 0x1f;
      value >>= 5;  // arithmetic shift: negative deltas end at -1
      more = (group & 0x10) ? value != -1 : value != 0;
      if (more) group |= 0x20;
      out.push_back(static_cast<char>(group + 48));
    }
  }
}

}  // namespace sam_fast
