// y = x W^T straight from GGUF blocks (W kept packed: [N rows, K/block_size blocks]), for the
// few rows of a decode step, and whole-row dequantization for the tiles a prefill multiplies
// with the BLAS.
//
// Matmul: each thread takes a contiguous range of W's rows. Per row, the packed values are
// dequantized 256 at a time (one K-quant super-block, or 8 small blocks) into a 1 KB stack
// buffer that stays in L1, and each of the M <= 16 x rows FMAs against it into its own fp32
// vector accumulator (compile-time M: the accumulators live in registers). The weights are
// read from memory once per step whatever M is; x (M x K, at most 16 x 5K fp32) stays in L2.
// fp32 accumulation; the sum order (lane-wise partial sums over K, then a horizontal sum)
// differs from the BLAS's, so results equal the dequantized path within fp32 rounding.
//
// On AMX CPUs, bf16 x of up to 256 rows (decode steps of many sequences) takes the tile path
// instead (docpipe_qmatmul_amx, below): W rounded to bf16, products on the tile unit.
//
// Dequantized values are bit-equal to models/gguf.py (and so gguf.quants.dequantize): every
// d * scale * q product is exact in fp32 and the one subtraction (or addition) of the min
// rounds once, whether or not the compiler fuses it into an FMA.
#include "common.h"

#include <omp.h>

#include <type_traits>

namespace {

// ggml type ids (models/gguf.py TENSOR_FORMATS).
enum : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q4_K = 12, Q5_K = 13,
             Q6_K = 14 };

struct Format {
  int block_size, type_size;
};

constexpr Format format(int type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q2_K: return {256, 84};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

// f(std::integral_constant<int, TYPE>{}) for the ggml type id `type`: one switch for every
// kernel templated on the type. Unknown types call nothing.
template <class F>
inline void with_type(int type, F&& f) {
  switch (type) {
    case Q4_0: return f(std::integral_constant<int, Q4_0>{});
    case Q4_1: return f(std::integral_constant<int, Q4_1>{});
    case Q5_0: return f(std::integral_constant<int, Q5_0>{});
    case Q5_1: return f(std::integral_constant<int, Q5_1>{});
    case Q8_0: return f(std::integral_constant<int, Q8_0>{});
    case Q2_K: return f(std::integral_constant<int, Q2_K>{});
    case Q4_K: return f(std::integral_constant<int, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int, Q6_K>{});
    default: return;
  }
}

// IEEE half -> float (normals, denormals, inf/NaN), branch-light and exact.
inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * (1.0f / 16777216.0f);  // mant * 2^-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline void dequant_q8_0(const uint8_t* b, float* out) {
  const float d = half(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(q[i]);
}

inline void dequant_q4_0(const uint8_t* b, float* out) {
  const float d = half(b);
  const uint8_t* q = b + 2;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * static_cast<float>((q[i] & 15) - 8);
    out[i + 16] = d * static_cast<float>((q[i] >> 4) - 8);
  }
}

inline void dequant_q4_1(const uint8_t* b, float* out) {
  const float d = half(b), m = half(b + 2);
  const uint8_t* q = b + 4;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * static_cast<float>(q[i] & 15) + m;
    out[i + 16] = d * static_cast<float>(q[i] >> 4) + m;
  }
}

// Q5_0 / Q5_1: u32 of fifth bits (bit j for element j) at `qh`, then 16 bytes of nibbles.
inline void five_bits(const uint8_t* qh_at, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_at, 4);
  const uint8_t* qs = qh_at + 4;
  for (int i = 0; i < 16; ++i) {
    q[i] = (qs[i] & 15) | (((qh >> i) & 1) << 4);
    q[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
  }
}

inline void dequant_q5_0(const uint8_t* b, float* out) {
  const float d = half(b);
  int q[32];
  five_bits(b + 2, q);
  for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(q[i] - 16);
}

inline void dequant_q5_1(const uint8_t* b, float* out) {
  const float d = half(b), m = half(b + 2);
  int q[32];
  five_bits(b + 4, q);
  for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(q[i]) + m;
}

