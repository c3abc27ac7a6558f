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
}
