// Causal prefill attention on CPU for bf16, with AVX-512 BF16 dot products.
//
// A group is `nq` consecutive query rows of one sequence whose keys are `nk` positions read in
// place from the paged cache (runs of consecutive slots, as in paged_decode.cpp); the queries
// are the last nq of those positions, and query i sees keys [0, nk - nq + i]. Work items are
// (group, KV head, block of query positions); the G query heads of a KV head are computed
// together so each key tile is loaded once for all of them.
//
// A block holds up to 48 rows (its positions x the G heads), 16 to a vector: the rows are in
// the lanes, so the softmax needs no horizontal reductions. The block's queries are transposed
// once into head_dim pairs x rows. Per key tile of 32:
// - scores by vdpbf16ps, a broadcast key pair against the rows' query pairs (RB vectors of
//   rows x 8 keys of accumulators), and their maximum per row;
// - an online softmax in fp32, 16 rows at a time (masks only on the tiles a row does not see
//   whole), probabilities rounded to bf16 (as the flash kernel does for its second matmul)
//   and packed as each row's (even, odd) key pair;
// - P V by vdpbf16ps over key pairs, 6 rows x 64 values (3 x 128) of accumulators, V
//   interleaved in pairs by one permute per 16 outputs, the running sums' correction applied
//   as the accumulators are loaded.
// A row's arithmetic depends only on its own keys and the tile grid from the group's first
// key, never on the batch (batch invariance): its lane of every vector holds its values only.
//
// Built by models/native.py into its own library (a compiler without AVX-512 BF16 support
// fails only this one); docpipe_prefill_supported says what it computes.

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DOCPIPE_PREFILL 1
#endif

namespace {

#ifdef DOCPIPE_PREFILL
constexpr int kMaxRows = 48;  // G * positions per block: 3 vectors of 16 rows
constexpr int T = 32;         // keys per tile

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

// S[j][r] = q_r . k_j for the tile's keys j < n (rounded up to KB; the keys past n are
// stand-ins: copies of key 0) and smax[rb] their maximum per row, the block's rows in the
// lanes: RB vectors of 16 rows x KB keys of accumulators, one broadcast of a key pair feeding
// RB vdpbf16ps.
template <int D, int RB>
inline void tile_scores(const uint32_t (*qT)[16 * RB], const uint16_t* const* rows, int n,
                        float (*S)[16 * RB], __m512* smax) {
  constexpr int KB = 8, P2 = D / 2;
  for (int rb = 0; rb < RB; ++rb) smax[rb] = _mm512_set1_ps(-INFINITY);
  for (int j0 = 0; j0 < n; j0 += KB) {
    __m512 a[KB][RB];
    for (int kb = 0; kb < KB; ++kb)
      for (int rb = 0; rb < RB; ++rb) a[kb][rb] = _mm512_setzero_ps();
    const uint32_t* kj[KB];
    for (int kb = 0; kb < KB; ++kb) kj[kb] = reinterpret_cast<const uint32_t*>(rows[j0 + kb]);
    for (int p = 0; p < P2; ++p) {
      __m512bh q[RB];
      for (int rb = 0; rb < RB; ++rb) q[rb] = as_bh(_mm512_load_si512(qT[p] + 16 * rb));
      for (int kb = 0; kb < KB; ++kb) {
        const __m512bh kv = as_bh(_mm512_set1_epi32(static_cast<int32_t>(kj[kb][p])));
        for (int rb = 0; rb < RB; ++rb) a[kb][rb] = _mm512_dpbf16_ps(a[kb][rb], q[rb], kv);
      }
    }
    for (int kb = 0; kb < KB; ++kb)
      for (int rb = 0; rb < RB; ++rb) {
        _mm512_store_ps(S[j0 + kb] + 16 * rb, a[kb][rb]);
        smax[rb] = _mm512_max_ps(smax[rb], a[kb][rb]);
      }
  }
}

// O_r += P_r V for RR rows at a time (RR x NO accumulators), one broadcast of a row's
// probability pair feeding NO vdpbf16ps; the running sums' correction applied on load.
template <int NO, int RR>
inline void tile_pv(__m512 (*acc)[NO], const uint32_t (*P)[kMaxRows], const float* corr,
                    const __m512i (*vp)[NO], const int* pairs, int Rp) {
  for (int r0 = 0; r0 < Rp; r0 += RR) {
    int np = 0;
    for (int i = 0; i < RR; ++i) np = pairs[r0 + i] > np ? pairs[r0 + i] : np;
    __m512 a[RR][NO];
    for (int i = 0; i < RR; ++i) {
      const __m512 c = _mm512_set1_ps(corr[r0 + i]);
      for (int o = 0; o < NO; ++o) a[i][o] = _mm512_mul_ps(acc[r0 + i][o], c);
    }
    for (int jp = 0; jp < np; ++jp) {
      __m512bh b[RR];
      for (int i = 0; i < RR; ++i)
        b[i] = as_bh(_mm512_set1_epi32(static_cast<int32_t>(P[jp][r0 + i])));
      for (int o = 0; o < NO; ++o) {
        const __m512bh w = as_bh(_mm512_load_si512(vp[jp] + o));
        for (int i = 0; i < RR; ++i) a[i][o] = _mm512_dpbf16_ps(a[i][o], b[i], w);
      }
    }
    for (int i = 0; i < RR; ++i)
      for (int o = 0; o < NO; ++o) acc[r0 + i][o] = a[i][o];
  }
}

// One tile's online softmax for the 16 rows of vector rb (vis: keys of the tile each row sees,
// unused when all see all n): running max m and sum l updated, the correction of the earlier
// sums into corr, and the probabilities rounded to bf16 into P, each row's (even, odd) key
// pair in one 32-bit lane. exp(s * scale - m) is one fused step; m is the scaled maximum.
template <int RB, bool kFull>
inline void softmax_tile(float (*S)[16 * RB], int rb, int n, int ne, __m512i vis, __m512 smax,
                         __m512 sc, __m512& m, __m512& l, uint32_t (*P)[kMaxRows], float* corr) {
  alignas(64) static const int16_t kPairIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                                   6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
                                                   12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i ip = _mm512_load_si512(kPairIdx);
  // a row that sees every key of the tile sees key 0, so the stand-ins change no maximum
  __m512 mx = kFull ? smax : _mm512_set1_ps(-INFINITY);
  if (!kFull)
    for (int j = 0; j < n; ++j)
      mx = _mm512_mask_max_ps(mx, _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j)), mx,
                              _mm512_load_ps(S[j] + 16 * rb));
  const __m512 m_new = _mm512_max_ps(m, _mm512_mul_ps(mx, sc));
  const __mmask16 seen = _mm512_cmp_ps_mask(m, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  const __m512 c = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(m, m_new)));
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < ne; j += 2) {
    __m512 e0 = exp_weight16(_mm512_fmsub_ps(_mm512_load_ps(S[j] + 16 * rb), sc, m_new));
    __m512 e1 = exp_weight16(_mm512_fmsub_ps(_mm512_load_ps(S[j + 1] + 16 * rb), sc, m_new));
    if (!kFull) {
      e0 = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j)), e0);
      e1 = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j + 1)), e1);
    } else if (j + 1 >= n) {
      e1 = _mm512_setzero_ps();  // the pad key of an odd tile
    }
    sum = _mm512_add_ps(_mm512_add_ps(sum, e0), e1);
    const __m512i pb = _mm512_permutexvar_epi16(ip, as_si(_mm512_cvtne2ps_pbh(e1, e0)));
    _mm512_store_si512(P[j / 2] + 16 * rb, pb);
  }
  l = _mm512_fmadd_ps(l, c, sum);
  m = m_new;
  _mm512_store_ps(corr + 16 * rb, c);
}

