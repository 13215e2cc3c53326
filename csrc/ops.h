// CPU kernels of the ttsearch ops; the schemas live in ttsearch/ops/registry.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace ttsearch {

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

at::Tensor paged_extend_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                                  const at::Tensor& context_lens, double scale);

at::Tensor cascade_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_tables, const at::Tensor& context_lens,
                                    const at::Tensor& prefix_tables, const at::Tensor& prefix_lens,
                                    const at::Tensor& seq_group, double scale);

void copy_blocks(at::Tensor& kv_cache, const at::Tensor& src, const at::Tensor& dst);

std::tuple<at::Tensor, at::Tensor> prm_step_score(const at::Tensor& hidden, const std::optional<at::Tensor>& norm_weight,
                                                  double eps, const at::Tensor& head_weight,
                                                  const std::optional<at::Tensor>& head_bias, int64_t positive_index,
                                                  const at::Tensor& prev_agg, const at::Tensor& prev_count,
                                                  c10::string_view aggregation);

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps);

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_sin_cache);

void silu_and_mul(at::Tensor& out, const at::Tensor& input);

at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& u);

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& blocks, c10::string_view qtype);

}  // namespace ttsearch
