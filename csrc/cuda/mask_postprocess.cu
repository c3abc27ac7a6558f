// CUDA kernels of sam_fast::mask_postprocess (schema in csrc/ops.cpp, arithmetic in csrc/mask_postprocess.h).
//
// One warp owns one output column of one mask, which is also one stretch of COCO's column-major RLE.
// The warp first combines the column's (at most four) low-resolution columns into a shared-memory
// vector T (Hl floats), then walks the column 32 rows at a time: lane i computes row y0 + i from
// three or four taps of T, and __ballot_sync turns the thresholds into 32-bit words, from which area,
// stability counts, box and run transitions are population counts.
//
//   pass 1 (column_stats_kernel): per-mask counts and box (integer atomics, so order-independent),
//          per-column transition count and first / last bit; the binary mask if asked;
//   host:  per-column RLE transitions (head and tail rules of the frame), one exclusive scan,
//          one device-to-host read of the total (the output size is data-dependent);
//   pass 2 (column_transitions_kernel): recompute the column, write the frame positions of its
//          transitions in order (ballot ranks), no atomics;
//   pass 3 (counts_kernel): counts = differences of consecutive positions per mask.
// Recomputing in pass 2 costs a few FLOPs per pixel and saves storing any full-resolution mask.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "../mask_postprocess.h"

namespace sam_fast {
namespace {

constexpr int kWarps = 8;  // columns per block

struct DeviceTaps {
  const int32_t* start_y;
  const float* weight_y;
  const int32_t* start_x;
  const float* weight_x;
  int count_y;
  int count_x;
};

struct Geometry {
  int low_h, low_w, out_h, out_w;
  int64_t x0, y0, frame_h, frame_w;
};

// T[k] = sum_t wx[t] * L[k][kx + t] for the warp's column, into shared memory.
template <typename scalar_t>
__device__ __forceinline__ void load_column(const scalar_t* __restrict__ L, const Geometry& g, const DeviceTaps& taps,
                                            int x, float* __restrict__ T, int lane) {
  const int kx = taps.start_x[x];
  const float* w = taps.weight_x + x * kPostprocessTaps;
  for (int k = lane; k < g.low_h; k += 32) {
    const scalar_t* row = L + static_cast<int64_t>(k) * g.low_w + kx;
    float acc = w[0] * static_cast<float>(row[0]);
    for (int t = 1; t < taps.count_x; ++t) acc += w[t] * static_cast<float>(row[t]);
    T[k] = acc;
  }
  __syncwarp();
}

__device__ __forceinline__ float column_value(const float* __restrict__ T, const DeviceTaps& taps, int y) {
  const int ky = taps.start_y[y];
  const float* w = taps.weight_y + y * kPostprocessTaps;
  float acc = w[0] * T[ky];
  for (int t = 1; t < taps.count_y; ++t) acc += w[t] * T[ky + t];
  return acc;
}

template <typename scalar_t>
__global__ void column_stats_kernel(const scalar_t* __restrict__ logits, Geometry g, DeviceTaps taps, float thr,
                                    float thr_hi, float thr_lo, int* __restrict__ counts /* (P, 3) */,
                                    int* __restrict__ box /* (P, 4) */, int* __restrict__ col_trans,
                                    uint8_t* __restrict__ col_first, uint8_t* __restrict__ col_last,
                                    bool* __restrict__ masks) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int x = blockIdx.x * kWarps + warp;
  const int p = blockIdx.y;
  if (x >= g.out_w) return;  // whole warps leave together
  float* T = shared + warp * g.low_h;
  load_column(logits + static_cast<int64_t>(p) * g.low_h * g.low_w, g, taps, x, T, lane);

