// Paged decode attention on CPU: one query row per sequence attends to its keys read in place
// from the paged KV cache (no gather, no copy), with an online softmax in fp32.
//
// Cache layout per layer: K and V [num_kv_heads, num_slots, head_dim]; a row's keys are the
// slots of its runs of consecutive slots, in order. Query heads that share a KV head are
// computed together, so each key and value is read once per KV head. q/out and the cache have
// their own element types (fp32 q with a bf16 cache halves the bytes decode reads); the
// arithmetic is fp32 throughout.
//
// Paths, the first that applies: AMX for the scores (bf16 q and cache, the shapes of the next
// path); AVX-512 with the queries and accumulators in registers
// (head_dim 64 with 2-6 query heads per KV head, head_dim 128 with 2-3); the SIMD path
// (AVX-512 or AVX2 + FMA: head_dim 64/128/256, up to 16 query heads per KV head); a portable
// loop nest for anything else.
//
// Work items are (row, kv head) pairs spread over the OpenMP threads; an item's arithmetic
// order depends only on its own keys, never on the batch or the thread count, so a row's
// output is the same whatever else is in the batch (batch invariance).
//
// Built by models/native.py into its own library; called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"


namespace {

constexpr int kMaxGroup = 16;   // query heads per KV head
constexpr int kMaxDim = 256;    // head_dim
constexpr int kTile = 16;       // keys per softmax update (the AVX-512 register path: 32)

// DT > 0: head_dim known at compile time (fully vectorised loops); DT == 0: runtime D.
template <typename TQ, typename TK, int DT>
void decode_item(const TQ* q, const TK* k, const TK* v, TQ* out, const int64_t* run_start,
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
// time so the queries and accumulators stay in registers (for the shapes pick() sends here).
// Scores of 16 keys are reduced together (a transpose-and-add tree) instead of one horizontal
// sum per key, and the online softmax updates once per 32 keys (two such halves), halving its
// per-head reductions, scalar exp and accumulator rescaling per key.

template <typename TQ, typename TK, int G, int NV>
void decode_item_avx512(const TQ* q, const TK* k, const TK* v, TQ* out, const int64_t* run_start,
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
  constexpr int TT = 32;  // keys per softmax update: two 16-key halves
  alignas(64) float p[G][TT];
  __m512 part[G][16];
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t first = run_start[r], count = run_len[r];
    for (int64_t t0 = 0; t0 < count; t0 += TT) {
      const int n = static_cast<int>(count - t0 < TT ? count - t0 : TT);
      const TK* kt = k + (first + t0) * D;
      const TK* vt = v + (first + t0) * D;
      __m512 s[G][2];
      for (int half = 0; half < 2; ++half) {
        for (int j = 0; j < 16; ++j) {
          const int jj = 16 * half + j;
          if (jj >= n) {
            for (int g = 0; g < G; ++g) part[g][j] = _mm512_setzero_ps();
            continue;
          }
          __m512 kr[NV];
          for (int i = 0; i < NV; ++i) kr[i] = load16(kt + jj * D + 16 * i);
          for (int g = 0; g < G; ++g) {
            __m512 t = _mm512_mul_ps(qv[g][0], kr[0]);
            for (int i = 1; i < NV; ++i) t = _mm512_fmadd_ps(qv[g][i], kr[i], t);
            part[g][j] = t;
          }
        }
        for (int g = 0; g < G; ++g) s[g][half] = reduce16(part[g]);
        if (n <= 16) {
          for (int g = 0; g < G; ++g) s[g][1] = _mm512_set1_ps(-INFINITY);
          break;
        }
      }
      const __mmask16 v0 = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
      const __mmask16 v1 = static_cast<__mmask16>(n <= 16 ? 0u : n >= 32 ? 0xffffu : (1u << (n - 16)) - 1u);
      for (int g = 0; g < G; ++g) {
        const __m512 s0 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), v0, s[g][0]);
        const __m512 s1 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), v1, s[g][1]);
        const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
        const float new_max = tile_max > m[g] ? tile_max : m[g];
        const float correction = l[g] > 0.f ? std::exp(m[g] - new_max) : 0.f;
        const __m512 mx = _mm512_set1_ps(new_max);
        const __m512 e0 = _mm512_maskz_mov_ps(v0, exp16(_mm512_sub_ps(s0, mx)));
        const __m512 e1 = _mm512_maskz_mov_ps(v1, exp16(_mm512_sub_ps(s1, mx)));
        l[g] = l[g] * correction + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
        m[g] = new_max;
        _mm512_store_ps(p[g], e0);
        _mm512_store_ps(p[g] + 16, e1);
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

template <typename TQ, typename TK, int G, int NV>
void item_avx512(const void* q, const void* k, const void* v, void* out, const int64_t* rs,
                 const int64_t* rl, int64_t nr, int, float scale) {
  decode_item_avx512<TQ, TK, G, NV>(static_cast<const TQ*>(q), static_cast<const TK*>(k),
                                    static_cast<const TK*>(v), static_cast<TQ*>(out), rs, rl, nr,
                                    scale);
}
#endif  // __AVX512F__

#if defined(__AVX512F__) || defined(DOCPIPE_AVX2)
// The cache lines of `bytes` bytes at k and at v into L1: the K and V of a tile to come.
inline void prefetch_kv(const void* k, const void* v, int64_t bytes) {
  const char* kb = static_cast<const char*>(k);
  const char* vb = static_cast<const char*>(v);
  for (int64_t b = 0; b < bytes; b += 64) {
    _mm_prefetch(kb + b, _MM_HINT_T0);
    _mm_prefetch(vb + b, _MM_HINT_T0);
  }
}
#endif

#ifdef DOCPIPE_AMX
// AMX path for bf16 q and cache, head_dim = 16 * NV (64 or 128), G query heads per KV head.
// Per tile of 32 keys: S^T (keys x heads) = K Q^T on the tile unit, K read in place as the A
// operand (16 consecutive slots, or a zero-padded copy at a run's end) and the queries held
// in tile registers as the B operand; the heads are the lanes of the softmax, which runs
// down the key vectors with no reductions and keeps a head's maximum until a weight would
// pass 2^kLazy (then the tile is weighed again and the accumulators rescaled). P V by
// vdpbf16ps: each pair of V rows interleaved once (one permute per 16 outputs) for all G
// heads, the probabilities rounded to bf16 (as the prefill kernels do), accumulators in
// registers.
// Tiles of 32 keys prefetched ahead: the tile loads of K do not start the hardware's stream
// prefetch as vector loads do (measured at W100K concurrency: 7.9 ms per layer without, 6.7
// with 1 or 2 tiles ahead, 6.8 with 4).
constexpr int kAhead = 2;

template <int G, int NV>
void decode_item_amx(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                     const int64_t* run_start, const int64_t* run_len, int64_t num_runs,
                     float scale) {
  constexpr int D = 16 * NV, P2 = D / 2, C = D / 32;
  static_assert(C == 2 || C == 4, "head_dim 64 or 128");
  // the queries as B tiles (tiles 4 .. 4 + C - 1): qT[p][g] = Q[g][2p .. 2p+1], zero past G
  alignas(64) uint32_t qT[P2][16] = {};
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(q);
  for (int g = 0; g < G; ++g)
    for (int p = 0; p < P2; ++p) qT[p][g] = q32[g * P2 + p];
  _tile_loadd(4, qT[0], 64);
  _tile_loadd(5, qT[16], 64);
  if (C == 4) {
    _tile_loadd(6, qT[32], 64);
    _tile_loadd(7, qT[48], 64);
  }
  alignas(64) float S[32][16];      // the tile's scores: keys x heads (lanes)
  alignas(64) uint32_t P[16][16];   // their weights as (even, odd) key pairs x heads
  alignas(64) uint16_t pad[16 * D];  // a run's last keys, zero-padded to 16
  alignas(64) static const uint16_t zero[D] = {};
  __m512i ilo, ihi;  // interleaving two V rows into key pairs
  pair_rows_index(ilo, ihi);
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_setzero_ps();
  __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
  const __m512 c = _mm512_set1_ps(scale * 1.44269504088896341f);  // log2 units
  bool first = true;
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t start = run_start[r], count = run_len[r];
    for (int64_t t0 = 0; t0 < count; t0 += 32) {
      const int n = static_cast<int>(count - t0 < 32 ? count - t0 : 32);
      if (t0 + 32 * kAhead < count)  // K and V of the tile kAhead ahead
        prefetch_kv(k + (start + t0 + 32 * kAhead) * D, v + (start + t0 + 32 * kAhead) * D,
                    32 * D * 2);
      for (int h = 0; h < 2 && 16 * h < n; ++h) {
        const int nh = n - 16 * h < 16 ? n - 16 * h : 16;
        const uint16_t* src = k + (start + t0 + 16 * h) * D;
        if (nh < 16) {
          std::memcpy(pad, src, sizeof(uint16_t) * nh * D);
          std::memset(pad + nh * D, 0, sizeof(uint16_t) * (16 - nh) * D);
          src = pad;
        }
        _tile_zero(0);
        _tile_loadd(2, src, D * 2);
        _tile_dpbf16ps(0, 2, 4);
        _tile_loadd(2, src + 32, D * 2);
        _tile_dpbf16ps(0, 2, 5);
        if (C == 4) {
          _tile_loadd(2, src + 64, D * 2);
          _tile_dpbf16ps(0, 2, 6);
          _tile_loadd(2, src + 96, D * 2);
          _tile_dpbf16ps(0, 2, 7);
        }
        _tile_stored(0, S[16 * h], 64);
      }
      // the online softmax of the heads (lanes) over keys j < n; rows past n are stale and
      // masked (vis = n in every lane)
      __m512 corr;
      const __mmask16 grow =
          n == 32 ? softmax_tile<true>(S, _mm512_setzero_si512(), c, m, l, P, corr, first)
                  : softmax_tile<false>(S, _mm512_set1_epi32(n), c, m, l, P, corr, first);
      if (grow) {
        alignas(64) float cf[16];
        _mm512_store_ps(cf, corr);
        for (int g = 0; g < G; ++g)
          for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], _mm512_set1_ps(cf[g]));
      }
      first = false;
      const uint16_t* vt = v + (start + t0) * D;
      for (int jp = 0; jp < (n + 1) / 2; ++jp) {
        const uint16_t* va = vt + 2 * jp * D;
        const uint16_t* vb = 2 * jp + 1 < n ? va + D : zero;
        __m512bh w[NV];
        for (int z = 0; z < NV / 2; ++z) {
          const __m512i a = _mm512_loadu_si512(va + 32 * z), b = _mm512_loadu_si512(vb + 32 * z);
          w[2 * z] = as_bh(_mm512_permutex2var_epi16(a, ilo, b));
          w[2 * z + 1] = as_bh(_mm512_permutex2var_epi16(a, ihi, b));
        }
        for (int g = 0; g < G; ++g) {
          const __m512i pg = _mm512_set1_epi32(static_cast<int32_t>(P[jp][g]));
          for (int i = 0; i < NV; ++i)
            acc[g][i] = _mm512_dpbf16_ps(acc[g][i], as_bh(pg), w[i]);
        }
      }
    }
  }
  alignas(64) float ls[16];
  _mm512_store_ps(ls, l);
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(ls[g] > 0.f ? 1.f / ls[g] : 0.f);
    for (int i = 0; i < NV; ++i) store16(out + g * D + 16 * i, _mm512_mul_ps(acc[g][i], inv));
  }
}

