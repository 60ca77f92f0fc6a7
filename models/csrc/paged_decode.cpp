// Paged decode attention on CPU: one query row per sequence attends to its keys read in place
// from the paged KV cache (no gather, no copy), with an online softmax in fp32.
//
// Cache layout per layer: K and V [num_kv_heads, num_slots, head_dim]; a row's keys are the
// slots of its runs of consecutive slots, in order. Query heads that share a KV head are
// computed together, so each key and value is read once per KV head.
//
// Work items are (row, kv head) pairs spread over the OpenMP threads; an item's arithmetic
// order depends only on its own keys, never on the batch or the thread count, so a row's
// output is the same whatever else is in the batch (batch invariance).
//
// Built by models/native.py (with elementwise.cpp, into one library); called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"


namespace {

constexpr int kMaxGroup = 16;   // query heads per KV head
constexpr int kMaxDim = 256;    // head_dim
constexpr int kTile = 16;       // keys per softmax update

// DT > 0: head_dim known at compile time (fully vectorised loops); DT == 0: runtime D.
template <typename T, int DT>
void decode_item(const T* q, const T* k, const T* v, T* out, const int64_t* run_start,
                 const int64_t* run_len, int64_t num_runs, int G, int D_, float scale) {
  const int D = DT > 0 ? DT : D_;
  alignas(64) float qf[kMaxGroup * kMaxDim];
  alignas(64) float acc[kMaxGroup * kMaxDim];
  alignas(64) float kf[kTile * kMaxDim];
  alignas(64) float s[kMaxGroup * kTile];
  float m[kMaxGroup], l[kMaxGroup];
  for (int g = 0; g < G; ++g) {
    for (int d = 0; d < D; ++d) qf[g * D + d] = load(q, g * D + d) * scale;
    for (int d = 0; d < D; ++d) acc[g * D + d] = 0.f;
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t first = run_start[r], count = run_len[r];
    for (int64_t t0 = 0; t0 < count; t0 += kTile) {
      const int n = static_cast<int>(count - t0 < kTile ? count - t0 : kTile);
      const int64_t base = (first + t0) * D;
      for (int j = 0; j < n; ++j) {
#pragma omp simd
        for (int d = 0; d < D; ++d) kf[j * D + d] = load(k, base + j * D + d);
      }
      for (int g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        float tile_max = -INFINITY;
        for (int j = 0; j < n; ++j) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < D; ++d) dot += qg[d] * kf[j * D + d];
          s[g * kTile + j] = dot;
          tile_max = dot > tile_max ? dot : tile_max;
        }
        const float new_max = tile_max > m[g] ? tile_max : m[g];
        // the first tile has nothing to correct (m = -inf)
        const float correction = l[g] > 0.f ? exp_nonpositive(m[g] - new_max) : 0.f;
        float sum = 0.f;
        float* sg = s + g * kTile;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < n; ++j) {
          const float p = exp_nonpositive(sg[j] - new_max);
          sg[j] = p;
          sum += p;
        }
        l[g] = l[g] * correction + sum;
        m[g] = new_max;
        float* ag = acc + g * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) ag[d] *= correction;
      }
      for (int j = 0; j < n; ++j) {
#pragma omp simd
        for (int d = 0; d < D; ++d) kf[d] = load(v, base + j * D + d);  // reuse as a V row
        for (int g = 0; g < G; ++g) {
          const float p = s[g * kTile + j];
          float* ag = acc + g * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) ag[d] += p * kf[d];
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int d = 0; d < D; ++d) store(out, g * D + d, acc[g * D + d] * inv);
  }
}

#ifdef __AVX512F__
// AVX-512 path for head_dim = 16 * NV and G query heads per KV head, both known at compile
// time so the queries and accumulators stay in registers. Scores of a tile of 16 keys are
// reduced together (a transpose-and-add tree) instead of one horizontal sum per key.

