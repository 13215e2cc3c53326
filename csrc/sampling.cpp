// Token sampling without sorting the vocabulary: per row temperature, top-k, top-p and an
// inverse-CDF draw, the rule of reference.sample_tokens (ttsearch/ops/reference.py).
//
// Per sampled row: the k-th largest scaled logit by selection (nth_element); the softmax
// exactly as torch's CPU kernel computes it (the same vector max, exp, sum and 1/sum), so
// the probabilities are the reference's own; the nucleus by a three-way quickselect on
// probability that tracks the mass above the pivot; the draw by block sums in token-id
// order, then one scan of the block it falls in.
// Where the reference rounds a float32 cumsum (torch accumulates it in double), this does
// the same, so the token differs from the reference's only where a sum lands within double
// rounding of a float32 rounding boundary.
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace ttsearch {
namespace {

using cpu::Vec;

// Below this many logits a parallel region costs more than it buys.
constexpr int64_t kParallelValues = 1 << 16;

// torch.argmax: the first index of the largest value (NaN counts as the largest).
int64_t argmax(const float* x, int64_t n) {
  const float best = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == best || (std::isnan(best) && std::isnan(x[i]))) return i;
  }
  return 0;
}

// torch.softmax on the CPU, step for step (aten/src/ATen/native/cpu/SoftMaxKernel.cpp).
void softmax_inplace(float* x, int64_t n) {
  const float max = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  at::vec::map([max](Vec v) { return (v - Vec(max)).exp(); }, x, x, n);
  const float inv = 1 / at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, x, n);
  at::vec::map([inv](Vec v) { return v * Vec(inv); }, x, x, n);
}

// Is the first token of probability p, after `ahead` mass of larger ones, in the nucleus?
// As the reference decides: its float32 cumsum (accumulated in double) minus p, below top_p.
inline bool kept(double ahead, float p, float top_p) { return static_cast<float>(ahead + p) - p < top_p; }

struct Nucleus {
  float lowest;       // the smallest probability it keeps
  int64_t ties_kept;  // how many tokens of that probability it keeps, lowest ids first
};

// The nucleus of probs[0, n) by quickselect: buf[lo, hi) holds the candidates for its lowest
// probability, `ahead` the mass of the tokens above them. The top token is always kept.
Nucleus find_nucleus(const float* probs, int64_t n, float top_p, float* buf) {
  std::copy(probs, probs + n, buf);
  double ahead = 0;
  Nucleus best{probs[0], 0};
  double best_ahead = 0;
  int64_t best_count = 0;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    float a = buf[lo], b = buf[lo + (hi - lo) / 2], c = buf[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    // three-way partition: [lo, gt) > pivot, [gt, lt) == pivot, [lt, hi) < pivot
    int64_t gt = lo, i = lo, lt = hi;
    double above = 0;
    while (i < lt) {
      const float v = buf[i];
      if (v > pivot) {
        above += v;
        std::swap(buf[gt++], buf[i++]);
      } else if (v < pivot) {
        std::swap(buf[i], buf[--lt]);
      } else {
        ++i;
      }
    }
    if (kept(ahead + above, pivot, top_p)) {  // the lowest kept is the pivot or below it
      best = {pivot, 0};
      best_ahead = ahead + above;
      best_count = lt - gt;
      ahead = best_ahead + static_cast<double>(best_count) * pivot;
      lo = lt;
    } else {  // above it
      hi = gt;
    }
  }
  // Ties of the lowest kept probability follow one another in id order.
  double cum = best_ahead;
  for (; best.ties_kept < best_count; ++best.ties_kept) {
    cum += best.lowest;
    if (!(static_cast<float>(cum) - best.lowest < top_p)) break;
  }
  return best;
}

// Inverse CDF: the first token whose cumulative mass exceeds u * total, the mass summed in
// double as torch's float32 cumsum accumulates it and compared as that cumsum rounds it.
// Blocks of kDrawBlock tokens are summed in independent lanes (one pass the compiler
// vectorizes) to find the block the draw falls in; only that block is scanned token by token.
// The lanes group the same doubles differently from a running sum, which can change a token
// only where a sum lands within double rounding of a float32 boundary, as above.
constexpr int64_t kDrawBlock = 256;
constexpr int kDrawLanes = 8;

