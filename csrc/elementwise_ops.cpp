// Fused elementwise ops of the decoder layer: RMS norm (alone, and after the residual add),
// rotate-half RoPE in place, and SiLU(gate) * up.
//
// Each follows its reference body (ttsearch/ops/reference.py) step by step: the arithmetic in
// float32, rounded to the tensors' dtype wherever the reference's torch ops round (after
// each op that returns a bf16/fp16 tensor), so for float32 only the order of the RMS sum
// differs. Rows run in parallel; the last dim may be any width (a partial last vector).
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>

#include <cmath>

#include "ops.h"

namespace ttsearch {
namespace {

using cpu::kVec;
using cpu::Vec;

// Below this many values a parallel region costs more than it buys.
constexpr int64_t kParallelValues = 1 << 15;

// n <= kVec values as floats (the rest of the vector zero), and back.
inline Vec load_n(const float* p, int64_t n) { return n == kVec ? Vec::loadu(p) : Vec::loadu(p, n); }
template <typename T>
inline Vec load_n(const T* p, int64_t n) {
  return n == kVec ? cpu::load_float(p) : at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, n));
}
inline void store_n(float* p, const Vec& v, int64_t n) { n == kVec ? v.store(p) : v.store(p, n); }
template <typename T>
inline void store_n(T* p, const Vec& v, int64_t n) {
  if (n == kVec) {
    cpu::store_float(p, v);
  } else {
    at::vec::convert<T>(v).store(p, n);
  }
}

// float32 values rounded to T and back, as a torch op returning a T tensor rounds them.
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return at::vec::convert<float>(at::vec::convert<T>(v));
  }
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)), the product rounded to T; x is a row
// already rounded to T (read back from memory).
template <typename T>
void normalize_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  Vec sq(0.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const Vec v = load_n(x + i, std::min(kVec, n - i));
    sq = at::vec::fmadd(v, v, sq);
  }
  const float mean = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sq) / static_cast<float>(n);
  const Vec r(1.f / std::sqrt(mean + eps));
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t m = std::min(kVec, n - i);
    store_n(out + i, load_n(weight + i, m) * round_to<T>(load_n(x + i, m) * r), m);
  }
}

// The row loops, outside the dtype dispatch (an OpenMP pragma cannot sit in a macro argument).
template <typename T>
void rms_norm_rows(T* out, int64_t os, const T* x, int64_t xs, const T* w, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows * n > kParallelValues)
  for (int64_t r = 0; r < rows; ++r) normalize_row(x + r * xs, w, out + r * os, n, eps);
}

template <typename T>
void add_rms_norm_rows(T* x, int64_t xs, T* res, int64_t rs, const T* w, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows * n > kParallelValues)
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * xs;
    T* rr = res + r * rs;
    for (int64_t i = 0; i < n; i += kVec) {  // the row stays in L1 for the norm below
      const int64_t m = std::min(kVec, n - i);
      store_n(rr + i, load_n(rr + i, m) + load_n(xr + i, m), m);
    }
    normalize_row(rr, w, xr, n, eps);
  }
}

// x [heads, 2 * half] of one token: x * cos + rotate_half(x) * sin, each product rounded to T
// as the reference's are.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t half, const T* cos, const T* sin) {
  for (int64_t h = 0; h < heads; ++h, x += 2 * half) {
    for (int64_t i = 0; i < half; i += kVec) {
      const int64_t m = std::min(kVec, half - i);
      const Vec c = load_n(cos + i, m), s = load_n(sin + i, m);
      const Vec x1 = load_n(x + i, m), x2 = load_n(x + half + i, m);
      store_n(x + i, round_to<T>(x1 * c) - round_to<T>(x2 * s), m);
      store_n(x + half + i, round_to<T>(x2 * c) + round_to<T>(x1 * s), m);
    }
  }
}

