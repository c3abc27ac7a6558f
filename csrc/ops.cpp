// Schemas of every C++/CUDA op in the sam_fast:: namespace, and the Python module that loads them.
//
// This file is always compiled. CPU kernels live in csrc/cpu/, CUDA kernels in csrc/cuda/ (built only
// when a CUDA toolkit and a CUDA torch are present); each registers its implementation with
// TORCH_LIBRARY_IMPL. Fake (meta) implementations are registered from Python (sam_fast/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing sam_fast._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sam_fast, m) {
  // Linear resampling of a relative-position table along its first dimension, the same arithmetic as
  // segment_anything's get_rel_pos resize, F.interpolate(mode="linear",
  // align_corners=False) (equal up to float rounding of the scale): (L, C) -> (length, C).
  m.def("resize_rel_pos(Tensor rel_pos, int length) -> Tensor");
  // segment_anything's mask post-processing fused (csrc/mask_postprocess.h): low-res logits (P, h, w)
  // through the two bilinear resizes (to padded_size, crop to input_size, to original_size), then per
  // mask the stability score, area, XYXY box and the column-major COCO RLE of the mask placed at
  // (x0, y0) in a (frame_h, frame_w) frame; binary masks only when asked. Returns (stability (P,) f32,
  // area (P,) i64, boxes (P, 4) i64, rle_counts i64, rle_offsets (P + 1,) i64, masks (P, H, W) bool or (0,)).
  m.def(
      "mask_postprocess(Tensor logits, int[2] padded_size, int[2] input_size, int[2] original_size, "
      "int[4] rle_frame, float mask_threshold, float stability_offset, bool return_rle, bool return_masks) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // pycocotools' compressed string form of a batch of RLEs (flat counts + offsets): (chars u8, offsets).
  m.def("rle_to_string(Tensor counts, Tensor offsets) -> (Tensor, Tensor)");
  // SAM's decomposed rel-pos bias in full (csrc/cpu/decomposed_bias.cpp): rel_h (..., ay), rel_w (..., ax),
  // float32 or float64, written into out (..., ay * ax): out[..., i * ax + j] = rel_h[..., i] + rel_w[..., j].
  m.def("decomposed_bias(Tensor rel_h, Tensor rel_w, Tensor(a!) out) -> ()");
  // softmax(scale * q k^T + rel_h[., key_y] + rel_w[., key_x]) v per segment and head, the bias added inside
  // the kernel's row blocks (csrc/cpu/rel_pos_attention.cpp): q (S, H, Lq, D), k, v (S, H, Lk, D), rel_h
  // (S, H, Lq, ay), rel_w (S, H, Lq, ax), ay * ax = Lk -> out (S, Lq, H, D), lse (S, H, Lq); q, k, v, out float32
  // or bfloat16 (float32 accumulation), rel_h, rel_w, lse float32
  m.def(
      "rel_pos_attention(Tensor q, Tensor k, Tensor v, Tensor rel_h, Tensor rel_w, float scale, Tensor(a!) out, "
      "Tensor(b!) lse) -> ()");
  // SAM's window / global attention with the decomposed rel-pos bias, read straight from a block's qkv tensor
  // (csrc/cpu/sam_block_attention.cpp): qkv (B, Hg, Wg, 3 * heads * D) float32 or bfloat16 (last dim contiguous);
  // window 0: global, else (window x window) segments over the grid padded to a multiple of window, the padded
  // keys reading pad_k / pad_v (heads, D) (zeros when None); rel_pos_h / rel_pos_w float32 (2 * segment - 1, D);
  // qkv_bias (3 * heads * D,), when given, is added to every row read from qkv (which then holds x W^T alone);
  // out (B, Hg, Wg, heads * D) written for every real position (padded queries are not computed).
  m.def(
      "sam_block_attention(Tensor qkv, int heads, int window, Tensor rel_pos_h, Tensor rel_pos_w, Tensor? qkv_bias, "
      "Tensor? pad_k, Tensor? pad_v, float scale, Tensor(a!) out) -> ()");
  // TinyViT's window attention the same way (csrc/cpu/sam_block_attention.cpp): qkv (B, Hg, Wg, 3 * heads * D) in
  // TinyViT's channel order (heads, 3, D), float32 or bfloat16 (last dim contiguous); (window x window) segments over
  // the grid padded to a multiple of window, the padded keys reading pad_k / pad_v (heads, D) (zeros when None);
  // bias float32 (heads, L, L), L = window^2, added to the scaled logits (row: the query's place in its window);
  // out (B, Hg, Wg, heads * D) written for every real position.
  m.def(
      "window_bias_attention(Tensor qkv, int heads, int window, Tensor bias, Tensor? pad_k, Tensor? pad_v, "
      "float scale, Tensor(a!) out) -> ()");
  // SAM 2's Hiera attention the same way, without a bias (csrc/cpu/sam_block_attention.cpp): qkv (B, Hg, Wg, 3 * heads
  // * D) in SAM's channel order (3, heads, D), float32 or bfloat16 (last dim contiguous); window 0: global, else
  // (window x window) segments over the grid padded to a multiple of window, the padded keys reading pad_k / pad_v
  // (heads, D) (zeros when None); q_stride s >= 1 (dividing window): each segment's queries max-pooled s x s;
  // qkv_bias as for sam_block_attention; out (B, Hg / s, Wg / s, heads * D) (floor), every position written.
  m.def(
      "hiera_attention(Tensor qkv, int heads, int window, int q_stride, Tensor? qkv_bias, Tensor? pad_k, "
      "Tensor? pad_v, float scale, Tensor(a!) out) -> ()");
  // After a bias-free GEMM (csrc/cpu/linear_epilogue.cpp): y = act(y + bias) + residual in place, a cache-sized
  // block of rows at a time; activation 'none', 'gelu' (exact) or 'gelu_tanh'; bias (N,), residual shaped like y.
  m.def("linear_epilogue_(Tensor(a!) y, Tensor? bias, str activation, Tensor? residual) -> ()");
  // The W8A8 quantisations, for every device: CPU kernels in csrc/cpu/int8_linear.cpp, CUDA kernels the Triton
  // launchers that sam_fast/ops/int8_linear.py registers. Defined here (not by Python's torch.library.custom_op) so
  // that an AOTInductor package whose graph calls them finds their schemas with this library loaded. x (M, K) float
  // -> (int8 (M, K), float32 per-row scale (M,)): per-token max|x| / 127, or one calibrated scale (NaN for a row
  // holding NaN / inf); layer_norm_quantize normalises each row first (float32).
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_static(Tensor x, Tensor scale) -> (Tensor, Tensor)");
  m.def("layer_norm_quantize(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  // The W8A8 path's CPU-only ops (csrc/cpu/int8_linear.cpp). int32 acc (M, N) -> ((float(acc) * a_scale) * w_scale) + bias [-> exact GELU] -> out_dtype
  // (float32, bfloat16, float16, or int8 re-quantised with out_scale); a_scale one value or (M,), w_scale (N,).
  m.def(
      "int8_epilogue(Tensor acc, Tensor a_scale, Tensor w_scale, Tensor? bias, bool gelu, ScalarType out_dtype, "
      "Tensor? out_scale) -> Tensor");
  // the same with a float32 result written over acc itself (read it as acc.view(float32))
  m.def("int8_epilogue_(Tensor(a!) acc, Tensor a_scale, Tensor w_scale, Tensor? bias, bool gelu) -> ()");
  // int8 weight (N, K) -> its panels for the AMX GEMM below, (ceil(N / 64) * K * 64,) int8; empty where the CPU
  // has no AMX int8 or K is not a multiple of 4;
  m.def("int8_pack_amx(Tensor w) -> Tensor");
  // x int8 (M, K) @ the packed weight, dequantised (* x_scale * w_scale + bias [-> exact GELU]) tile by tile into an
  // (M, N) out_dtype result (float32, bfloat16, float16, or int8 re-quantised with out_scale): the int32
  // accumulator never leaves the thread's tile buffer.
  m.def("int8_linear_amx(Tensor x, Tensor x_scale, Tensor w_packed, int N, Tensor w_scale, Tensor? bias, bool gelu, "
        "ScalarType out_dtype, Tensor? out_scale) -> Tensor");
  // quantize_per_token(int8_linear_amx(..., gelu, float32)) in one op, the float32 result never written out: the int8
  // hidden activation of an MLP and its per-row scales (NaN for a row holding NaN or +-inf)
  m.def("int8_linear_amx_quantize(Tensor x, Tensor x_scale, Tensor w_packed, int N, Tensor w_scale, Tensor? bias, "
        "bool gelu) -> (Tensor, Tensor)");
  // How many of ATen's intra-op threads one at::parallel_for of `tasks` tasks in this extension ran on
  // (csrc/cpu/parallel_probe.cpp): 1 whatever torch.set_num_threads says would mean the extension was built
  // without OpenMP, and every CPU op above runs on one thread.
  m.def("parallel_threads(int tasks) -> int");
  // Which instruction-set paths of the CPU kernels are switched off (csrc/cpu/cpu.h; 1: AVX-512, 2: AMX): returns the
  // mask in force and, when switched_off >= 0, sets a new one (-1 reads it only).
  m.def("cpu_features(int switched_off=-1) -> int");
}