template <int G, int NV>
void item_amx(const void* q, const void* k, const void* v, void* out, const int64_t* rs,
              const int64_t* rl, int64_t nr, int, float scale) {
  decode_item_amx<G, NV>(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
                         static_cast<const uint16_t*>(v), static_cast<uint16_t*>(out), rs, rl,
                         nr, scale);
}
#endif  // DOCPIPE_AMX

#if defined(__AVX512F__) || defined(DOCPIPE_AVX2)
#ifdef __AVX512F__
using Simd = Vec16;
#else
using Simd = Vec8;
#endif

// SIMD path for head_dim D (a multiple of the vector width) and a runtime G <= kMaxGroup:
// the queries and accumulators live in (L1-resident) arrays, so one body serves every G.
// Both phases of a tile of 16 keys go key by key, each K (then V) row read once, in order, and
// applied to every query head: the hardware prefetchers follow that stream from DRAM, where
// the same loads grouped head by head and chunk by chunk ran at half the bandwidth (measured:
// 10-15 against 22-28 GB/s on one Zen 4 core). On an AMX Xeon the AVX2 build's K/V loads
// still waited on memory: prefetching the tile kSimdAhead tiles ahead took that kernel from
// 16.5 to 20 GB/s (8 rows of ~1.1K keys, fp32 cache; bf16 cache 13.5 -> 16.3; 1 or 2 tiles
// ahead alike, 4 less; a 30 GB/s streaming read). Scores: each (head, key) a W-lane partial
// product, W keys reduced together (one transpose-and-add tree). bf16 K/V are widened as
// they are loaded.
constexpr int kSimdAhead = 2;  // tiles of 16 keys