template <typename T>
void rotary_rows(const int64_t* pos, T* q, int64_t qs, int64_t q_heads, T* k, int64_t ks, int64_t k_heads,
                 const T* cache, int64_t tokens, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp parallel for if (tokens * (q_heads + k_heads) * dim > kParallelValues)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* cos = cache + pos[t] * dim;
    rotate_heads(q + t * qs, q_heads, half, cos, cos + half);
    rotate_heads(k + t * ks, k_heads, half, cos, cos + half);
  }
}

template <typename T>
void silu_and_mul_rows(T* out, int64_t os, const T* x, int64_t xs, int64_t rows, int64_t d) {
#pragma omp parallel for if (rows * d > kParallelValues)
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * xs;
    const T* up = gate + d;
    for (int64_t i = 0; i < d; i += kVec) {
      const int64_t m = std::min(kVec, d - i);
      const Vec g = load_n(gate + i, m);
      // torch's silu: x / (1 + exp(-x)) in float32, rounded; then the product, rounded
      const Vec silu = round_to<T>(g / (Vec(1.f) + g.neg().exp()));
      store_n(out + r * os + i, silu * load_n(up + i, m), m);
    }
  }
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.dim() == 2 && out.sizes() == input.sizes(), "rms_norm: expected 2-D input and out of one shape");
  TORCH_CHECK(input.stride(1) == 1 && out.stride(1) == 1 && weight.is_contiguous(), "rms_norm: rows must be contiguous");
  TTSEARCH_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm", [&] {
    rms_norm_rows(out.data_ptr<scalar_t>(), out.stride(0), input.const_data_ptr<scalar_t>(), input.stride(0),
                  weight.const_data_ptr<scalar_t>(), input.size(0), input.size(1), static_cast<float>(eps));
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.dim() == 2 && residual.sizes() == input.sizes(),
              "fused_add_rms_norm: expected 2-D input and residual of one shape");
  TORCH_CHECK(input.stride(1) == 1 && residual.stride(1) == 1 && weight.is_contiguous(),
              "fused_add_rms_norm: rows must be contiguous");
  TTSEARCH_DISPATCH_FLOAT_TYPES(input.scalar_type(), "fused_add_rms_norm", [&] {
    add_rms_norm_rows(input.data_ptr<scalar_t>(), input.stride(0), residual.data_ptr<scalar_t>(), residual.stride(0),
                      weight.const_data_ptr<scalar_t>(), input.size(0), input.size(1), static_cast<float>(eps));
  });
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_sin_cache) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && query.size(0) == key.size(0) && query.size(2) == key.size(2),
              "rotary_embedding: expected query [T, H, D] and key [T, Hkv, D]");
  const int64_t dim = query.size(2);
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == dim && key.stride(2) == 1 && key.stride(1) == dim &&
                  cos_sin_cache.is_contiguous() && cos_sin_cache.size(1) == dim,
              "rotary_embedding: each token's heads and the cache rows must be contiguous");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TTSEARCH_DISPATCH_FLOAT_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    rotary_rows(pos.const_data_ptr<int64_t>(), query.data_ptr<scalar_t>(), query.stride(0), query.size(1),
                key.data_ptr<scalar_t>(), key.stride(0), key.size(1), cos_sin_cache.const_data_ptr<scalar_t>(),
                query.size(0), dim);
  });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && out.dim() == 2 && out.size(0) == input.size(0) && input.size(1) == 2 * out.size(1),
              "silu_and_mul: expected input [N, 2d] and out [N, d]");
  TORCH_CHECK(input.stride(1) == 1 && out.stride(1) == 1, "silu_and_mul: rows must be contiguous");
  TTSEARCH_DISPATCH_FLOAT_TYPES(input.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows(out.data_ptr<scalar_t>(), out.stride(0), input.const_data_ptr<scalar_t>(), input.stride(0),
                      out.size(0), out.size(1));
  });
}

}  // namespace ttsearch
