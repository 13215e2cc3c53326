// The per-sequence decode step shared by paged and cascade decode attention: all query
// heads of one sequence against a block-aligned range of its cached tokens, with an
// online softmax. Include after cpu_utils.h.
#pragma once

#include <cmath>

#include "cpu_utils.h"

namespace ttsearch::cpu {

// Decode splits contexts into partitions of this many tokens (rounded up to whole blocks);
// the cascade kernel never goes below it: under it a merge costs more than it buys.
constexpr int64_t kMinPartitionTokens = 256;

// All query heads `q` [H, D] (pre-scaled) of one sequence against its tokens
// [first, end); `first` is block-aligned. Leaves the partition's un-normalized output in
// `acc` [H, D] and its softmax max and sum in `row_max`, `row_sum` [H]. kDim is the head
// dim when known at compile time, else 0.
template <int64_t kDim, typename scalar_t>
void attend_partition(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const CacheLayout& cache,
                      const int32_t* block_table, int64_t group, int64_t first, int64_t end, float* acc,
                      float* row_max, float* row_sum, float* scores) {
  const int64_t dim = kDim ? kDim : cache.head_dim;
  const int64_t block_size = cache.block_size, stride = cache.token_stride();
  const int64_t num_heads = group * cache.kv_heads;
  std::fill(acc, acc + num_heads * dim, 0.f);
  std::fill(row_max, row_max + num_heads, kNegInf);
  std::fill(row_sum, row_sum + num_heads, 0.f);

  for (int64_t start = first; start < end; start += block_size) {
    const int64_t n = std::min(block_size, end - start);
    const int64_t block = block_table[start / block_size];
    const scalar_t* k = cache.row(k_cache, block, 0, 0);
    const scalar_t* v = cache.row(v_cache, block, 0, 0);
    // Fetch the next block's K while this block's scores compute, and its V during this
    // block's P.V: two bursts rather than one keep the loads in flight within bounds.
    const bool has_next = start + block_size < end;
    const int64_t next = has_next ? block_table[start / block_size + 1] : 0;
    const int64_t next_len = std::min(block_size, end - start - block_size) * stride;
    if (start == first) prefetch(v, n * stride);
    if (has_next) prefetch(cache.row(k_cache, next, 0, 0), next_len);

    // Scores of the whole block first, so the running softmax is rescaled once per block.
    for (int64_t h = 0; h < cache.kv_heads; ++h) {
      score_block(q + h * group * dim, group, k + h * dim, stride, n, dim, scores + h * group * block_size,
                       block_size);
    }
    for (int64_t g = 0; g < num_heads; ++g) {
      float* s = scores + g * block_size;
      const float new_max = std::max(row_max[g], max_of(s, n));
      const float alpha = std::exp(row_max[g] - new_max);
      row_sum[g] = row_sum[g] * alpha + exp_shift_sum(s, n, new_max);
      if (alpha != 1.f) scale_inplace(acc + g * dim, alpha, dim);
      row_max[g] = new_max;
    }
    if (has_next) prefetch(cache.row(v_cache, next, 0, 0), next_len);
    // acc [group, D] += P [group, n] . V [n, D], per kv head
    for (int64_t h = 0; h < cache.kv_heads; ++h) {
      small_gemm(group, dim, n, scores + h * group * block_size, block_size, 1, v + h * dim, stride,
                      acc + h * group * dim, dim, /*accumulate=*/true);
    }
  }
}

}  // namespace ttsearch::cpu
