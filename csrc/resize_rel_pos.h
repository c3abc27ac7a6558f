// Shared index arithmetic of sam_fast::resize_rel_pos for the CPU and CUDA kernels.
//
// Output row i samples the input at src = (i + 0.5) * in/out - 0.5 (clamped at 0), blending rows
// floor(src) and floor(src) + 1 (the last row repeats), exactly as ATen's upsample_linear1d with
// align_corners=False and no scale factor. The scale is computed in the accumulation type
// (float for float/half/bfloat16, double for double) as ATen does; float results agree with ATen to
// within the rounding of that scale (exact in double).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#if defined(__CUDACC__)
#define SAM_FAST_HD __host__ __device__ __forceinline__
#else
#define SAM_FAST_HD inline
#endif

namespace sam_fast {

template <typename acc_t>
struct LinearTap {
  int64_t i0;
  int64_t i1;
  acc_t w0;
  acc_t w1;
};

template <typename acc_t>
SAM_FAST_HD LinearTap<acc_t> linear_tap(int64_t out_index, int64_t in_len, acc_t scale) {
  acc_t src = scale * (static_cast<acc_t>(out_index) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (src < static_cast<acc_t>(0)) {
    src = static_cast<acc_t>(0);
  }
  int64_t i0 = static_cast<int64_t>(src);
  int64_t step = i0 < in_len - 1 ? 1 : 0;
  acc_t lambda1 = src - static_cast<acc_t>(i0);
  if (lambda1 > static_cast<acc_t>(1)) lambda1 = static_cast<acc_t>(1);
  if (lambda1 < static_cast<acc_t>(0)) lambda1 = static_cast<acc_t>(0);
  return {i0, i0 + step, static_cast<acc_t>(1) - lambda1, lambda1};
}

// Argument checks shared by the CPU and CUDA implementations.
inline void check_resize_rel_pos_args(const at::Tensor& rel_pos, int64_t length) {
  TORCH_CHECK(rel_pos.dim() == 2, "sam_fast::resize_rel_pos: expected rel_pos of shape (L, C), got ",
              rel_pos.dim(), "-d tensor of shape ", rel_pos.sizes());
  TORCH_CHECK(rel_pos.size(0) >= 1, "sam_fast::resize_rel_pos: rel_pos has no rows");
  TORCH_CHECK(length >= 1, "sam_fast::resize_rel_pos: expected length >= 1, got ", length);
  TORCH_CHECK(at::isFloatingType(rel_pos.scalar_type()),
              "sam_fast::resize_rel_pos: expected a floating-point rel_pos, got ", rel_pos.scalar_type());
}

}  // namespace sam_fast
