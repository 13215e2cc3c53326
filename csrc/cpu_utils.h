// Vector helpers shared by the CPU attention kernels.
//
// Include this header before any other ATen header: it selects the ISA of ATen's
// Vectorized<T>. Torch's own build sets CPU_CAPABILITY_* per dispatch target; this
// extension is compiled for the build host (-march=native), so it takes the widest ISA
// the compiler was told the host has.
#pragma once

#ifdef VECTOR_WIDTH
#error "cpu_utils.h must be included before any ATen vectorization header"
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

// The cache dtypes the kernels handle; reductions always run in float32.
#define TTSEARCH_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

namespace ttsearch::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// One K or V pool [num_blocks, block_size, kv_heads, head_dim], contiguous.
struct CacheLayout {
  int64_t block_size;
  int64_t kv_heads;
  int64_t head_dim;

  int64_t token_stride() const { return kv_heads * head_dim; }

  template <typename T>
  const T* row(const T* cache, int64_t block, int64_t offset, int64_t kv_head) const {
    return cache + ((block * block_size + offset) * kv_heads + kv_head) * head_dim;
  }
};

// Starts loading n values into L2. Paged blocks sit at random addresses, where the
// hardware prefetcher cannot run ahead of the reads.
template <typename T>
inline void prefetch(const T* src, int64_t n) {
  constexpr int64_t kLine = 64;
  const char* bytes = reinterpret_cast<const char*>(src);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += kLine) {
    __builtin_prefetch(bytes + b, /*rw=*/0, /*locality=*/1);
  }
}

// kVec consecutive values as floats.
inline Vec load_float(const float* p) { return Vec::loadu(p); }
inline Vec load_float(const at::BFloat16* p) {
  return at::vec::convert<float>(at::vec::Vectorized<at::BFloat16>::loadu(p, kVec));
}
inline Vec load_float(const at::Half* p) {
  return at::vec::convert<float>(at::vec::Vectorized<at::Half>::loadu(p, kVec));
}

inline void store_float(float* p, const Vec& v) { v.store(p); }
inline void store_float(at::BFloat16* p, const Vec& v) { at::vec::convert<at::BFloat16>(v).store(p, kVec); }
inline void store_float(at::Half* p, const Vec& v) { at::vec::convert<at::Half>(v).store(p, kVec); }

// `rows` rows of `cols` values, `ld` apart, as float32 rows: float data is used in place,
// narrower types are widened into `buf` (packed, `cols` apart). Sets `out_ld`.
inline const float* as_float_rows(const float* src, int64_t ld, int64_t, int64_t, float*, int64_t& out_ld) {
  out_ld = ld;
  return src;
}
template <typename T>
const float* as_float_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, float* buf, int64_t& out_ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < cols; i += kVec) load_float(src + r * ld + i).store(buf + r * cols + i);
  }
  out_ld = cols;
  return buf;
}

// dst = src * scale, widened to float32.
template <typename T>
void load_scaled(const T* src, float scale, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kVec) (load_float(src + i) * Vec(scale)).store(dst + i);
}

// dst = src * scale, narrowed to T.
template <typename T>
void store_scaled(const float* src, float scale, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kVec) store_float(dst + i, Vec::loadu(src + i) * Vec(scale));
}

// scores[g * ld + t] = q[g] . k[t] for n key rows (`k_ld` apart) and kHeads query rows
// (`dim` apart). Each key row is loaded and widened once for all kHeads rows.
template <int kHeads, typename T>
C10_ALWAYS_INLINE void score_rows(const float* q, const T* k, int64_t k_ld, int64_t n, int64_t dim, float* scores,
                                  int64_t ld) {
  for (int64_t t = 0; t < n; ++t) {
    Vec acc[kHeads];
    for (int g = 0; g < kHeads; ++g) acc[g] = Vec(0.f);
    for (int64_t i = 0; i < dim; i += kVec) {
      const Vec kv = load_float(k + t * k_ld + i);
      for (int g = 0; g < kHeads; ++g) acc[g] = at::vec::fmadd(Vec::loadu(q + g * dim + i), kv, acc[g]);
    }
    for (int g = 0; g < kHeads; ++g) scores[g * ld + t] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc[g]);
  }
}

