// Paged extend (prefill) attention: the new tokens of several sequences, causal among
// themselves, against each sequence's cached context (which already holds them).
//
// Work is split over (query tile, kv head). A tile is up to kQueryTile consecutive new
// tokens of one sequence times all query heads of the kv head, so each K/V block is read
// once per tile. Per key block the tile runs two small GEMMs in float32:
//   S^T [keys, rows] = K [keys, D] . Q^T [D, rows]      (rows = tokens x heads, padded)
//   O   [rows, D]   += P [rows, keys] . V [keys, D]     (P read transposed from S^T)
// Keeping the scores key-major puts the rows in the vector lanes, so the online softmax
// (running max, sum, rescale) and the causal mask are plain vector ops across rows.
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "ops.h"

namespace ttsearch {
namespace {

using cpu::CacheLayout;
using cpu::kNegInf;
using cpu::kVec;
using cpu::Vec;

constexpr int64_t kQueryTile = 32;

struct QueryTile {
  int64_t seq;
  int64_t first_row;  // row of the first token in query / out
  int64_t first_pos;  // its position in the sequence
  int64_t num_tokens;
};

// Per-thread buffers for one tile of `rows_cap` (padded) rows.
struct TileScratch {
  std::vector<float> q_t, pos, scores, out, k_buf;
  cpu::OnlineSoftmax softmax;

  TileScratch(int64_t rows_cap, int64_t dim, int64_t block_size)
      : q_t(dim * rows_cap), pos(rows_cap), scores(block_size * rows_cap), out(rows_cap * dim),
        k_buf(block_size * dim), softmax(rows_cap) {}
};

template <typename scalar_t>
void attend_tile(const QueryTile& tile, const scalar_t* query, scalar_t* out, const scalar_t* k_cache,
                 const scalar_t* v_cache, const CacheLayout& cache, const int32_t* block_table, int64_t num_heads,
                 int64_t kv_head, int64_t group, float scale, TileScratch& s) {
  const int64_t dim = cache.head_dim, block_size = cache.block_size;
  const int64_t rows = tile.num_tokens * group;  // row r = token * group + head in group
  const int64_t ld = cpu::round_up(rows, kVec);
  const int64_t last_pos = tile.first_pos + tile.num_tokens - 1;

  // Q^T, pre-scaled. Padding rows get a zero query and the last position, so they stay
  // finite and are simply not written out.
  std::fill(s.q_t.begin(), s.q_t.begin() + dim * ld, 0.f);
  std::fill(s.pos.begin(), s.pos.begin() + ld, static_cast<float>(last_pos));
  for (int64_t i = 0; i < tile.num_tokens; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      const scalar_t* q_row = query + ((tile.first_row + i) * num_heads + kv_head * group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) s.q_t[d * ld + r] = static_cast<float>(q_row[d]) * scale;
      s.pos[r] = static_cast<float>(tile.first_pos + i);
    }
  }
  std::fill(s.out.begin(), s.out.begin() + ld * dim, 0.f);
  s.softmax.reset(ld);

  // Keys past the tile's last token are masked for every row: never read them.
  for (int64_t start = 0; start <= last_pos; start += block_size) {
    const int64_t n = std::min(block_size, last_pos + 1 - start);
    const int64_t block = block_table[start / block_size];
    int64_t k_ld;
    const float* k = cpu::as_float_rows(cache.row(k_cache, block, 0, kv_head), cache.token_stride(), n, dim,
                                        s.k_buf.data(), k_ld);
    float* scores = s.scores.data();
    cpu::small_gemm(n, ld, dim, k, k_ld, 1, s.q_t.data(), ld, scores, ld, /*accumulate=*/false);

    // Causal mask, only on blocks that reach past the tile's first token.
    for (int64_t t = std::max<int64_t>(0, tile.first_pos + 1 - start); t < n; ++t) {
      const Vec key_pos(static_cast<float>(start + t));
      for (int64_t j = 0; j < ld; j += kVec) {
        const Vec masked = Vec::loadu(s.pos.data() + j) < key_pos;
        Vec::blendv(Vec::loadu(scores + t * ld + j), Vec(kNegInf), masked).store(scores + t * ld + j);
      }
    }

    // Online softmax, vectorized across rows. Key 0 is visible to every row, so the
    // running max is finite from the first block on.
    for (int64_t j = 0; j < ld; j += kVec) {
      Vec new_max = s.softmax.max(j);
      for (int64_t t = 0; t < n; ++t) new_max = at::vec::maximum(new_max, Vec::loadu(scores + t * ld + j));
      Vec sum(0.f);
      for (int64_t t = 0; t < n; ++t) {
        const Vec p = (Vec::loadu(scores + t * ld + j) - new_max).exp_u20();
        p.store(scores + t * ld + j);
        sum = sum + p;
      }
      s.softmax.update(j, new_max, sum);
    }
    s.softmax.rescale(s.out.data(), ld, dim);

    cpu::small_gemm(ld, dim, n, scores, 1, ld, cache.row(v_cache, block, 0, kv_head), cache.token_stride(),
                    s.out.data(), dim, /*accumulate=*/true);
  }

  for (int64_t i = 0; i < tile.num_tokens; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      scalar_t* o_row = out + ((tile.first_row + i) * num_heads + kv_head * group + g) * dim;
      cpu::store_scaled(s.out.data() + r * dim, 1.f / s.softmax.row_sum[r], o_row, dim);
    }
  }
}

template <typename scalar_t>
void extend_kernel(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                   float scale, at::Tensor& out) {
  const int64_t num_heads = query.size(1);
  const CacheLayout cache{k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  const int64_t group = num_heads / cache.kv_heads;
  const int64_t batch = context_lens.size(0);
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.size(1);

  std::vector<QueryTile> tiles;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = starts[b + 1] - starts[b];
    for (int64_t i = 0; i < n; i += kQueryTile) {
      tiles.push_back({b, starts[b] + i, lens[b] - n + i, std::min(kQueryTile, n - i)});
    }
  }
  // Longest first: a tile's cost grows with its position, and late small items balance
  // the dynamic schedule.
  std::sort(tiles.begin(), tiles.end(), [](const QueryTile& a, const QueryTile& b) {
    return a.first_pos + a.num_tokens > b.first_pos + b.num_tokens;
  });

  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* k = k_cache.data_ptr<scalar_t>();
  const scalar_t* v = v_cache.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t num_items = static_cast<int64_t>(tiles.size()) * cache.kv_heads;

#pragma omp parallel
  {
    TileScratch scratch(cpu::round_up(kQueryTile * group, kVec), cache.head_dim, cache.block_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const QueryTile& tile = tiles[item / cache.kv_heads];
      attend_tile(tile, q, o, k, v, cache, tables + tile.seq * table_stride, num_heads, item % cache.kv_heads, group,
                  scale, scratch);
    }
  }
}

}  // namespace

at::Tensor paged_extend_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4, "paged_extend_attention: query [T, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_extend_attention: caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_extend_attention: query and caches must share a dtype");
  TORCH_CHECK(query.size(2) % kVec == 0, "paged_extend_attention: head_dim must be a multiple of ", kVec);
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "paged_extend_attention: heads not a multiple of kv heads");

  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor starts = query_start_loc.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  TTSEARCH_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_extend_attention", [&] {
    extend_kernel<scalar_t>(q, k_cache, v_cache, tables, starts, lens, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace ttsearch
