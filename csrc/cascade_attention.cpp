// Cascade (shared-prefix) decode attention: paged decode attention where sequences share
// the first blocks of their contexts along a tree (the system prompt for every problem, a
// problem's question for its beams, a step for the beams forked from it). Each sequence's
// path lists its prefix nodes, outermost first; they tile the start of its context.
//
// Phase 1, per (node, row tile, kv head, prefix chunk): the query heads of all the node's
// members (the sequences with the node on their path) that read this kv head, rows =
// members x heads-per-kv-head, against the chunk's prefix keys and values, block by block,
// with an online softmax. A node's block is read once per item instead of once per
// sequence, and the work becomes two small GEMMs per block whose rows are the members'
// query heads:
//   S^T [keys, rows] = K [keys, D] . Q^T [D, rows]     (rows in the vector lanes, so the
//                                                       online softmax is lane-wise)
//   O   [rows, D]   += P [rows, keys] . V [keys, D]
// On bfloat16 caches with AVX512_BF16 both run as bf16 dot products (vdpbf16ps) with
// float32 accumulation; otherwise in float32 (narrower data widened as it is loaded).
// Phase 2, per (sequence, partition): the token ranges of the sequence that no node of
// phase 1 serves — its own suffix past its path, and any node on its path too small to
// take the shared path — as in paged decode attention.
// Both phases leave un-normalized partial outputs with their softmax max and sum; a last
// pass merges them per (sequence, head) by log-sum-exp.
// In the code: plan_cascade (on one thread: the nodes, the partitions, the items), then
// run_items (both phases' items, in parallel), then merge_partials (in parallel).
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "decode_partition.h"
#include "ops.h"

namespace ttsearch {
namespace {

using cpu::CacheLayout;
using cpu::kNegInf;
using cpu::kVec;
using cpu::Vec;

// Query rows (members x heads per kv head) per phase-1 item: bounds its scratch.
constexpr int64_t kRowTile = 128;
constexpr int64_t kTileAlign = 4 * kVec;
// Prefix blocks per online-softmax step of a phase-1 item.
constexpr int64_t kStepBlocks = 4;
// The smallest prefix chunk worth an item (and a merge) of its own.
constexpr int64_t kMinChunkBlocks = 8;
constexpr float kLog2e = 1.4426950408889634f;
// Smaller nodes take the plain path (phase 2 reads them with each member's own tokens):
// below 2 members nothing is shared, and below 3 rows (members x heads per kv head; 2
// members without GQA) the lanes the rows leave empty cost more than reading the prefix
// twice (measured on SmolLM2 and 8-kv-head shapes).
constexpr int64_t kMinMembers = 2;
constexpr int64_t kMinRows = 3;

template <typename scalar_t>
constexpr bool use_bf16_dot() {
#ifdef TTSEARCH_HAS_BF16_DOT
  return std::is_same_v<scalar_t, at::BFloat16>;
#else
  return false;
#endif
}

// A prefix node that takes the shared-prefix path.
struct Node {
  int64_t first_member;   // into the member list (sequence ids, ascending within a node)
  int64_t members;
  int64_t rows;           // members x heads per kv head; row r = member r / hpk, head r % hpk
  const int32_t* prefix;  // its prefix block ids
  int64_t prefix_blocks;
  int64_t tile_rows, tiles;
  int64_t chunk_blocks, chunks;
  int64_t partials;  // offset of its phase-1 partials: [kv head][chunk] x (acc [rows, D] | max [rows] | sum [rows])
};

// A phase-2 item: tokens [first, end) of one sequence; `first` is block-aligned.
struct Partition {
  int64_t seq, first, end;
};

struct Item {
  int64_t cost;
  int32_t kind;  // 0: prefix (node, row tile, kv head, chunk); 1: partition
  int32_t a, b, c, d;
};

struct PrefixScratch {
  std::vector<float> q_t;          // Q^T [D, ld], pre-scaled (float path)
  std::vector<uint32_t> q_pairs;   // Q^T as bf16 pairs [D / 2, ld] (bf16 dot)
  std::vector<float> scores;       // S^T [step keys, ld]
  std::vector<uint32_t> p_pairs;   // P^T as bf16 pairs [step keys / 2, ld]
  std::vector<uint32_t> v_pairs;   // V as bf16 pairs [step keys / 2, D]
  std::vector<float> k_buf;        // one block of keys widened to float32
  cpu::OnlineSoftmax softmax;