  int area = 0, hi = 0, lo = 0, trans = 0, ymin = INT_MAX, ymax = -1;
  unsigned prev_bit = 0, first_bit = 0;
  for (int y0 = 0; y0 < g.out_h; y0 += 32) {
    const int y = y0 + lane;
    const bool valid = y < g.out_h;
    const float v = valid ? column_value(T, taps, y) : 0.0f;
    const unsigned on = __ballot_sync(0xffffffffu, valid && v > thr);
    hi += __popc(__ballot_sync(0xffffffffu, valid && v > thr_hi));
    lo += __popc(__ballot_sync(0xffffffffu, valid && v > thr_lo));
    const unsigned valid_bits = __ballot_sync(0xffffffffu, valid);
    area += __popc(on);
    if (y0 == 0) first_bit = on & 1u;
    // A transition at row r: bit r differs from bit r - 1 (from the previous word for r = y0).
    unsigned changes = (on ^ ((on << 1) | prev_bit)) & valid_bits;
    if (y0 == 0) changes &= ~1u;  // row 0's transition depends on the neighbour column: host rule
    trans += __popc(changes);
    if (on != 0u) {
      ymin = min(ymin, y0 + __ffs(on) - 1);
      ymax = y0 + 31 - __clz(on);
    }
    const int last_valid = min(31, g.out_h - 1 - y0);
    prev_bit = (on >> last_valid) & 1u;
    if (masks != nullptr && valid) masks[(static_cast<int64_t>(p) * g.out_h + y) * g.out_w + x] = v > thr;
  }
  if (lane == 0) {
    const int64_t c = static_cast<int64_t>(p) * g.out_w + x;
    col_trans[c] = trans;
    col_first[c] = static_cast<uint8_t>(first_bit);
    col_last[c] = static_cast<uint8_t>(prev_bit);
    atomicAdd(counts + p * 3 + 0, area);
    atomicAdd(counts + p * 3 + 1, hi);
    atomicAdd(counts + p * 3 + 2, lo);
    if (area > 0) {
      atomicMin(box + p * 4 + 0, x);
      atomicMin(box + p * 4 + 1, ymin);
      atomicMax(box + p * 4 + 2, x);
      atomicMax(box + p * 4 + 3, ymax);
    }
  }
}

template <typename scalar_t>
__global__ void column_transitions_kernel(const scalar_t* __restrict__ logits, Geometry g, DeviceTaps taps, float thr,
                                          const int64_t* __restrict__ col_start, const uint8_t* __restrict__ head,
                                          const uint8_t* __restrict__ tail, int64_t* __restrict__ positions) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int x = blockIdx.x * kWarps + warp;
  const int p = blockIdx.y;
  if (x >= g.out_w) return;
  float* T = shared + warp * g.low_h;
  load_column(logits + static_cast<int64_t>(p) * g.low_h * g.low_w, g, taps, x, T, lane);

  const int64_t c = static_cast<int64_t>(p) * g.out_w + x;
  const int64_t base = (g.x0 + x) * g.frame_h + g.y0;  // frame position of row 0
  int64_t index = col_start[c];
  if (head[c]) {
    if (lane == 0) positions[index] = base;
    ++index;
  }
  unsigned prev_bit = 0;
  const unsigned lower = (1u << lane) - 1u;
  for (int y0 = 0; y0 < g.out_h; y0 += 32) {
    const int y = y0 + lane;
    const bool valid = y < g.out_h;
    const float v = valid ? column_value(T, taps, y) : 0.0f;
    const unsigned on = __ballot_sync(0xffffffffu, valid && v > thr);
    const unsigned valid_bits = __ballot_sync(0xffffffffu, valid);
    unsigned changes = (on ^ ((on << 1) | prev_bit)) & valid_bits;
    if (y0 == 0) changes &= ~1u;
    if ((changes >> lane) & 1u) positions[index + __popc(changes & lower)] = base + y;
    index += __popc(changes);
    const int last_valid = min(31, g.out_h - 1 - y0);
    prev_bit = (on >> last_valid) & 1u;
  }
  if (tail[c] && lane == 0) positions[index] = base + g.out_h;
}

// counts[cs + i] = position[i] - position[i - 1] over [0, positions..., frame size] of each mask.
__global__ void counts_kernel(const int64_t* __restrict__ positions, const int64_t* __restrict__ trans_start,
                              const int64_t* __restrict__ trans_count, int64_t frame_size,
                              int64_t* __restrict__ counts) {
  const int p = blockIdx.x;
  const int64_t start = trans_start[p], n = trans_count[p];
  int64_t* out = counts + start + p;
  for (int64_t i = threadIdx.x; i <= n; i += blockDim.x) {
    const int64_t before = i > 0 ? positions[start + i - 1] : 0;
    const int64_t after = i < n ? positions[start + i] : frame_size;
    out[i] = after - before;
  }
}

