// CUDA kernel of sam_fast::resize_rel_pos (schema in csrc/ops.cpp, index math in csrc/resize_rel_pos.h).
// One thread per output element; the table is tiny, so the point is only to keep the resize on the
// device beside the attention that consumes it, with the CPU kernel's exact arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../resize_rel_pos.h"

namespace sam_fast {
namespace {

template <typename scalar_t>
__global__ void resize_rel_pos_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                      int64_t in_len, int64_t length, int64_t channels,
                                      at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= length * channels) return;
  const int64_t i = idx / channels;
  const int64_t c = idx - i * channels;
  const LinearTap<acc_t> t = linear_tap<acc_t>(i, in_len, scale);
  out[idx] = static_cast<scalar_t>(t.w0 * static_cast<acc_t>(in[t.i0 * channels + c]) +
                                   t.w1 * static_cast<acc_t>(in[t.i1 * channels + c]));
}

}  // namespace

at::Tensor resize_rel_pos_cuda(const at::Tensor& rel_pos, int64_t length) {
  TORCH_CHECK(rel_pos.is_cuda(), "sam_fast::resize_rel_pos: expected a CUDA tensor, got ", rel_pos.device());
  check_resize_rel_pos_args(rel_pos, length);
  const c10::cuda::CUDAGuard guard(rel_pos.device());
  at::Tensor src = rel_pos.contiguous();
  at::Tensor out = at::empty({length, src.size(1)}, src.options());
  const int64_t total = length * src.size(1);
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "resize_rel_pos_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(src.size(0)) / static_cast<acc_t>(length);
    resize_rel_pos_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src.size(0), length, src.size(1), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sam_fast, CUDA, m) { m.impl("resize_rel_pos", &resize_rel_pos_cuda); }

}  // namespace sam_fast