// DZ: zmm registers per bf16 row (head_dim = 32 * DZ); RB: vectors of 16 rows in the block.
template <int DZ, int RB>
void prefill_block(const uint16_t* const* qrows, const int64_t* limit, int R, int64_t span,
                   const uint16_t* k, const uint16_t* v, const int64_t* run_start,
                   const int64_t* run_len, int64_t num_runs, uint16_t* const* orows,
                   float scale) {
  constexpr int D = 32 * DZ, NO = 2 * DZ, P2 = D / 2, L = 16 * RB;
  constexpr int RR = 24 / NO;  // rows per P V register block
  static_assert(L <= kMaxRows && kMaxRows % RR == 0, "block shape");
  const int Rp = (R + RR - 1) / RR * RR;  // rows padded for the P V blocks (pads weigh 0)
  // the block's queries transposed, rows in the lanes: qT[p][r] = Q[r][2p .. 2p+1]
  alignas(64) uint32_t qT[P2][L];
  alignas(64) int32_t lim[L];
  for (int r = 0; r < L; ++r) {
    // pad lanes: zero queries with the last row's keys (finite, never stored)
    lim[r] = static_cast<int32_t>(limit[r < R ? r : R - 1]);
    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qrows[r < R ? r : 0]);
    for (int p = 0; p < P2; ++p) qT[p][r] = r < R ? q32[p] : 0u;
  }
  __m512 acc[kMaxRows][NO];
  for (int r = 0; r < Rp; ++r)
    for (int o = 0; o < NO; ++o) acc[r][o] = _mm512_setzero_ps();
  __m512 m[RB], l[RB];
  for (int rb = 0; rb < RB; ++rb) {
    m[rb] = _mm512_set1_ps(-INFINITY);
    l[rb] = _mm512_setzero_ps();
  }
  __m512i ilo, ihi;  // interleaving two V rows into key pairs
  pair_rows_index(ilo, ihi);
  KeyCursor kc{run_start, run_len, num_runs};
  const uint16_t* rows[T];
  __m512i vp[T / 2][NO];
  alignas(64) float S[T][L];
  alignas(64) uint32_t P[T / 2][kMaxRows] = {};
  alignas(64) float corr[kMaxRows] = {};
  int pairs[kMaxRows] = {};
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < span; t0 += T) {
    const int n = static_cast<int>(span - t0 < T ? span - t0 : T);
    const int ne = (n + 1) & ~1;  // keys rounded up to whole pairs
    kc.next(n, k, D, rows);
    for (int j = n; j < T; ++j) rows[j] = rows[0];  // finite stand-ins, weighted 0
    __m512 smax[RB];
    tile_scores<D, RB>(qT, rows, n, S, smax);
    for (int jp = 0; jp < ne / 2; ++jp) {
      const uint16_t* va = v + (rows[2 * jp] - k);
      const uint16_t* vb = v + (rows[2 * jp + 1] - k);
      for (int z = 0; z < DZ; ++z) {
        const __m512i a = _mm512_loadu_si512(va + 32 * z), b = _mm512_loadu_si512(vb + 32 * z);
        vp[jp][2 * z] = _mm512_permutex2var_epi16(a, ilo, b);
        vp[jp][2 * z + 1] = _mm512_permutex2var_epi16(a, ihi, b);
      }
    }
    // Online softmax, 16 rows per vector: a row sees key t0 + j when j < limit - t0.
    for (int rb = 0; rb < RB; ++rb) {
      if (lim[16 * rb] - t0 >= n)  // limits grow with the row: every row sees every key
        softmax_tile<RB, true>(S, rb, n, ne, _mm512_setzero_si512(), smax[rb], sc, m[rb], l[rb],
                               P, corr);
      else
        softmax_tile<RB, false>(S, rb, n, ne,
                                _mm512_sub_epi32(_mm512_load_si512(lim + 16 * rb),
                                                 _mm512_set1_epi32(static_cast<int32_t>(t0))),
                                smax[rb], sc, m[rb], l[rb], P, corr);
    }
    for (int r = 0; r < Rp; ++r) {
      const int64_t visible = r < R ? limit[r] - t0 : 0;
      const int nv = static_cast<int>(visible < 0 ? 0 : visible < n ? visible : n);
      pairs[r] = (nv + 1) / 2;
    }
    tile_pv<NO, RR>(acc, P, corr, vp, pairs, Rp);
  }
  alignas(64) float lsum[L];
  for (int rb = 0; rb < RB; ++rb) _mm512_store_ps(lsum + 16 * rb, l[rb]);
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(lsum[r] > 0.f ? 1.f / lsum[r] : 0.f);
    for (int o = 0; o < NO; ++o) store16(orows[r] + 16 * o, _mm512_mul_ps(acc[r][o], inv));
  }
}

