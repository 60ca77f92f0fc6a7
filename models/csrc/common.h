// Helpers shared by the native CPU kernels: bf16 <-> fp32 conversions that vectorise, and a
// vectorisable exp for non-positive arguments. Element types: float (fp32) and uint16_t
// holding bf16 bits. `Vec8` (AVX2 + FMA) and `Vec16` (AVX-512) wrap the few vector operations
// the attention kernels use, so one template body serves both widths.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define DOCPIPE_AVX2 1
#endif

#if defined(__AVX512F__) || defined(DOCPIPE_AVX2)
#include <immintrin.h>
#endif

// AMX tiles with bf16 (Sapphire Rapids and later), and the OS call that grants them (Linux).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__linux__)
#define DOCPIPE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// exp(x) for x <= 0, vectorisable (no libm call): 2^(x log2 e) split into 2^n * 2^f with
// f in [-0.5, 0.5], 2^f by its Taylor series to degree 7 (relative error < 2e-7). Results
// below FLT_MIN come out as the denormals torch gives (2^n is applied in two normal halves);
// below about -104 the result is 0, as in fp32.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = x < -104.f ? -104.f : x;
  const float y = x * 1.44269504088896341f;
  const float n = __builtin_floorf(y + 0.5f);
  const float f = y - n;
  float p = 1.5252733804059840e-5f;
  p = p * f + 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t n1 = static_cast<int32_t>(n) / 2, n2 = static_cast<int32_t>(n) - n1;
  const int32_t bits1 = (n1 + 127) << 23, bits2 = (n2 + 127) << 23;
  float scale1, scale2;
  std::memcpy(&scale1, &bits1, sizeof scale1);
  std::memcpy(&scale2, &bits2, sizeof scale2);
  return p * scale1 * scale2;
}

// Softmax weights exp(x) in the vector kernels (exp_weight8/16), cheaper than exp_nonpositive:
// 2^f by this degree-5 near-minimax polynomial on [-0.5, 0.5] (relative error < 3e-7 in fp32;
// PyTorch's flash kernel uses a coarser exp), 2^n exact (exponent bits, or scalef), and 0 below
// exp(-87) instead of denormals (weights next to the row maximum's 1: no effect on a sum).
constexpr float kExpWeight[6] = {1.0000000716546560f, 6.9314696706386440e-1f,
                                 2.4022119723933838e-1f, 5.5507132749609900e-2f,
                                 9.6755413306841340e-3f, 1.3276471519624727e-3f};

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, int64_t i, float x) { p[i] = x; }
// fp32 -> bf16 bits, round to nearest even (as torch); NaN stays NaN. Branch-free so loops
// over it vectorise.
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}
inline void store(uint16_t* p, int64_t i, float x) { p[i] = to_bf16(x); }

// x rounded to T's precision, as an fp32 value: what torch holds after an op in dtype T.
inline float round_as(float x, const float*) { return x; }
inline float round_as(float x, const uint16_t*) {
  const uint32_t u = static_cast<uint32_t>(to_bf16(x)) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// exp(x) for x <= 0, as exp_nonpositive() above, 16 lanes at a time.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // scalef gives denormals, then 0
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381608e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Softmax weights exp(x), x <= 0, cheaper than exp16(): see kExpWeight.
inline __m512 exp_weight16(__m512 x) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(kExpWeight[5]);
  for (int i = 4; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpWeight[i]));
  // p * 2^n: the same bits as adding n to p's exponent, for the normal results kept
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GT_OQ);
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// 16 fp32 values as bf16 bits, rounded as to_bf16() rounds.
inline __m256i bf16_bits16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
#ifdef __AVX512BF16__
  // The hardware conversion rounds to nearest even and quiets NaN as to_bf16() does, but
  // flushes denormal inputs to zero: a vector holding one takes the integer path below.
  const __mmask16 denormal = _mm512_mask_test_epi32_mask(
      _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000)), u,
      _mm512_set1_epi32(0x007fffff));
  if (__builtin_expect(denormal == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(x);
#endif
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// 16 fp32 values stored as T, rounded as to_bf16() rounds.
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits16(x));
}

