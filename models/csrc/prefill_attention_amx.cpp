// Causal prefill attention for bf16 on CPUs with AMX (Intel Sapphire Rapids and later): both
// matmuls on the tile unit, the online softmax in AVX-512.
//
// Groups, work items and the causal rule are those of prefill_attention.cpp: a group is `nq`
// consecutive query rows of one sequence over `nk` keys read from the paged cache (runs of
// slots); query i sees keys [0, nk - nq + i]. An item is (group, KV head, block of positions),
// its rows the positions x the G query heads of the KV head, at most 16.
//
// The call first packs each (group, KV head)'s keys once for all its items, in tiles of 32:
// K as rows (the A operand of S^T = K Q^T), V transposed (the A operand of O^T = V^T P^T),
// zero past the last key. Everything is transposed so that a block's rows are the columns of
// the C tiles, i.e. the lanes of a vector:
// - S^T (32 keys x 16 rows, two C tiles) = K . Q^T, the block's queries held as the B operand
//   (pairs of head_dim x rows, transposed once per block);
// - the online softmax runs down the 32 key vectors of 16 rows: no horizontal reductions, and
//   its probabilities, rounded to bf16 and paired by key, are already P^T's B layout;
// - O^T (head_dim x 16 rows): at head_dim 64 its four C tiles stay in tile registers for the
//   whole block; at 128 and 256 (8 and 16 tiles, more than the 8 registers) each tile's P V
//   is added to accumulators in memory, four 16-dim slices at a time.
// A row's running maximum is raised only when a weight would exceed 2^kLazy (scores in log2
// units), so the accumulators are rescaled (stored, scaled per lane, reloaded) on few tiles;
// a row's weights stay at most 2^kLazy, far inside fp32 and bf16 range. The weights come from
// a degree-3 exp2 (relative error < 7.5e-5, below their bf16 rounding).
// A row's values depend only on its own scores and the tile grid from the group's first key,
// never on the other rows (batch invariance): a rescale multiplies rows whose maximum did not
// move by exactly 1.
//
// Built by models/native.py into its own library (a compiler without AMX intrinsics fails only
// this one); docpipe_prefill_supported says what it computes, and is 0 where the OS does not
// grant the tile state.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"


namespace {

#ifdef DOCPIPE_AMX
constexpr int T = kAmxKeys;      // keys per tile
constexpr int kRows = kAmxLanes;  // rows per block: the lanes of a vector, the columns of a C tile

// The O^T accumulators of head_dim 64 (tiles 0-3) multiplied per lane (row) by corr, through
// memory.
inline void rescale(float (*O)[kRows][kRows], __m512 corr) {
  _tile_stored(0, O[0], 64);
  _tile_stored(1, O[1], 64);
  _tile_stored(2, O[2], 64);
  _tile_stored(3, O[3], 64);
  for (int db = 0; db < 4; ++db)
    for (int i = 0; i < 16; ++i)
      _mm512_store_ps(O[db][i], _mm512_mul_ps(_mm512_load_ps(O[db][i]), corr));
  _tile_loadd(0, O[0], 64);
  _tile_loadd(1, O[1], 64);
  _tile_loadd(2, O[2], 64);
  _tile_loadd(3, O[3], 64);
}

// a[i][j] -> a[j][i] for a 16 x 16 block of fp32 (rows of 16 lanes).
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4;  // 0 1 2 3 8 9 10 11
    t[a] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// P V for head_dim 128 or 256, whose O^T (D/16 C tiles) does not fit the 8 tile registers:
// four 16-dim slices at a time into tiles 0-3 (P in tile 7), stored, and added to the
// accumulators in memory, O = O corr + P V where a row's maximum rose (O = P V on the first
// tile).
template <int D>
inline void pv_to_memory(const uint16_t* vtt, float (*O)[kRows][kRows], __m512 corr,
                         bool first, bool scaled) {
  alignas(64) float part[4][kRows][kRows];
  for (int db0 = 0; db0 < D / 16; db0 += 4) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(6, vtt + (db0 + 0) * 16 * T, 64);
    _tile_dpbf16ps(0, 6, 7);
    _tile_loadd(6, vtt + (db0 + 1) * 16 * T, 64);
    _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(6, vtt + (db0 + 2) * 16 * T, 64);
    _tile_dpbf16ps(2, 6, 7);
    _tile_loadd(6, vtt + (db0 + 3) * 16 * T, 64);
    _tile_dpbf16ps(3, 6, 7);
    _tile_stored(0, part[0], 64);
    _tile_stored(1, part[1], 64);
    _tile_stored(2, part[2], 64);
    _tile_stored(3, part[3], 64);
    for (int d = 0; d < 4; ++d)
      for (int i = 0; i < 16; ++i) {
        const __m512 pv = _mm512_load_ps(part[d][i]);
        float* o = O[db0 + d][i];
        _mm512_store_ps(o, first    ? pv
                           : scaled ? _mm512_fmadd_ps(_mm512_load_ps(o), corr, pv)
                                    : _mm512_add_ps(_mm512_load_ps(o), pv));
      }
  }
}