template <typename T, int G, int NV>
void decode_item_avx512(const T* q, const T* k, const T* v, T* out, const int64_t* run_start,
                        const int64_t* run_len, int64_t num_runs, float scale) {
  constexpr int D = 16 * NV;
  __m512 qv[G][NV], acc[G][NV];
  float m[G], l[G];
  alignas(64) float qs[D];
  for (int g = 0; g < G; ++g) {
    for (int d = 0; d < D; ++d) qs[d] = load(q, g * D + d) * scale;
    for (int i = 0; i < NV; ++i) {
      qv[g][i] = _mm512_load_ps(qs + 16 * i);
      acc[g][i] = _mm512_setzero_ps();
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  alignas(64) float p[G][16];
  __m512 part[G][16];
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t first = run_start[r], count = run_len[r];
    for (int64_t t0 = 0; t0 < count; t0 += 16) {
      const int n = static_cast<int>(count - t0 < 16 ? count - t0 : 16);
      const T* kt = k + (first + t0) * D;
      const T* vt = v + (first + t0) * D;
      for (int j = 0; j < 16; ++j) {
        if (j >= n) {
          for (int g = 0; g < G; ++g) part[g][j] = _mm512_setzero_ps();
          continue;
        }
        __m512 kr[NV];
        for (int i = 0; i < NV; ++i) kr[i] = load16(kt + j * D + 16 * i);
        for (int g = 0; g < G; ++g) {
          __m512 t = _mm512_mul_ps(qv[g][0], kr[0]);
          for (int i = 1; i < NV; ++i) t = _mm512_fmadd_ps(qv[g][i], kr[i], t);
          part[g][j] = t;
        }
      }
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
      for (int g = 0; g < G; ++g) {
        const __m512 s = reduce16(part[g]);
        const float tile_max = _mm512_mask_reduce_max_ps(valid, s);
        const float new_max = tile_max > m[g] ? tile_max : m[g];
        const float correction = l[g] > 0.f ? std::exp(m[g] - new_max) : 0.f;
        const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
        l[g] = l[g] * correction + _mm512_reduce_add_ps(e);
        m[g] = new_max;
        _mm512_store_ps(p[g], e);
        const __m512 c = _mm512_set1_ps(correction);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], c);
      }
      for (int j = 0; j < n; ++j) {
        __m512 vr[NV];
        for (int i = 0; i < NV; ++i) vr[i] = load16(vt + j * D + 16 * i);
        for (int g = 0; g < G; ++g) {
          const __m512 pj = _mm512_set1_ps(p[g][j]);
          for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(pj, vr[i], acc[g][i]);
        }
      }
    }
  }
  alignas(64) float o[D];
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
    for (int i = 0; i < NV; ++i) _mm512_store_ps(o + 16 * i, _mm512_mul_ps(acc[g][i], inv));
    for (int d = 0; d < D; ++d) store(out, g * D + d, o[d]);
  }
}

using ItemFn = void (*)(const void*, const void*, const void*, void*, const int64_t*,
                        const int64_t*, int64_t, float);

template <typename T, int G, int NV>
void item_thunk(const void* q, const void* k, const void* v, void* out, const int64_t* rs,
                const int64_t* rl, int64_t nr, float scale) {
  decode_item_avx512<T, G, NV>(static_cast<const T*>(q), static_cast<const T*>(k),
                               static_cast<const T*>(v), static_cast<T*>(out), rs, rl, nr, scale);
}

template <typename T, int NV>
ItemFn pick_group(int G) {
  switch (G) {
    case 1: return item_thunk<T, 1, NV>;
    case 2: return item_thunk<T, 2, NV>;
    case 3: return item_thunk<T, 3, NV>;
    case 4: return item_thunk<T, 4, NV>;
    case 5: return item_thunk<T, 5, NV>;
    case 6: return item_thunk<T, 6, NV>;
    case 7: return item_thunk<T, 7, NV>;
    case 8: return item_thunk<T, 8, NV>;
    default: return nullptr;
  }
}

template <typename T>
ItemFn pick_avx512(int G, int D) {
  if (D == 64) return pick_group<T, 4>(G);
  if (D == 128) return pick_group<T, 8>(G);
  return nullptr;
}
#endif  // __AVX512F__

