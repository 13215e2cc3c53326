// Data movement in the paged KV cache: writing new tokens' K/V into their slots, and
// copying whole blocks (copy-on-write of forked tails).
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops.h"

namespace ttsearch {
namespace {

// Below this many bytes a parallel region costs more than the copy.
constexpr int64_t kParallelBytes = 1 << 16;

// key/value [T, Hkv, D] in the cache dtype, with each token's [Hkv, D] row contiguous
// (a slice of a fused QKV projection qualifies without a copy).
at::Tensor token_rows(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor t = x.scalar_type() == dtype ? x : x.to(dtype);
  const bool rows_contiguous = t.stride(2) == 1 && (t.size(1) == 1 || t.stride(1) == t.size(2));
  return rows_contiguous ? t : t.contiguous();
}

}  // namespace

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "store_kv: caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "store_kv: k_cache and v_cache dtypes differ");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "store_kv: key/value must be [tokens, kv_heads, head_dim]");
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0) return;

  const at::Tensor k = token_rows(key, k_cache.scalar_type());
  const at::Tensor v = token_rows(value, v_cache.scalar_type());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();

  const int64_t elem = k_cache.element_size();
  const int64_t row_bytes = k_cache.size(2) * k_cache.size(3) * elem;
  const int64_t k_stride = k.stride(0) * elem, v_stride = v.stride(0) * elem;
  const char* k_src = static_cast<const char*>(k.data_ptr());
  const char* v_src = static_cast<const char*>(v.data_ptr());
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());

#pragma omp parallel for if (2 * num_tokens * row_bytes > kParallelBytes)
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slot[t] < 0) continue;  // padding token
    std::memcpy(k_dst + slot[t] * row_bytes, k_src + t * k_stride, row_bytes);
    std::memcpy(v_dst + slot[t] * row_bytes, v_src + t * v_stride, row_bytes);
  }
}

void copy_blocks(at::Tensor& kv_cache, const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.is_contiguous(),
              "copy_blocks: kv_cache must be a contiguous [2, layers, blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(src.numel() == dst.numel(), "copy_blocks: src and dst differ in length");
  const int64_t n = src.numel();
  if (n == 0) return;

  const at::Tensor src_ids = src.to(at::kLong).contiguous();
  const at::Tensor dst_ids = dst.to(at::kLong).contiguous();
  const int64_t* s = src_ids.data_ptr<int64_t>();
  const int64_t* d = dst_ids.data_ptr<int64_t>();

  const int64_t planes = kv_cache.size(0) * kv_cache.size(1);  // (k/v, layer)
  const int64_t num_blocks = kv_cache.size(2);
  const int64_t block_bytes = kv_cache.size(3) * kv_cache.size(4) * kv_cache.size(5) * kv_cache.element_size();
  const int64_t plane_bytes = num_blocks * block_bytes;
  char* base = static_cast<char*>(kv_cache.data_ptr());
  const bool parallel = planes * n * block_bytes > kParallelBytes;

  // A block that is both a source and a destination must be read before it is
  // overwritten (the reference gathers all sources first): stage the sources then.
  std::vector<bool> is_dst(num_blocks, false);
  for (int64_t i = 0; i < n; ++i) is_dst[d[i]] = true;
  const bool overlap = std::any_of(s, s + n, [&](int64_t b) { return is_dst[b]; });

  if (!overlap) {
#pragma omp parallel for collapse(2) if (parallel)
    for (int64_t p = 0; p < planes; ++p) {
      for (int64_t i = 0; i < n; ++i) {
        char* plane = base + p * plane_bytes;
        std::memcpy(plane + d[i] * block_bytes, plane + s[i] * block_bytes, block_bytes);
      }
    }
    return;
  }
  std::vector<char> staged(planes * n * block_bytes);
#pragma omp parallel for collapse(2) if (parallel)
  for (int64_t p = 0; p < planes; ++p) {
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(staged.data() + (p * n + i) * block_bytes, base + p * plane_bytes + s[i] * block_bytes, block_bytes);
    }
  }
#pragma omp parallel for collapse(2) if (parallel)
  for (int64_t p = 0; p < planes; ++p) {
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(base + p * plane_bytes + d[i] * block_bytes, staged.data() + (p * n + i) * block_bytes, block_bytes);
    }
  }
}

}  // namespace ttsearch