// The instantiation for head_dim 32 * DZ and R rows.
template <int DZ>
void prefill_rows(const uint16_t* const* qrows, const int64_t* limit, int R, int64_t span,
                  const uint16_t* k, const uint16_t* v, const int64_t* rs, const int64_t* rl,
                  int64_t nr, uint16_t* const* orows, float scale) {
  if (R <= 16)
    prefill_block<DZ, 1>(qrows, limit, R, span, k, v, rs, rl, nr, orows, scale);
  else if (R <= 32)
    prefill_block<DZ, 2>(qrows, limit, R, span, k, v, rs, rl, nr, orows, scale);
  else
    prefill_block<DZ, 3>(qrows, limit, R, span, k, v, rs, rl, nr, orows, scale);
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
  const int positions = kMaxRows / G;  // per block
  const auto* q = static_cast<const uint16_t*>(q_);
  const auto* k = static_cast<const uint16_t*>(k_);
  const auto* v = static_cast<const uint16_t*>(v_);
  auto* out = static_cast<uint16_t*>(out_);
  const std::vector<PrefillItem> items = prefill_items(num_groups, g_nq, positions, Hkv);
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < num_items; ++it) {
    const PrefillItem item = items[it];
    const int64_t g = item.group;
    const uint16_t* qrows[kMaxRows];
    uint16_t* orows[kMaxRows];
    int64_t limit[kMaxRows];
    const int R = item_rows(q, q_row_stride, out, out_row_stride, g_row0, g_nq, g_nk, item,
                            positions, G, D, qrows, orows, limit);
    const int64_t span = limit[R - 1];
    const int64_t* rs = run_start + run_off[g];
    const int64_t* rl = run_len + run_off[g];
    const int64_t nr = run_off[g + 1] - run_off[g];
    const uint16_t* kh = k + item.h * kv_head_stride;
    const uint16_t* vh = v + item.h * kv_head_stride;
    if (D == 64)
      prefill_rows<2>(qrows, limit, R, span, kh, vh, rs, rl, nr, orows, scale);
    else
      prefill_rows<4>(qrows, limit, R, span, kh, vh, rs, rl, nr, orows, scale);
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