// Q4_K / Q5_K: 12 bytes at p -> 6-bit scale and min of sub-block s.
inline void k_scale_min(const uint8_t* p, int s, int* sc, int* mn) {
  if (s < 4) {
    *sc = p[s] & 63;
    *mn = p[s + 4] & 63;
  } else {
    *sc = (p[s + 4] & 15) | ((p[s - 4] >> 6) << 4);
    *mn = (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
  }
}

inline void dequant_q4_k(const uint8_t* b, float* out) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* qs = b + 16;
  for (int s = 0; s < 8; ++s) {
    int sc, mn;
    k_scale_min(b + 4, s, &sc, &mn);
    const float a = d * static_cast<float>(sc), c = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int l = 0; l < 32; ++l) out[32 * s + l] = a * static_cast<float>((q[l] >> shift) & 15) - c;
  }
}

inline void dequant_q5_k(const uint8_t* b, float* out) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t *qh = b + 16, *qs = b + 48;
  for (int s = 0; s < 8; ++s) {
    int sc, mn;
    k_scale_min(b + 4, s, &sc, &mn);
    const float a = d * static_cast<float>(sc), c = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 15) + 16 * ((qh[l] >> s) & 1);
      out[32 * s + l] = a * static_cast<float>(v) - c;
    }
  }
}

inline void dequant_q6_k(const uint8_t* b, float* out) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 4; ++k) {
      const uint8_t* lo = ql + 64 * h + 32 * (k % 2);
      const uint8_t* hi = qh + 32 * h;
      const int base = 128 * h + 32 * k;
      const float a0 = d * static_cast<float>(sc[base / 16]);
      const float a1 = d * static_cast<float>(sc[base / 16 + 1]);
      for (int l = 0; l < 32; ++l) {
        const int v = (((lo[l] >> (4 * (k / 2))) & 15) | (((hi[l] >> (2 * k)) & 3) << 4)) - 32;
        out[base + l] = (l < 16 ? a0 : a1) * static_cast<float>(v);
      }
    }
}

inline void dequant_q2_k(const uint8_t* b, float* out) {
  const uint8_t *sc = b, *qs = b + 16;
  const float d = half(b + 80), dmin = half(b + 82);
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      const int base = 128 * h + 32 * j;
      for (int l = 0; l < 32; ++l) {
        const int s = (base + l) / 16;
        const float a = d * static_cast<float>(sc[s] & 15), c = dmin * static_cast<float>(sc[s] >> 4);
        out[base + l] = a * static_cast<float>((qs[32 * h + l] >> (2 * j)) & 3) - c;
      }
    }
}

#if defined(DOCPIPE_AVX2) && defined(__F16C__)
// AVX2 dequantizers, bit-equal to the scalar ones above: the same exact products, and the
// one rounding of the min's addition is the FMA's. They serve the AVX-512 build too (its
// inner loop reads their output from L1); Q2_K keeps the scalar one.
#define DOCPIPE_SIMD_DEQUANT 1

inline float half_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 8 bytes (the low 8 of v) as 8 fp32 lanes: unsigned or signed.
inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline __m128i hi8(__m128i v) { return _mm_srli_si128(v, 8); }