  PrefixScratch(int64_t ld, int64_t dim, int64_t block_size) : softmax(ld) {
    const int64_t keys = kStepBlocks * block_size + 1;  // + 1: the pad of an odd count
    q_t.resize(dim * ld);
    q_pairs.resize(dim / 2 * ld);
    scores.resize(keys * ld);
    p_pairs.resize((keys / 2 + 1) * ld);
    v_pairs.resize((keys / 2 + 1) * dim);
    k_buf.resize(block_size * dim);
  }
};

// Phase 1: rows [row0, row0 + rows) of a node against its blocks [block0, block1) for one
// kv head. `member_seqs` lists the node's members. Leaves the un-normalized output
// in `acc` [rows, D] and the softmax max and sum in `out_max`, `out_sum` [rows].
template <typename scalar_t>
void attend_prefix(const scalar_t* query, int64_t num_heads, const int32_t* member_seqs, int64_t hpk, int64_t row0,
                   int64_t rows, int64_t kv_head, const scalar_t* k_cache, const scalar_t* v_cache,
                   const CacheLayout& cache, const int32_t* prefix, int64_t block0, int64_t block1, float scale,
                   float* acc, float* out_max, float* out_sum, PrefixScratch& s) {
  constexpr bool kBf16Dot = use_bf16_dot<scalar_t>();
  const int64_t dim = cache.head_dim, block_size = cache.block_size, stride = cache.token_stride();
  const int64_t ld = cpu::round_up(rows, kVec);
  auto query_row = [&](int64_t i) {
    const int64_t r = row0 + i;
    return query + (member_seqs[r / hpk] * num_heads + kv_head * hpk + r % hpk) * dim;
  };

  // Q^T, zero in the padding columns (their scores are 0: finite, and never written out).
  // The bf16 path keeps the query exact and scales the scores instead.
  const float score_scale = kBf16Dot ? scale : 1.f;
  if constexpr (kBf16Dot) {
    std::fill(s.q_pairs.begin(), s.q_pairs.begin() + dim / 2 * ld, 0u);
    for (int64_t i = 0; i < rows; ++i) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(query_row(i));
      for (int64_t p = 0; p < dim / 2; ++p) s.q_pairs[p * ld + i] = words[p];
    }
  } else {
    std::fill(s.q_t.begin(), s.q_t.begin() + dim * ld, 0.f);
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* q = query_row(i);
      for (int64_t d = 0; d < dim; ++d) s.q_t[d * ld + i] = static_cast<float>(q[d]) * scale;
    }
  }
  s.softmax.reset(ld);
  std::fill(acc, acc + rows * dim, 0.f);

