// Linear layers on GGUF's quantized blocks: y = x @ W.T with W kept as llama.cpp wrote it.
// ttsearch/ops/quantized.py has the layouts and the op's contract, which this follows: x is
// first rounded to int8 in groups of 32 features, one float32 scale per group (as llama.cpp
// rounds its activations), so that 32 weights times a group of x is one integer dot product.
//
// Up to kFusedRows rows of x (decoding): the weights are unpacked in registers, 32 bytes
// at a time, and dotted with every row (AVX512-VNNI's vpdpbusd, or AVX2's vpmaddubsw and
// vpmaddwd), so W is read from memory once per call: 3.5x fewer bytes than bf16 for 4-bit
// formats. Output features split across threads. More rows (wider decode batches, prefill):
// the product is compute-bound. With AVX512-VNNI, an int8 GEMM: x laid out in tiles of 8 or
// 16 rows, W unpacked 8 output features at a time, up to 64 int8 products per instruction
// (bf16's GEMM does 32). Without it, past 8 rows, a panel of W at a time is dequantized to
// x's dtype for ATen's GEMM.
#include "cpu_utils.h"  // first: selects ATen's vector ISA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"

namespace ttsearch {
namespace {

using cpu::kVec;
using cpu::Vec;

constexpr int kGroup = 32;           // features per int8 group of x, and per integer dot product
// Up to kFusedRows rows of x go through the fused kernel, their accumulators in registers:
// past 4 on a Zen 4 the int8 GEMM's tiles of 8 rows are faster; without it, past 8, the int8
// products per row cost more than dequantizing W once for ATen's bf16 GEMM.
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512VNNI__)
constexpr int64_t kFusedRows = 4;
#else
constexpr int64_t kFusedRows = 8;
#endif
inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- 32 bytes at a time
// Bytes: 32 weights or 32 rounded features (`|` is their bitwise or). Ints: 8 int32 sums,
// lane i over bytes 4i..4i+3. Floats: 8 float32 lanes.
#if defined(__AVX2__)
using Bytes = __m256i;
using Ints = __m256i;
using Floats = __m256;

C10_ALWAYS_INLINE Bytes load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
C10_ALWAYS_INLINE Bytes splat(int8_t v) { return _mm256_set1_epi8(v); }
C10_ALWAYS_INLINE Bytes minus(Bytes a, int8_t v) { return _mm256_sub_epi8(a, splat(v)); }
// (byte >> shift) & mask for every byte (mask drops the bits that shifted in from the next byte)
C10_ALWAYS_INLINE Bytes field(Bytes v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), splat(static_cast<int8_t>(mask)));
}
C10_ALWAYS_INLINE Bytes shifted_left(Bytes v, int shift) { return _mm256_sll_epi16(v, _mm_cvtsi32_si128(shift)); }
// 16 bytes -> their low nibbles (elements 0-15), then their high ones (16-31)
C10_ALWAYS_INLINE Bytes nibbles(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), splat(15));
}
// byte e = value where bit e of bits is set, else 0
C10_ALWAYS_INLINE Bytes bits_as(uint32_t bits, int8_t value) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte e <- byte e / 8 of bits
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));  // bit e % 8 of byte e
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), splat(value));
}
// sums of 4 products of unsigned bytes u and signed bytes s (u < 128: no saturation on AVX2)
C10_ALWAYS_INLINE Ints dot_unsigned(Bytes u, Bytes s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// the same for signed bytes w: |w| times s with w's sign
C10_ALWAYS_INLINE Ints dot_signed(Bytes w, Bytes s) { return dot_unsigned(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w)); }
// lo in the lanes of bytes 0-15, hi in those of bytes 16-31
C10_ALWAYS_INLINE Floats halves(float lo, float hi) { return _mm256_set_m128(_mm_set1_ps(hi), _mm_set1_ps(lo)); }
// the kVec bytes from byte i * kVec on, as floats
template <bool kSigned>
C10_ALWAYS_INLINE Vec to_floats(Bytes q, int i) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i half = i == 0 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  return _mm512_cvtepi32_ps(kSigned ? _mm512_cvtepi8_epi32(half) : _mm512_cvtepu8_epi32(half));
#else
  const __m128i half = i < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  const __m128i eight = i % 2 == 0 ? half : _mm_srli_si128(half, 8);
  return _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight));
