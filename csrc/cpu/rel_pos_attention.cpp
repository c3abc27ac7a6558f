// CPU kernel of sam_fast::rel_pos_attention (schema in csrc/ops.cpp): softmax(scale * q k^T + bias) v for SAM's
// blocks, with the decomposed rel-pos bias added inside each block of rows instead of being written out.
//
// Per (segment, head) and block of query rows: one BLAS GEMM for the logits (q_block @ k^T, all keys of the
// segment: the block is sized so that its logits stay in L2), one pass per row that adds
// rel_h[row, key_y] + rel_w[row, key_x] and finds the maximum, one pass of exp and sum, one GEMM of the
// probabilities with v, and the rows scaled by 1 / sum on their way into the output. The bias therefore costs
// a few vector adds in a pass the softmax makes anyway, instead of a chunk of memory written and read back.
// Keys that must not be seen carry -inf in rel_h or rel_w (the caller folds its key mask into them).
//
// Inputs: q (S, H, Lq, D), k and v (S, H, Lk, D), float32 or bfloat16 (all three alike), any strides with the
// last one 1 (views of one qkv tensor are read in place); rel_h (S, H, Lq, ay) and rel_w (S, H, Lq, ax), float32,
// contiguous, ay * ax = Lk (keys in row-major (key_y, key_x) order). Outputs: out (S, Lq, H, D) in q's dtype and
// lse (S, H, Lq) float32, contiguous. A row that sees no key gets out 0 and lse -inf.
//
// bfloat16: both GEMMs take bf16 operands and accumulate in float32 (ATen's batch-reduce GEMM: oneDNN's AMX
// micro-kernel on B operands packed in VNNI pairs where the CPU has AMX, its bf16 -> fp32 GEMM elsewhere); the
// logits, bias, softmax and lse are float32, the probabilities are rounded to bf16 for the second GEMM (as
// PyTorch's fused CPU kernel does), and each output row is divided by its float32 sum before its one rounding.
#include "attention_rows.h"

namespace sam_fast {
namespace {

// rel_pos_attention: tasks (segment, head, block of rows), each thread's consecutive tasks sharing its keys.
template <typename T>
void attend_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* hp,
                     const float* wp, const KeyGrid& g, float scale, T* op, float* lp) {
  const int64_t S = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t bq = block_rows<T>(Lq, Lk, D);
  const int64_t nb = (Lq + bq - 1) / bq;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  cpu::parallel_for(0, S * H * nb, 1, [&](int64_t begin, int64_t end) {
    Attend<T> att(bq, Lk, D);
    float sums[256];
    float maxes[256];
    int64_t loaded = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / (H * nb), h = (t / nb) % H, r0 = (t % nb) * bq;
      const int64_t n = std::min(bq, Lq - r0);
      if (loaded != s * H + h) {
        att.keys(kp + s * k.stride(0) + h * k.stride(1), k.stride(2), vp + s * v.stride(0) + h * v.stride(1),
                 v.stride(2));
        loaded = s * H + h;
      }
      const int64_t row = (s * H + h) * Lq + r0;
      att.block(qp + s * q.stride(0) + h * q.stride(1) + r0 * q.stride(2), q.stride(2), n, hp + row * g.ay,
                wp + row * g.ax, g, scale, sums, maxes);
      for (int64_t i = 0; i < n; ++i) {
        lp[row + i] = finish_row(att.acc() + i * D, D, sums[i], maxes[i], op + ((s * Lq + r0 + i) * H + h) * D);
      }
    }
  });
}

}  // namespace

void rel_pos_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel_h,
                           const at::Tensor& rel_w, double scale, at::Tensor out, at::Tensor lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "rel_pos_attention: q, k, v must be 4-D (S, H, L, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  const at::Tensor* data[] = {&q, &k, &v, &out};
  for (const at::Tensor* t : data) {
    TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && t->scalar_type() == dt && t->device().is_cpu(),
                "rel_pos_attention: q, k, v and out must be all float32 or all bfloat16 on the CPU, got ",
                t->scalar_type(), " on ", t->device(), " (q: ", dt, ")");
  }
  const at::Tensor* stats[] = {&rel_h, &rel_w, &lse};
  for (const at::Tensor* t : stats) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "rel_pos_attention: rel_h, rel_w and lse must be float32 on the CPU, got ", t->scalar_type(), " on ",
                t->device());
  }
  const int64_t S = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == S && k.size(1) == H && k.size(3) == D,
              "rel_pos_attention: k and v must be (S, H, Lk, D) = (", S, ", ", H, ", Lk, ", D, "), got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "rel_pos_attention: q, k, v need a contiguous last dim");
  TORCH_CHECK(rel_h.dim() == 4 && rel_w.dim() == 4 && rel_h.is_contiguous() && rel_w.is_contiguous() &&
                  rel_h.sizes().slice(0, 3) == q.sizes().slice(0, 3) &&
                  rel_w.sizes().slice(0, 3) == q.sizes().slice(0, 3) && rel_h.size(3) * rel_w.size(3) == Lk,
              "rel_pos_attention: rel_h and rel_w must be contiguous (S, H, Lq, ay) and (S, H, Lq, ax) with ay * ax = "
              "Lk = ", Lk, ", got ", rel_h.sizes(), " and ", rel_w.sizes());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({S, Lq, H, D}),
              "rel_pos_attention: out must be a contiguous (S, Lq, H, D) tensor, got ", out.sizes());
  TORCH_CHECK(lse.is_contiguous() && lse.sizes() == at::IntArrayRef({S, H, Lq}),
              "rel_pos_attention: lse must be a contiguous (S, H, Lq) tensor, got ", lse.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &rel_h, &rel_w}) {
    at::assert_no_overlap(out, *t);  // out and lse are written while the inputs are read
    at::assert_no_overlap(lse, *t);
  }
  at::assert_no_overlap(out, lse);
  if (S == 0 || H == 0 || Lq == 0) return;
  if (Lk == 0) {  // no key anywhere: every row is out 0, lse -inf
    out.zero_();
    lse.fill_(kNegInf);
    return;
  }
  if (D == 0) {  // no channels: the logits are the bias alone, and out is empty
    lse.copy_(at::logsumexp((rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2), -1));
    return;
  }
  const float fscale = static_cast<float>(scale);
  const float* hp = rel_h.const_data_ptr<float>();
  const float* wp = rel_w.const_data_ptr<float>();
  std::vector<int32_t> iy, ix;
  KeyGrid g{rel_h.size(3), rel_w.size(3), nullptr, nullptr};
  small_grid_index(g, iy, ix);
  if (dt == at::kFloat) {
    attend_segments(q, k, v, hp, wp, g, fscale, out.data_ptr<float>(), lse.data_ptr<float>());
  } else {
    attend_segments(q, k, v, hp, wp, g, fscale, out.data_ptr<at::BFloat16>(), lse.data_ptr<float>());
  }
}

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) { m.impl("rel_pos_attention", &rel_pos_attention_cpu); }

}  // namespace sam_fast
