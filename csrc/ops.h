// CPU kernels of the ttsearch ops; the schemas live in ttsearch/ops/__init__.py.
#pragma once

#include <ATen/core/Tensor.h>

namespace ttsearch {

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

at::Tensor paged_extend_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                                  const at::Tensor& context_lens, double scale);

void copy_blocks(at::Tensor& kv_cache, const at::Tensor& src, const at::Tensor& dst);

}  // namespace ttsearch
