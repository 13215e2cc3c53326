// Paged decode attention: one query token per sequence against its cached context.
//
// Work is split over (sequence, context partition). An item walks its partition block by
// block with an online softmax; within a block, each kv head's query heads are computed
// together (GQA), so every K/V row is read once per group, and the block's rows of all kv
// heads, one contiguous range, are read in one pass. Contexts longer than 256 tokens are
// split into partitions of a fixed length (flash-decoding) merged by log-sum-exp.
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "decode_partition.h"
#include "ops.h"

namespace ttsearch {
namespace {

using cpu::CacheLayout;
using cpu::kMinPartitionTokens;
using cpu::kNegInf;

template <typename scalar_t>
void decode_kernel(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, float scale, at::Tensor& out) {
  const int64_t batch = query.size(0), num_heads = query.size(1);
  const CacheLayout cache{k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  const int64_t dim = cache.head_dim, block_size = cache.block_size;
  const int64_t group = num_heads / cache.kv_heads;

  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* k = k_cache.data_ptr<scalar_t>();
  const scalar_t* v = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.size(1);
  scalar_t* o = out.data_ptr<scalar_t>();

  // Contexts split at a fixed token count, whatever the batch: a small batch still gives
  // every thread items, and a sequence's sums run in the same order in any batch (the
  // batch-invariant mode relies on it). A split costs one merge of [H, D + 2] floats.
  const int64_t max_len = *std::max_element(lens, lens + batch);
  const int64_t part_len = cpu::ceil_div(kMinPartitionTokens, block_size) * block_size;
  const int64_t num_parts = cpu::ceil_div(max_len, part_len);

  // Partial results [batch, parts, (acc [H, D] | max [H] | sum [H])] when a context is split.
  const int64_t part_stride = num_heads * (dim + 2);
  std::vector<float> partials(num_parts > 1 ? batch * num_parts * part_stride : 0);

#pragma omp parallel
  {
    std::vector<float> scratch(num_heads * dim + part_stride + num_heads * block_size);
    float* q_buf = scratch.data();
    float* state = q_buf + num_heads * dim;
    float* scores = state + part_stride;

    // Dynamic: contexts are ragged, items are not equally long.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < batch * num_parts; ++item) {
      const int64_t b = item / num_parts, part = item % num_parts;
      const int64_t first = part * part_len;
      if (first >= lens[b]) continue;
      cpu::load_scaled(q + b * num_heads * dim, scale, q_buf, num_heads * dim);

      float* acc = num_parts > 1 ? partials.data() + item * part_stride : state;
      float* row_max = acc + num_heads * dim;
      float* row_sum = row_max + num_heads;
      const int64_t end = std::min<int64_t>(lens[b], first + part_len);
      cpu::dispatch_head_dim(dim, [&](auto head_dim) {
        cpu::attend_partition<head_dim>(q_buf, k, v, cache, tables + b * table_stride, group, first, end, acc, row_max,
                                   row_sum, scores);
      });
      if (num_parts == 1) {
        for (int64_t h = 0; h < num_heads; ++h) {
          cpu::store_scaled(acc + h * dim, 1.f / row_sum[h], o + (b * num_heads + h) * dim, dim);
        }
      }
    }
  }
  if (num_parts == 1) return;

  // Merge the partitions of each (sequence, head): weights exp(max_p - max) rescale both
  // the partial outputs and the partial sums.
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < batch * num_heads; ++bh) {
    const int64_t b = bh / num_heads, h = bh % num_heads;
    const int64_t parts = cpu::ceil_div(lens[b], part_len);
    const float* first_part = partials.data() + b * num_parts * part_stride;
    auto part_acc = [&](int64_t p) { return first_part + p * part_stride + h * dim; };
    auto part_max = [&](int64_t p) { return first_part[p * part_stride + num_heads * dim + h]; };
    auto part_sum = [&](int64_t p) { return first_part[p * part_stride + num_heads * dim + num_heads + h]; };

    float global_max = kNegInf;
    for (int64_t p = 0; p < parts; ++p) global_max = std::max(global_max, part_max(p));
    std::vector<float> weight(parts);
    float total = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      weight[p] = std::exp(part_max(p) - global_max);
      total += weight[p] * part_sum(p);
    }
    scalar_t* o_row = o + bh * dim;
    for (int64_t d = 0; d < dim; d += cpu::kVec) {
      cpu::Vec merged(0.f);
      for (int64_t p = 0; p < parts; ++p) merged = at::vec::fmadd(cpu::Vec(weight[p]), cpu::Vec::loadu(part_acc(p) + d), merged);
      cpu::store_float(o_row + d, merged * cpu::Vec(1.f / total));
    }
  }
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4, "paged_decode_attention: query [B, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: query and caches must share a dtype");
  TORCH_CHECK(query.size(2) % cpu::kVec == 0, "paged_decode_attention: head_dim must be a multiple of ", cpu::kVec);
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "paged_decode_attention: heads not a multiple of kv heads");

  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  TTSEARCH_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, tables, lens, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace ttsearch