// Where the SIMD dequantizers put a block's groups of 32 values (q: 32 bytes of quants, value
// i of the group at out + i). F32Out writes fp32; Bf16Out (AVX-512 BF16) rounds the same
// fp32 values to bf16 in registers (nearest even, as torch's .to(bfloat16)).
//   affine(q, a, c):       a * q + c, q unsigned (exact product, one rounding)
//   centered(q, o, d0, d1): (q - o) * d, q unsigned, d0 for values 0-15 and d1 for 16-31
//   signed8(q, d):          q * d, q signed bytes
struct F32Out {
  float* out;
  F32Out at(int i) const { return {out + i}; }
  void affine(__m256i q, float a, float c) const {
    const __m256 av = _mm256_set1_ps(a), cv = _mm256_set1_ps(c);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(out, _mm256_fmadd_ps(u8x8(lo), av, cv));
    _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(u8x8(hi8(lo)), av, cv));
    _mm256_storeu_ps(out + 16, _mm256_fmadd_ps(u8x8(hi), av, cv));
    _mm256_storeu_ps(out + 24, _mm256_fmadd_ps(u8x8(hi8(hi)), av, cv));
  }
  void centered(__m256i q, int offset, float d0, float d1) const {
    const __m256i o = _mm256_set1_epi32(offset);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, hi8(lo), hi, hi8(hi)};
    for (int i = 0; i < 4; ++i)
      _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[i]), o)),
          _mm256_set1_ps(i < 2 ? d0 : d1)));
  }
  void signed8(__m256i q, float d) const {
    const __m256 dv = _mm256_set1_ps(d);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(out, _mm256_mul_ps(i8x8(lo), dv));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(i8x8(hi8(lo)), dv));
    _mm256_storeu_ps(out + 16, _mm256_mul_ps(i8x8(hi), dv));
    _mm256_storeu_ps(out + 24, _mm256_mul_ps(i8x8(hi8(hi)), dv));
  }
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DOCPIPE_BF16_DEQUANT 1
struct Bf16Out {
  uint16_t* out;
  Bf16Out at(int i) const { return {out + i}; }
  void put(__m512 lo, __m512 hi) const {  // values 0-15, 16-31
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  static __m512 u8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
  void affine(__m256i q, float a, float c) const {
    const __m512 av = _mm512_set1_ps(a), cv = _mm512_set1_ps(c);
    put(_mm512_fmadd_ps(u8x16(_mm256_castsi256_si128(q)), av, cv),
        _mm512_fmadd_ps(u8x16(_mm256_extracti128_si256(q, 1)), av, cv));
  }
  void centered(__m256i q, int offset, float d0, float d1) const {
    const __m512i o = _mm512_set1_epi32(offset);
    const auto part = [&](__m128i v, float d) {
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(v), o)),
                           _mm512_set1_ps(d));
    };
    put(part(_mm256_castsi256_si128(q), d0), part(_mm256_extracti128_si256(q, 1), d1));
  }
  void signed8(__m256i q, float d) const {
    const __m512 dv = _mm512_set1_ps(d);
    put(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), dv),
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), dv));
  }
};
#endif

// The 16 nibble bytes at q: low nibbles (values 0..15) then high nibbles (16..31).
inline __m256i nibbles32(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// Q5_0/Q5_1's fifth bits (u32 at qh_at) as bytes of 16 or 0, element j in byte j.
inline __m256i fifth_bits32(const uint8_t* qh_at) {
  uint32_t qh;
  std::memcpy(&qh, qh_at, 4);
  // byte j takes byte j/8 of qh, then tests bit j%8
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(qh)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

// q with 16 added to byte j where bit j of the u32 at qh_at is set (Q5_0/Q5_1's fifth bits):
// one masked add with AVX-512 BW/VL (q < 16: the same as an OR), else the byte spread above.
inline __m256i with_fifth_bits(__m256i q, const uint8_t* qh_at) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  uint32_t qh;
  std::memcpy(&qh, qh_at, 4);
  return _mm256_mask_add_epi8(q, static_cast<__mmask32>(qh), q, _mm256_set1_epi8(16));
#else
  return _mm256_or_si256(q, fifth_bits32(qh_at));
#endif
}

template <class Out>
inline void simd_q8_0(const uint8_t* b, Out out) {
  out.signed8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), half_f16c(b));
}

// Q4_0 / Q5_0: d * (q - offset); q - offset is exact in int, as in the scalar code.
template <class Out>
inline void simd_q4_0(const uint8_t* b, Out out) {
  const float d = half_f16c(b);
  out.centered(nibbles32(b + 2), 8, d, d);
}

template <class Out>
inline void simd_q4_1(const uint8_t* b, Out out) {
  out.affine(nibbles32(b + 4), half_f16c(b), half_f16c(b + 2));
}

template <class Out>
inline void simd_q5_0(const uint8_t* b, Out out) {
  const float d = half_f16c(b);
  out.centered(with_fifth_bits(nibbles32(b + 6), b + 2), 16, d, d);
}

template <class Out>
inline void simd_q5_1(const uint8_t* b, Out out) {
  out.affine(with_fifth_bits(nibbles32(b + 8), b + 4), half_f16c(b),
             half_f16c(b + 2));
}