template <typename T, int DT>
void run(const T* q, int64_t q_row_stride, const T* k, const T* v, int64_t kv_head_stride,
         T* out, int64_t out_row_stride, const int64_t* rows, const int64_t* run_off,
         const int64_t* run_start, const int64_t* run_len, int64_t num_rows, int H, int Hkv,
         int D, float scale) {
  const int G = H / Hkv;
  // Work items (row, KV head) over the threads; `item` computes one from its pointers.
  auto for_each_item = [&](auto&& item) {
    const int64_t items = num_rows * Hkv;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t i = it / Hkv;
      const int h = static_cast<int>(it % Hkv);
      const int64_t row = rows[i];
      item(q + row * q_row_stride + h * G * D, k + h * kv_head_stride, v + h * kv_head_stride,
           out + row * out_row_stride + h * G * D, run_start + run_off[i], run_len + run_off[i],
           run_off[i + 1] - run_off[i]);
    }
  };
#ifdef __AVX512F__
  if (const ItemFn fast = pick_avx512<T>(G, D)) {
    for_each_item([&](const T* qi, const T* kh, const T* vh, T* oi, const int64_t* rs,
                      const int64_t* rl, int64_t nr) { fast(qi, kh, vh, oi, rs, rl, nr, scale); });
    return;
  }
#endif
  for_each_item([&](const T* qi, const T* kh, const T* vh, T* oi, const int64_t* rs,
                    const int64_t* rl, int64_t nr) {
    decode_item<T, DT>(qi, kh, vh, oi, rs, rl, nr, G, D, scale);
  });
}

template <typename T>
void dispatch(const T* q, int64_t q_row_stride, const T* k, const T* v, int64_t kv_head_stride,
              T* out, int64_t out_row_stride, const int64_t* rows, const int64_t* run_off,
              const int64_t* run_start, const int64_t* run_len, int64_t num_rows, int H, int Hkv,
              int D, float scale) {
  switch (D) {
    case 64:
      return run<T, 64>(q, q_row_stride, k, v, kv_head_stride, out, out_row_stride, rows,
                        run_off, run_start, run_len, num_rows, H, Hkv, D, scale);
    case 128:
      return run<T, 128>(q, q_row_stride, k, v, kv_head_stride, out, out_row_stride, rows,
                         run_off, run_start, run_len, num_rows, H, Hkv, D, scale);
    default:
      return run<T, 0>(q, q_row_stride, k, v, kv_head_stride, out, out_row_stride, rows,
                       run_off, run_start, run_len, num_rows, H, Hkv, D, scale);
  }
}

}  // namespace

extern "C" {

int docpipe_paged_decode_limits(int* max_group, int* max_dim) {
  *max_group = kMaxGroup;
  *max_dim = kMaxDim;
  return 1;  // ABI version
}

// dtype: 0 = float32, 1 = bfloat16. Pointers are to the first element of each tensor.
void docpipe_paged_decode(int dtype, const void* q, int64_t q_row_stride, const void* k,
                          const void* v, int64_t kv_head_stride, void* out,
                          int64_t out_row_stride, const int64_t* rows, const int64_t* run_off,
                          const int64_t* run_start, const int64_t* run_len, int64_t num_rows,
                          int H, int Hkv, int D, float scale) {
  if (dtype == 1) {
    dispatch(static_cast<const uint16_t*>(q), q_row_stride, static_cast<const uint16_t*>(k),
             static_cast<const uint16_t*>(v), kv_head_stride, static_cast<uint16_t*>(out),
             out_row_stride, rows, run_off, run_start, run_len, num_rows, H, Hkv, D, scale);
  } else {
    dispatch(static_cast<const float*>(q), q_row_stride, static_cast<const float*>(k),
             static_cast<const float*>(v), kv_head_stride, static_cast<float*>(out),
             out_row_stride, rows, run_off, run_start, run_len, num_rows, H, Hkv, D, scale);
  }
}

}  // extern "C"
