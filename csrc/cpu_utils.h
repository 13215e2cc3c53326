// Vector helpers shared by the CPU attention kernels.
//
// Include this header before any other ATen header: it selects the ISA of ATen's
// Vectorized<T>. Torch's own build sets CPU_CAPABILITY_* per dispatch target; setup.py
// compiles csrc/ once per ISA level (ttsearch._C_<level>) with that level's explicit -m
// flags (ttsearch/ops/cpu_isa.py), and this header takes the widest ISA those flags enable.
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
#elif defined(__ARM_FEATURE_SVE) && defined(__ARM_FEATURE_SVE_BITS) && __ARM_FEATURE_SVE_BITS == 256
#define CPU_CAPABILITY SVE256
#define CPU_CAPABILITY_SVE
#define CPU_CAPABILITY_SVE256
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

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

// kVec consecutive values as floats, and back.
inline Vec load_float(const float* p) { return Vec::loadu(p); }
inline void store_float(float* p, const Vec& v) { v.store(p); }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Plain full-width loads and stores of kVec 16-bit values, converted with ATen's own
// routines (torch's rounding: to nearest even, NaN kept). ATen's Vectorized<T>::loadu(p, kVec)
// is a masked load on AVX-512, which cannot take a value from a store still in flight (a
// stall on every row just written), and a memcpy on AVX2: a bf16 norm ran 2x (AVX-512) and
// 8x (AVX2) slower through them.
#if defined(CPU_CAPABILITY_AVX512)
using FloatReg = __m512;
using HalfReg = __m256i;
inline HalfReg load_halves(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store_halves(void* p, HalfReg v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
#else
using FloatReg = __m256;
using HalfReg = __m128i;
inline HalfReg load_halves(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void store_halves(void* p, HalfReg v) { _mm_storeu_si128(static_cast<__m128i*>(p), v); }
#endif
inline Vec load_float(const at::BFloat16* p) {
  FloatReg o;
  at::vec::cvtbf16_fp32(load_halves(p), o);
  return o;
}
inline Vec load_float(const at::Half* p) {
  FloatReg o;
  at::vec::cvtfp16_fp32(load_halves(p), o);
  return o;
}
inline void store_float(at::BFloat16* p, const Vec& v) { store_halves(p, at::vec::cvtfp32_bf16(FloatReg(v))); }
inline void store_float(at::Half* p, const Vec& v) { store_halves(p, at::vec::cvtfp32_fp16(FloatReg(v))); }
#else
inline Vec load_float(const at::BFloat16* p) {
  return at::vec::convert<float>(at::vec::Vectorized<at::BFloat16>::loadu(p, kVec));
}
inline Vec load_float(const at::Half* p) {
  return at::vec::convert<float>(at::vec::Vectorized<at::Half>::loadu(p, kVec));
}
inline void store_float(at::BFloat16* p, const Vec& v) { at::vec::convert<at::BFloat16>(v).store(p, kVec); }
inline void store_float(at::Half* p, const Vec& v) { at::vec::convert<at::Half>(v).store(p, kVec); }
#endif

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

// 2^x for finite x (underflowing to 0), by a polynomial of 2^f on f in [-1/2, 1/2] and an
// exact scaling by 2^round(x). kDegree 4: relative error 2.7e-6, below bf16's rounding;
// kDegree 5: 2.3e-7, float32's (the coefficients are a relative-error minimax fit).
template <int kDegree>
C10_ALWAYS_INLINE Vec exp2_finite(const Vec& x) {
  static_assert(kDegree == 4 || kDegree == 5);
#ifdef CPU_CAPABILITY_AVX512
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (kDegree == 4) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(0.009570094756782055f), f, _mm512_set1_ps(0.05591786280274391f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247443318367f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931217908859253f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999992847442627f));
  } else {
    p = _mm512_fmadd_ps(_mm512_set1_ps(0.00132764654699713f), f, _mm512_set1_ps(0.009675541892647743f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550713464617729f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022120237350464f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469440460205f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  }
  return _mm512_scalef_ps(p, n);
#else
  return (x * Vec(0.6931471805599453f)).exp_u20();
#endif
}

// max(a, b) for values that are never NaN: skips maximum()'s NaN propagation.
C10_ALWAYS_INLINE Vec max_no_nan(const Vec& a, const Vec& b) {
#ifdef CPU_CAPABILITY_AVX512
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
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

// ---------------------------------------------------------------------------- online softmax

// The running softmax of attention rows over steps of keys, one vector lane per row (rows
// padded to `ld`, a multiple of kVec): per row the max so far, the sum of exp(score - max)
// so far, and the factor by which the last step's new max rescales what was accumulated.
struct OnlineSoftmax {
  std::vector<float> row_max, row_sum, alpha;

  explicit OnlineSoftmax(int64_t ld) : row_max(ld), row_sum(ld), alpha(ld) {}

  // Before the first step of rows [0, ld): no max yet, nothing summed.
  void reset(int64_t ld) {
    std::fill(row_max.begin(), row_max.begin() + ld, kNegInf);
    std::fill(row_sum.begin(), row_sum.begin() + ld, 0.f);
  }

  Vec max(int64_t j) const { return Vec::loadu(row_max.data() + j); }

  // Rows [j, j + kVec) after a step whose max is `new_max` (at least the old max) and whose
  // exp(score - new_max) add up to `sum`: the old sum is rescaled to the new max.
  void update(int64_t j, const Vec& new_max, const Vec& sum) {
    const Vec factor = (max(j) - new_max).exp_u20();
    (Vec::loadu(row_sum.data() + j) * factor + sum).store(row_sum.data() + j);
    new_max.store(row_max.data() + j);
    factor.store(alpha.data() + j);
  }

  // The accumulated output rows [0, rows) of `dim` values, rescaled to the rows' new max.
  void rescale(float* acc, int64_t rows, int64_t dim) const {
    for (int64_t r = 0; r < rows; ++r) {
      if (alpha[r] != 1.f) scale_inplace(acc + r * dim, alpha[r], dim);
    }
  }
};

// ---------------------------------------------------------------------------- small GEMM
//
// C[m, n] (+)= A[m, k] * B[k, n] for the attention tiles. A is float32, read through a
// row and a column stride so a transposed operand needs no copy; B rows are contiguous,
// of any supported dtype, widened as they are loaded; C is float32. n is a multiple of
// kVec. A register tile of kRows x kCols vectors accumulates over k; each B vector is
// loaded once per kRows rows.

// Keeps a loaded vector in a register: without this GCC folds the load into every FMA that
// uses it (a memory operand each), and the tile becomes bound by loads instead of FMAs.
C10_ALWAYS_INLINE Vec pin(Vec v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  __m512 raw = v;
  asm("" : "+v"(raw));
  return raw;
#else
  return v;
#endif
}

template <int kRows, int kCols, typename TB>
C10_ALWAYS_INLINE void gemm_tile(const float* a, int64_t a_rs, int64_t a_cs, const TB* b, int64_t ldb, float* c,
                                 int64_t ldc, int64_t k, bool accumulate) {
  Vec acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kCols; ++j) acc[r][j] = accumulate ? Vec::loadu(c + r * ldc + j * kVec) : Vec(0.f);
  }
  for (int64_t p = 0; p < k; ++p) {
    Vec bv[kCols];
    for (int j = 0; j < kCols; ++j) bv[j] = pin(load_float(b + p * ldb + j * kVec));
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

// ---------------------------------------------------------------------------- bf16 dot GEMM
//
// Where the host has AVX512_BF16 (vdpbf16ps: 16 lanes, each adding the products of two
// bf16 pairs to a float32 accumulator), bfloat16 tiles run at twice the rate of widening
// them to float32. Operands come as bf16 *pairs*: one 32-bit word holds two consecutive
// values along the reduction dimension k, the lower index in the low half.
//
// C[m, n] (+)= A[m, k] * B[k, n], k = 2 * k2, float32 C:
//   A pair (i, p) at a[i * a_rs + p * a_cs]   (32-bit words, any strides: broadcast)
//   B pairs (p, j..j+15) at b + p * ldb + j    (rows of n words, n a multiple of kVec)
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define TTSEARCH_HAS_BF16_DOT 1

template <int kRows, int kCols>
C10_ALWAYS_INLINE void dot_bf16_tile(const uint32_t* a, int64_t a_rs, int64_t a_cs, const uint32_t* b, int64_t ldb,
                                     float* c, int64_t ldc, int64_t k2, bool accumulate) {
  __m512 acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kCols; ++j) acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * ldc + j * kVec) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh bv[kCols];
    for (int j = 0; j < kCols; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + p * ldb + j * kVec);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_rs + p * a_cs]));
      for (int j = 0; j < kCols; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kCols; ++j) _mm512_storeu_ps(c + r * ldc + j * kVec, acc[r][j]);
  }
}