  for (int64_t step = block0; step < block1; step += kStepBlocks) {
    const int64_t num_blocks = std::min(kStepBlocks, block1 - step);
    const int64_t n = num_blocks * block_size;
    float* scores = s.scores.data();

    // S^T [n, ld], one block of keys at a time (straight from the cache)
    for (int64_t j = 0; j < num_blocks; ++j) {
      const scalar_t* k = cache.row(k_cache, prefix[step + j], 0, kv_head);
      float* sc = scores + j * block_size * ld;
      if constexpr (kBf16Dot) {
#ifdef TTSEARCH_HAS_BF16_DOT
        cpu::dot_bf16_gemm(block_size, ld, dim / 2, reinterpret_cast<const uint32_t*>(k), stride / 2, 1,
                           s.q_pairs.data(), ld, sc, ld, /*accumulate=*/false);
#endif
      } else {
        int64_t k_ld;
        const float* kf = cpu::as_float_rows(k, stride, block_size, dim, s.k_buf.data(), k_ld);
        cpu::small_gemm(block_size, ld, dim, kf, k_ld, 1, s.q_t.data(), ld, sc, ld, /*accumulate=*/false);
      }
    }

    // Online softmax, lane-wise across rows; p = 2^(s * scale * log2(e) - max * log2(e)).
    const Vec log2_scale(score_scale * kLog2e);
    for (int64_t j = 0; j < ld; j += kVec) {
      Vec top(kNegInf);
      for (int64_t t = 0; t < n; ++t) top = cpu::max_no_nan(top, Vec::loadu(scores + t * ld + j));
      const Vec new_max = at::vec::maximum(s.softmax.max(j), top * Vec(score_scale));
      const Vec shift = new_max * Vec(kLog2e);
      Vec sum(0.f);
      if constexpr (kBf16Dot) {
#ifdef TTSEARCH_HAS_BF16_DOT
        // P as bf16 pairs of consecutive keys; the sum adds the rounded values the product uses
        for (int64_t t = 0; t < n; t += 2) {
          const Vec p0 = cpu::exp2_finite<4>(at::vec::fmsub(Vec::loadu(scores + t * ld + j), log2_scale, shift));
          const Vec p1 = t + 1 < n
                             ? cpu::exp2_finite<4>(at::vec::fmsub(Vec::loadu(scores + (t + 1) * ld + j), log2_scale, shift))
                             : Vec(0.f);
          __m512 rounded;
          _mm512_storeu_si512(s.p_pairs.data() + t / 2 * ld + j, cpu::round_bf16_pairs(p0, p1, rounded));
          sum = sum + Vec(rounded);
        }
#endif
      } else {
        for (int64_t t = 0; t < n; ++t) {
          const Vec p = cpu::exp2_finite<5>(at::vec::fmsub(Vec::loadu(scores + t * ld + j), log2_scale, shift));
          p.store(scores + t * ld + j);
          sum = sum + p;
        }
      }
      s.softmax.update(j, new_max, sum);
    }
    s.softmax.rescale(acc, rows, dim);

    // acc [rows, D] += P [rows, n] . V [n, D]
    if constexpr (kBf16Dot) {
#ifdef TTSEARCH_HAS_BF16_DOT
      auto v_row = [&](int64_t t) { return cache.row(v_cache, prefix[step + t / block_size], t % block_size, kv_head); };
      const int64_t pairs = (n + 1) / 2;
      for (int64_t u = 0; u < pairs; ++u) {
        const scalar_t* v0 = v_row(2 * u);
        const scalar_t* v1 = 2 * u + 1 < n ? v_row(2 * u + 1) : nullptr;
        for (int64_t d = 0; d < dim; d += kVec) {
          const __m512i w = v1 ? cpu::bf16_pairs(v0 + d, v1 + d)
                               : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
          _mm512_storeu_si512(s.v_pairs.data() + u * dim + d, w);
        }
      }
      cpu::dot_bf16_gemm(rows, dim, pairs, s.p_pairs.data(), 1, ld, s.v_pairs.data(), dim, acc, dim,
                         /*accumulate=*/true);
#endif
    } else {
      for (int64_t j = 0; j < num_blocks; ++j) {
        cpu::small_gemm(rows, dim, block_size, scores + j * block_size * ld, 1, ld,
                        cache.row(v_cache, prefix[step + j], 0, kv_head), stride, acc, dim, /*accumulate=*/true);
      }
    }
  }
  std::copy(s.softmax.row_max.begin(), s.softmax.row_max.begin() + rows, out_max);
  std::copy(s.softmax.row_sum.begin(), s.softmax.row_sum.begin() + rows, out_sum);
}

// One call's tensors as the planner, the items and the merge read them.
struct Batch {
  int64_t batch, num_heads, hpk, levels, num_nodes;
  CacheLayout cache;
  const int32_t* tables;  // [B, table_stride]
  int64_t table_stride;
  const int32_t* lens;
  const int32_t* prefix_ids;  // [num_nodes, prefix_stride]
  int64_t prefix_stride;
  const int32_t* prefix_len;
  const int32_t* path;  // [B, levels]: node at (sequence, level), or -1
};

// What a call computes and where each result goes: the nodes that take the shared-prefix
// path with their members, phase 2's partitions, and the work items of both phases.
struct Plan {
  std::vector<int64_t> cascade_of;    // node -> index in `nodes`, or -1 (the plain path)
  std::vector<Node> nodes;
  std::vector<int32_t> member_seqs;   // the nodes' members, node by node
  std::vector<int64_t> member_index;  // (sequence, level) -> its member index in that node, or -1
  std::vector<Partition> partitions;
  std::vector<int64_t> part_start;    // sequence b's partitions: [part_start[b], part_start[b + 1])
  int64_t suffix_work = 0;            // query-head tokens phase 2 reads
  std::vector<Item> items;            // longest first
  int64_t partial_floats = 0;         // the phase-1 partials, all nodes
  int64_t max_tile = kVec;            // the most rows of a phase-1 item
};