#endif
}
#if defined(CPU_CAPABILITY_AVX512)
// Two groups side by side in one 512-bit register: the fused kernel's unit on AVX-512.
using WideBytes = __m512i;
using WideFloats = __m512;
C10_ALWAYS_INLINE WideBytes join(Bytes a, Bytes b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
C10_ALWAYS_INLINE WideFloats join(Floats a, Floats b) { return _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1); }
C10_ALWAYS_INLINE WideBytes load_wide(const int8_t* p) { return _mm512_loadu_si512(p); }
C10_ALWAYS_INLINE WideFloats load_wide(const float* p) { return _mm512_loadu_ps(p); }
C10_ALWAYS_INLINE WideFloats wide_zeros() { return _mm512_setzero_ps(); }
C10_ALWAYS_INLINE __m512i dot_unsigned(WideBytes u, WideBytes s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
}
C10_ALWAYS_INLINE __m512i dot_signed(WideBytes w, WideBytes s) {
  const __m512i negated = _mm512_mask_sub_epi8(s, _mm512_movepi8_mask(w), _mm512_setzero_si512(), s);
  return dot_unsigned(_mm512_abs_epi8(w), negated);
}
C10_ALWAYS_INLINE WideFloats fmadd(__m512i i, WideFloats scale, WideFloats times, WideFloats acc) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(scale, times), acc);
}
C10_ALWAYS_INLINE WideFloats fmadd(WideFloats a, WideFloats b, WideFloats acc) { return _mm512_fmadd_ps(a, b, acc); }
C10_ALWAYS_INLINE float sum(WideFloats a) { return _mm512_reduce_add_ps(a); }
#endif
C10_ALWAYS_INLINE Floats splat_floats(float v) { return _mm256_set1_ps(v); }
C10_ALWAYS_INLINE Floats load_floats(const float* p) { return _mm256_loadu_ps(p); }
C10_ALWAYS_INLINE Floats fmadd(Floats a, Floats b, Floats acc) { return _mm256_fmadd_ps(a, b, acc); }
C10_ALWAYS_INLINE Floats fmadd(Ints i, Floats scale, Floats times, Floats acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(scale, times), acc);
}
C10_ALWAYS_INLINE float sum(Floats a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// 32 features of x (scaled by 1 / d) rounded to int8 at q; returns the sum of the 32.
C10_ALWAYS_INLINE int round_to_int8(const float* x, float inverse, int8_t* q) {
#if defined(CPU_CAPABILITY_AVX512)
  int total = 0;
  for (int i = 0; i < kGroup; i += 16) {  // cvtps rounds to nearest, ties to even (MXCSR's default)
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inverse)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(v));
    total += _mm512_reduce_add_epi32(v);
  }
  return total;
#else
  __m256i v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), _mm256_set1_ps(inverse)));
  // packing works within 128-bit lanes: the permute puts the 32 bytes back in order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
#endif
}
#else  // plain loops, which the compiler vectorizes for the baseline ISA
struct Bytes {
  uint8_t b[32];
};
struct Ints {
  int32_t v[8];
};
struct Floats {
  float v[8];
};

inline Bytes load(const void* p) {
  Bytes r;
  std::memcpy(r.b, p, 32);
  return r;
}
inline Bytes operator|(Bytes a, const Bytes& b) {
  for (int e = 0; e < 32; ++e) a.b[e] |= b.b[e];
  return a;
}
inline Bytes minus(Bytes a, int8_t v) {
  for (int e = 0; e < 32; ++e) a.b[e] = static_cast<uint8_t>(a.b[e] - v);
  return a;
}
inline Bytes field(Bytes v, int shift, int mask) {
  for (int e = 0; e < 32; ++e) v.b[e] = (v.b[e] >> shift) & mask;
  return v;
}
inline Bytes shifted_left(Bytes v, int shift) {
  for (int e = 0; e < 32; ++e) v.b[e] = static_cast<uint8_t>(v.b[e] << shift);
  return v;
}
inline Bytes nibbles(const uint8_t* p) {
  Bytes r;
  for (int e = 0; e < 16; ++e) r.b[e] = p[e] & 15, r.b[e + 16] = p[e] >> 4;
  return r;
}
inline Bytes bits_as(uint32_t bits, int8_t value) {
  Bytes r;
  for (int e = 0; e < 32; ++e) r.b[e] = (bits >> e) & 1 ? value : 0;
  return r;
}
template <bool kSigned>
inline Ints dot(const Bytes& w, const Bytes& s) {
  Ints r;
  for (int i = 0; i < 8; ++i) {
    r.v[i] = 0;
    for (int e = 4 * i; e < 4 * i + 4; ++e) {
      r.v[i] += (kSigned ? static_cast<int8_t>(w.b[e]) : w.b[e]) * static_cast<int8_t>(s.b[e]);
    }
  }
  return r;
}
inline Ints dot_unsigned(const Bytes& u, const Bytes& s) { return dot<false>(u, s); }
inline Ints dot_signed(const Bytes& w, const Bytes& s) { return dot<true>(w, s); }
inline Floats halves(float lo, float hi) {
  Floats r;
  for (int i = 0; i < 8; ++i) r.v[i] = i < 4 ? lo : hi;
  return r;
}
inline Floats splat_floats(float v) {
  Floats r;
  for (int l = 0; l < 8; ++l) r.v[l] = v;
  return r;
}
inline Floats load_floats(const float* p) {
  Floats r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline Floats fmadd(const Floats& a, const Floats& b, Floats acc) {
  for (int l = 0; l < 8; ++l) acc.v[l] += a.v[l] * b.v[l];
  return acc;
}
inline Floats fmadd(const Ints& i, const Floats& scale, const Floats& times, Floats acc) {
  for (int l = 0; l < 8; ++l) acc.v[l] += static_cast<float>(i.v[l]) * (scale.v[l] * times.v[l]);
  return acc;
}
inline float sum(const Floats& a) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += a.v[l];
  return s;
}
inline int round_to_int8(const float* x, float inverse, int8_t* q) {
  int total = 0;
  for (int e = 0; e < kGroup; ++e) {
    q[e] = static_cast<int8_t>(std::nearbyint(x[e] * inverse));  // to nearest, ties to even
    total += q[e];
  }
  return total;
}
template <bool kSigned>
inline Vec to_floats(const Bytes& q, int i) {
  alignas(64) float f[kVec];
  for (int64_t e = 0; e < kVec; ++e) {
    const uint8_t b = q.b[i * kVec + e];
    f[e] = kSigned ? static_cast<float>(static_cast<int8_t>(b)) : static_cast<float>(b);
  }
  return Vec::loadu(f);
}
#endif