template <typename TQ, typename TK, int D>
void decode_item_simd(const TQ* q, const TK* k, const TK* v, TQ* out, const int64_t* run_start,
                      const int64_t* run_len, int64_t num_runs, int G, float scale) {
  using A = Simd;
  using V = A::V;
  constexpr int W = A::W, NV = D / W, T = 16, NS = T / W;
  constexpr int CK = NV < 8 ? NV : 8, CV = NV < 4 ? NV : 4;  // row vectors held in registers
  static_assert(D % W == 0 && T % W == 0 && NV % CK == 0 && NV % CV == 0, "tile shapes");
  alignas(64) float qs[kMaxGroup][D];
  alignas(64) float acc[kMaxGroup][D];
  alignas(64) float part[kMaxGroup][T][W];  // per head and key: lanes to sum for the score
  alignas(64) float p[kMaxGroup][T];
  float m[kMaxGroup], l[kMaxGroup], corr[kMaxGroup];
  for (int g = 0; g < G; ++g) {
    for (int d = 0; d < D; ++d) qs[g][d] = load(q, g * D + d) * scale;
    for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  const V neg_inf = A::set1(-INFINITY);
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t first = run_start[r], count = run_len[r];
    for (int64_t t0 = 0; t0 < count; t0 += T) {
      const int n = static_cast<int>(count - t0 < T ? count - t0 : T);
      const TK* kt = k + (first + t0) * D;
      const TK* vt = v + (first + t0) * D;
      if (t0 + T * kSimdAhead < count) {  // K and V of the tile kSimdAhead ahead, in this run
        const int64_t next = t0 + T * kSimdAhead, rows = count - next < T ? count - next : T;
        prefetch_kv(k + (first + next) * D, v + (first + next) * D,
                    rows * D * static_cast<int64_t>(sizeof(TK)));
      }
      for (int j = 0; j < n; ++j) {
        // CK vectors of the row at a time (in registers), a head's sum carried between blocks
        for (int c0 = 0; c0 < NV; c0 += CK) {
          V kr[CK];
          for (int c = 0; c < CK; ++c) kr[c] = A::load(kt + j * D + (c0 + c) * W);
          for (int g = 0; g < G; ++g) {
            const float* qg = qs[g] + c0 * W;
            V t = c0 == 0 ? A::mul(A::load(qg), kr[0])
                          : A::fma(A::load(qg), kr[0], A::load(part[g][j]));
            for (int c = 1; c < CK; ++c) t = A::fma(A::load(qg + c * W), kr[c], t);
            A::store(part[g][j], t);
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        V s[NS];
        for (int h = 0; h < NS; ++h) {
          V lanes[W];  // past n: stale or unset, masked below
          for (int j = 0; j < W; ++j) lanes[j] = A::load(part[g][h * W + j]);
          s[h] = A::head(A::reduce(lanes), n - h * W, neg_inf);
        }
        V mx = s[0];
        for (int h = 1; h < NS; ++h) mx = A::max(mx, s[h]);
        const float tile_max = A::hmax(mx);
        // the first tile has nothing to correct (m = -inf); an unchanged max corrects by 1
        corr[g] = 1.f;
        if (tile_max > m[g]) {
          corr[g] = l[g] > 0.f ? exp_nonpositive(m[g] - tile_max) : 0.f;
          m[g] = tile_max;
        }
        const V mg = A::set1(m[g]);
        V sum = A::zero();
        for (int h = 0; h < NS; ++h) {
          const V e = A::head(A::exp(A::sub(s[h], mg)), n - h * W, A::zero());
          A::store(p[g] + h * W, e);
          sum = A::add(sum, e);
        }
        l[g] = l[g] * corr[g] + A::hsum(sum);
        if (corr[g] != 1.f) {
          const V cg = A::set1(corr[g]);
          for (int c = 0; c < NV; ++c)
            A::store(acc[g] + c * W, A::mul(A::load(acc[g] + c * W), cg));
        }
      }
      // keys in pairs (an odd last key paired with a weight-0 copy of itself: adds exact
      // zeros), CV vectors of both rows at a time: two FMAs per accumulator load and store
      for (int j = 0; j < n; j += 2) {
        const int j1 = j + 1 < n ? j + 1 : j;
        const TK* v0 = vt + j * D;
        const TK* v1 = vt + j1 * D;
        for (int c0 = 0; c0 < NV; c0 += CV) {
          V a[CV], b[CV];
          for (int c = 0; c < CV; ++c) {
            a[c] = A::load(v0 + (c0 + c) * W);
            b[c] = A::load(v1 + (c0 + c) * W);
          }
          for (int g = 0; g < G; ++g) {
            const V p0 = A::set1(p[g][j]);
            const V p1 = A::set1(j + 1 < n ? p[g][j + 1] : 0.f);
            float* ag = acc[g] + c0 * W;
            for (int c = 0; c < CV; ++c)
              A::store(ag + c * W, A::fma(p1, b[c], A::fma(p0, a[c], A::load(ag + c * W))));
          }
        }
      }
    }
  }
  alignas(64) float o[D];
  for (int g = 0; g < G; ++g) {
    const V inv = A::set1(l[g] > 0.f ? 1.f / l[g] : 0.f);
    for (int c = 0; c < NV; ++c) A::store(o + c * W, A::mul(A::load(acc[g] + c * W), inv));
    for (int d = 0; d < D; ++d) store(out, g * D + d, o[d]);
  }
}

template <typename TQ, typename TK, int D>
void item_simd(const void* q, const void* k, const void* v, void* out, const int64_t* rs,
               const int64_t* rl, int64_t nr, int G, float scale) {
  decode_item_simd<TQ, TK, D>(static_cast<const TQ*>(q), static_cast<const TK*>(k),
                              static_cast<const TK*>(v), static_cast<TQ*>(out), rs, rl, nr, G,
                              scale);
}
#endif  // SIMD

template <typename TQ, typename TK, int DT>
void item_portable(const void* q, const void* k, const void* v, void* out, const int64_t* rs,
                   const int64_t* rl, int64_t nr, int G, int D, float scale) {
  decode_item<TQ, TK, DT>(static_cast<const TQ*>(q), static_cast<const TK*>(k),
                          static_cast<const TK*>(v), static_cast<TQ*>(out), rs, rl, nr, G, D,
                          scale);
}

// One work item: (q, k, v, out, run_start, run_len, num_runs, G, scale).
using ItemFn = void (*)(const void*, const void*, const void*, void*, const int64_t*,
                        const int64_t*, int64_t, int, float);

enum Path { kPortable = 0, kSimd = 1, kAvx512 = 2, kAmx = 3 };

// The fastest path compiled in for this shape, and its item function (nullptr: portable).
template <typename TQ, typename TK>
ItemFn pick(int G, int D, Path* path) {
  *path = kPortable;
  (void)G;
  (void)D;
#ifndef DOCPIPE_DECODE_PORTABLE  // -DDOCPIPE_DECODE_PORTABLE: the portable path only (benchmarks)
#ifdef DOCPIPE_AMX
  // bf16 q and cache where the OS grants the tiles, the register path's shapes
  if constexpr (sizeof(TQ) == 2 && sizeof(TK) == 2) {
    if (G >= 2 && (D == 64 || D == 128) && G * (D / 16) <= 24 && amx_permitted()) {
      ItemFn fn = nullptr;
      switch (G * 1000 + D) {
        case 2064: fn = item_amx<2, 4>; break;
        case 3064: fn = item_amx<3, 4>; break;
        case 4064: fn = item_amx<4, 4>; break;
        case 5064: fn = item_amx<5, 4>; break;
        case 6064: fn = item_amx<6, 4>; break;
        case 2128: fn = item_amx<2, 8>; break;
        case 3128: fn = item_amx<3, 8>; break;
        default: break;
      }
      if (fn != nullptr) {
        *path = kAmx;
        return fn;
      }
    }
  }
#endif
#ifdef __AVX512F__
  // The register path where G x head_dim/16 queries (and as many accumulators) fit in the 32
  // registers and G >= 2 reuses each loaded key; measured on Zen 4, the SIMD path is faster
  // elsewhere (G = 1, or the register path spilling, e.g. G = 8 at head_dim 128).
  if (G >= 2 && (D == 64 || D == 128) && G * (D / 16) <= 24) {
    ItemFn fn = nullptr;
    switch (G * 1000 + D) {
      case 2064: fn = item_avx512<TQ, TK, 2, 4>; break;
      case 3064: fn = item_avx512<TQ, TK, 3, 4>; break;
      case 4064: fn = item_avx512<TQ, TK, 4, 4>; break;
      case 5064: fn = item_avx512<TQ, TK, 5, 4>; break;
      case 6064: fn = item_avx512<TQ, TK, 6, 4>; break;
      case 2128: fn = item_avx512<TQ, TK, 2, 8>; break;
      case 3128: fn = item_avx512<TQ, TK, 3, 8>; break;
      default: break;
    }
    if (fn != nullptr) {
      *path = kAvx512;
      return fn;
    }
  }
#endif
#if defined(__AVX512F__) || defined(DOCPIPE_AVX2)
  if (G >= 1 && G <= kMaxGroup) {
    *path = kSimd;
    if (D == 64) return item_simd<TQ, TK, 64>;
    if (D == 128) return item_simd<TQ, TK, 128>;
    if (D == 256) return item_simd<TQ, TK, 256>;
    *path = kPortable;
  }
#endif
#endif  // DOCPIPE_DECODE_PORTABLE
  return nullptr;
}

template <typename TQ, typename TK>
void run(const TQ* q, int64_t q_row_stride, const TK* k, const TK* v, int64_t kv_head_stride,
         TQ* out, int64_t out_row_stride, const int64_t* rows, const int64_t* run_off,
         const int64_t* run_start, const int64_t* run_len, int64_t num_rows, int H, int Hkv,
         int D, float scale) {
  const int G = H / Hkv;
  Path path;
  ItemFn fast = pick<TQ, TK>(G, D, &path);
  // the portable body with head_dim known at compile time where it is common
  using PortableFn = void (*)(const void*, const void*, const void*, void*, const int64_t*,
                              const int64_t*, int64_t, int, int, float);
  const PortableFn slow = D == 64    ? item_portable<TQ, TK, 64>
                          : D == 128 ? item_portable<TQ, TK, 128>
                                     : item_portable<TQ, TK, 0>;
  const int64_t items = num_rows * Hkv;
#pragma omp parallel
  {
#ifdef DOCPIPE_AMX
  if (path == kAmx) configure_tiles();  // per thread; released below
#endif
#pragma omp for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / Hkv;
    const int h = static_cast<int>(it % Hkv);
    const int64_t row = rows[i];
    const TQ* qi = q + row * q_row_stride + h * G * D;
    TQ* oi = out + row * out_row_stride + h * G * D;
    const TK* kh = k + h * kv_head_stride;
    const TK* vh = v + h * kv_head_stride;
    const int64_t* rs = run_start + run_off[i];
    const int64_t* rl = run_len + run_off[i];
    const int64_t nr = run_off[i + 1] - run_off[i];
    if (fast != nullptr)
      fast(qi, kh, vh, oi, rs, rl, nr, G, scale);
    else
      slow(qi, kh, vh, oi, rs, rl, nr, G, D, scale);
  }
#ifdef DOCPIPE_AMX
  if (path == kAmx) _tile_release();
#endif
  }
}

}  // namespace

