// Registers the moe_lora C++/CUDA ops with the PyTorch dispatcher and defines the Python module
// torch_moe_lora._C, which only exists so that `from torch_moe_lora import _C` loads this library
// (no pybind11: the ops are reached through torch.ops.moe_lora, and the module builds against the
// limited Python API).
//
// TORCH_LIBRARY_FRAGMENT rather than TORCH_LIBRARY: Python code also defines ops in the moe_lora
// namespace (torch.library.custom_op), and fragments never clash with another definition block.
#include <Python.h>
#include <torch/library.h>

#include "align_block_size.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // no per-interpreter state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FRAGMENT(moe_lora, m) {
  m.def(
      "align_block_size(Tensor topk_ids, Tensor? token_lora, int num_experts, int max_loras, int block_size) "
      "-> (Tensor sorted_pair_ids, Tensor expert_of_block, Tensor num_blocks)");
}

TORCH_LIBRARY_IMPL(moe_lora, CPU, m) {
  m.impl("align_block_size", &moe_lora::align_block_size_cpu);
}

#ifdef MOE_LORA_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_lora, CUDA, m) {
  m.impl("align_block_size", &moe_lora::align_block_size_cuda);
}
#endif