// ---------------------------------------------------------------- the formats
// 32 weights unpacked into bytes q (signed where the format says kSigned): weight e is
// (e < 16 ? lo : hi) * q[e] + offset.
struct Group {
  Bytes q;
  float lo, hi, offset;
};

// One struct each: kElems weights in kBytes; group(b, g) unpacks the g-th 32 weights of the
// block at b. kOffset: whether a group's offset can be non-zero.
struct Q4_0 {
  static constexpr int kElems = 32, kBytes = 18;
  static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int) {
    const float d = f16(b);
    return {nibbles(b + 2), d, d, -8.f * d};
  }
};

struct Q4_1 {
  static constexpr int kElems = 32, kBytes = 20;
  static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int) {
    const float d = f16(b);
    return {nibbles(b + 4), d, d, f16(b + 2)};
  }
};

struct Q5_0 {  // the fifth bit of weight e is bit e of the 32-bit word at byte 2
  static constexpr int kElems = 32, kBytes = 22;
  static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int) {
    const float d = f16(b);
    return {nibbles(b + 6) | bits_as(u32(b + 2), 16), d, d, -16.f * d};
  }
};

struct Q5_1 {
  static constexpr int kElems = 32, kBytes = 24;
  static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int) {
    const float d = f16(b);
    return {nibbles(b + 8) | bits_as(u32(b + 4), 16), d, d, f16(b + 2)};
  }
};

struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34;
  static constexpr bool kSigned = true, kOffset = false, kHalfScales = false;
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int) {
    const float d = f16(b);
    return {load(b + 2), d, d, 0.f};
  }
};

// K-quants: 256 weights in sub-blocks of 32 (q4_K) or 16 (q6_K) with their own scales.
struct Q4_K {
  static constexpr int kElems = 256, kBytes = 144;
  static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int sub) {
    const uint8_t* s = b + 4;  // 8 six-bit scales and 8 six-bit mins in 12 bytes
    const int sc = sub < 4 ? s[sub] & 63 : (s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4);
    const int mn = sub < 4 ? s[sub + 4] & 63 : (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
    const float scale = f16(b) * static_cast<float>(sc);
    // sub-blocks 2i and 2i + 1: the low and high nibbles of the same 32 bytes
    return {field(load(b + 16 + 32 * (sub / 2)), 4 * (sub % 2), 15), scale, scale, -f16(b + 2) * static_cast<float>(mn)};
  }
};

struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210;
  static constexpr bool kSigned = true, kOffset = false, kHalfScales = true;  // a scale per 16 weights
  C10_ALWAYS_INLINE static Group group(const uint8_t* b, int i) {
    // in each half of 128 weights, group g of 32: nibble g / 2 of the (g % 2)-th 32 low bytes,
    // bits 2g, 2g + 1 of the 32 high bytes; one int8 scale per 16 weights
    const int half = i / 4, g = i % 4;
    const Bytes low = field(load(b + 64 * half + 32 * (g % 2)), 4 * (g / 2), 15);
    const Bytes high = field(load(b + 128 + 32 * half), 2 * g, 3);
    const float d = f16(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half + 2 * g;
    return {minus(low | shifted_left(high, 4), 32), d * static_cast<float>(sc[0]), d * static_cast<float>(sc[1]), 0.f};
  }
};

// Group `index` of a row of W's blocks
template <typename F>
C10_ALWAYS_INLINE Group group_of(const uint8_t* row, int64_t index) {
  constexpr int G = F::kElems / kGroup;
  return F::group(row + index / G * F::kBytes, static_cast<int>(index % G));
}

// ---------------------------------------------------------------- x rounded to int8