// One block: rows qrows[0..R) (R <= 16) with key limits `limit` (non-decreasing) over the
// packed keys kp (ntiles x 32 rows of D) and vt (ntiles x D/16 A tiles of 16 dims x 32 keys).
// head_dim 64 keeps O^T in tiles 0-3; 128 and 256 in memory (pv_to_memory).
template <int D>
void amx_block(const uint16_t* const* qrows, const int64_t* limit, int R, const uint16_t* kp,
               const uint16_t* vt, uint16_t* const* orows, float scale) {
  constexpr int P2 = D / 2;
  constexpr bool kResident = D == 64;
  // the block's queries as B tiles: qT[p][r] = Q[r][2p .. 2p+1]; tile c is rows 16c .. 16c+15
  alignas(64) uint32_t qT[P2][kRows];
  alignas(64) int32_t lim[kRows];
  for (int r = 0; r < kRows; ++r) {
    // pad lanes: zero queries with the last row's keys (finite, never stored)
    lim[r] = static_cast<int32_t>(limit[r < R ? r : R - 1]);
    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qrows[r < R ? r : 0]);
    for (int p = 0; p < P2; ++p) qT[p][r] = r < R ? q32[p] : 0u;
  }
  alignas(64) float S[2][T][kRows];  // two tiles' scores: this one and the next
  alignas(64) uint32_t P[T / 2][kRows];
  alignas(64) float O[D / 16][kRows][kRows];
  __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
  const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f);  // log2 units
  const __m512i limv = _mm512_load_si512(lim);
  if (kResident) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t span = lim[kRows - 1];
  // S^T of the tile at t0 into Sb (tiles 4-5; 6-7 for the operands)
  auto scores = [&](int64_t t0, float (*Sb)[kRows]) {
    const uint16_t* kt = kp + t0 * D;
    _tile_zero(4);
    _tile_zero(5);
    for (int c = 0; c < D / 32; ++c) {  // head_dim 32c .. 32c + 31
      _tile_loadd(7, qT[16 * c], 64);
      _tile_loadd(6, kt + 32 * c, D * 2);
      _tile_dpbf16ps(4, 6, 7);
      _tile_loadd(6, kt + 16 * D + 32 * c, D * 2);
      _tile_dpbf16ps(5, 6, 7);
    }
    _tile_stored(4, Sb[0], 64);
    _tile_stored(5, Sb[16], 64);
  };
  scores(0, S[0]);
  for (int64_t t0 = 0, b = 0; t0 < span; t0 += T, b ^= 1) {
    // the next tile's scores first: the tile unit computes them during this tile's softmax
    if (t0 + T < span) scores(t0 + T, S[b ^ 1]);
    __m512 corr;
    __mmask16 grow;
    if (lim[0] - t0 >= T)  // limits grow with the row: every row sees every key
      grow = softmax_tile<true>(S[b], limv, sc, m, l, P, corr, t0 == 0);
    else
      grow = softmax_tile<false>(
          S[b], _mm512_sub_epi32(limv, _mm512_set1_epi32(static_cast<int32_t>(t0))), sc, m, l, P,
          corr, t0 == 0);
    const uint16_t* vtt = vt + t0 * D;
    _tile_loadd(7, P[0], 64);
    if (!kResident) {
      pv_to_memory<D>(vtt, O, corr, t0 == 0, grow != 0);
      continue;
    }
    if (grow && t0 > 0) rescale(O, corr);  // at t0 = 0 the accumulators are zero
    _tile_loadd(6, vtt, 64);
    _tile_dpbf16ps(0, 6, 7);
    _tile_loadd(6, vtt + 16 * T, 64);
    _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(6, vtt + 32 * T, 64);
    _tile_dpbf16ps(2, 6, 7);
    _tile_loadd(6, vtt + 48 * T, 64);
    _tile_dpbf16ps(3, 6, 7);
  }
  if (kResident) {
    _tile_stored(0, O[0], 64);
    _tile_stored(1, O[1], 64);
    _tile_stored(2, O[2], 64);
    _tile_stored(3, O[3], 64);
  }
  // out[r][16 db + i] = O[db][i][r] / l[r]
  alignas(64) float inv[kRows];
  _mm512_store_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(l, _mm512_setzero_ps(), _CMP_GT_OQ),
                                           _mm512_set1_ps(1.f), l));
  for (int db = 0; db < D / 16; ++db) {
    __m512 rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = _mm512_load_ps(O[db][i]);
    transpose16(rows);  // rows[r] = O^T's column r: row r's 16 values
    for (int r = 0; r < R; ++r)
      store16(orows[r] + 16 * db, _mm512_mul_ps(rows[r], _mm512_set1_ps(inv[r])));
  }
}

