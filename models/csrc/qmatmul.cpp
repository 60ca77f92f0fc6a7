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

inline Format format(int type) {
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

// 32 unsigned bytes (q) -> out[0..32) = a * q + c (exact product, one rounding).
inline void affine32(__m256i q, __m256 a, __m256 c, float* out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  _mm256_storeu_ps(out, _mm256_fmadd_ps(u8x8(lo), a, c));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(u8x8(hi8(lo)), a, c));
  _mm256_storeu_ps(out + 16, _mm256_fmadd_ps(u8x8(hi), a, c));
  _mm256_storeu_ps(out + 24, _mm256_fmadd_ps(u8x8(hi8(hi)), a, c));
}

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

inline void simd_q8_0(const uint8_t* b, float* out) {
  const __m256 d = _mm256_set1_ps(half_f16c(b));
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  _mm256_storeu_ps(out, _mm256_mul_ps(i8x8(lo), d));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(i8x8(hi8(lo)), d));
  _mm256_storeu_ps(out + 16, _mm256_mul_ps(i8x8(hi), d));
  _mm256_storeu_ps(out + 24, _mm256_mul_ps(i8x8(hi8(hi)), d));
}

// Q4_0 / Q5_0: d * (q - offset); q - offset is exact in int, as in the scalar code.
inline void signed32(__m256i q, int offset, __m256 d, float* out) {
  const __m256i o = _mm256_set1_epi32(offset);
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, hi8(lo), hi, hi8(hi)};
  for (int i = 0; i < 4; ++i)
    _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[i]), o)), d));
}

inline void simd_q4_0(const uint8_t* b, float* out) {
  signed32(nibbles32(b + 2), 8, _mm256_set1_ps(half_f16c(b)), out);
}

inline void simd_q4_1(const uint8_t* b, float* out) {
  affine32(nibbles32(b + 4), _mm256_set1_ps(half_f16c(b)), _mm256_set1_ps(half_f16c(b + 2)), out);
}

inline void simd_q5_0(const uint8_t* b, float* out) {
  const __m256i q = _mm256_or_si256(nibbles32(b + 6), fifth_bits32(b + 2));
  signed32(q, 16, _mm256_set1_ps(half_f16c(b)), out);
}

inline void simd_q5_1(const uint8_t* b, float* out) {
  const __m256i q = _mm256_or_si256(nibbles32(b + 8), fifth_bits32(b + 4));
  affine32(q, _mm256_set1_ps(half_f16c(b)), _mm256_set1_ps(half_f16c(b + 2)), out);
}

// Q4_K / Q5_K: sub-block s is a * q - c, with q the low or high nibbles of 32 bytes.
inline void simd_q45_k(const uint8_t* b, bool five, float* out) {
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
    affine32(q, _mm256_set1_ps(d * static_cast<float>(sc)),
             _mm256_set1_ps(-(dmin * static_cast<float>(mn))), out + 32 * s);
  }
}

inline void simd_q6_k(const uint8_t* b, float* out) {
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
      const __m256 a0 = _mm256_set1_ps(d * static_cast<float>(sc[base / 16]));
      const __m256 a1 = _mm256_set1_ps(d * static_cast<float>(sc[base / 16 + 1]));
      const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
      const __m128i parts[4] = {q0, hi8(q0), q1, hi8(q1)};
      const __m256i o = _mm256_set1_epi32(32);
      for (int i = 0; i < 4; ++i)
        _mm256_storeu_ps(out + base + 8 * i, _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[i]), o)),
            i < 2 ? a0 : a1));
    }
  }
}
#endif  // DOCPIPE_AVX2 && __F16C__

// `count` values (whole blocks) of a row starting at value `first`, into out.
template <int TYPE>
inline void dequant_span(const uint8_t* row, int64_t first, int count, float* out) {
  constexpr Format f = TYPE == Q4_0 ? Format{32, 18} : TYPE == Q4_1 ? Format{32, 20}
                       : TYPE == Q5_0 ? Format{32, 22} : TYPE == Q5_1 ? Format{32, 24}
                       : TYPE == Q8_0 ? Format{32, 34} : TYPE == Q2_K ? Format{256, 84}
                       : TYPE == Q4_K ? Format{256, 144} : TYPE == Q5_K ? Format{256, 176}
                                      : Format{256, 210};
  const uint8_t* b = row + (first / f.block_size) * f.type_size;
  for (int i = 0; i < count; i += f.block_size, b += f.type_size) {
#ifdef DOCPIPE_SIMD_DEQUANT
    if constexpr (TYPE == Q4_0) simd_q4_0(b, out + i);
    else if constexpr (TYPE == Q4_1) simd_q4_1(b, out + i);
    else if constexpr (TYPE == Q5_0) simd_q5_0(b, out + i);
    else if constexpr (TYPE == Q5_1) simd_q5_1(b, out + i);
    else if constexpr (TYPE == Q8_0) simd_q8_0(b, out + i);
    else if constexpr (TYPE == Q2_K) dequant_q2_k(b, out + i);
    else if constexpr (TYPE == Q4_K) simd_q45_k(b, false, out + i);
    else if constexpr (TYPE == Q5_K) simd_q45_k(b, true, out + i);
    else simd_q6_k(b, out + i);
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
  switch (type) {
    case Q4_0: return matmul_type<Q4_0>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q4_1: return matmul_type<Q4_1>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q5_0: return matmul_type<Q5_0>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q5_1: return matmul_type<Q5_1>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q8_0: return matmul_type<Q8_0>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q2_K: return matmul_type<Q2_K>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q4_K: return matmul_type<Q4_K>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q5_K: return matmul_type<Q5_K>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    case Q6_K: return matmul_type<Q6_K>(m, w, row_bytes, k, x, ldx, y, ldy, j0, j1);
    default: return;
  }
}

template <typename T>
void dequant_dispatch(int type, const uint8_t* row, int64_t k, T* out) {
  alignas(64) float buf[kChunk];
  for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
    const int count = static_cast<int>(k - k0 < kChunk ? k - k0 : kChunk);
    float* dst = std::is_same<T, float>::value ? reinterpret_cast<float*>(out) + k0 : buf;
    switch (type) {
      case Q4_0: dequant_span<Q4_0>(row, k0, count, dst); break;
      case Q4_1: dequant_span<Q4_1>(row, k0, count, dst); break;
      case Q5_0: dequant_span<Q5_0>(row, k0, count, dst); break;
      case Q5_1: dequant_span<Q5_1>(row, k0, count, dst); break;
      case Q8_0: dequant_span<Q8_0>(row, k0, count, dst); break;
      case Q2_K: dequant_span<Q2_K>(row, k0, count, dst); break;
      case Q4_K: dequant_span<Q4_K>(row, k0, count, dst); break;
      case Q5_K: dequant_span<Q5_K>(row, k0, count, dst); break;
      case Q6_K: dequant_span<Q6_K>(row, k0, count, dst); break;
      default: return;
    }
    if (!std::is_same<T, float>::value)
      for (int i = 0; i < count; ++i) store(out, k0 + i, buf[i]);
  }
}

// Rows [j0, j1) of `n` for thread t of nt, in whole groups of 4 rows (cache lines of y).
inline void thread_rows(int64_t n, int t, int nt, int64_t* j0, int64_t* j1) {
  const int64_t groups = (n + 3) / 4;
  const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
  *j0 = g0 * 4 < n ? g0 * 4 : n;
  *j1 = g1 * 4 < n ? g1 * 4 : n;
}

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