// The scale d = max |x| / 127 of a group of 32 features of x, as kGroup / kVec vectors.
C10_ALWAYS_INLINE float group_scale(const Vec* x) {
  Vec amax(0.f);
  for (int i = 0; i < kGroup / kVec; ++i) amax = at::vec::maximum(amax, x[i].abs());
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, amax) / 127.f;
}

// Group g of x [*, K] of type T, as floats.
template <typename T>
C10_ALWAYS_INLINE void load_group(const T* x, int64_t g, Vec* out) {
  for (int i = 0; i < kGroup / kVec; ++i) out[i] = cpu::load_float(x + g * kGroup + i * kVec);
}

C10_ALWAYS_INLINE float inverse_of(float d) { return d > 0.f ? 1.f / d : 0.f; }  // a group of zeros stays zero

// Group g of x [*, K] of type T rounded to int8 at q; returns its scale d, and sets `total` to
// the sum of its 32 rounded values.
template <typename T>
C10_ALWAYS_INLINE float round_group(const T* x, int64_t g, int8_t* q, int& total) {
  Vec v[kGroup / kVec];
  load_group(x, g, v);
  const float d = group_scale(v);
  alignas(64) float xg[kGroup];  // the group as floats, for the int8 rounding
  for (int i = 0; i < kGroup / kVec; ++i) v[i].store(xg + i * kVec);
  total = round_to_int8(xg, inverse_of(d), q);
  return d;
}

// x [M, K] rounded in groups of 32 for the fused kernel: q = round(x / d) as int8, and per group,
// repeated in each of its 8 dot-product lanes: d, and d * sum(q) / 8 (the lanes of a group add
// up to its sum of rounded x, which an offset of the weights multiplies). Padded by one group, which
// the wide kernel may read past the last one, times a zero scale.
struct RoundedRows {
  int64_t K, groups;
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> d, s;   // [M, groups, 8]

  template <typename T>
  RoundedRows(const T* x, int64_t M, int64_t K)
      : K(K), groups(K / kGroup), q(M * K + kGroup, 0), d((M * groups + 1) * 8, 0.f), s((M * groups + 1) * 8, 0.f) {
    for (int64_t g = 0; g < M * groups; ++g) {
      int total;
      const float dg = round_group(x, g, q.data() + g * kGroup, total);
      std::fill_n(d.data() + 8 * g, 8, dg);
      std::fill_n(s.data() + 8 * g, 8, dg * static_cast<float>(total) / 8.f);
    }
  }
};

// ---------------------------------------------------------------- the kernels

// y[m, n] = sum_k x[m, k] * W[n, k] for the kRows rows of x, into y [kRows, N] float32.
// On AVX-512 two groups go through each instruction; on AVX2 one.
template <typename F, int kRows>
void fused_rows(const RoundedRows& x, const uint8_t* w, int64_t N, float* y) {
  const int64_t K = x.K, groups = x.groups, row_bytes = K / F::kElems * F::kBytes;
  const int8_t* xq = x.q.data();
  const float* xd = x.d.data();
  const float* xs = x.s.data();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* wn = w + n * row_bytes;
#if defined(CPU_CAPABILITY_AVX512)
    WideFloats acc[kRows], offsets[kRows];
    for (int m = 0; m < kRows; ++m) acc[m] = offsets[m] = wide_zeros();
    // groups `group` and `group + 1` of every row against q, scale and offset: two groups' worth
    auto dot_rows = [&](int64_t group, WideBytes q, WideFloats scale, WideFloats offset) {
      for (int m = 0; m < kRows; ++m) {
        const WideBytes a = load_wide(xq + m * K + group * kGroup);
        const __m512i dot = F::kSigned ? dot_signed(q, a) : dot_unsigned(q, a);
        acc[m] = fmadd(dot, scale, load_wide(xd + (m * groups + group) * 8), acc[m]);
        if (F::kOffset) offsets[m] = fmadd(offset, load_wide(xs + (m * groups + group) * 8), offsets[m]);
      }
    };
    for (int64_t group = 0; group + 1 < groups; group += 2) {
      const Group u = group_of<F>(wn, group), v = group_of<F>(wn, group + 1);
      dot_rows(group, join(u.q, v.q), join(halves(u.lo, u.hi), halves(v.lo, v.hi)),
               join(splat_floats(u.offset), splat_floats(v.offset)));
    }
    if (groups % 2) {  // an odd last group: zero scales in the place of a partner
      const Group u = group_of<F>(wn, groups - 1);
      const Floats zero = splat_floats(0.f);
      dot_rows(groups - 1, join(u.q, u.q), join(halves(u.lo, u.hi), zero), join(splat_floats(u.offset), zero));
    }
    for (int m = 0; m < kRows; ++m) y[m * N + n] = sum(acc[m]) + sum(offsets[m]);
#else
    Floats acc[kRows], offsets[kRows];
    for (int m = 0; m < kRows; ++m) acc[m] = offsets[m] = splat_floats(0.f);
    for (int64_t group = 0; group < groups; ++group) {
      const Group u = group_of<F>(wn, group);
      const Floats scale = halves(u.lo, u.hi), offset = splat_floats(u.offset);
      for (int m = 0; m < kRows; ++m) {
        const Bytes a = load(xq + m * K + group * kGroup);
        const Ints dot = F::kSigned ? dot_signed(u.q, a) : dot_unsigned(u.q, a);
        acc[m] = fmadd(dot, scale, load_floats(xd + (m * groups + group) * 8), acc[m]);
        if (F::kOffset) offsets[m] = fmadd(offset, load_floats(xs + (m * groups + group) * 8), offsets[m]);
      }
    }
    for (int m = 0; m < kRows; ++m) y[m * N + n] = sum(acc[m]) + sum(offsets[m]);
#endif
  }
}