int64_t draw(const float* probs, int64_t n, float u) {
  std::vector<double> block_sums((n + kDrawBlock - 1) / kDrawBlock);
  double total = 0;
  for (int64_t b = 0, start = 0; start < n; ++b, start += kDrawBlock) {
    const int64_t end = std::min(n, start + kDrawBlock);
    double lanes[kDrawLanes] = {};
    int64_t i = start;
    for (; i + kDrawLanes <= end; i += kDrawLanes) {
      for (int j = 0; j < kDrawLanes; ++j) lanes[j] += probs[i + j];
    }
    double sum = 0;
    for (int j = 0; j < kDrawLanes; ++j) sum += lanes[j];
    for (; i < end; ++i) sum += probs[i];
    block_sums[b] = sum;
    total += sum;
  }
  const float target = u * static_cast<float>(total);
  double cum = 0;
  int64_t i = 0;
  for (const double sum : block_sums) {  // skip whole blocks the draw lies past
    if (static_cast<float>(cum + sum) > target) break;
    cum += sum;
    i += kDrawBlock;
  }
  for (; i < n; ++i) {
    cum += probs[i];
    if (static_cast<float>(cum) > target) return i;
  }
  return n - 1;
}

int64_t sample_row(const float* logits, int64_t n, float temperature, int64_t top_k, float top_p, float u,
                   float* probs, float* buf) {
  at::vec::map([temperature](Vec v) { return v / Vec(temperature); }, probs, logits, n);
  if (top_k > 0 && top_k < n) {
    std::copy(probs, probs + n, buf);
    std::nth_element(buf, buf + top_k - 1, buf + n, std::greater<float>());
    const float kth = buf[top_k - 1];
    for (int64_t i = 0; i < n; ++i) {
      if (probs[i] < kth) probs[i] = -std::numeric_limits<float>::infinity();
    }
  }
  softmax_inplace(probs, n);
  if (top_p < 1) {
    const Nucleus nucleus = find_nucleus(probs, n, top_p, buf);
    // The nucleus as a mask: above its lowest probability, or the first ties of it.
    int64_t ties = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (probs[i] < nucleus.lowest || (probs[i] == nucleus.lowest && ties++ >= nucleus.ties_kept)) probs[i] = 0.f;
    }
  }
  return draw(probs, n, u);
}

// dst = src widened to float32 (exactly).
template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + cpu::kVec <= n; i += cpu::kVec) cpu::load_float(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The row loop, outside the dtype dispatch (an OpenMP pragma cannot sit in a macro
// argument). bfloat16 and float16 rows are widened to float32 first (exactly), as the
// reference does.
template <typename T>
void sample_rows(const T* data, int64_t rows, int64_t n, const float* t, const int64_t* k, const float* p,
                 const float* r, int64_t* out) {
#pragma omp parallel if (rows * n > kParallelValues)
  {
    std::vector<float> probs, buf;  // per thread, sized at the first row that needs them
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < rows; ++b) {
      const float* row;
      if constexpr (std::is_same_v<T, float>) {
        row = data + b * n;
      } else {
        probs.resize(n);
        widen(data + b * n, probs.data(), n);
        row = probs.data();
      }
      if (t[b] == 0 || k[b] == 1) {
        out[b] = argmax(row, n);
        continue;
      }
      probs.resize(n);
      buf.resize(n);
      out[b] = sample_row(row, n, t[b], k[b], p[b], r[b], probs.data(), buf.data());
    }
  }
}

}  // namespace

at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& u) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: expected logits [B, V]");
  const at::Tensor x = logits.contiguous();
  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor ks = top_k.to(at::kLong).contiguous();
  const at::Tensor ps = top_p.to(at::kFloat).contiguous();
  const at::Tensor us = u.to(at::kFloat).contiguous();
  at::Tensor tokens = at::empty({x.size(0)}, logits.options().dtype(at::kLong));
  TTSEARCH_DISPATCH_FLOAT_TYPES(x.scalar_type(), "sample_tokens", [&] {
    sample_rows(x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), temp.const_data_ptr<float>(),
                ks.const_data_ptr<int64_t>(), ps.const_data_ptr<float>(), us.const_data_ptr<float>(),
                tokens.data_ptr<int64_t>());
  });
  return tokens;
}

}  // namespace ttsearch