// Q4_K / Q5_K: sub-block s is a * q - c, with q the low or high nibbles of 32 bytes.
template <class Out>
inline void simd_q45_k(const uint8_t* b, bool five, Out out) {
  const float d = half_f16c(b), dmin = half_f16c(b + 2);
  const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
  const __m256i m15 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
  const __m256i high = five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh))
                            : _mm256_setzero_si256();
  for (int s = 0; s < 8; ++s) {
    int sc, mn;
    k_scale_min(b + 4, s, &sc, &mn);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (s / 2)));
    __m256i q = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (s % 2)), m15);
    if (five)  // + 16 * bit s of qh[l]
      q = _mm256_add_epi8(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, s), one), 4));
    out.at(32 * s).affine(q, d * static_cast<float>(sc), -(dmin * static_cast<float>(mn)));
  }
}

template <class Out>
inline void simd_q6_k(const uint8_t* b, Out out) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_f16c(b + 208);
  const __m256i m15 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
    for (int k = 0; k < 4; ++k) {
      const __m256i lo = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(ql + 64 * h + 32 * (k % 2)));
      const __m256i q = _mm256_or_si256(
          _mm256_and_si256(_mm256_srli_epi16(lo, 4 * (k / 2)), m15),
          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), m3), 4));
      const int base = 128 * h + 32 * k;
      out.at(base).centered(q, 32, d * static_cast<float>(sc[base / 16]),
                            d * static_cast<float>(sc[base / 16 + 1]));
    }
  }
}

// One block of TYPE through its SIMD dequantizer into out (Q2_K has none: callers use the
// scalar one).
template <int TYPE, class Out>
inline void simd_block(const uint8_t* b, Out out) {
  if constexpr (TYPE == Q4_0) simd_q4_0(b, out);
  else if constexpr (TYPE == Q4_1) simd_q4_1(b, out);
  else if constexpr (TYPE == Q5_0) simd_q5_0(b, out);
  else if constexpr (TYPE == Q5_1) simd_q5_1(b, out);
  else if constexpr (TYPE == Q8_0) simd_q8_0(b, out);
  else if constexpr (TYPE == Q4_K) simd_q45_k(b, false, out);
  else if constexpr (TYPE == Q5_K) simd_q45_k(b, true, out);
  else if constexpr (TYPE == Q6_K) simd_q6_k(b, out);
}
#endif  // DOCPIPE_AVX2 && __F16C__

// `count` values (whole blocks) of a row starting at value `first`, into out.
template <int TYPE>
inline void dequant_span(const uint8_t* row, int64_t first, int count, float* out) {
  constexpr Format f = format(TYPE);
  const uint8_t* b = row + (first / f.block_size) * f.type_size;
  for (int i = 0; i < count; i += f.block_size, b += f.type_size) {
#ifdef DOCPIPE_SIMD_DEQUANT
    if constexpr (TYPE == Q2_K) dequant_q2_k(b, out + i);
    else simd_block<TYPE>(b, F32Out{out + i});
    continue;
#endif
    if constexpr (TYPE == Q4_0) dequant_q4_0(b, out + i);
    else if constexpr (TYPE == Q4_1) dequant_q4_1(b, out + i);
    else if constexpr (TYPE == Q5_0) dequant_q5_0(b, out + i);
    else if constexpr (TYPE == Q5_1) dequant_q5_1(b, out + i);
    else if constexpr (TYPE == Q8_0) dequant_q8_0(b, out + i);
    else if constexpr (TYPE == Q2_K) dequant_q2_k(b, out + i);
    else if constexpr (TYPE == Q4_K) dequant_q4_k(b, out + i);
    else if constexpr (TYPE == Q5_K) dequant_q5_k(b, out + i);
    else dequant_q6_k(b, out + i);
  }
}