template <typename F>
void fused(const RoundedRows& x, int64_t M, const uint8_t* w, int64_t N, float* y) {
  static_assert(kFusedRows <= 8, "one case per row count");
  switch (M) {
    case 1: return fused_rows<F, 1>(x, w, N, y);
    case 2: return fused_rows<F, 2>(x, w, N, y);
    case 3: return fused_rows<F, 3>(x, w, N, y);
    case 4: return fused_rows<F, 4>(x, w, N, y);
    case 5: return fused_rows<F, 5>(x, w, N, y);
    case 6: return fused_rows<F, 6>(x, w, N, y);
    case 7: return fused_rows<F, 7>(x, w, N, y);
    case 8: return fused_rows<F, 8>(x, w, N, y);
    default: return;  // no rows
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512VNNI__)
// ---------------------------------------------------------------- int8 GEMM (AVX512-VNNI)
// More rows than the fused kernel takes: x is laid out once in tiles of 16 rows, so that one
// 512-bit register holds 4 features of 16 rows and vpdpbusd multiplies it by 4 weights of one
// output feature, broadcast. A strip of kStripCols output features is unpacked from its blocks
// once (into the calling thread's buffer, in L1) and multiplied by every tile of x: W is read
// once per call, and the int8 products run at 64 per instruction (bf16's run at 32).
//
// vpdpbusd multiplies unsigned bytes by signed ones. The 4- and 5-bit formats store their
// weights unsigned: they go in as they are, x signed. A signed format's weights (q8_0, q6_K)
// go in signed, x plus 128 (unsigned), and each group's sum starts at -128 * the sum of its
// weights. Either way each group's integer sum is exact, as in the fused kernel.
constexpr int kStripCols = 8;

// A register of kRows lanes, one row of x each: a tile of 16 rows (zmm), or of 8 (ymm) for a
// batch that fills no more. A lane computes exactly as in the other width, so a row's result
// does not depend on which tile width took it.
template <int kRows>
struct Lanes;
template <>
struct Lanes<16> {
  using Ints = __m512i;
  using Floats = __m512;
  static Ints load(const void* p) { return _mm512_loadu_si512(p); }
  static Ints splat(int32_t v) { return _mm512_set1_epi32(v); }
  static Ints zeros() { return _mm512_setzero_si512(); }
  static Ints dot(Ints acc, Ints u, Ints s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static Floats load_floats(const float* p) { return _mm512_loadu_ps(p); }
  static Floats splat_float(float v) { return _mm512_set1_ps(v); }
  static Floats zero_floats() { return _mm512_setzero_ps(); }
  static Floats to_floats(Ints v) { return _mm512_cvtepi32_ps(v); }
  static Floats mul(Floats a, Floats b) { return _mm512_mul_ps(a, b); }
  static Floats fmadd(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Floats v) { _mm512_storeu_ps(p, v); }
};
template <>
struct Lanes<8> {
  using Ints = __m256i;
  using Floats = __m256;
  static Ints load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static Ints splat(int32_t v) { return _mm256_set1_epi32(v); }
  static Ints zeros() { return _mm256_setzero_si256(); }
  static Ints dot(Ints acc, Ints u, Ints s) { return _mm256_dpbusd_epi32(acc, u, s); }
  static Floats load_floats(const float* p) { return _mm256_loadu_ps(p); }
  static Floats splat_float(float v) { return _mm256_set1_ps(v); }
  static Floats zero_floats() { return _mm256_setzero_ps(); }
  static Floats to_floats(Ints v) { return _mm256_cvtepi32_ps(v); }
  static Floats mul(Floats a, Floats b) { return _mm256_mul_ps(a, b); }
  static Floats fmadd(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Floats v) { _mm256_storeu_ps(p, v); }
};

// x [M, K] rounded in groups of 32, in tiles of `rows` rows: bytes [tile][K / 4][rows][4] (plus
// 128 where `plus_128`), and per [tile][group][rows] its scale d and d * sum(q) (which the
// weights' offsets multiply). Rows past M are zeros with a zero scale.
struct TiledRows {
  int64_t K, groups, rows, tiles;
  std::vector<uint8_t> q;
  std::vector<float> d, s;

  template <typename T>
  TiledRows(const T* x, int64_t M, int64_t K, bool plus_128, int64_t rows)
      : K(K), groups(K / kGroup), rows(rows), tiles((M + rows - 1) / rows), q(tiles * K * rows, plus_128 ? 128 : 0),
        d(tiles * groups * rows, 0.f), s(d.size(), 0.f) {
    const uint32_t flip = plus_128 ? 0x80808080u : 0u;  // q + 128 of each byte: its top bit flipped
#pragma omp parallel for schedule(static) if (M * K >= 1 << 14)
    for (int64_t m = 0; m < M; ++m) {
      const int64_t tile = m / rows, r = m % rows;
      for (int64_t g = 0; g < groups; ++g) {
        int8_t qg[kGroup];
        int total;
        const float dg = round_group(x + m * K, g, qg, total);
        uint32_t quads[kGroup / 4];
        std::memcpy(quads, qg, kGroup);
        uint32_t* out = reinterpret_cast<uint32_t*>(q.data()) + (tile * (K / 4) + g * (kGroup / 4)) * rows + r;
        for (int i = 0; i < kGroup / 4; ++i) out[i * rows] = quads[i] ^ flip;
        const int64_t at = (tile * groups + g) * rows + r;
        d[at] = dg, s[at] = dg * static_cast<float>(total);
      }
    }
  }
};

// kStripCols output features unpacked: their weights as bytes [group][col][32], and per
// [group][col] the scales of the two halves of the group (equal but in q6_K), the offset, and
// (signed formats) the sums' starts: -128 * the sum of each half's weights.
struct Strip {
  std::vector<int32_t> q;
  std::vector<float> lo, hi, offset;
  std::vector<int32_t> start_lo, start_hi;

  void resize(int64_t groups) {
    const int64_t n = groups * kStripCols;
    if (static_cast<int64_t>(lo.size()) >= n) return;
    q.resize(n * kGroup / 4), lo.resize(n), hi.resize(n), offset.resize(n), start_lo.resize(n), start_hi.resize(n);
  }
};

// the sums of bytes 0-15 and 16-31 of q, signed (vpsadbw sums 8 unsigned bytes: q + 128's)
C10_ALWAYS_INLINE void half_sums(Bytes q, int32_t& low, int32_t& high) {
  const __m256i eights = _mm256_sad_epu8(_mm256_xor_si256(q, splat(-128)), _mm256_setzero_si256());
  const __m256i pairs = _mm256_add_epi64(eights, _mm256_unpackhi_epi64(eights, eights));  // 0 + 1, 2 + 3
  low = _mm256_cvtsi256_si32(pairs) - 16 * 128;
  high = _mm_cvtsi128_si32(_mm256_extracti128_si256(pairs, 1)) - 16 * 128;
}

// Columns [n0, n0 + cols) of W into the strip, each row of blocks read in order.
template <typename F>
void unpack_strip(const uint8_t* w, int64_t row_bytes, int64_t groups, int64_t n0, int cols, Strip& strip) {
  for (int c = 0; c < kStripCols; ++c) {
    const uint8_t* row = w + (n0 + c) * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = g * kStripCols + c;
      int32_t* quads = strip.q.data() + i * 8;
      if (c >= cols) {  // past N: weights of zero
        std::fill_n(quads, 8, 0);
        strip.lo[i] = strip.hi[i] = strip.offset[i] = 0.f;
        strip.start_lo[i] = strip.start_hi[i] = 0;
        continue;
      }
      const Group u = group_of<F>(row, g);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(quads), u.q);
      strip.lo[i] = u.lo, strip.hi[i] = u.hi, strip.offset[i] = u.offset;
      if (F::kSigned) {
        int32_t low, high;
        half_sums(u.q, low, high);
        strip.start_lo[i] = -128 * (F::kHalfScales ? low : low + high);
        strip.start_hi[i] = -128 * high;
      }
    }
  }
}