// x rounded to T's precision, as fp32 (round_as() for 16 lanes).
inline __m512 round16(__m512 x, const float*) { return x; }
inline __m512 round16(__m512 x, const uint16_t*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(x)), 16));
}
// r[j] = sum of the 16 lanes of v[j], for 16 vectors.
inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  // each 128-bit lane of b[i] now holds partial sums of v[4i .. 4i+3]
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// 16 fp32 lanes (AVX-512F).
struct Vec16 {
  using V = __m512;
  static constexpr int W = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) { return load16(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V exp(V x) { return exp16(x); }
  static V exp_weight(V x) { return exp_weight16(x); }
  static V reduce(const V* v) { return reduce16(v); }
  static float hmax(V x) { return _mm512_reduce_max_ps(x); }
  static float hsum(V x) { return _mm512_reduce_add_ps(x); }
  static V head(V x, int n, V fill) {
    const __mmask16 keep = static_cast<__mmask16>(n <= 0 ? 0u : n >= 16 ? 0xffffu : (1u << n) - 1u);
    return _mm512_mask_mov_ps(fill, keep, x);
  }
};

#endif  // __AVX512F__

#ifdef DOCPIPE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// exp(x) for x <= 0, as exp_nonpositive(), 8 lanes at a time. 2^n is applied in two halves
// (n >= -150 here, each half >= -75: normal), so results below FLT_MIN are denormals as in fp32.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-104.f));
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(1.5252733804059840e-5f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-4f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// Softmax weights exp(x), x <= 0, 8 lanes: as exp_weight16().
inline __m256 exp_weight8(__m256 x) {
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(kExpWeight[5]);
  for (int i = 4; i >= 0; --i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpWeight[i]));
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p),
                                        _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GT_OQ);
  return _mm256_and_ps(_mm256_castsi256_ps(bits), normal);
}

// r[j] = sum of the 8 lanes of v[j], for 8 vectors (a fixed tree: the same bits every call).
inline __m256 reduce8(const __m256* v) {
  const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
  // each 128-bit half of b0 (b1) holds that half's sums of v[0..3] (v[4..7])
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 rows of 8 floats transposed in place: r[i][j] <- r[j][i].
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// 8 fp32 lanes (AVX2 + FMA).
struct Vec8 {
  using V = __m256;
  static constexpr int W = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) { return load8(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V exp(V x) { return exp8(x); }
  static V exp_weight(V x) { return exp_weight8(x); }
  static V reduce(const V* v) { return reduce8(v); }
  static float hmax(V x) { return hmax8(x); }
  static float hsum(V x) { return hsum8(x); }
  // lanes [0, n) of x, `fill` in the others
  static V head(V x, int n, V fill) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    return _mm256_blendv_ps(fill, x, keep);
  }
};
#endif  // DOCPIPE_AVX2

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 pairs <-> the integer vectors that move them
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
inline __m512i as_si(__m512bh x) { return (__m512i)x; }

// permutex2var indices interleaving two rows of 32 bf16 (a, b): lo holds the pairs
// (a[d], b[d]) for d in [0, 16), hi for d in [16, 32).
inline void pair_rows_index(__m512i& lo, __m512i& hi) {
  alignas(64) int16_t idx_lo[32], idx_hi[32];
  for (int t = 0; t < 16; ++t) {
    idx_lo[2 * t] = static_cast<int16_t>(t);
    idx_lo[2 * t + 1] = static_cast<int16_t>(t | 32);
    idx_hi[2 * t] = static_cast<int16_t>(t + 16);
    idx_hi[2 * t + 1] = static_cast<int16_t>((t + 16) | 32);
  }
  lo = _mm512_load_si512(idx_lo);
  hi = _mm512_load_si512(idx_hi);
}
#endif


// A prefill call's work items: (group, first position of a block of `positions`, KV head),
// each group's last blocks (they see the most keys) first, so the threads finish together.
struct PrefillItem {
  int64_t group, first;
  int h;
};
inline std::vector<PrefillItem> prefill_items(int64_t num_groups, const int64_t* g_nq,
                                              int positions, int Hkv) {
  std::vector<PrefillItem> items;
  for (int64_t g = 0; g < num_groups; ++g)
    for (int64_t first = (g_nq[g] - 1) / positions * positions; first >= 0; first -= positions)
      for (int h = 0; h < Hkv; ++h) items.push_back({g, first, h});
  return items;
}

// The rows of one prefill work item: its block's positions (up to `positions` of them) x the
// G query heads of its KV head, as q and out row pointers with each row's key limit (query i
// of a group is key nk - nq + i and sees the keys up to and including itself). Returns the
// row count.
template <typename T>
inline int item_rows(const T* q, int64_t q_row_stride, T* out, int64_t out_row_stride,
                     const int64_t* g_row0, const int64_t* g_nq, const int64_t* g_nk,
                     const PrefillItem& item, int positions, int G, int D, const T** qrows,
                     T** orows, int64_t* limit) {
  const int64_t g = item.group, first = item.first, h = item.h;
  const int64_t npos = g_nq[g] - first < positions ? g_nq[g] - first : positions;
  int R = 0;
  for (int64_t i = 0; i < npos; ++i) {
    const int64_t row = g_row0[g] + first + i;
    const int64_t lim = g_nk[g] - g_nq[g] + first + i + 1;
    for (int gi = 0; gi < G; ++gi, ++R) {
      qrows[R] = q + row * q_row_stride + (h * G + gi) * D;
      orows[R] = out + row * out_row_stride + (h * G + gi) * D;
      limit[R] = lim;
    }
  }
  return R;
}

#ifdef DOCPIPE_AMX
// Linux grants a process the AMX tile data only when asked (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); once granted, every thread may use it.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// Palette 1, tiles 0-7 all 16 rows x 64 bytes: C tiles of 16 x 16 fp32, A and B tiles of
// 16 x 32 bf16.
inline void configure_tiles() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg = {};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

// The AMX kernels keep a row's running maximum until one of its weights would exceed 2^kLazy.
constexpr float kLazy = 8.f;
// Their softmax tiles: 32 keys, one vector of 16 rows (or heads) per key.
constexpr int kAmxKeys = 32, kAmxLanes = 16;

// Two vectors of 16 weights rounded to bf16, lane r holding (e0[r], e1[r]): key pairs in the
// layout of an AMX bf16 operand's rows.
inline __m512i pair_bf16(__m512 e0, __m512 e1) {
  alignas(64) static const int16_t kPairIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                                   6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
                                                   12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kPairIdx), as_si(_mm512_cvtne2ps_pbh(e1, e0)));
}