template <int kRows>
C10_ALWAYS_INLINE void dot_bf16_rows(int64_t n, int64_t k2, const uint32_t* a, int64_t a_rs, int64_t a_cs,
                                     const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) dot_bf16_tile<kRows, 4>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k2, accumulate);
  switch ((n - j) / kVec) {
    case 3: dot_bf16_tile<kRows, 3>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k2, accumulate); break;
    case 2: dot_bf16_tile<kRows, 2>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k2, accumulate); break;
    case 1: dot_bf16_tile<kRows, 1>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, k2, accumulate); break;
    default: break;
  }
}

inline void dot_bf16_gemm(int64_t m, int64_t n, int64_t k2, const uint32_t* a, int64_t a_rs, int64_t a_cs,
                          const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) dot_bf16_rows<4>(n, k2, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate);
  const uint32_t* a_tail = a + i * a_rs;
  float* c_tail = c + i * ldc;
  switch (m - i) {
    case 3: dot_bf16_rows<3>(n, k2, a_tail, a_rs, a_cs, b, ldb, c_tail, ldc, accumulate); break;
    case 2: dot_bf16_rows<2>(n, k2, a_tail, a_rs, a_cs, b, ldb, c_tail, ldc, accumulate); break;
    case 1: dot_bf16_rows<1>(n, k2, a_tail, a_rs, a_cs, b, ldb, c_tail, ldc, accumulate); break;
    default: break;
  }
}

// kVec pairs (x0[i], x1[i]) from two rows of bf16 values.
C10_ALWAYS_INLINE __m512i bf16_pairs(const at::BFloat16* x0, const at::BFloat16* x1) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0)));
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1)));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// kVec pairs (round(p0[i]), round(p1[i])) of float32 values rounded to bf16 (nearest even);
// `rounded` gets p0 + p1 as the rounded values, so sums match what the products use.
C10_ALWAYS_INLINE __m512i round_bf16_pairs(__m512 p0, __m512 p1, __m512& rounded) {
  // [p0 as bf16 x 16 | p1 as bf16 x 16], then interleaved: word i = (p0[i], p1[i])
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                         5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i pairs = _mm512_permutexvar_epi16(order, halves);
  rounded = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)),
                          _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
  return pairs;
}
#endif  // AVX512_BF16

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