// Quads [kFirst, kFirst + kCount) of one group: the tile's rows (xq: the group's 8 quads of
// kRows rows) times the strip's columns (wq: the group's [kStripCols][8] quads), from sums
// started at `start` (signed formats), then times d_x * scale into acc.
template <int kRows, bool kSigned, int kFirst, int kCount>
C10_ALWAYS_INLINE void group_product(const uint8_t* xq, const int32_t* wq, const int32_t* start, const float* scale,
                                     typename Lanes<kRows>::Floats dx,
                                     typename Lanes<kRows>::Floats (&acc)[kStripCols]) {
  using L = Lanes<kRows>;
  typename L::Ints sums[kStripCols];
#pragma GCC unroll 8
  for (int c = 0; c < kStripCols; ++c) sums[c] = kSigned ? L::splat(start[c]) : L::zeros();
#pragma GCC unroll 8
  for (int k = kFirst; k < kFirst + kCount; ++k) {
    const typename L::Ints xv = L::load(xq + k * kRows * 4);
#pragma GCC unroll 8
    for (int c = 0; c < kStripCols; ++c) {
      const typename L::Ints wv = L::splat(wq[c * 8 + k]);
      sums[c] = kSigned ? L::dot(sums[c], xv, wv) : L::dot(sums[c], wv, xv);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < kStripCols; ++c) {
    acc[c] = L::fmadd(L::to_floats(sums[c]), L::mul(dx, L::splat_float(scale[c])), acc[c]);
  }
}

// out[c][r] = row r of the tile times strip column c, for kStripCols columns and kRows rows
template <typename F, int kRows>
void tile_times_strip(const TiledRows& x, int64_t tile, const Strip& strip, float* out) {
  using L = Lanes<kRows>;
  const int64_t groups = x.groups;
  const uint8_t* xq = x.q.data() + tile * (x.K / 4) * kRows * 4;
  const int64_t rows = tile * groups * kRows;
  typename L::Floats acc[kStripCols];
#pragma GCC unroll 8
  for (int c = 0; c < kStripCols; ++c) acc[c] = L::zero_floats();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* xg = xq + g * 8 * kRows * 4;
    const int32_t* wg = strip.q.data() + g * 8 * kStripCols;
    const int64_t i = g * kStripCols, at = rows + g * kRows;
    const typename L::Floats dx = L::load_floats(x.d.data() + at);
    if (F::kHalfScales) {
      group_product<kRows, F::kSigned, 0, 4>(xg, wg, strip.start_lo.data() + i, strip.lo.data() + i, dx, acc);
      group_product<kRows, F::kSigned, 4, 4>(xg, wg, strip.start_hi.data() + i, strip.hi.data() + i, dx, acc);
    } else {
      group_product<kRows, F::kSigned, 0, 8>(xg, wg, strip.start_lo.data() + i, strip.lo.data() + i, dx, acc);
    }
    if (F::kOffset) {
      const typename L::Floats sx = L::load_floats(x.s.data() + at);
#pragma GCC unroll 8
      for (int c = 0; c < kStripCols; ++c) acc[c] = L::fmadd(sx, L::splat_float(strip.offset[i + c]), acc[c]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < kStripCols; ++c) L::store(out + c * kRows, acc[c]);
}

// 8 floats stored as T (rounded to nearest even, as static_cast does)
C10_ALWAYS_INLINE void store_columns(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
C10_ALWAYS_INLINE void store_columns(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
C10_ALWAYS_INLINE void store_columns(at::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(v)));
}

// y [M, N] of type T = x @ W.T through the int8 tiles
template <typename F, int kRows, typename T>
void int8_gemm(const TiledRows& x, int64_t M, const uint8_t* w, int64_t N, T* y) {
  const int64_t groups = x.groups, row_bytes = x.K / F::kElems * F::kBytes;
  const int64_t strips = (N + kStripCols - 1) / kStripCols;
#pragma omp parallel
  {
    thread_local Strip strip;
    strip.resize(groups);
    alignas(64) float out[kStripCols * kRows];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < strips; ++i) {
      const int64_t n0 = i * kStripCols;
      const int cols = static_cast<int>(std::min<int64_t>(kStripCols, N - n0));
      unpack_strip<F>(w, row_bytes, groups, n0, cols, strip);
      for (int64_t tile = 0; tile < x.tiles; ++tile) {
        tile_times_strip<F, kRows>(x, tile, strip, out);
        const int64_t rows = std::min<int64_t>(kRows, M - tile * kRows);
        for (int64_t r = 0; r < rows; ++r) {
          T* yr = y + (tile * kRows + r) * N + n0;
          if (cols == kStripCols) {  // column c of row r is at out[c * kRows + r]
            store_columns(yr, _mm256_i32gather_ps(out + r, _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                                               _mm256_set1_epi32(kRows)), 4));
          } else {
            for (int c = 0; c < cols; ++c) yr[c] = static_cast<T>(out[c * kRows + r]);
          }
        }
      }
    }
  }
}

