// CPU kernel of sam_fast::cpu_features (schema in csrc/ops.cpp): reads, and optionally sets, which of the CPU
// kernels' instruction-set paths are switched off (csrc/cpu/cpu.h), so that a process can reach every path its
// CPU has without restarting under another environment (sam_fast.cpu_features.disable in Python).
#include <torch/library.h>

#include "cpu.h"

namespace sam_fast {

// switched_off: -1 reads the current state; otherwise the new bit mask of switched-off paths (1: AVX-512,
// 2: AMX). Returns the mask in force before the call.
int64_t cpu_features(int64_t switched_off) {
  TORCH_CHECK(switched_off >= -1 && switched_off <= (cpu::kAvx512 | cpu::kAmx),
              "cpu_features: switched_off must be -1 (read) or a mask of 1 (AVX-512) and 2 (AMX), got ",
              switched_off);
  const int before = cpu::switched_off();
  if (switched_off >= 0) cpu::switched_off_state().store(static_cast<int>(switched_off), std::memory_order_relaxed);
  return before;
}

TORCH_LIBRARY_IMPL(sam_fast, CompositeExplicitAutograd, m) { m.impl("cpu_features", &cpu_features); }

}  // namespace sam_fast
