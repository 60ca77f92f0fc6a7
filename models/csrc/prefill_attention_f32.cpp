// Causal prefill attention on CPU for fp32 queries over an fp32 or bf16 KV cache (AVX2 + FMA,
// or AVX-512 where compiled in), all arithmetic in fp32.
//
// The work decomposition and arguments are those of prefill_attention.cpp: a group is `nq`
// consecutive query rows of one sequence whose keys are `nk` positions read in place from the
// paged cache (runs of consecutive slots); the queries are the last nq of those positions, and
// query i sees keys [0, nk - nq + i]. Work items are (group, KV head, block of query
// positions); the block's rows are its positions x the G query heads of the KV head, so each
// key tile is loaded (and transposed) once for all of them.
//
// Per key tile of 64, for each strip of MR rows: scores S = Q K^T by a register-blocked
// kernel (MR rows x NK vectors of keys, the keys transposed into the lanes: one broadcast of a
// query value feeds NK FMAs), an online softmax in fp32, then O += P V by a second blocked
// kernel (MR rows x CB vectors of head_dim, one broadcast of a probability feeds CB FMAs), the
// correction of the running sum applied as the accumulators are loaded. Both keep MR x NK
// (MR x CB) accumulators in registers: 6 x 2 on AVX2 (16 registers), 6 x 4 on AVX-512 (32).
// The probabilities use exp_weight (common.h), cheaper than the decode kernel's exp.
//
// A row's arithmetic depends only on its own keys and the tile grid from the group's first
// key: the rows beside it in a strip only decide how many keys a strip visits, and a key a row
// does not see adds an exact 0 to it. So a row's output does not depend on the batch (batch
// invariance).
//
// Built by models/native.py into its own library; docpipe_prefill_supported says what it
// computes.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#ifdef DOCPIPE_AVX2
#define DOCPIPE_PREFILL_F32 1
#endif