extern "C" {

int docpipe_paged_decode_limits(int* max_group, int* max_dim) {
  *max_group = kMaxGroup;
  *max_dim = kMaxDim;
  return 2;  // ABI version: (dtype, kv_dtype, ...)
}

// The path docpipe_paged_decode takes for these types and shape: 3 AMX, 2 AVX-512 (registers),
// 1 SIMD (AVX-512 or AVX2 + FMA, see docpipe_paged_decode_simd_width), 0 portable,
// -1 not supported (the type pair, or G/D past the limits).
int docpipe_paged_decode_path(int dtype, int kv_dtype, int G, int D) {
  if (G < 1 || G > kMaxGroup || D < 1 || D > kMaxDim) return -1;
  Path path;
  if (dtype == 0 && kv_dtype == 0) pick<float, float>(G, D, &path);
  else if (dtype == 1 && kv_dtype == 1) pick<uint16_t, uint16_t>(G, D, &path);
  else if (dtype == 0 && kv_dtype == 1) pick<float, uint16_t>(G, D, &path);
  else return -1;
  return path;
}

// fp32 lanes of the SIMD path's vectors: 16 (AVX-512), 8 (AVX2 + FMA), 0 (not built).
int docpipe_paged_decode_simd_width() {
#if defined(__AVX512F__) || defined(DOCPIPE_AVX2)
  return Simd::W;
#else
  return 0;
#endif
}

// dtype: q/out, kv_dtype: the cache; 0 = float32, 1 = bfloat16. Pairs: (0, 0), (1, 1), (0, 1).
// Pointers are to the first element of each tensor. Returns 1 when computed, 0 for a type
// pair it does not take (nothing written).
int docpipe_paged_decode(int dtype, int kv_dtype, const void* q, int64_t q_row_stride,
                         const void* k, const void* v, int64_t kv_head_stride, void* out,
                         int64_t out_row_stride, const int64_t* rows, const int64_t* run_off,
                         const int64_t* run_start, const int64_t* run_len, int64_t num_rows,
                         int H, int Hkv, int D, float scale) {
  if (Hkv < 1 || H % Hkv != 0 || H / Hkv > kMaxGroup || D < 1 || D > kMaxDim) return 0;
#define DOCPIPE_RUN(TQ, TK)                                                                  \
  run(static_cast<const TQ*>(q), q_row_stride, static_cast<const TK*>(k),                    \
      static_cast<const TK*>(v), kv_head_stride, static_cast<TQ*>(out), out_row_stride, rows, \
      run_off, run_start, run_len, num_rows, H, Hkv, D, scale)
  if (dtype == 0 && kv_dtype == 0) DOCPIPE_RUN(float, float);
  else if (dtype == 1 && kv_dtype == 1) DOCPIPE_RUN(uint16_t, uint16_t);
  else if (dtype == 0 && kv_dtype == 1) DOCPIPE_RUN(float, uint16_t);
  else return 0;
#undef DOCPIPE_RUN
  return 1;
}

}  // extern "C"