// The partials of node `node`'s (kv head h, chunk c): acc [rows, D] | max [rows] | sum [rows].
inline int64_t prefix_partials_at(const Node& node, int64_t h, int64_t c, int64_t dim) {
  return node.partials + (h * node.chunks + c) * node.rows * (dim + 2);
}

// Members of each node, at whatever level, then the nodes that take the shared-prefix path.
void plan_nodes(const Batch& in, Plan& plan) {
  std::vector<int64_t> count(in.num_nodes, 0);
  for (int64_t i = 0; i < in.batch * in.levels; ++i) {
    if (in.path[i] >= 0) ++count[in.path[i]];
  }
  plan.cascade_of.assign(in.num_nodes, -1);
  int64_t members_total = 0;
  for (int64_t g = 0; g < in.num_nodes; ++g) {
    if (count[g] < kMinMembers || count[g] * in.hpk < kMinRows) continue;
    plan.cascade_of[g] = static_cast<int64_t>(plan.nodes.size());
    Node node{};
    node.first_member = members_total;
    node.members = count[g];
    node.rows = count[g] * in.hpk;
    node.prefix = in.prefix_ids + g * in.prefix_stride;
    node.prefix_blocks = in.prefix_len[g] / in.cache.block_size;
    plan.nodes.push_back(node);
    members_total += count[g];
  }
  plan.member_seqs.resize(members_total);
  plan.member_index.assign(in.batch * in.levels, -1);
  std::vector<int64_t> filled(plan.nodes.size(), 0);
  for (int64_t b = 0; b < in.batch; ++b) {
    for (int64_t l = 0; l < in.levels; ++l) {
      const int32_t g = in.path[b * in.levels + l];
      if (g < 0 || plan.cascade_of[g] < 0) continue;
      const Node& node = plan.nodes[plan.cascade_of[g]];
      plan.member_index[b * in.levels + l] = filled[plan.cascade_of[g]]++;
      plan.member_seqs[node.first_member + plan.member_index[b * in.levels + l]] = static_cast<int32_t>(b);
    }
  }
}

// Phase 2's token ranges: what of each context no shared node serves (the nodes that took
// the plain path, and the sequence's own suffix), in block-aligned runs, split into
// partitions as paged decode splits contexts.
void plan_partitions(const Batch& in, int64_t threads, Plan& plan) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::vector<int64_t> range_start(in.batch + 1, 0);
  int64_t max_unserved = 0;
  for (int64_t b = 0; b < in.batch; ++b) {
    int64_t pos = 0, first = 0, unserved = 0;
    auto add_range = [&](int64_t end) {  // [first, end), when not empty
      if (end <= first) return;
      ranges.emplace_back(first, end);
      unserved += end - first;
    };
    for (int64_t l = 0; l < in.levels; ++l) {
      const int32_t g = in.path[b * in.levels + l];
      if (g < 0) continue;
      if (plan.cascade_of[g] >= 0) {
        add_range(pos);
        first = pos + in.prefix_len[g];
      }
      pos += in.prefix_len[g];
    }
    add_range(in.lens[b]);
    range_start[b + 1] = static_cast<int64_t>(ranges.size());
    max_unserved = std::max(max_unserved, unserved);
    plan.suffix_work += unserved * in.num_heads;
  }
  const int64_t block_size = in.cache.block_size;
  const int64_t parts_wanted = cpu::ceil_div(4 * threads, in.batch);
  const int64_t part_blocks = std::max(cpu::ceil_div(cpu::ceil_div(std::max<int64_t>(max_unserved, 1), parts_wanted), block_size),
                                       cpu::ceil_div(cpu::kMinPartitionTokens, block_size));
  const int64_t part_len = part_blocks * block_size;
  plan.part_start.assign(in.batch + 1, 0);
  for (int64_t b = 0; b < in.batch; ++b) {
    for (int64_t r = range_start[b]; r < range_start[b + 1]; ++r) {
      for (int64_t first = ranges[r].first; first < ranges[r].second; first += part_len) {
        plan.partitions.push_back({b, first, std::min(ranges[r].second, first + part_len)});
      }
    }
    plan.part_start[b + 1] = static_cast<int64_t>(plan.partitions.size());
  }
}