// y [M, N] = x @ W.T for x [M, K] past the fused kernel's rows, in x's dtype: tiles of 8 rows
// for a batch that fills no more, else of 16
template <typename F>
at::Tensor many_rows(const at::Tensor& x, const uint8_t* w, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  TTSEARCH_DISPATCH_FLOAT_TYPES(x.scalar_type(), "quantized_linear", [&] {
    if (M <= 8) {
      int8_gemm<F, 8>(TiledRows(x.data_ptr<scalar_t>(), M, K, F::kSigned, 8), M, w, N, y.data_ptr<scalar_t>());
    } else {
      int8_gemm<F, 16>(TiledRows(x.data_ptr<scalar_t>(), M, K, F::kSigned, 16), M, w, N, y.data_ptr<scalar_t>());
    }
  });
  return y;
}
#else
// ---------------------------------------------------------------- dequantize, then ATen's GEMM (other levels)
// Output features dequantized at a time for the GEMM: 4 MB of them (a small model's whole
// matrix, a slice of a vocabulary-sized one), which stay in the last-level cache for the GEMM.
constexpr int64_t kPanelBytes = 4 << 20;
constexpr int64_t kMinPanelRows = 64;

// x [M, K] of type T rounded, as values d * q of type T (for the GEMM).
template <typename T>
void round_values(const T* x, int64_t M, int64_t K, T* out) {
  for (int64_t g = 0; g < M * K / kGroup; ++g) {
    Vec v[kGroup / kVec];
    load_group(x, g, v);
    const float dg = group_scale(v);
    const Vec d(dg), inverse(inverse_of(dg));
    for (int i = 0; i < kGroup / kVec; ++i) {  // round(): to nearest, ties to even
      cpu::store_float(out + g * kGroup + i * kVec, (v[i] * inverse).round() * d);
    }
  }
}