// 2^y for the softmax weights: 2^frac(y) by a degree-3 near-minimax polynomial on [0, 1)
// (relative error < 7.5e-5, far below the bf16 rounding of the probabilities that follows),
// times 2^floor(y) by scalef. Results below 2^-126 are denormals or 0.
inline __m512 exp2_weight16(__m512 y) {
  const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(0.07802427560091019f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606751322746277f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958334445953369f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999251961708069f));
  return _mm512_scalef_ps(p, y);
}

// One pass over a tile's scores for the block's 16 rows (vis: keys of the tile each row sees,
// unused when all rows see all 32): weights 2^(s c - m) rounded to bf16 into P, each row's
// (even, odd) key pair in one 32-bit lane; returns their sum, and the largest exponent seen
// into ymax.
template <bool kFull>
inline __m512 tile_weights(const float (*S)[kAmxLanes], __m512i vis, __m512 c, __m512 m,
                           uint32_t (*P)[kAmxLanes], __m512& ymax) {
  __m512 sum = _mm512_setzero_ps(), top = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < kAmxKeys; j += 2) {
    const __m512 y0 = _mm512_fmsub_ps(_mm512_load_ps(S[j]), c, m);
    const __m512 y1 = _mm512_fmsub_ps(_mm512_load_ps(S[j + 1]), c, m);
    __m512 e0 = exp2_weight16(y0), e1 = exp2_weight16(y1);
    if (kFull) {
      top = _mm512_max_ps(top, _mm512_max_ps(y0, y1));
    } else {
      const __mmask16 v0 = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j));
      const __mmask16 v1 = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j + 1));
      top = _mm512_mask_max_ps(_mm512_mask_max_ps(top, v0, top, y0), v1, top, y1);
      e0 = _mm512_maskz_mov_ps(v0, e0);
      e1 = _mm512_maskz_mov_ps(v1, e1);
    }
    sum = _mm512_add_ps(_mm512_add_ps(sum, e0), e1);
    _mm512_store_si512(P[j / 2], pair_bf16(e0, e1));
  }
  ymax = top;
  return sum;
}

// One tile's online softmax for the block's 16 rows, scores in log2 units (c = scale log2 e):
// weights against the running max m, the running sum l updated, and the factor for the
// earlier accumulators into corr. Returns the rows whose m was raised: on the first tile every
// row (m = -inf), later the rows with a weight above 2^kLazy, for which the tile is weighed
// again against the new m (the other rows get the same bits again, and corr = 1).
template <bool kFull>
inline __mmask16 softmax_tile(const float (*S)[kAmxLanes], __m512i vis, __m512 c, __m512& m,
                              __m512& l, uint32_t (*P)[kAmxLanes], __m512& corr, bool first) {
  __m512 ymax, sum;
  __mmask16 grow = 0xFFFF;
  if (!first) {
    sum = tile_weights<kFull>(S, vis, c, m, P, ymax);
    grow = _mm512_cmp_ps_mask(ymax, _mm512_set1_ps(kLazy), _CMP_GT_OQ);
    if (!grow) {
      l = _mm512_add_ps(l, sum);
      corr = _mm512_set1_ps(1.f);
      return 0;
    }
  }
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < kAmxKeys; ++j)
    mx = kFull ? _mm512_max_ps(mx, _mm512_load_ps(S[j]))
               : _mm512_mask_max_ps(mx, _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j)), mx,
                                    _mm512_load_ps(S[j]));
  const __m512 m_new = _mm512_mask_max_ps(m, grow, m, _mm512_mul_ps(mx, c));
  const __mmask16 seen = _mm512_cmp_ps_mask(m, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  corr = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), grow,
                            _mm512_maskz_mov_ps(seen, exp2_weight16(_mm512_sub_ps(m, m_new))));
  sum = tile_weights<kFull>(S, vis, c, m_new, P, ymax);
  l = _mm512_fmadd_ps(l, corr, sum);
  m = m_new;
  return grow;
}

#endif  // DOCPIPE_AMX

}  // namespace