#ifdef DOCPIPE_BF16_DEQUANT
// W row `row` (k values) as bf16 into out: the SIMD dequantizers' values, rounded in registers.
template <int TYPE>
inline void dequant_row_bf16(const uint8_t* row, int64_t k, uint16_t* out) {
  constexpr Format f = format(TYPE);
  const uint8_t* b = row;
  for (int64_t i = 0; i < k; i += f.block_size, b += f.type_size) {
    const Bf16Out o{out + i};
    if constexpr (TYPE != Q2_K) {
      simd_block<TYPE>(b, o);
    } else {  // Q2_K: the scalar dequantizer, then rounded
      alignas(64) float buf[256];
      dequant_q2_k(b, buf);
      for (int j = 0; j < 256; j += 32)
        o.at(j).put(_mm512_load_ps(buf + j), _mm512_load_ps(buf + j + 16));
    }
  }
}
#endif  // DOCPIPE_BF16_DEQUANT

constexpr int kChunk = 256;  // values dequantized at a time (a multiple of every block size)
constexpr int kMaxRows = 16;

// Portable vector of W lanes for machines without AVX2 (the compiler vectorises what it can).
struct VecScalar {
  static constexpr int W = 8;
  struct V {
    float v[8];
  };
  static V zero() { return V{}; }
  template <typename T>
  static V load(const T* p) {
    V r;
    for (int i = 0; i < 8; ++i) r.v[i] = ::load(p, i);
    return r;
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static float hsum(V x) {
    float s = 0;
    for (int i = 0; i < 8; ++i) s += x.v[i];
    return s;
  }
};

#if defined(__AVX512F__)
using Vec = Vec16;
constexpr int kPath = 2;
#elif defined(DOCPIPE_AVX2)
using Vec = Vec8;
constexpr int kPath = 1;
#else
using Vec = VecScalar;
constexpr int kPath = 0;
#endif

// y[r, j] for rows j in [j0, j1) of W, all M rows of x.
template <int TYPE, int M, typename T>
void matmul_rows(const uint8_t* w, int64_t row_bytes, int64_t k, const T* x, int64_t ldx, T* y,
                 int64_t ldy, int64_t j0, int64_t j1) {
  alignas(64) float buf[kChunk];
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = w + j * row_bytes;
    typename Vec::V acc[M];
    for (int r = 0; r < M; ++r) acc[r] = Vec::zero();
    for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
      const int count = static_cast<int>(k - k0 < kChunk ? k - k0 : kChunk);
      dequant_span<TYPE>(row, k0, count, buf);
      for (int i = 0; i < count; i += Vec::W) {
        const typename Vec::V wv = Vec::load(buf + i);
        for (int r = 0; r < M; ++r) acc[r] = Vec::fma(wv, Vec::load(x + r * ldx + k0 + i), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) store(y, r * ldy + j, Vec::hsum(acc[r]));
  }
}

template <int TYPE, typename T>
void matmul_type(int64_t m, const uint8_t* w, int64_t row_bytes, int64_t k, const T* x,
                 int64_t ldx, T* y, int64_t ldy, int64_t j0, int64_t j1) {
  switch (m) {
#define DOCPIPE_M(n) \
  case n: return matmul_rows<TYPE, n>(w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    DOCPIPE_M(1) DOCPIPE_M(2) DOCPIPE_M(3) DOCPIPE_M(4) DOCPIPE_M(5) DOCPIPE_M(6) DOCPIPE_M(7)
    DOCPIPE_M(8) DOCPIPE_M(9) DOCPIPE_M(10) DOCPIPE_M(11) DOCPIPE_M(12) DOCPIPE_M(13)
    DOCPIPE_M(14) DOCPIPE_M(15) DOCPIPE_M(16)
#undef DOCPIPE_M
    default: return;
  }
}

template <typename T>
void matmul_dispatch(int type, int64_t m, const uint8_t* w, int64_t row_bytes, int64_t k,
                     const T* x, int64_t ldx, T* y, int64_t ldy, int64_t j0, int64_t j1) {
  with_type(type, [&](auto t) { matmul_type<t()>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1); });
}

template <typename T>
void dequant_dispatch(int type, const uint8_t* row, int64_t k, T* out) {
#ifdef DOCPIPE_BF16_DEQUANT
  if constexpr (std::is_same<T, uint16_t>::value) {  // rounded in registers
    with_type(type, [&](auto t) { dequant_row_bf16<t()>(row, k, out); });
    return;
  }
#endif
  with_type(type, [&](auto t) {
    alignas(64) float buf[kChunk];
    for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
      const int count = static_cast<int>(k - k0 < kChunk ? k - k0 : kChunk);
      float* dst = std::is_same<T, float>::value ? reinterpret_cast<float*>(out) + k0 : buf;
      dequant_span<t()>(row, k0, count, dst);
      if (!std::is_same<T, float>::value)
        for (int i = 0; i < count; ++i) store(out, k0 + i, buf[i]);
    }
  });
}

