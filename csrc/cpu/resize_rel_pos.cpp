// CPU kernel of sam_fast::resize_rel_pos (schema in csrc/ops.cpp, index math in csrc/resize_rel_pos.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu.h"

#include "../resize_rel_pos.h"

namespace sam_fast {

at::Tensor resize_rel_pos_cpu(const at::Tensor& rel_pos, int64_t length) {
  check_resize_rel_pos_args(rel_pos, length);
  at::Tensor src = rel_pos.contiguous();
  at::Tensor out = at::empty({length, src.size(1)}, src.options());
  const int64_t in_len = src.size(0);
  const int64_t channels = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "resize_rel_pos_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(in_len) / static_cast<acc_t>(length);
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    cpu::parallel_for(0, length, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const LinearTap<acc_t> t = linear_tap<acc_t>(i, in_len, scale);
        const scalar_t* r0 = in + t.i0 * channels;
        const scalar_t* r1 = in + t.i1 * channels;
        for (int64_t c = 0; c < channels; ++c) {
          o[i * channels + c] = static_cast<scalar_t>(t.w0 * static_cast<acc_t>(r0[c]) +
                                                      t.w1 * static_cast<acc_t>(r1[c]));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) { m.impl("resize_rel_pos", &resize_rel_pos_cpu); }

}  // namespace sam_fast