at::Tensor taps_tensor(const AxisTaps& taps, int64_t n, at::Tensor* starts) {
  at::Tensor s = at::empty({n}, at::dtype(at::kInt));
  at::Tensor w = at::empty({n, kPostprocessTaps}, at::dtype(at::kFloat));
  std::copy(taps.start.begin(), taps.start.end(), s.data_ptr<int32_t>());
  std::copy(taps.weight.begin(), taps.weight.end(), w.data_ptr<float>());
  *starts = s;
  return w;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_postprocess_cuda(
    const at::Tensor& logits, at::IntArrayRef padded_size, at::IntArrayRef input_size, at::IntArrayRef original_size,
    at::IntArrayRef rle_frame, double mask_threshold, double stability_offset, bool return_rle, bool return_masks) {
  TORCH_CHECK(logits.is_cuda(), "sam_fast::mask_postprocess: expected a CUDA tensor, got ", logits.device());
  const PostprocessGeometry pg = check_mask_postprocess_args(logits, padded_size, input_size, original_size, rle_frame);
  TORCH_CHECK(pg.out_h * pg.out_w < (int64_t{1} << 31) && pg.low_h * pg.low_w < (int64_t{1} << 31),
              "sam_fast::mask_postprocess: the CUDA kernel counts pixels in int32; masks of size (", pg.out_h, ", ",
              pg.out_w, ") are too large");
  const int64_t smem = static_cast<int64_t>(kWarps) * pg.low_h * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "sam_fast::mask_postprocess: the CUDA kernel supports logits up to ",
              48 * 1024 / (kWarps * sizeof(float)), " rows, got ", pg.low_h);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor src = logits.contiguous();
  const int64_t P = src.size(0);
  const auto dev = logits.device();
  const auto long_opts = logits.options().dtype(at::kLong);

  at::Tensor sy, sx;
  const AxisTaps hy = composite_taps(pg.low_h, pg.padded_h, pg.crop_h, pg.out_h);
  const AxisTaps hx = composite_taps(pg.low_w, pg.padded_w, pg.crop_w, pg.out_w);
  at::Tensor wy = taps_tensor(hy, pg.out_h, &sy).to(dev, /*non_blocking=*/false);
  at::Tensor wx = taps_tensor(hx, pg.out_w, &sx).to(dev, false);
  sy = sy.to(dev, false);
  sx = sx.to(dev, false);
  const DeviceTaps taps{sy.data_ptr<int32_t>(), wy.data_ptr<float>(), sx.data_ptr<int32_t>(), wx.data_ptr<float>(),
                        hy.count, hx.count};
  const Geometry g{static_cast<int>(pg.low_h), static_cast<int>(pg.low_w), static_cast<int>(pg.out_h),
                   static_cast<int>(pg.out_w), pg.x0, pg.y0, pg.frame_h, pg.frame_w};
  const float thr = static_cast<float>(mask_threshold);
  const float thr_hi = static_cast<float>(mask_threshold + stability_offset);
  const float thr_lo = static_cast<float>(mask_threshold - stability_offset);

  at::Tensor counts = at::zeros({P, 3}, logits.options().dtype(at::kInt));
  at::Tensor box = at::tensor({INT_MAX, INT_MAX, -1, -1}, at::dtype(at::kInt)).to(dev).repeat({P, 1});
  at::Tensor col_trans = at::empty({P, pg.out_w}, logits.options().dtype(at::kInt));
  at::Tensor col_first = at::empty({P, pg.out_w}, logits.options().dtype(at::kByte));
  at::Tensor col_last = at::empty({P, pg.out_w}, logits.options().dtype(at::kByte));
  at::Tensor masks = return_masks ? at::empty({P, pg.out_h, pg.out_w}, logits.options().dtype(at::kBool))
                                  : at::empty({0}, logits.options().dtype(at::kBool));
  const dim3 grid((pg.out_w + kWarps - 1) / kWarps, P);
  const dim3 block(32 * kWarps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (P > 0) {
    TORCH_CHECK(P <= 65535, "sam_fast::mask_postprocess: the CUDA kernel takes at most 65535 masks per call, got ", P);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mask_postprocess_cuda", [&] {
      column_stats_kernel<scalar_t><<<grid, block, smem, stream>>>(
          src.data_ptr<scalar_t>(), g, taps, thr, thr_hi, thr_lo, counts.data_ptr<int>(), box.data_ptr<int>(),
          col_trans.data_ptr<int>(), col_first.data_ptr<uint8_t>(), col_last.data_ptr<uint8_t>(),
          return_masks ? masks.data_ptr<bool>() : nullptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor area = counts.select(1, 0).to(at::kLong);
  at::Tensor stability = counts.select(1, 1).to(at::kFloat) / counts.select(1, 2).to(at::kFloat);
  at::Tensor boxes = at::where(area.gt(0).unsqueeze(1), box.to(at::kLong), at::zeros({}, long_opts));

  if (!return_rle) {
    return {stability, area, boxes, at::empty({0}, long_opts), at::zeros({1}, long_opts), masks};
  }
  // Transitions at a column's row 0 and just below its last row depend on the frame (csrc/mask_postprocess.h).
  const int64_t tail_rows = pg.frame_h - pg.y0 - pg.out_h;
  const int64_t frame_size = pg.frame_h * pg.frame_w;
  at::Tensor first = col_first.to(at::kBool), last = col_last.to(at::kBool);
  at::Tensor prev = at::zeros_like(first);
  if (pg.y0 == 0 && tail_rows == 0 && pg.out_w > 1) {
    prev.narrow(1, 1, pg.out_w - 1).copy_(last.narrow(1, 0, pg.out_w - 1));
  }
  at::Tensor head = first.ne(prev);
  at::Tensor tail = last.clone();
  if (tail_rows == 0) {
    tail.narrow(1, 0, pg.out_w - 1).zero_();
    const int64_t after_last = (pg.x0 + pg.out_w - 1) * pg.frame_h + pg.y0 + pg.out_h;
    if (after_last >= frame_size) tail.narrow(1, pg.out_w - 1, 1).zero_();
  }
  at::Tensor per_col = col_trans.to(at::kLong) + head.to(at::kLong) + tail.to(at::kLong);
  at::Tensor col_end = per_col.flatten().cumsum(0);
  at::Tensor col_start = (col_end - per_col.flatten()).contiguous();
  at::Tensor trans_count = per_col.sum(1);
  at::Tensor trans_start = col_start.view({P, pg.out_w}).select(1, 0).contiguous();
  const int64_t total = P > 0 ? col_end[-1].item<int64_t>() : 0;  // the one synchronisation
  at::Tensor positions = at::empty({total}, long_opts);
  at::Tensor rle_counts = at::empty({total + P}, long_opts);
  if (P > 0) {
    at::Tensor head_u8 = head.to(at::kByte), tail_u8 = tail.to(at::kByte);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mask_postprocess_cuda", [&] {
      column_transitions_kernel<scalar_t><<<grid, block, smem, stream>>>(
          src.data_ptr<scalar_t>(), g, taps, thr, col_start.data_ptr<int64_t>(), head_u8.data_ptr<uint8_t>(),
          tail_u8.data_ptr<uint8_t>(), positions.data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    counts_kernel<<<P, 256, 0, stream>>>(positions.data_ptr<int64_t>(), trans_start.data_ptr<int64_t>(),
                                         trans_count.data_ptr<int64_t>(), frame_size, rle_counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor offsets = at::cat({trans_start + at::arange(P, long_opts), at::full({1}, total + P, long_opts)});
  return {stability, area, boxes, rle_counts, offsets, masks};
}

TORCH_LIBRARY_IMPL(sam_fast, CUDA, m) { m.impl("mask_postprocess", &mask_postprocess_cuda); }

}  // namespace sam_fast
