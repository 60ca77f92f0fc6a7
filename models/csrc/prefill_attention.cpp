// Causal prefill attention on CPU for bf16, with AVX-512 BF16 dot products.
//
// A group is `nq` consecutive query rows of one sequence whose keys are `nk` positions read in
// place from the paged cache (runs of consecutive slots, as in paged_decode.cpp); the queries
// are the last nq of those positions, and query i sees keys [0, nk - nq + i]. Work items are
// (group, KV head, block of query positions); the G query heads of a KV head are computed
// together so each key tile is loaded once for all of them.
//
// Per key tile of 32: the tile's keys transposed into head_dim pairs x 32 keys, scores by
// vdpbf16ps with the keys in the lanes (4 rows x 2 halves at a time), an online softmax in fp32,
// probabilities rounded to bf16 (as the flash kernel does for its second matmul), and P V by
// vdpbf16ps over key pairs, V interleaved in pairs by one permute per 16 outputs. A row's
// arithmetic depends only on its own keys and the tile grid from the group's first key, never
// on the batch (batch invariance).
//
// Built by models/native.py into its own library (a compiler without AVX-512 BF16 support
// fails only this one); docpipe_prefill_supported says what it computes.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DOCPIPE_PREFILL 1
#endif

namespace {

#ifdef DOCPIPE_PREFILL
constexpr int kMaxRows = 64;  // G * positions per block

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// Keys [t0, t0 + n) of a sequence laid out in runs, as row pointers (cursor advanced in place).
struct KeyCursor {
  const int64_t* start;
  const int64_t* len;
  int64_t num_runs, run = 0, offset = 0;
  void next(int n, const uint16_t* base, int64_t D, const uint16_t** rows) {
    for (int j = 0; j < n; ++j) {
      while (offset >= len[run]) {
        offset = 0;
        ++run;
      }
      rows[j] = base + (start[run] + offset) * D;
      ++offset;
    }
  }
};

// DZ: zmm registers per bf16 row (head_dim = 32 * DZ).
template <int DZ>
void prefill_block(const uint16_t* const* qrows, const int64_t* limit, int R, int64_t span,
                   const uint16_t* k, const uint16_t* v, const int64_t* run_start,
                   const int64_t* run_len, int64_t num_runs, uint16_t* const* orows,
                   float scale) {
  constexpr int D = 32 * DZ, NO = 2 * DZ;
  __m512 acc[kMaxRows][NO];
  float m[kMaxRows], l[kMaxRows];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NO; ++c) acc[r][c] = _mm512_setzero_ps();
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  // permutex2var indices interleaving two rows: output c holds pairs for d in [16c, 16c + 16)
  alignas(64) int16_t idx_lo[32], idx_hi[32];
  for (int t = 0; t < 16; ++t) {
    idx_lo[2 * t] = static_cast<int16_t>(t);
    idx_lo[2 * t + 1] = static_cast<int16_t>(t | 32);
    idx_hi[2 * t] = static_cast<int16_t>(t + 16);
    idx_hi[2 * t + 1] = static_cast<int16_t>((t + 16) | 32);
  }
  const __m512i ilo = _mm512_load_si512(idx_lo), ihi = _mm512_load_si512(idx_hi);
  KeyCursor kc{run_start, run_len, num_runs};
  constexpr int T = 32;  // keys per tile: two 16-lane halves
  const uint16_t* rows[T];
  __m512i vp[T / 2][NO];
  alignas(64) uint32_t kp[D / 2][T];  // key pairs transposed: kp[p][j] = K[j][2p .. 2p+1]
  alignas(64) float scores[kMaxRows][T];
  alignas(64) uint32_t pairs[T / 2];
  const uint32_t* q32[kMaxRows];
  for (int r = 0; r < R; ++r) q32[r] = reinterpret_cast<const uint32_t*>(qrows[r]);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t t0 = 0; t0 < span; t0 += T) {
    const int n = static_cast<int>(span - t0 < T ? span - t0 : T);
    kc.next(n, k, D, rows);
    for (int j = n; j < T; ++j) rows[j] = rows[0];  // finite stand-ins, weighted 0
    for (int j = 0; j < T; ++j) {
      const uint32_t* kj = reinterpret_cast<const uint32_t*>(rows[j]);
      for (int p = 0; p < D / 2; ++p) kp[p][j] = kj[p];
    }
    // Scores of 4 rows at a time (8 independent accumulation chains: 4 rows x 2 halves),
    // rows that see no key of this tile skipped (a prefix: limits grow with the row).
    int first = 0;
    while (first < R && limit[first] <= t0) ++first;
    for (int r0 = first & ~3; r0 < R; r0 += 4) {
      __m512 a0[4], a1[4];
      for (int i = 0; i < 4; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
      const int nr = R - r0 < 4 ? R - r0 : 4;
      for (int p = 0; p < D / 2; ++p) {
        const __m512bh k0 = as_bh(_mm512_load_si512(kp[p]));
        const __m512bh k1 = as_bh(_mm512_load_si512(kp[p] + 16));
        for (int i = 0; i < 4; ++i) {
          if (i >= nr) break;
          const __m512bh qb = as_bh(_mm512_set1_epi32(static_cast<int32_t>(q32[r0 + i][p])));
          a0[i] = _mm512_dpbf16_ps(a0[i], qb, k0);
          a1[i] = _mm512_dpbf16_ps(a1[i], qb, k1);
        }
      }
      for (int i = 0; i < nr; ++i) {
        _mm512_store_ps(scores[r0 + i], a0[i]);
        _mm512_store_ps(scores[r0 + i] + 16, a1[i]);
      }
    }
    for (int jp = 0; jp < T / 2; ++jp) {
      const uint16_t* va = v + (rows[2 * jp] - k);
      const uint16_t* vb = v + (rows[2 * jp + 1] - k);
      for (int z = 0; z < DZ; ++z) {
        const __m512i a = _mm512_loadu_si512(va + 32 * z), b = _mm512_loadu_si512(vb + 32 * z);
        vp[jp][2 * z] = _mm512_permutex2var_epi16(a, ilo, b);
        vp[jp][2 * z + 1] = _mm512_permutex2var_epi16(a, ihi, b);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int r = first; r < R; ++r) {
      const int64_t visible = limit[r] - t0;  // keys of this tile the row sees
      const int nv = static_cast<int>(visible < n ? visible : n);
      const __mmask16 v0 = static_cast<__mmask16>(nv >= 16 ? 0xffffu : (1u << nv) - 1u);
      const __mmask16 v1 = static_cast<__mmask16>(nv <= 16 ? 0u : nv >= 32 ? 0xffffu : (1u << (nv - 16)) - 1u);
      const __m512 s0 = _mm512_mask_mov_ps(neg_inf, v0, _mm512_mul_ps(_mm512_load_ps(scores[r]), sc));
      const __m512 s1 = _mm512_mask_mov_ps(neg_inf, v1, _mm512_mul_ps(_mm512_load_ps(scores[r] + 16), sc));
      const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
      const float new_max = tile_max > m[r] ? tile_max : m[r];
      const float correction = l[r] > 0.f ? std::exp(m[r] - new_max) : 0.f;
      const __m512 mx = _mm512_set1_ps(new_max);
      const __m512 e0 = _mm512_maskz_mov_ps(v0, exp16(_mm512_sub_ps(s0, mx)));
      const __m512 e1 = _mm512_maskz_mov_ps(v1, exp16(_mm512_sub_ps(s1, mx)));
      l[r] = l[r] * correction + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
      m[r] = new_max;
      const __m512 c = _mm512_set1_ps(correction);
      for (int o = 0; o < NO; ++o) acc[r][o] = _mm512_mul_ps(acc[r][o], c);
      const __m256bh pb0 = _mm512_cvtneps_pbh(e0), pb1 = _mm512_cvtneps_pbh(e1);
      std::memcpy(pairs, &pb0, sizeof pb0);
      std::memcpy(pairs + 8, &pb1, sizeof pb1);
      for (int jp = 0; jp < (nv + 1) / 2; ++jp) {
        const __m512bh b = as_bh(_mm512_set1_epi32(static_cast<int32_t>(pairs[jp])));
        for (int o = 0; o < NO; ++o) acc[r][o] = _mm512_dpbf16_ps(acc[r][o], b, as_bh(vp[jp][o]));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
    for (int o = 0; o < NO; ++o) store16(orows[r] + 16 * o, _mm512_mul_ps(acc[r][o], inv));
  }
}
#endif  // DOCPIPE_PREFILL

}  // namespace

extern "C" {

// 1 when docpipe_prefill_attention computes these types (0 = float32, 1 = bfloat16: q/out,
// then the cache) and shape here: bf16 only, head_dim 64/128, up to 16 query heads per KV head.
int docpipe_prefill_supported(int dtype, int kv_dtype, int D, int G) {
#ifdef DOCPIPE_PREFILL
  return dtype == 1 && kv_dtype == 1 && (D == 64 || D == 128) && G >= 1 && G <= 16;
#else
  (void)dtype; (void)kv_dtype; (void)D; (void)G;
  return 0;
#endif
}

// Returns 1 when computed, 0 when this build or shape is not supported (the caller falls back).
// Per group g: first batch row g_row0[g], g_nq[g] query rows, g_nk[g] keys in the runs
// run_off[g] .. run_off[g + 1]. q/out rows: [H, D] at q_row_stride / out_row_stride.
int docpipe_prefill_attention(int dtype, int kv_dtype, const void* q_, int64_t q_row_stride,
                              const void* k_, const void* v_, int64_t kv_head_stride, void* out_,
                              int64_t out_row_stride, const int64_t* g_row0, const int64_t* g_nq,
                              const int64_t* g_nk, const int64_t* run_off,
                              const int64_t* run_start, const int64_t* run_len,
                              int64_t num_groups, int H, int Hkv, int D, float scale) {
#ifdef DOCPIPE_PREFILL
  if (Hkv < 1 || H % Hkv != 0 || !docpipe_prefill_supported(dtype, kv_dtype, D, H / Hkv)) return 0;
  const int G = H / Hkv;
  const int positions = kMaxRows / G < 16 ? kMaxRows / G : 16;  // per block
  const auto* q = static_cast<const uint16_t*>(q_);
  const auto* k = static_cast<const uint16_t*>(k_);
  const auto* v = static_cast<const uint16_t*>(v_);
  auto* out = static_cast<uint16_t*>(out_);
  struct Item { int64_t group, first; int h; };
  std::vector<Item> items;
  for (int64_t g = 0; g < num_groups; ++g)
    for (int64_t first = 0; first < g_nq[g]; first += positions)
      for (int h = 0; h < Hkv; ++h) items.push_back({g, first, h});
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < num_items; ++it) {
    const Item item = items[it];
    const int64_t g = item.group;
    const int64_t npos = g_nq[g] - item.first < positions ? g_nq[g] - item.first : positions;
    const uint16_t* qrows[kMaxRows];
    uint16_t* orows[kMaxRows];
    int64_t limit[kMaxRows];
    int R = 0;
    for (int64_t i = 0; i < npos; ++i) {
      const int64_t row = g_row0[g] + item.first + i;
      // query i of the group is key nk - nq + i; it sees keys up to and including itself
      const int64_t lim = g_nk[g] - g_nq[g] + item.first + i + 1;
      for (int gi = 0; gi < G; ++gi, ++R) {
        qrows[R] = q + row * q_row_stride + (item.h * G + gi) * D;
        orows[R] = out + row * out_row_stride + (item.h * G + gi) * D;
        limit[R] = lim;
      }
    }
    const int64_t span = limit[R - 1];
    const int64_t* rs = run_start + run_off[g];
    const int64_t* rl = run_len + run_off[g];
    const int64_t nr = run_off[g + 1] - run_off[g];
    const uint16_t* kh = k + item.h * kv_head_stride;
    const uint16_t* vh = v + item.h * kv_head_stride;
    if (D == 64)
      prefill_block<2>(qrows, limit, R, span, kh, vh, rs, rl, nr, orows, scale);
    else
      prefill_block<4>(qrows, limit, R, span, kh, vh, rs, rl, nr, orows, scale);
  }
  return 1;
#else
  (void)dtype; (void)kv_dtype; (void)q_; (void)q_row_stride; (void)k_; (void)v_;
  (void)kv_head_stride;
  (void)out_; (void)out_row_stride; (void)g_row0; (void)g_nq; (void)g_nk; (void)run_off;
  (void)run_start; (void)run_len; (void)num_groups; (void)H; (void)Hkv; (void)D; (void)scale;
  return 0;
#endif
}

}  // extern "C"
