// Registers the host ops as torch.ops.moca.* (schemas + CPU kernels) and makes this library an
// importable Python module, moca._C. Fake (meta) impls for torch.compile are registered in Python
// by moca.host_ops, which set_python_module names so that torch imports it when they are needed.
// This file owns TORCH_LIBRARY(moca); other sources (e.g. CUDA ops) add theirs with TORCH_LIBRARY_FRAGMENT.
#include <Python.h>
#include <torch/library.h>

#include "host_ops.h"

TORCH_LIBRARY(moca, m) {
  m.set_python_module("moca.host_ops");
  m.def(
      "mrope_positions(Tensor input_ids, Tensor cu_seqlens, Tensor image_grid_thw, int image_token_id, "
      "int spatial_merge_size) -> Tensor");
  m.def(
      "vision_window_index(Tensor grid_thw, int window_size, int patch_size, int spatial_merge_size) "
      "-> (Tensor, Tensor)");
  m.def("vision_positions(Tensor grid_thw, int spatial_merge_size) -> Tensor");
  m.def("pack_bins(Tensor costs, int budget, int max_items=0) -> (Tensor, Tensor)");
  m.def("patchify_(Tensor pixels, Tensor table, Tensor(a!) out, int patch_size, int merge_size) -> ()");
}

TORCH_LIBRARY_IMPL(moca, CPU, m) {
  m.impl("mrope_positions", &moca::mrope_positions);
  m.impl("vision_window_index", &moca::vision_window_index);
  m.impl("vision_positions", &moca::vision_positions);
  m.impl("pack_bins", &moca::pack_bins);
  m.impl("patchify_", &moca::patchify_);
}

// An empty module: importing moca._C runs the static registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
