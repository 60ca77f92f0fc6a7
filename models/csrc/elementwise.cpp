// Fused row-wise kernels for the CPU forward pass: RMSNorm, SwiGLU and rotary embedding, one
// pass over memory each instead of one torch op per step. Each reproduces the torch path's
// roundings (values are rounded to the model's dtype exactly where the op-by-op form rounds),
// so bf16 results agree with it, and rows are independent (batch-invariant).
//
// dtype: 0 = float32, 1 = bfloat16 (uint16_t bits). Rows are split over the OpenMP threads
// when there is enough work.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

namespace {

constexpr int64_t kParallelMin = 1 << 14;  // elements; below this one thread is faster

// weight * round(x * rsqrt(mean(x^2) + eps)): HF's RMSNorm (normalise in fp32, round to the
// input dtype, then scale by the weight in that dtype).
template <typename T>
void rms_norm(const T* x, int64_t x_row_stride, const T* w, T* out, int64_t rows, int64_t dim,
              float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_row_stride;
    T* o = out + r * dim;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < dim; ++d) {
      const float v = load(xr, d);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    int64_t d0 = 0;
#ifdef __AVX512F__
    const __m512 iv = _mm512_set1_ps(inv);
    for (; d0 + 16 <= dim; d0 += 16) {  // the loop below, 16 lanes
      const __m512 y = round16(_mm512_mul_ps(load16(xr + d0), iv), xr);
      store16(o + d0, _mm512_mul_ps(load16(w + d0), y));
    }
#endif
#pragma omp simd
    for (int64_t d = d0; d < dim; ++d) {
      const float y = round_as(load(xr, d) * inv, xr);
      store(o, d, load(w, d) * y);
    }
  }
}

// round(round(silu(gate)) * up) for rows [gate | up] of width 2 * inter.
template <typename T>
void silu_mul(const T* gate_up, int64_t row_stride, T* out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * row_stride;
    const T* u = g + inter;
    T* o = out + r * inter;
    int64_t d = 0;
#ifdef __AVX512F__
    for (; d + 16 <= inter; d += 16) {
      const __m512 x = load16(g + d);
      const __m512 neg_abs = _mm512_min_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 e = exp16(neg_abs);  // exp(-|x|): no overflow
      const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
      const __m512 num = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), negative, e);
      const __m512 sigmoid = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      const __m512 s = round16(_mm512_mul_ps(x, sigmoid), g);
      store16(o + d, _mm512_mul_ps(s, load16(u + d)));
    }
#endif
#ifdef DOCPIPE_AVX2
    for (; d + 8 <= inter; d += 8) {  // as the AVX-512 loop above, 8 lanes
      const __m256 x = load8(g + d);
      const __m256 e = exp8(_mm256_min_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), x)));
      const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.f), e, negative);
      const __m256 s = _mm256_mul_ps(x, _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
      if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(o + d, _mm256_mul_ps(s, load8(u + d)));
      } else {  // bf16 (compute dtype forced on a CPU without native bf16): round per lane
        alignas(32) float sl[8];
        _mm256_store_ps(sl, s);
        for (int i = 0; i < 8; ++i) store(o, d + i, round_as(sl[i], g) * load(u, d + i));
      }
    }
#endif
    for (; d < inter; ++d) {
      const float x = load(g, d);
      const float e = exp_nonpositive(x < 0.f ? x : -x);  // exp(-|x|): no overflow
      const float sigmoid = (x < 0.f ? e : 1.f) / (1.f + e);
      const float s = round_as(x * sigmoid, g);
      store(o, d, s * load(u, d));
    }
  }
}

// Half-split rotary embedding of `heads` heads per row: with x = [x1 | x2],
// out = round(round(x * cos) + round([-x2 | x1] * sin)); cos/sin rows [rows, D] in T.
template <typename T>
void rotary(const T* x, int64_t x_row_stride, T* out, int64_t rows, int64_t heads, int64_t D,
            const T* cos, const T* sin) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (rows * heads * D >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * D;
    const T* s = sin + r * D;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + r * x_row_stride + h * D;
      T* o = out + (r * heads + h) * D;
      int64_t d0 = 0;
#ifdef __AVX512F__
      if (half % 16 == 0) {  // the loop below, 16 lanes; -x2 flips the sign bit as it does
        const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
        for (; d0 < half; d0 += 16) {
          const __m512 x1 = load16(xh + d0), x2 = load16(xh + d0 + half);
          const __m512 nx2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));
          const __m512 a1 = round16(_mm512_mul_ps(x1, load16(c + d0)), xh);
          const __m512 b1 = round16(_mm512_mul_ps(nx2, load16(s + d0)), xh);
          const __m512 a2 = round16(_mm512_mul_ps(x2, load16(c + d0 + half)), xh);
          const __m512 b2 = round16(_mm512_mul_ps(x1, load16(s + d0 + half)), xh);
          store16(o + d0, _mm512_add_ps(a1, b1));
          store16(o + d0 + half, _mm512_add_ps(a2, b2));
        }
      }
#endif
#pragma omp simd
      for (int64_t d = d0; d < half; ++d) {
        const float x1 = load(xh, d), x2 = load(xh, d + half);
        const float a1 = round_as(x1 * load(c, d), xh), b1 = round_as(-x2 * load(s, d), xh);
        const float a2 = round_as(x2 * load(c, d + half), xh);
        const float b2 = round_as(x1 * load(s, d + half), xh);
        store(o, d, a1 + b1);
        store(o, d + half, a2 + b2);
      }
    }
  }
}

}  // namespace

extern "C" {

void docpipe_rms_norm(int dtype, const void* x, int64_t x_row_stride, const void* w, void* out,
                      int64_t rows, int64_t dim, float eps) {
  if (dtype == 1)
    rms_norm(static_cast<const uint16_t*>(x), x_row_stride, static_cast<const uint16_t*>(w),
             static_cast<uint16_t*>(out), rows, dim, eps);
  else
    rms_norm(static_cast<const float*>(x), x_row_stride, static_cast<const float*>(w),
             static_cast<float*>(out), rows, dim, eps);
}

void docpipe_silu_mul(int dtype, const void* gate_up, int64_t row_stride, void* out,
                      int64_t rows, int64_t inter) {
  if (dtype == 1)
    silu_mul(static_cast<const uint16_t*>(gate_up), row_stride, static_cast<uint16_t*>(out),
             rows, inter);
  else
    silu_mul(static_cast<const float*>(gate_up), row_stride, static_cast<float*>(out), rows,
             inter);
}

void docpipe_rotary(int dtype, const void* x, int64_t x_row_stride, void* out, int64_t rows,
                    int64_t heads, int64_t D, const void* cos, const void* sin) {
  if (dtype == 1)
    rotary(static_cast<const uint16_t*>(x), x_row_stride, static_cast<uint16_t*>(out), rows,
           heads, D, static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin));
  else
    rotary(static_cast<const float*>(x), x_row_stride, static_cast<float*>(out), rows, heads, D,
           static_cast<const float*>(cos), static_cast<const float*>(sin));
}

}  // extern "C"