// Keys [32 t, 32 t + 32) of one (group, KV head), from their slots, into K rows and V^T tiles;
// keys past n are zero.
template <int D>
void pack_tile(const int64_t* slot, int64_t n, int64_t t, const uint16_t* k, const uint16_t* v,
               uint16_t* kp, uint16_t* vt) {
  uint16_t* kt = kp + t * T * D;
  uint16_t* vtt = vt + t * T * D;  // [D / 16][16 dims][32 keys]
  for (int j = 0; j < T; ++j) {
    const int64_t key = t * T + j;
    if (key >= n) {
      std::memset(kt + j * D, 0, D * sizeof(uint16_t));
      for (int d = 0; d < D; ++d) vtt[(d / 16) * 16 * T + (d % 16) * T + j] = 0;
      continue;
    }
    std::memcpy(kt + j * D, k + slot[key] * D, D * sizeof(uint16_t));
    const uint16_t* vr = v + slot[key] * D;
    for (int d = 0; d < D; ++d) vtt[(d / 16) * 16 * T + (d % 16) * T + j] = vr[d];
  }
}
// docpipe_prefill_attention for bf16 and head_dim D (checked by the caller).
template <int D>
void prefill(const uint16_t* q, int64_t q_row_stride, const uint16_t* k, const uint16_t* v,
             int64_t kv_head_stride, uint16_t* out, int64_t out_row_stride, const int64_t* g_row0,
             const int64_t* g_nq, const int64_t* g_nk, const int64_t* run_off,
             const int64_t* run_start, const int64_t* run_len, int64_t num_groups, int H, int Hkv,
             float scale) {
  const int G = H / Hkv;
  const int positions = kRows / G;  // per block
  // Each group's key slots in order, and where its packed tiles start (per KV head).
  std::vector<int64_t> slot_off(num_groups + 1, 0), tile_off(num_groups + 1, 0);
  for (int64_t g = 0; g < num_groups; ++g) {
    slot_off[g + 1] = slot_off[g] + g_nk[g];
    tile_off[g + 1] = tile_off[g] + (g_nk[g] + T - 1) / T;
  }
  std::vector<int64_t> slots(slot_off[num_groups]);
  for (int64_t g = 0; g < num_groups; ++g) {
    int64_t* s = slots.data() + slot_off[g];
    for (int64_t r = run_off[g]; r < run_off[g + 1]; ++r)
      for (int64_t i = 0; i < run_len[r]; ++i) *s++ = run_start[r] + i;
  }
  const int64_t tiles = tile_off[num_groups];
  // every element is written by pack_tile: no zero-fill
  const size_t packed = static_cast<size_t>(Hkv) * tiles * T * D;
  const std::unique_ptr<uint16_t[]> kp(new uint16_t[packed]), vt(new uint16_t[packed]);
  struct Pack { int64_t group, tile; int h; };
  std::vector<Pack> packs;
  for (int64_t g = 0; g < num_groups; ++g)
    for (int64_t t = 0; t < tile_off[g + 1] - tile_off[g]; ++t)
      for (int h = 0; h < Hkv; ++h) packs.push_back({g, t, h});
  const std::vector<PrefillItem> items = prefill_items(num_groups, g_nq, positions, Hkv);
  const int64_t num_packs = static_cast<int64_t>(packs.size());
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_packs; ++i) {
      const Pack p = packs[i];
      const size_t base = (static_cast<size_t>(p.h) * tiles + tile_off[p.group]) * T * D;
      pack_tile<D>(slots.data() + slot_off[p.group], g_nk[p.group], p.tile,
                k + p.h * kv_head_stride, v + p.h * kv_head_stride, kp.get() + base,
                vt.get() + base);
    }
    configure_tiles();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < num_items; ++it) {
      const PrefillItem item = items[it];
      const int64_t g = item.group;
      const uint16_t* qrows[kRows];
      uint16_t* orows[kRows];
      int64_t limit[kRows];
      const int R = item_rows(q, q_row_stride, out, out_row_stride, g_row0, g_nq, g_nk, item,
                              positions, G, D, qrows, orows, limit);
      const size_t base = (static_cast<size_t>(item.h) * tiles + tile_off[g]) * T * D;
      amx_block<D>(qrows, limit, R, kp.get() + base, vt.get() + base, orows, scale);
    }
    _tile_release();
  }
}
#endif  // DOCPIPE_AMX

}  // namespace

