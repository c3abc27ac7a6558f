// CPU kernel of sam_fast::linear_epilogue_ (schema in csrc/ops.cpp): what follows a bias-free GEMM in a ViT block,
// y = act(y + bias) + residual, in place, one cache-sized block of rows at a time.
//
// PyTorch's CPU addmm first copies the broadcast bias into the whole output and then runs the GEMM on top of it;
// the GELU and the residual add after it are two more full passes. For a ViT-B MLP on SAM's 64 x 64 grid that
// is 50 MB written three times beyond the GEMM's own write (20-25 ms a pass on one core of the machines we
// measure). Here the GEMM writes its result once, and each thread then takes blocks of about kBlockBytes of
// rows, adds the bias, applies the activation and adds the residual while the block is in its L2: ATen's own
// vectorised kernels on the block (so the values are ATen's), one trip through memory in all.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include "cpu.h"

#include <algorithm>
#include <optional>
#include <string>

namespace sam_fast {
namespace {

constexpr int64_t kBlockBytes = int64_t{1} << 18;

void linear_epilogue_cpu(at::Tensor y, const std::optional<at::Tensor>& bias, c10::string_view activation,
                         const std::optional<at::Tensor>& residual) {
  const std::string act(activation);
  TORCH_CHECK(act == "none" || act == "gelu" || act == "gelu_tanh",
              "linear_epilogue_: activation must be 'none', 'gelu' or 'gelu_tanh', got '", act, "'");
  TORCH_CHECK(y.device().is_cpu() && at::isFloatingType(y.scalar_type()) && y.dim() >= 1 && y.is_contiguous(),
              "linear_epilogue_: y must be a contiguous floating-point CPU tensor with at least 1 dim, got ",
              y.sizes(), " ", y.scalar_type(), " on ", y.device());
  TORCH_CHECK(!(y.requires_grad() && at::GradMode::is_enabled()),
              "linear_epilogue_: y requires grad and grad mode is on: it would be changed in place behind autograd's "
              "back (run under torch.no_grad(), or on a tensor that does not require grad)");
  const int64_t N = y.size(-1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == y.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == N,
                "linear_epilogue_: bias must be a (", N, ",) ", y.scalar_type(), " CPU tensor, got ", bias->sizes(),
                " ", bias->scalar_type(), " on ", bias->device());
    at::assert_no_partial_overlap(y, *bias);
    at::assert_no_overlap(y, *bias);
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == y.scalar_type() &&
                    residual->sizes() == y.sizes() && residual->is_contiguous(),
                "linear_epilogue_: residual must be a contiguous ", y.scalar_type(), " CPU tensor shaped like y ",
                y.sizes(), ", got ", residual->sizes(), " ", residual->scalar_type(), " on ", residual->device());
    at::assert_no_overlap(y, *residual);
  }
  if (y.numel() == 0) return;
  const int64_t M = y.numel() / N;
  at::Tensor y2 = y.view({M, N});
  at::Tensor r2 = residual.has_value() ? residual->view({M, N}) : at::Tensor();
  const int64_t rows = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, N * y.element_size()));
  const int64_t blocks = (M + rows - 1) / rows;
  // below autograd on every thread: these are plain in-place kernels on views of y
  cpu::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * rows, n = std::min(rows, M - r0);
      at::Tensor blk = y2.narrow(0, r0, n);
      if (bias.has_value()) blk.add_(*bias);
      if (act != "none") at::gelu_(blk, act == "gelu" ? "none" : "tanh");
      if (residual.has_value()) blk.add_(r2.narrow(0, r0, n));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) { m.impl("linear_epilogue_", &linear_epilogue_cpu); }

}  // namespace sam_fast
