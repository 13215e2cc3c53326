// Registers the CPU kernels for the ops that ttsearch/ops/registry.py defines. Importing
// ttsearch._C_<level> (one module per ISA level, all from these sources; ttsearch/ops/cpu_isa.py
// imports one) runs the static registration; the module exports only what it was compiled for.
#include "cpu_utils.h"  // first: selects ATen's vector ISA, reported below

#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(ttsearch, CPU, m) {
  m.impl("store_kv", &ttsearch::store_kv);
  m.impl("paged_decode_attention", &ttsearch::paged_decode_attention);
  m.impl("paged_extend_attention", &ttsearch::paged_extend_attention);
  m.impl("cascade_decode_attention", &ttsearch::cascade_decode_attention);
  m.impl("copy_blocks", &ttsearch::copy_blocks);
  m.impl("prm_step_score", &ttsearch::prm_step_score);
  m.impl("rms_norm", &ttsearch::rms_norm);
  m.impl("fused_add_rms_norm", &ttsearch::fused_add_rms_norm);
  m.impl("rotary_embedding", &ttsearch::rotary_embedding);
  m.impl("silu_and_mul", &ttsearch::silu_and_mul);
  m.impl("sample_tokens", &ttsearch::sample_tokens);
  m.impl("quantized_linear", &ttsearch::quantized_linear);
}

// TORCH_EXTENSION_NAME: _C_<level>, set by torch's BuildExtension from the module name. The
// module is plain C API (no pybind11, which doubles this file's compile time): it exports
// what the compiler flags selected, for tests to check against the module's level.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};

PyMODINIT_FUNC C10_CONCATENATE(PyInit_, TORCH_EXTENSION_NAME)() {
#ifdef TTSEARCH_HAS_BF16_DOT
  PyObject* bf16_dot = Py_True;
#else
  PyObject* bf16_dot = Py_False;
#endif
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && (PyModule_AddStringConstant(m, "CPU_CAPABILITY", C10_STRINGIZE(CPU_CAPABILITY)) < 0 ||
                       PyModule_AddObjectRef(m, "BF16_DOT", bf16_dot) < 0)) {
    Py_CLEAR(m);
  }
  return m;
}