// scores [group, ld] = q [group, dim] . k [n, dim]^T, four query rows per pass over the keys.
template <typename T>
C10_ALWAYS_INLINE void score_block(const float* q, int64_t group, const T* k, int64_t k_ld, int64_t n, int64_t dim,
                                   float* scores, int64_t ld) {
  int64_t g = 0;
  for (; g + 4 <= group; g += 4) score_rows<4>(q + g * dim, k, k_ld, n, dim, scores + g * ld, ld);
  switch (group - g) {
    case 3: score_rows<3>(q + g * dim, k, k_ld, n, dim, scores + g * ld, ld); break;
    case 2: score_rows<2>(q + g * dim, k, k_ld, n, dim, scores + g * ld, ld); break;
    case 1: score_rows<1>(q + g * dim, k, k_ld, n, dim, scores + g * ld, ld); break;
    default: break;
  }
}

inline void scale_inplace(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; i += kVec) (Vec::loadu(x + i) * Vec(a)).store(x + i);
}

// The first n values, the rest of the last vector padded with -inf (neutral for max, 0 after exp).
inline Vec load_padded(const float* p, int64_t n) {
  return n >= kVec ? Vec::loadu(p) : Vec::set(Vec(kNegInf), Vec::loadu(p, n), n);
}

inline float max_of(const float* x, int64_t n) {
  Vec m(kNegInf);
  for (int64_t i = 0; i < n; i += kVec) m = at::vec::maximum(m, load_padded(x + i, n - i));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
}

// x = exp(x - shift) in place; returns the sum.
inline float exp_shift_sum(float* x, int64_t n, float shift) {
  Vec sum(0.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const Vec e = (load_padded(x + i, n - i) - Vec(shift)).exp_u20();
    e.store(x + i, std::min(kVec, n - i));
    sum = sum + e;
  }
  return at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum);
}

// ---------------------------------------------------------------------------- small GEMM
//
// C[m, n] (+)= A[m, k] * B[k, n] for the attention tiles. A is float32, read through a
// row and a column stride so a transposed operand needs no copy; B rows are contiguous,
// of any supported dtype, widened as they are loaded; C is float32. n is a multiple of
// kVec. A register tile of kRows x kCols vectors accumulates over k; each B vector is
// loaded once per kRows rows.

template <int kRows, int kCols, typename TB>
C10_ALWAYS_INLINE void gemm_tile(const float* a, int64_t a_rs, int64_t a_cs, const TB* b, int64_t ldb, float* c,
                                 int64_t ldc, int64_t k, bool accumulate) {
  Vec acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kCols; ++j) acc[r][j] = accumulate ? Vec::loadu(c + r * ldc + j * kVec) : Vec(0.f);
  }
  for (int64_t p = 0; p < k; ++p) {
    Vec bv[kCols];
    for (int j = 0; j < kCols; ++j) bv[j] = load_float(b + p * ldb + j * kVec);
    for (int r = 0; r < kRows; ++r) {
      const Vec av(a[r * a_rs + p * a_cs]);
      for (int j = 0; j < kCols; ++j) acc[r][j] = at::vec::fmadd(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kCols; ++j) acc[r][j].store(c + r * ldc + j * kVec);
  }
}

template <int kRows, typename TB>
C10_ALWAYS_INLINE void gemm_rows(int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const TB* b,
                                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) gemm_tile<kRows, 4>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k, accumulate);
  switch ((n - j) / kVec) {
    case 3: gemm_tile<kRows, 3>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k, accumulate); break;
    case 2: gemm_tile<kRows, 2>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k, accumulate); break;
    case 1: gemm_tile<kRows, 1>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k, accumulate); break;
    default: break;
  }
}

template <typename TB>
C10_ALWAYS_INLINE void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
                                  const TB* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) gemm_rows<4>(n, k, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate);
  const float* a_tail = a + i * a_rs;
  float* c_tail = c + i * ldc;
  switch (m - i) {
    case 3: gemm_rows<3>(n, k, a_tail, a_rs, a_cs, b, ldb, c_tail, ldc, accumulate); break;
    case 2: gemm_rows<2>(n, k, a_tail, a_rs, a_cs, b, ldb, c_tail, ldc, accumulate); break;
    case 1: gemm_rows<1>(n, k, a_tail, a_rs, a_cs, b, ldb, c_tail, ldc, accumulate); break;
    default: break;
  }
}

// Calls f(std::integral_constant<int64_t, D>{}) with the head dim as a compile-time
// constant for the common sizes, so the loops over it unroll; with 0 (read the runtime
// dim) otherwise.
template <typename F>
void dispatch_head_dim(int64_t dim, F&& f) {
  switch (dim) {
    case 64: f(std::integral_constant<int64_t, 64>{}); break;
    case 128: f(std::integral_constant<int64_t, 128>{}); break;
    default: f(std::integral_constant<int64_t, 0>{}); break;
  }
}

}  // namespace ttsearch::cpu