// Phase 1's items: row tiles of at most kRowTile rows, and the prefix split into chunks
// until the whole batch gives every thread several items; then phase 2's, one per
// partition; longest first, so the short ones even out the dynamic schedule at the end.
void plan_items(const Batch& in, int64_t threads, Plan& plan) {
  const int64_t block_size = in.cache.block_size, kv_heads = in.cache.kv_heads, dim = in.cache.head_dim;
  int64_t prefix_work = 0;
  for (const Node& node : plan.nodes) prefix_work += node.rows * node.prefix_blocks * block_size;
  const double total_work = static_cast<double>(prefix_work + 4 * plan.suffix_work);  // a GEMV row costs more
  for (size_t ni = 0; ni < plan.nodes.size(); ++ni) {
    Node& node = plan.nodes[ni];
    node.tiles = cpu::ceil_div(node.rows, kRowTile);
    node.tile_rows = cpu::round_up(cpu::ceil_div(node.rows, node.tiles), kTileAlign);
    node.tiles = cpu::ceil_div(node.rows, node.tile_rows);
    const double share = node.rows * node.prefix_blocks * block_size / total_work;
    const int64_t wanted = static_cast<int64_t>(std::ceil(4 * threads * share));
    const int64_t max_chunks = std::max<int64_t>(1, node.prefix_blocks / kMinChunkBlocks);
    const int64_t chunks = std::clamp<int64_t>(cpu::ceil_div(wanted, node.tiles * kv_heads), 1, max_chunks);
    node.chunk_blocks = cpu::ceil_div(node.prefix_blocks, chunks);
    node.chunks = cpu::ceil_div(node.prefix_blocks, node.chunk_blocks);
    node.partials = plan.partial_floats;
    plan.partial_floats += kv_heads * node.chunks * node.rows * (dim + 2);
    for (int64_t t = 0; t < node.tiles; ++t) {
      const int64_t rows = std::min(node.tile_rows, node.rows - t * node.tile_rows);
      for (int64_t h = 0; h < kv_heads; ++h) {
        for (int64_t c = 0; c < node.chunks; ++c) {
          const int64_t blocks = std::min(node.chunk_blocks, node.prefix_blocks - c * node.chunk_blocks);
          plan.items.push_back({rows * blocks * block_size, 0, static_cast<int32_t>(ni), static_cast<int32_t>(t),
                                static_cast<int32_t>(h), static_cast<int32_t>(c)});
        }
      }
    }
    plan.max_tile = std::max(plan.max_tile, node.tile_rows);
  }
  for (size_t p = 0; p < plan.partitions.size(); ++p) {
    const int64_t tokens = plan.partitions[p].end - plan.partitions[p].first;
    plan.items.push_back({4 * tokens * in.num_heads, 1, static_cast<int32_t>(p), 0, 0, 0});
  }
  std::stable_sort(plan.items.begin(), plan.items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

Plan plan_cascade(const Batch& in, int64_t threads) {
  Plan plan;
  plan_nodes(in, plan);
  plan_partitions(in, threads, plan);
  plan_items(in, threads, plan);
  return plan;
}

// Runs every item: a phase-1 item leaves its partials in `prefix_partials`, a partition its
// own in `suffix_partials` (per partition: acc [H, D] | max [H] | sum [H]).
template <typename scalar_t>
void run_items(const Batch& in, const Plan& plan, const scalar_t* q, const scalar_t* k, const scalar_t* v, float scale,
               float* prefix_partials, float* suffix_partials) {
  const int64_t num_heads = in.num_heads, dim = in.cache.head_dim, block_size = in.cache.block_size;
  const int64_t suffix_stride = num_heads * (dim + 2);
  const int64_t num_items = static_cast<int64_t>(plan.items.size());
#pragma omp parallel
  {
    PrefixScratch prefix_scratch(plan.nodes.empty() ? 0 : plan.max_tile, dim, block_size);
    std::vector<float> q_buf(num_heads * dim), scores(num_heads * block_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      const Item& item = plan.items[i];
      if (item.kind == 0) {
        const Node& node = plan.nodes[item.a];
        const int64_t row0 = item.b * node.tile_rows, rows = std::min(node.tile_rows, node.rows - row0);
        const int64_t h = item.c, c = item.d;
        float* base = prefix_partials + prefix_partials_at(node, h, c, dim);
        const int64_t block0 = c * node.chunk_blocks, block1 = std::min(node.prefix_blocks, block0 + node.chunk_blocks);
        attend_prefix(q, num_heads, plan.member_seqs.data() + node.first_member, in.hpk, row0, rows, h, k, v, in.cache,
                      node.prefix, block0, block1, scale, base + row0 * dim, base + node.rows * dim + row0,
                      base + node.rows * (dim + 1) + row0, prefix_scratch);
      } else {
        const Partition& part = plan.partitions[item.a];
        const int64_t b = part.seq;
        float* acc = suffix_partials + item.a * suffix_stride;
        cpu::load_scaled(q + b * num_heads * dim, scale, q_buf.data(), num_heads * dim);
        cpu::dispatch_head_dim(dim, [&](auto head_dim) {
          cpu::attend_partition<head_dim>(q_buf.data(), k, v, in.cache, in.tables + b * in.table_stride, in.hpk,
                                          part.first, part.end, acc, acc + num_heads * dim,
                                          acc + num_heads * (dim + 1), scores.data());
        });
      }
    }
  }
}

// Merges each (sequence, head)'s partials into `o`: the chunks of every shared node on its
// path, then its partitions, weighted by exp(max_p - max) / sum.
template <typename scalar_t>
void merge_partials(const Batch& in, const Plan& plan, const float* prefix_partials, const float* suffix_partials,
                    scalar_t* o) {
  const int64_t num_heads = in.num_heads, dim = in.cache.head_dim, levels = in.levels, hpk = in.hpk;
  const int64_t suffix_stride = num_heads * (dim + 2);
#pragma omp parallel
  {
    std::vector<const float*> part_acc;
    std::vector<float> part_max, part_sum;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < in.batch * num_heads; ++bh) {
      const int64_t b = bh / num_heads, hq = bh % num_heads;
      part_acc.clear();
      part_max.clear();
      part_sum.clear();
      auto add = [&](const float* acc, float m, float sum) {
        part_acc.push_back(acc);
        part_max.push_back(m);
        part_sum.push_back(sum);
      };
      for (int64_t l = 0; l < levels; ++l) {
        if (plan.member_index[b * levels + l] < 0) continue;
        const Node& node = plan.nodes[plan.cascade_of[in.path[b * levels + l]]];
        const int64_t row = plan.member_index[b * levels + l] * hpk + hq % hpk, h = hq / hpk;
        for (int64_t c = 0; c < node.chunks; ++c) {
          const float* base = prefix_partials + prefix_partials_at(node, h, c, dim);
          add(base + row * dim, base[node.rows * dim + row], base[node.rows * (dim + 1) + row]);
        }
      }
      for (int64_t p = plan.part_start[b]; p < plan.part_start[b + 1]; ++p) {
        const float* base = suffix_partials + p * suffix_stride;
        add(base + hq * dim, base[num_heads * dim + hq], base[num_heads * (dim + 1) + hq]);
      }
      const int64_t parts = static_cast<int64_t>(part_acc.size());
      const float global_max = *std::max_element(part_max.begin(), part_max.end());
      float total = 0.f;
      for (int64_t i = 0; i < parts; ++i) {
        part_max[i] = std::exp(part_max[i] - global_max);  // now the partial's weight
        total += part_max[i] * part_sum[i];
      }
      scalar_t* o_row = o + bh * dim;
      for (int64_t d = 0; d < dim; d += kVec) {
        Vec merged(0.f);
        for (int64_t i = 0; i < parts; ++i) merged = at::vec::fmadd(Vec(part_max[i]), Vec::loadu(part_acc[i] + d), merged);
        cpu::store_float(o_row + d, merged * Vec(1.f / total));
      }
    }
  }
}

template <typename scalar_t>
void cascade_kernel(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& prefix_tables,
                    const at::Tensor& prefix_lens, const at::Tensor& seq_group, float scale, at::Tensor& out) {
  const CacheLayout cache{k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  const Batch in{query.size(0),
                 query.size(1),
                 query.size(1) / cache.kv_heads,
                 seq_group.size(1),
                 prefix_lens.size(0),
                 cache,
                 block_tables.data_ptr<int32_t>(),
                 block_tables.size(1),
                 context_lens.data_ptr<int32_t>(),
                 prefix_tables.data_ptr<int32_t>(),
                 prefix_tables.size(1),
                 prefix_lens.data_ptr<int32_t>(),
                 seq_group.data_ptr<int32_t>()};
  const Plan plan = plan_cascade(in, omp_get_max_threads());
  // Uninitialized: every entry the merge reads is written first.
  const std::unique_ptr<float[]> prefix_partials(new float[plan.partial_floats]);
  const std::unique_ptr<float[]> suffix_partials(
      new float[static_cast<int64_t>(plan.partitions.size()) * in.num_heads * (cache.head_dim + 2)]);
  run_items(in, plan, query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), scale,
            prefix_partials.get(), suffix_partials.get());
  merge_partials(in, plan, prefix_partials.get(), suffix_partials.get(), out.data_ptr<scalar_t>());
}

}  // namespace

