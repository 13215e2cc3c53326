// Fused PRM step score: from the hidden states at step tags, the final RMS norm, only the
// head's 1 or 2 rows (candidate-token rows of the LM head, a 2-class or a value head),
// P(good) and each beam's running aggregate — full-vocabulary logits are never formed.
//
// The arithmetic follows the reference body (ttsearch/ops/reference.py) step by step: the
// norm in float32 (x * rsqrt(mean(x^2) + eps)), rounded to the hidden states' dtype, then
// multiplied by the weight in float32; the logits as float32 dot products; softmax over the
// 2 logits (or a sigmoid of the 1); the aggregate in float32. Rows run in parallel.
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <string_view>
#include <tuple>
#include <vector>

#include "ops.h"

namespace ttsearch {
namespace {

using cpu::kVec;
using cpu::Vec;

// Below this many hidden values a parallel region costs more than it buys.
constexpr int64_t kParallelValues = 1 << 15;

enum class Aggregation { kLast, kMin, kProd, kMean };

Aggregation parse_aggregation(std::string_view how) {
  if (how == "last") return Aggregation::kLast;
  if (how == "min") return Aggregation::kMin;
  if (how == "prod") return Aggregation::kProd;
  TORCH_CHECK(how == "mean", "prm_step_score: unknown aggregation '", std::string(how), "'");
  return Aggregation::kMean;
}

// float32 values rounded to T and back (identity for float).
inline Vec round_to(const Vec& v, float*) { return v; }
inline Vec round_to(const Vec& v, at::BFloat16*) {
  return at::vec::convert<float>(at::vec::convert<at::BFloat16>(v));
}
inline Vec round_to(const Vec& v, at::Half*) { return at::vec::convert<float>(at::vec::convert<at::Half>(v)); }

template <typename scalar_t>
float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

struct Head {
  const float* norm;  // [width] or null
  float eps;
  const float* rows;  // [num_rows, width]
  int64_t num_rows;   // 1 or 2
  const float* bias;  // [num_rows] or null
  int64_t positive;
};

// The head's logits for one hidden row x [width].
template <typename scalar_t>
void row_logits(const scalar_t* x, int64_t width, const Head& head, float* logits) {
  const int64_t body = width / kVec * kVec;
  float rstd = 1.f;
  if (head.norm) {
    Vec sq(0.f);
    for (int64_t i = 0; i < body; i += kVec) {
      const Vec v = cpu::load_float(x + i);
      sq = at::vec::fmadd(v, v, sq);
    }
    float sum_sq = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sq);
    for (int64_t i = body; i < width; ++i) sum_sq += static_cast<float>(x[i]) * static_cast<float>(x[i]);
    rstd = 1.f / std::sqrt(sum_sq / static_cast<float>(width) + head.eps);
  }
  const float* w1 = head.num_rows == 2 ? head.rows + width : head.rows;
  Vec dot0(0.f), dot1(0.f);
  for (int64_t i = 0; i < body; i += kVec) {
    Vec y = cpu::load_float(x + i);
    if (head.norm) y = Vec::loadu(head.norm + i) * round_to(y * Vec(rstd), static_cast<scalar_t*>(nullptr));
    dot0 = at::vec::fmadd(y, Vec::loadu(head.rows + i), dot0);
    if (head.num_rows == 2) dot1 = at::vec::fmadd(y, Vec::loadu(w1 + i), dot1);
  }
  float l0 = at::vec::vec_reduce_all<float>(std::plus<Vec>(), dot0);
  float l1 = at::vec::vec_reduce_all<float>(std::plus<Vec>(), dot1);
  for (int64_t i = body; i < width; ++i) {
    float y = static_cast<float>(x[i]);
    if (head.norm) y = head.norm[i] * round_to<scalar_t>(y * rstd);
    l0 += y * head.rows[i];
    if (head.num_rows == 2) l1 += y * w1[i];
  }
  logits[0] = l0 + (head.bias ? head.bias[0] : 0.f);
  if (head.num_rows == 2) logits[1] = l1 + (head.bias ? head.bias[1] : 0.f);
}

float probability(const float* logits, const Head& head) {
  if (head.num_rows == 1) return 1.f / (1.f + std::exp(-logits[0]));
  const float top = std::max(logits[0], logits[1]);
  const float e0 = std::exp(logits[0] - top), e1 = std::exp(logits[1] - top);
  return (head.positive == 0 ? e0 : e1) / (e0 + e1);
}

float aggregate(float prev, int64_t count, float score, Aggregation how) {
  if (count == 0 || how == Aggregation::kLast) return score;  // a beam's first step starts from its score
  switch (how) {
    case Aggregation::kMin: return std::min(prev, score);
    case Aggregation::kProd: return prev * score;
    default: {
      const float c = static_cast<float>(count);
      return (prev * c + score) / (c + 1.f);
    }
  }
}

template <typename scalar_t>
void score_rows(const scalar_t* data, int64_t n, int64_t width, int64_t row_stride, const Head& head,
                const float* prev, const int64_t* counts, Aggregation how, float* scores, float* aggregates) {
#pragma omp parallel for schedule(static) if (n * width > kParallelValues)
  for (int64_t r = 0; r < n; ++r) {
    float logits[2];
    row_logits(data + r * row_stride, width, head, logits);
    scores[r] = probability(logits, head);
    aggregates[r] = aggregate(prev[r], counts[r], scores[r], how);
  }
}

// A small operand as contiguous float32 (the norm weight, the head rows, the bias).
at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> prm_step_score(const at::Tensor& hidden, const std::optional<at::Tensor>& norm_weight,
                                                  double eps, const at::Tensor& head_weight,
                                                  const std::optional<at::Tensor>& head_bias, int64_t positive_index,
                                                  const at::Tensor& prev_agg, const at::Tensor& prev_count,
                                                  c10::string_view aggregation) {
  TORCH_CHECK(hidden.dim() == 2, "prm_step_score: hidden must be [tags, hidden]");
  const int64_t n = hidden.size(0), width = hidden.size(1);
  TORCH_CHECK(head_weight.dim() == 2 && (head_weight.size(0) == 1 || head_weight.size(0) == 2) &&
                  head_weight.size(1) == width,
              "prm_step_score: head_weight must be [1 or 2, hidden]");
  TORCH_CHECK(head_weight.size(0) == 1 || positive_index == 0 || positive_index == 1,
              "prm_step_score: positive_index must be 0 or 1");
  TORCH_CHECK(prev_agg.numel() == n && prev_count.numel() == n, "prm_step_score: prev_agg / prev_count need ", n, " entries");
  const Aggregation how = parse_aggregation(aggregation);

  at::Tensor scores = at::empty({n}, hidden.options().dtype(at::kFloat));
  at::Tensor aggregates = at::empty({n}, hidden.options().dtype(at::kFloat));
  if (n == 0) return {scores, aggregates};

  // float64 states go through float32, as the reference's hidden.float() does; rounding
  // the normalized values back to float64 changes nothing.
  at::Tensor x = hidden.scalar_type() == at::kDouble ? hidden.to(at::kFloat) : hidden;
  if (x.stride(1) != 1) x = x.contiguous();
  const at::Tensor norm = norm_weight.has_value() ? as_float(*norm_weight) : at::Tensor();
  const at::Tensor rows = as_float(head_weight);
  const at::Tensor bias = head_bias.has_value() ? as_float(*head_bias) : at::Tensor();
  TORCH_CHECK(!norm.defined() || norm.numel() == width, "prm_step_score: norm_weight must be [hidden]");
  TORCH_CHECK(!bias.defined() || bias.numel() == rows.size(0), "prm_step_score: head_bias must be [head rows]");
  const Head head{norm.defined() ? norm.data_ptr<float>() : nullptr, static_cast<float>(eps), rows.data_ptr<float>(),
                  rows.size(0), bias.defined() ? bias.data_ptr<float>() : nullptr, positive_index};
  const at::Tensor prev = prev_agg.to(at::kFloat).contiguous();
  const at::Tensor counts = prev_count.to(at::kLong).contiguous();
  const float* prev_p = prev.data_ptr<float>();
  const int64_t* count_p = counts.data_ptr<int64_t>();
  float* score_p = scores.data_ptr<float>();
  float* agg_p = aggregates.data_ptr<float>();
  const int64_t row_stride = x.stride(0);

  TTSEARCH_DISPATCH_FLOAT_TYPES(x.scalar_type(), "prm_step_score", [&] {
    score_rows(x.data_ptr<scalar_t>(), n, width, row_stride, head, prev_p, count_p, how, score_p, agg_p);
  });
  return {scores, aggregates};
}

}  // namespace ttsearch