namespace {

#ifdef DOCPIPE_PREFILL_F32
#ifdef __AVX512F__
using A = Vec16;
constexpr int MR = 6, NK = 4, CB = 4;
#else
using A = Vec8;
constexpr int MR = 6, NK = 2, CB = 2;
#endif
constexpr int kMaxRows = 96;  // rows per work item (G x positions, padded to a multiple of MR)
constexpr int kTile = 64;  // keys per softmax update
static_assert(kMaxRows % MR == 0 && kTile % (NK * A::W) == 0 && 64 % (CB * A::W) == 0,
              "tile shapes (head_dim: a multiple of 64)");

// Keys [t0, t0 + n) of a sequence laid out in runs, as row pointers (cursor advanced in place).
template <typename TK>
struct KeyCursor {
  const int64_t* start;
  const int64_t* len;
  int64_t num_runs, run = 0, offset = 0;
  void next(int n, const TK* base, int64_t D, const TK** rows) {
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

// Per-thread buffers, 64-byte aligned: scaled queries and accumulators [kMaxRows][D], the key
// tile transposed [D][kTile], and a bf16 value tile widened to fp32 [kTile][D].
struct Scratch {
  std::vector<float> buf;
  float *qs, *o, *kt, *vf;
  explicit Scratch(int D) : buf(static_cast<size_t>(2 * kMaxRows + 2 * kTile) * D + 16) {
    float* p = buf.data();
    p += (16 - (reinterpret_cast<uintptr_t>(p) / sizeof(float)) % 16) % 16;
    qs = p;
    o = qs + kMaxRows * D;
    kt = o + kMaxRows * D;
    vf = kt + kTile * D;
  }
};

// The two register-blocked kernels are kept out of line: inlined into prefill_item, g++ keeps
// that loop's constants in vector registers and spills 3 of the 12 accumulators to the
// stack (measured on Zen 3: the kernel 1.7x slower, a store-to-load chain per key).
#define DOCPIPE_KERNEL __attribute__((noinline))

// S[r][kb ..] for MR rows of Qs and the NK * W keys from kb of the transposed tile.
DOCPIPE_KERNEL void scores(const float* qs, int D, const float* kt, int kb, float (*s)[kTile]) {
  using V = A::V;
  constexpr int W = A::W;
  V acc[MR][NK];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < NK; ++i) acc[r][i] = A::zero();
  for (int d = 0; d < D; ++d) {
    V kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = A::load(kt + d * kTile + kb + i * W);
    for (int r = 0; r < MR; ++r) {
      const V b = A::set1(qs[r * D + d]);
      for (int i = 0; i < NK; ++i) acc[r][i] = A::fma(b, kv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < NK; ++i) A::store(s[r] + kb + i * W, acc[r][i]);
}

// O[r][c0 ..] = O[r][c0 ..] * corr[r] + sum_{j < nv} P[r][j] V[j][c0 ..], CB vectors, MR rows.
DOCPIPE_KERNEL void accumulate(float* o, int D, const float* corr, const float (*p)[kTile],
                               const float* const* vr, int nv, int c0) {
  using V = A::V;
  constexpr int W = A::W;
  V acc[MR][CB];
  for (int r = 0; r < MR; ++r) {
    const V c = A::set1(corr[r]);
    for (int i = 0; i < CB; ++i) acc[r][i] = A::mul(A::load(o + r * D + c0 + i * W), c);
  }
  for (int j = 0; j < nv; ++j) {
    V vv[CB];
    for (int i = 0; i < CB; ++i) vv[i] = A::load(vr[j] + c0 + i * W);
    for (int r = 0; r < MR; ++r) {
      const V b = A::set1(p[r][j]);
      for (int i = 0; i < CB; ++i) acc[r][i] = A::fma(b, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < CB; ++i) A::store(o + r * D + c0 + i * W, acc[r][i]);
}

// One work item: R rows (ascending limits: row r sees keys [0, limit[r]) of the group).
template <typename TK>
void prefill_item(const float* const* qrows, float* const* orows, const int64_t* limit, int R,
                  const TK* k, const TK* v, const int64_t* run_start, const int64_t* run_len,
                  int64_t num_runs, int D, float scale, Scratch& sc) {
  using V = A::V;
  constexpr int W = A::W, T = kTile, KB = NK * W, NS = T / W;
  const int Rp = (R + MR - 1) / MR * MR;  // padded rows: zero queries, discarded
  float* const qs = sc.qs;
  float* const o = sc.o;
  float* const kt = sc.kt;
  int64_t lim[kMaxRows];
  float m[kMaxRows], l[kMaxRows];
  const V vscale = A::set1(scale);
  for (int r = 0; r < Rp; ++r) {
    lim[r] = limit[r < R ? r : R - 1];
    for (int d = 0; d < D; d += W) {
      A::store(qs + r * D + d, r < R ? A::mul(A::load(qrows[r] + d), vscale) : A::zero());
      A::store(o + r * D + d, A::zero());
    }
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const int64_t span = lim[Rp - 1];
  KeyCursor<TK> kc{run_start, run_len, num_runs};
  const TK* krow[T];
  const float* vr[T];
  alignas(64) float s[MR][T];
  const V neg_inf = A::set1(-INFINITY);
  int first_row = 0;
  for (int64_t t0 = 0; t0 < span; t0 += T) {
    const int n = static_cast<int>(span - t0 < T ? span - t0 : T);
    kc.next(n, k, D, krow);
    for (int j = n; j < T; ++j) krow[j] = krow[0];  // finite stand-ins, weighted 0
    for (int jb = 0; jb < T; jb += 8)
      for (int db = 0; db < D; db += 8) {
        __m256 x[8];
        for (int i = 0; i < 8; ++i) x[i] = load8(krow[jb + i] + db);
        transpose8(x);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (db + i) * T + jb, x[i]);
      }
    if constexpr (std::is_same_v<TK, float>) {
      for (int j = 0; j < T; ++j) vr[j] = v + (krow[j] - k);
    } else {
      for (int j = 0; j < n; ++j) {
        const TK* vj = v + (krow[j] - k);
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(sc.vf + j * D + d, load8(vj + d));
        vr[j] = sc.vf + j * D;
      }
      for (int j = n; j < T; ++j) vr[j] = vr[0];
    }
    // rows that see no key of this tile come first (limits ascend): skip their strips
    while (first_row < Rp && lim[first_row] <= t0) ++first_row;
    for (int st = first_row / MR * MR; st < Rp; st += MR) {
      int nv[MR], nv_max = 0;
      for (int r = 0; r < MR; ++r) {
        const int64_t visible = lim[st + r] - t0;
        nv[r] = static_cast<int>(visible <= 0 ? 0 : visible < n ? visible : n);
        nv_max = nv[r] > nv_max ? nv[r] : nv_max;
      }
      for (int kb = 0; kb < nv_max; kb += KB) scores(qs + st * D, D, kt, kb, s);
      float corr[MR];
      for (int r = 0; r < MR; ++r) {
        const int nr = nv[r];
        corr[r] = 1.f;
        if (nr == 0) {  // sees none of these keys: weights 0, state unchanged
          for (int h = 0; h < NS; ++h) A::store(s[r] + h * W, A::zero());
          continue;
        }
        V sv[NS];  // scores past nr (masked, or never computed) are -inf
        for (int h = 0; h < NS; ++h) sv[h] = A::head(A::load(s[r] + h * W), nr - h * W, neg_inf);
        V mx = sv[0];
        for (int h = 1; h < NS; ++h) mx = A::max(mx, sv[h]);
        const float tile_max = A::hmax(mx);
        float& mr = m[st + r];
        float& lr = l[st + r];
        if (tile_max > mr) {  // the first tile has nothing to correct (l = 0)
          corr[r] = lr > 0.f ? exp_nonpositive(mr - tile_max) : 0.f;
          mr = tile_max;
        }
        const V mv = A::set1(mr);
        V sum = A::zero();
        for (int h = 0; h < NS; ++h) {
          const V e = A::head(A::exp_weight(A::sub(sv[h], mv)), nr - h * W, A::zero());
          A::store(s[r] + h * W, e);
          sum = A::add(sum, e);
        }
        lr = lr * corr[r] + A::hsum(sum);
      }
      for (int c0 = 0; c0 < D; c0 += CB * W)
        accumulate(o + st * D, D, corr, s, vr, nv_max, c0);
    }
  }
  for (int r = 0; r < R; ++r) {
    const V inv = A::set1(l[r] > 0.f ? 1.f / l[r] : 0.f);
    for (int d = 0; d < D; d += W) A::store(orows[r] + d, A::mul(A::load(o + r * D + d), inv));
  }
}

template <typename TK>
void prefill(const float* q, int64_t q_row_stride, const TK* k, const TK* v,
             int64_t kv_head_stride, float* out, int64_t out_row_stride, const int64_t* g_row0,
             const int64_t* g_nq, const int64_t* g_nk, const int64_t* run_off,
             const int64_t* run_start, const int64_t* run_len, int64_t num_groups, int H, int Hkv,
             int D, float scale) {
  const int G = H / Hkv;
  const int positions = kMaxRows / G;  // per block
  const std::vector<PrefillItem> items = prefill_items(num_groups, g_nq, positions, Hkv);
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel
  {
    Scratch sc(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < num_items; ++it) {
      const PrefillItem item = items[it];
      const int64_t g = item.group;
      const float* qrows[kMaxRows];
      float* orows[kMaxRows];
      int64_t limit[kMaxRows];
      const int R = item_rows(q, q_row_stride, out, out_row_stride, g_row0, g_nq, g_nk, item,
                              positions, G, D, qrows, orows, limit);
      const int64_t off = run_off[g];
      prefill_item<TK>(qrows, orows, limit, R, k + item.h * kv_head_stride,
                       v + item.h * kv_head_stride, run_start + off, run_len + off,
                       run_off[g + 1] - off, D, scale, sc);
    }
  }
}
#endif  // DOCPIPE_PREFILL_F32

}  // namespace

extern "C" {

// 1 when docpipe_prefill_attention computes these types (0 = float32, 1 = bfloat16: q/out,
// then the cache) and shape here: fp32 q over an fp32 or bf16 cache, head_dim 64/128/256, up
// to 16 query heads per KV head, on AVX2 + FMA or AVX-512.
int docpipe_prefill_supported(int dtype, int kv_dtype, int D, int G) {
#ifdef DOCPIPE_PREFILL_F32
  return dtype == 0 && (kv_dtype == 0 || kv_dtype == 1) && (D == 64 || D == 128 || D == 256) &&
         G >= 1 && G <= 16;
#else
  (void)dtype; (void)kv_dtype; (void)D; (void)G;
  return 0;
#endif
}

// Returns 1 when computed, 0 when this build or shape is not supported (the caller falls back).
// Per group g: first batch row g_row0[g], g_nq[g] query rows, g_nk[g] keys in the runs
// run_off[g] .. run_off[g + 1]. q/out rows: [H, D] at q_row_stride / out_row_stride.
int docpipe_prefill_attention(int dtype, int kv_dtype, const void* q, int64_t q_row_stride,
                              const void* k, const void* v, int64_t kv_head_stride, void* out,
                              int64_t out_row_stride, const int64_t* g_row0, const int64_t* g_nq,
                              const int64_t* g_nk, const int64_t* run_off,
                              const int64_t* run_start, const int64_t* run_len,
                              int64_t num_groups, int H, int Hkv, int D, float scale) {
#ifdef DOCPIPE_PREFILL_F32
  if (Hkv < 1 || H % Hkv != 0 || !docpipe_prefill_supported(dtype, kv_dtype, D, H / Hkv)) return 0;
  const auto* qf = static_cast<const float*>(q);
  auto* of = static_cast<float*>(out);
  if (kv_dtype == 0)
    prefill(qf, q_row_stride, static_cast<const float*>(k), static_cast<const float*>(v),
            kv_head_stride, of, out_row_stride, g_row0, g_nq, g_nk, run_off, run_start, run_len,
            num_groups, H, Hkv, D, scale);
  else
    prefill(qf, q_row_stride, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
            kv_head_stride, of, out_row_stride, g_row0, g_nq, g_nk, run_off, run_start, run_len,
            num_groups, H, Hkv, D, scale);
  return 1;
#else
  (void)dtype; (void)kv_dtype; (void)q; (void)q_row_stride; (void)k; (void)v;
  (void)kv_head_stride; (void)out; (void)out_row_stride; (void)g_row0; (void)g_nq; (void)g_nk;
  (void)run_off; (void)run_start; (void)run_len; (void)num_groups; (void)H; (void)Hkv; (void)D;
  (void)scale;
  return 0;
#endif
}

}  // extern "C"