// Rows [j0, j1) of `n` for thread t of nt, in whole groups of `group` rows (4: cache lines of
// y; the AMX path: its blocks of 32).
inline void thread_rows(int64_t n, int t, int nt, int64_t* j0, int64_t* j1, int64_t group = 4) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
  *j0 = g0 * group < n ? g0 * group : n;
  *j1 = g1 * group < n ? g1 * group : n;
}

#ifdef DOCPIPE_AMX
// AMX path for bf16 x of up to kAmxMaxRows rows (decode steps of many sequences): the products
// run on the tile unit instead of one FMA per weight and row. Each thread takes whole blocks
// of 32 W rows. A block's rows are dequantized (the same fp32 values as above) and rounded to
// bf16 (round to nearest even, as torch's .to(bfloat16)) into a 32 x K buffer in L1/L2: the
// A operand of two tiles, read in place. x is packed once per call into B tiles (pairs of k
// of 16 rows per 64-byte tile row, zero past m), shared by the threads. C^T = W x^T is
// accumulated over K in fp32 tiles, 2 W tiles x 2 x tiles at a time, then transposed into y.
// So y equals x @ W.to(bf16)^T in fp32 accumulation (the BLAS path's values), W is read from
// memory once per call, and a row's value does not depend on m.
constexpr int kAmxMaxRows = 256;
constexpr int kAmxBlock = 32;  // W rows per block: two A tiles

// Lane i holds i * step (gather offsets).
inline __m512i lane_offsets(int step) {
  return _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(step));
}

// xb[(mb * k/2 + kp) * 16 + r] = the bf16 pair kp of x row 16 mb + r (0 for rows >= m), for
// this thread's share of every mb's pairs.
inline void pack_x_tiles(const uint16_t* x, int64_t ldx, int64_t m, int64_t k, uint32_t* xb,
                         int t, int nt) {
  const int64_t blocks = (m + 15) / 16, pairs = k / 2;
  const int64_t p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;
  const __m512i offsets = lane_offsets(static_cast<int>(ldx * 2));  // bytes between x rows
  for (int64_t mb = 0; mb < blocks; ++mb) {
    const int64_t rows = m - 16 * mb < 16 ? m - 16 * mb : 16;
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    const uint8_t* base = reinterpret_cast<const uint8_t*>(x + 16 * mb * ldx);
    for (int64_t kp = p0; kp < p1; ++kp)
      _mm512_storeu_si512(xb + (mb * pairs + kp) * 16,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets,
                                                      base + 4 * kp, 1));
  }
}

