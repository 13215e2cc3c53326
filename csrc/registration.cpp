// Registers the CPU kernels for the ops that ttsearch/ops/__init__.py defines. Importing
// ttsearch._C runs the static registration; the module itself exports nothing.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(ttsearch, CPU, m) {
  m.impl("store_kv", &ttsearch::store_kv);
  m.impl("paged_decode_attention", &ttsearch::paged_decode_attention);
  m.impl("paged_extend_attention", &ttsearch::paged_extend_attention);
  m.impl("cascade_decode_attention", &ttsearch::cascade_decode_attention);
  m.impl("copy_blocks", &ttsearch::copy_blocks);
  m.impl("prm_step_score", &ttsearch::prm_step_score);
}

PYBIND11_MODULE(_C, m) {}
