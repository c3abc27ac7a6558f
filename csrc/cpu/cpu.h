// What every CPU kernel of sam_fast asks of the machine, decided in this one place: which instruction sets it may
// use (with the overrides users and tests set), and a parallel loop whose body runs below autograd on every
// thread.
//
// Overrides: the environment at the first decision (SAM_FAST_CPU_NO_AVX512, SAM_FAST_CPU_NO_AMX), or, in process, the
// op sam_fast::cpu_features (csrc/cpu/cpu_features.cpp; Python: sam_fast.cpu_features.disable):
//   avx512 off  every AVX-512 path off: the plain loops run, as on a CPU without AVX-512
//   amx off     every AMX path off: bf16 attention GEMMs as AVX512-BF16 dot products (where the CPU has them, else
//               on row-major operands through ATen), int8 GEMMs through torch._int_mm
// An environment flag is on when it holds anything but "", "0", "false", "no" or "off" (in any case), the same
// rule as sam_fast/cpu_features.py: `SAM_FAST_CPU_NO_AVX512=0` leaves AVX-512 on.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define SAM_FAST_X86_AVX512 1
#include <immintrin.h>
#endif

namespace sam_fast {
namespace cpu {

// whether the environment flag `name` is on (see the header comment)
inline bool env_flag(const char* name) {
  const char* raw = std::getenv(name);
  if (raw == nullptr) return false;
  std::string v(raw);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return !(v.empty() || v == "0" || v == "false" || v == "no" || v == "off");
}

enum Feature : int { kAvx512 = 1, kAmx = 2 };

// the features switched off (Feature bits): the environment's choice until cpu_features sets another
inline std::atomic<int>& switched_off_state() {
  static std::atomic<int> state{-1};  // -1: the environment not read yet
  return state;
}

inline int switched_off() {
  int v = switched_off_state().load(std::memory_order_relaxed);
  if (v < 0) {
    v = (env_flag("SAM_FAST_CPU_NO_AVX512") ? kAvx512 : 0) | (env_flag("SAM_FAST_CPU_NO_AMX") ? kAmx : 0);
    switched_off_state().store(v, std::memory_order_relaxed);
  }
  return v;
}

// AVX-512F kernels may run: the CPU has them and they are not switched off
inline bool avx512() {
#ifdef SAM_FAST_X86_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && !(switched_off() & kAvx512);
#else
  return false;
#endif
}

// AVX-512F with BW and VL (the bf16 panel packing)
inline bool avx512_bw_vl() {
#ifdef SAM_FAST_X86_AVX512
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has && avx512();
#else
  return false;
#endif
}

// AVX512-BF16 (vdpbf16ps: bf16 pairs multiplied and summed into float32 lanes) with F, BW and VL: the bf16 attention
// GEMMs of CPUs without AMX (csrc/cpu/attention_rows.h)
inline bool avx512_bf16() {
#ifdef SAM_FAST_X86_AVX512
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && avx512_bw_vl();
#else
  return false;
#endif
}

// AVX512-VNNI (vpdpbusd: four u8 x s8 products summed into int32 lanes) with F, BW and VL: the int8 GEMM of CPUs
// without AMX (csrc/cpu/int8_linear.cpp)
inline bool avx512_vnni() {
#ifdef SAM_FAST_X86_AVX512
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has && avx512_bw_vl();
#else
  return false;
#endif
}

// oneDNN's AMX micro-kernel may run on `dtype` operands (kBFloat16 or kChar): the CPU has AMX for it and AMX is
// not switched off
inline bool amx(at::ScalarType dtype) {
  return at::native::cpublas::could_pack(dtype) && !(switched_off() & kAmx);
}

// at::parallel_for whose body runs below autograd on every thread. Grad and inference mode are per thread and
// OpenMP's workers do not inherit the caller's: an ATen op called in a body on a worker would otherwise be
// recorded by autograd when an input requires grad, and under torch.inference_mode that fails outright
// ("Inference tensors cannot be saved for backward"). The kernels' ATen calls are plain computations on their
// own buffers or on views of the op's tensors; none of them is ever differentiated.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(b, e);
  });
}

}  // namespace cpu
}  // namespace sam_fast