// A buffer of at least `bytes`, kept for the calling thread's next call: a fresh one each call
// would be zeroed page by page by the kernel, which cost more than the dequantizing it holds.
inline uint8_t* scratch(int64_t bytes) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  return buffer.data_ptr<uint8_t>();
}

// 32 dequantized weights, lo * q + offset then hi * q + offset, stored at o as T
template <bool kSigned, typename T>
C10_ALWAYS_INLINE void store_group(T* o, const Bytes& q, float lo, float hi, float offset) {
  for (int i = 0; i < kGroup / kVec; ++i) {
    cpu::store_float(o + i * kVec, at::vec::fmadd(Vec(i * kVec < kGroup / 2 ? lo : hi), to_floats<kSigned>(q, i), Vec(offset)));
  }
}

// W's rows [n0, n0 + count) dequantized into out [count, K] of type T.
template <typename F, typename T>
void dequantize_rows(const uint8_t* w, int64_t K, int64_t n0, int64_t count, T* out) {
  const int64_t row_bytes = K / F::kElems * F::kBytes;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < count; ++n) {
    for (int64_t group = 0; group < K / kGroup; ++group) {
      const Group u = group_of<F>(w + (n0 + n) * row_bytes, group);
      store_group<F::kSigned>(out + n * K + group * kGroup, u.q, u.lo, u.hi, u.offset);
    }
  }
}


// y [M, N] = x @ W.T for x [M, K] past the fused kernel's rows, in x's dtype
template <typename F>
at::Tensor many_rows(const at::Tensor& x, const uint8_t* w, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xr = at::empty({M, K}, x.options());
  const int64_t panel_rows = std::min(N, std::max<int64_t>(kMinPanelRows, kPanelBytes / (K * x.element_size())));
  TTSEARCH_DISPATCH_FLOAT_TYPES(x.scalar_type(), "quantized_linear", [&] {
    round_values(x.data_ptr<scalar_t>(), M, K, xr.data_ptr<scalar_t>());
    scalar_t* panel = reinterpret_cast<scalar_t*>(scratch(panel_rows * K * x.element_size()));
    for (int64_t n0 = 0; n0 < N; n0 += panel_rows) {
      const int64_t count = std::min(panel_rows, N - n0);
      dequantize_rows<F, scalar_t>(w, K, n0, count, panel);
      at::Tensor out = y.narrow(1, n0, count);
      at::mm_out(out, xr, at::from_blob(panel, {count, K}, x.options()).t());
    }
  });
  return y;
}
#endif

template <typename F>
at::Tensor linear(const at::Tensor& x, const at::Tensor& blocks) {
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const at::Tensor xc = x.contiguous();
  if (M <= kFusedRows) {
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    TTSEARCH_DISPATCH_FLOAT_TYPES(x.scalar_type(), "quantized_linear", [&] {
      fused<F>(RoundedRows(xc.data_ptr<scalar_t>(), M, K), M, w, N, y.data_ptr<float>());
    });
    return y.to(x.scalar_type());
  }
  return many_rows<F>(xc, w, N);
}

}  // namespace

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& blocks, c10::string_view qtype) {
  if (qtype == "q4_0") return linear<Q4_0>(x, blocks);
  if (qtype == "q4_1") return linear<Q4_1>(x, blocks);
  if (qtype == "q5_0") return linear<Q5_0>(x, blocks);
  if (qtype == "q5_1") return linear<Q5_1>(x, blocks);
  if (qtype == "q8_0") return linear<Q8_0>(x, blocks);
  if (qtype == "q4_K") return linear<Q4_K>(x, blocks);
  if (qtype == "q6_K") return linear<Q6_K>(x, blocks);
  TORCH_CHECK(false, "quantized_linear: unknown format ", qtype);
}

}  // namespace ttsearch