at::Tensor cascade_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_tables, const at::Tensor& context_lens,
                                    const at::Tensor& prefix_tables, const at::Tensor& prefix_lens,
                                    const at::Tensor& seq_group, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4, "cascade_decode_attention: query [B, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cascade_decode_attention: caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "cascade_decode_attention: query and caches must share a dtype");
  TORCH_CHECK(query.size(2) % kVec == 0, "cascade_decode_attention: head_dim must be a multiple of ", kVec);
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "cascade_decode_attention: heads not a multiple of kv heads");
  TORCH_CHECK(seq_group.dim() == 1 || seq_group.dim() == 2, "cascade_decode_attention: seq_group must be [B] or [B, L]");
  TORCH_CHECK(prefix_tables.dim() == 2 && prefix_tables.size(0) == prefix_lens.size(0) &&
                  seq_group.size(0) == query.size(0) && context_lens.size(0) == query.size(0),
              "cascade_decode_attention: mismatched group or batch sizes");

  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  const at::Tensor p_tables = prefix_tables.to(at::kInt).contiguous();
  const at::Tensor p_lens = prefix_lens.to(at::kInt).contiguous();
  // [B, L]: a one-level seq_group [B] is L = 1
  const at::Tensor paths = (seq_group.dim() == 1 ? seq_group.unsqueeze(1) : seq_group).to(at::kInt).contiguous();
  // The invariants the kernel indexes with (the Python wrapper checks them all, with
  // clearer messages, and the block ids besides).
  const int64_t block_size = k_cache.size(1), num_nodes = p_lens.size(0), levels = paths.size(1);
  const int32_t* pl = p_lens.data_ptr<int32_t>();
  const int32_t* sg = paths.data_ptr<int32_t>();
  const int32_t* cl = lens.data_ptr<int32_t>();
  for (int64_t g = 0; g < num_nodes; ++g) {
    TORCH_CHECK(pl[g] >= block_size && pl[g] % block_size == 0 && pl[g] / block_size <= p_tables.size(1),
                "cascade_decode_attention: prefix_lens[", g, "] = ", pl[g], " is not whole blocks within prefix_tables");
  }
  for (int64_t b = 0; b < q.size(0); ++b) {
    int64_t path_len = 0;
    for (int64_t l = 0; l < levels; ++l) {
      const int32_t g = sg[b * levels + l];
      TORCH_CHECK(g >= -1 && g < num_nodes, "cascade_decode_attention: seq_group[", b, ", ", l, "] = ", g);
      if (g >= 0) path_len += pl[g];
    }
    TORCH_CHECK(cl[b] >= 1 && cl[b] >= path_len, "cascade_decode_attention: context_lens[", b, "] = ", cl[b],
                " is shorter than its path's ", path_len, " prefix tokens");
  }
  TTSEARCH_DISPATCH_FLOAT_TYPES(q.scalar_type(), "cascade_decode_attention", [&] {
    cascade_kernel<scalar_t>(q, k_cache, v_cache, tables, lens, p_tables, p_lens, paths, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace ttsearch