extern "C" {

// 1 when docpipe_prefill_attention computes these types (0 = float32, 1 = bfloat16: q/out,
// then the cache) and shape here: bf16, head_dim 64/128/256, up to 16 query heads per KV head,
// on a CPU and OS with AMX.
int docpipe_prefill_supported(int dtype, int kv_dtype, int D_, int G) {
#ifdef DOCPIPE_AMX
  return dtype == 1 && kv_dtype == 1 && (D_ == 64 || D_ == 128 || D_ == 256) && G >= 1 &&
         G <= kRows && amx_permitted();
#else
  (void)dtype; (void)kv_dtype; (void)D_; (void)G;
  return 0;
#endif
}

// The arguments and result of prefill_attention.cpp's function of this name.
int docpipe_prefill_attention(int dtype, int kv_dtype, const void* q_, int64_t q_row_stride,
                              const void* k_, const void* v_, int64_t kv_head_stride, void* out_,
                              int64_t out_row_stride, const int64_t* g_row0, const int64_t* g_nq,
                              const int64_t* g_nk, const int64_t* run_off,
                              const int64_t* run_start, const int64_t* run_len,
                              int64_t num_groups, int H, int Hkv, int D, float scale) {
#ifdef DOCPIPE_AMX
  if (Hkv < 1 || H % Hkv != 0 || !docpipe_prefill_supported(dtype, kv_dtype, D, H / Hkv))
    return 0;
  const auto* q = static_cast<const uint16_t*>(q_);
  const auto* k = static_cast<const uint16_t*>(k_);
  const auto* v = static_cast<const uint16_t*>(v_);
  auto* out = static_cast<uint16_t*>(out_);
  auto* run = D == 64 ? prefill<64> : D == 128 ? prefill<128> : prefill<256>;
  run(q, q_row_stride, k, v, kv_head_stride, out, out_row_stride, g_row0, g_nq, g_nk, run_off,
      run_start, run_len, num_groups, H, Hkv, scale);
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