// The C^T tile in c (16 W rows x 16 x rows, fp32, row stride 16) into y[m0 + j, n0 + i] for
// j < mrows, i < nrows, rounded to bf16.
inline void store_transposed(const float* c, uint16_t* y, int64_t ldy, int64_t m0, int mrows,
                             int64_t n0, int nrows) {
  const __m512i down = lane_offsets(16);
  const __mmask16 live = static_cast<__mmask16>((1u << nrows) - 1);
  for (int j = 0; j < mrows; ++j) {
    const __m512 v = _mm512_i32gather_ps(down, c + j, 4);
    _mm256_mask_storeu_epi16(y + (m0 + j) * ldy + n0, live, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// Rows [r0, r1) of the W block starting at row n0 (of those before j1) as bf16 into wb (32 x k);
// rows past j1 are zeros.
template <int TYPE>
inline void dequant_block_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t n0,
                               int64_t j1, int r0, int r1, uint16_t* wb) {
  for (int r = r0; r < r1; ++r) {
    if (n0 + r < j1) dequant_row_bf16<TYPE>(w + (n0 + r) * row_bytes, k, wb + r * k);
    else std::memset(wb + r * k, 0, k * 2);
  }
}

// y rows [0, m) x columns [j0, j1) (W rows), in blocks of 32 W rows; wb: 2 x 32 x k scratch.
// The next block's rows are dequantized (vector units) between the current block's first
// tile products (tile unit), so the two overlap.
template <int TYPE>
void amx_rows(const uint8_t* w, int64_t row_bytes, int64_t k, const uint32_t* xb, int64_t m,
              uint16_t* y, int64_t ldy, int64_t j0, int64_t j1, uint16_t* wb) {
  alignas(64) float c[16 * 16];
  const int64_t blocks = (m + 15) / 16, pairs = k / 2, stride = k * 2, steps = k / 32;
  if (j0 >= j1) return;
  dequant_block_rows<TYPE>(w, row_bytes, k, j0, j1, 0, kAmxBlock, wb);
  int buf = 0;
  for (int64_t n0 = j0; n0 < j1; n0 += kAmxBlock, buf ^= 1) {
    const uint16_t* a = wb + buf * kAmxBlock * k;
    uint16_t* next = wb + (buf ^ 1) * kAmxBlock * k;
    const bool more = n0 + kAmxBlock < j1;
    const int rows = static_cast<int>(j1 - n0 < kAmxBlock ? j1 - n0 : kAmxBlock);
    const int lo = rows < 16 ? rows : 16, hi = rows - lo;
    for (int64_t mb = 0; mb < blocks; mb += 2) {
      const bool two = mb + 1 < blocks;
      const uint32_t* b0 = xb + mb * pairs * 16;
      const uint32_t* b1 = b0 + pairs * 16;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t k0 = 32 * s;
        _tile_loadd(4, a + k0, stride);
        _tile_loadd(5, a + 16 * k + k0, stride);
        _tile_loadd(6, b0 + k0 / 2 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_loadd(7, b1 + k0 / 2 * 16, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
        if (mb == 0 && more)  // this step's share of the next block's rows
          dequant_block_rows<TYPE>(w, row_bytes, k, n0 + kAmxBlock, j1,
                                   static_cast<int>(kAmxBlock * s / steps),
                                   static_cast<int>(kAmxBlock * (s + 1) / steps), next);
      }
      for (int t = 0; t < (two ? 2 : 1); ++t) {
        const int64_t m0 = 16 * (mb + t);
        const int mrows = static_cast<int>(m - m0 < 16 ? m - m0 : 16);
        if (t == 0) _tile_stored(0, c, 64);
        else _tile_stored(2, c, 64);
        store_transposed(c, y, ldy, m0, mrows, n0, lo);
        if (hi > 0) {
          if (t == 0) _tile_stored(1, c, 64);
          else _tile_stored(3, c, 64);
          store_transposed(c, y, ldy, m0, mrows, n0 + 16, hi);
        }
      }
    }
  }
}

void amx_dispatch(int type, const uint8_t* w, int64_t row_bytes, int64_t k, const uint32_t* xb,
                  int64_t m, uint16_t* y, int64_t ldy, int64_t j0, int64_t j1, uint16_t* wb) {
  with_type(type, [&](auto t) { amx_rows<t()>(w, row_bytes, k, xb, m, y, ldy, j0, j1, wb); });
}
#endif  // DOCPIPE_AMX

}  // namespace

extern "C" {

// 1 when `type` (a ggml type id) is one these kernels compute, with k a multiple of its block.
int docpipe_qmatmul_supported(int type, int64_t k) {
  const Format f = format(type);
  return f.block_size > 0 && k % f.block_size == 0 ? 1 : 0;
}

int docpipe_qmatmul_max_rows() { return kMaxRows; }

// 2: AVX-512, 1: AVX2 + FMA, 0: portable.
int docpipe_qmatmul_path() { return kPath; }

// y[r, j] = sum_k x[r, k] W[j, k] for r < m, j < n; W: n rows of packed blocks (k / block
// values each), x and y of `dtype` (0 fp32, 1 bf16 bits) with row strides ldx, ldy. x's rows
// are taken 16 at a time inside one parallel region (one thread wake-up per call: on a busy
// machine each region costs a scheduler time slice); a row's value does not depend on m.
// Returns 0, or -1 for a type or k it does not take (nothing written).
int docpipe_qmatmul(int type, int dtype, const void* w, int64_t n, int64_t k, const void* x,
                    int64_t ldx, int64_t m, void* y, int64_t ldy) {
  if (!docpipe_qmatmul_supported(type, k) || m < 1 || dtype < 0 || dtype > 1) return -1;
  const Format f = format(type);
  const int64_t row_bytes = k / f.block_size * f.type_size;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
#pragma omp parallel
  {
    int64_t j0, j1;
    thread_rows(n, omp_get_thread_num(), omp_get_num_threads(), &j0, &j1);
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int64_t rows = m - r0 < kMaxRows ? m - r0 : kMaxRows;
      if (dtype == 0)
        matmul_dispatch(type, rows, wb, row_bytes, k, static_cast<const float*>(x) + r0 * ldx,
                        ldx, static_cast<float*>(y) + r0 * ldy, ldy, j0, j1);
      else
        matmul_dispatch(type, rows, wb, row_bytes, k, static_cast<const uint16_t*>(x) + r0 * ldx,
                        ldx, static_cast<uint16_t*>(y) + r0 * ldy, ldy, j0, j1);
    }
  }
  return 0;
}

// Most x rows docpipe_qmatmul_amx takes: 0 where this build or CPU has no AMX (or the OS
// does not grant it).
int docpipe_qmatmul_amx_max_rows() {
#ifdef DOCPIPE_AMX
  return amx_permitted() ? kAmxMaxRows : 0;
#else
  return 0;
#endif
}

// docpipe_qmatmul for bf16 x and y with m <= docpipe_qmatmul_amx_max_rows() on AMX tiles (W
// rounded to bf16, fp32 sums: see amx_rows). Returns 0, or -1 where it does not take the call.
int docpipe_qmatmul_amx(int type, const void* w, int64_t n, int64_t k, const void* x,
                        int64_t ldx, int64_t m, void* y, int64_t ldy) {
#ifdef DOCPIPE_AMX
  if (!docpipe_qmatmul_supported(type, k) || m < 1 || m > kAmxMaxRows || !amx_permitted())
    return -1;
  const Format f = format(type);
  const int64_t row_bytes = k / f.block_size * f.type_size;
  std::vector<uint32_t> xb(static_cast<size_t>((m + 15) / 16 * 16 * (k / 2)));
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    pack_x_tiles(static_cast<const uint16_t*>(x), ldx, m, k, xb.data(), t, nt);
    static thread_local std::vector<uint16_t> wb;
    if (wb.size() < static_cast<size_t>(2 * kAmxBlock * k)) wb.resize(2 * kAmxBlock * k);
    int64_t j0, j1;
    thread_rows(n, t, nt, &j0, &j1, kAmxBlock);
    configure_tiles();
#pragma omp barrier
    amx_dispatch(type, static_cast<const uint8_t*>(w), row_bytes, k, xb.data(), m,
                 static_cast<uint16_t*>(y), ldy, j0, j1, wb.data());
    _tile_release();
  }
  return 0;
#else
  (void)type, (void)w, (void)n, (void)k, (void)x, (void)ldx, (void)m, (void)y, (void)ldy;
  return -1;
#endif
}

// out[j, :] = dequantized row j of W, for j < n (out contiguous [n, k], `dtype` as above).
int docpipe_dequantize_rows(int type, int dtype, const void* w, int64_t n, int64_t k, void* out) {
  if (!docpipe_qmatmul_supported(type, k) || dtype < 0 || dtype > 1) return -1;
  const Format f = format(type);
  const int64_t row_bytes = k / f.block_size * f.type_size;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    if (dtype == 0)
      dequant_dispatch(type, wb + j * row_bytes, k, static_cast<float*>(out) + j * k);
    else
      dequant_dispatch(type, wb + j * row_bytes, k, static_cast<uint16_t*>(out) + j * k);
  }
  return 0;
}

}  // extern "C"
