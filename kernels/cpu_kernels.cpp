// The CPU's paged-attention kernel, float32 (the element-wise kernels and the torch operators
// that call this one are in cpu_ops.cpp).
//
// Paged attention: one call per layer attends every query of a ragged batch (prompt chunks and
// decodes) to its sequence's keys and values, read straight out of the paged cache through the
// block table. No gathered copy of the context, no mask tensor, no work on masked tiles: each
// query tile walks only the keys it can see, in tiles of KT keys, with an online softmax. First
// this step's keys and values are written into their cache slots (keys rotated by RoPE when
// rotary tables are given); then the tiles run in parallel on OpenMP threads (torch's runtime:
// cpu.py links the library against the one torch loaded). Tiles with many query rows (prompt
// chunks) vectorise both products over query rows (broadcasting one key or value element at a
// time); tiles with few (decodes; every KV head of a sequence in one tile when there are enough
// sequences to fill the threads) take dot products over the head dim (the AVX-512 build: the
// query heads that share a KV head as one vector, four dims each, see group_scores; and a tile of
// two such groups reads each key's cache row whole, see pair_scores). Layouts: see
// ModgenAttentionCall.
//
// Built at run time by modgen/kernels/cpu.py with -DHEAD_DIM=<d>, once per instruction set
// (cpu.py's ISA table), with no torch headers (half a second); the torch operator
// modgen::paged_attention calls the build for its head dim. Vectors are GCC vector extensions of
// the instruction set's native width (16 floats for AVX-512, 8 for AVX2, 4 for NEON or SSE),
// never wider: a vector type wider than the hardware is split or scalarised by the compiler,
// which made a 16-float build 20x slower on AVX2. Register blocking follows the register count
// (32 or 16).

#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<head dim>"
#endif

#include "cpu_common.h"
#include "cpu_linear.h"  // exported below too, so each instruction set's build can be tested

namespace {

// Tuning knobs (-D at build time, for experiments; cpu.py builds the defaults): keys per tile,
// register blocks of the row-vectorised products, key tiles prefetched ahead by decode tiles,
// the cache level they are prefetched into (0: L1, 1: L2, 2: L3), whether those prefetches are
// spread over the products a key at a time (1) or asked for at once per tile (0), and the rows
// that share one load of each key (GQ, below). Key tiles of 64 (against 32) halve what each tile
// costs besides its products (the block-table walk, the softmax's reductions, the output block's
// load, rescale and store): decode tiles over caches whose blocks lie in runs, as the blocked
// allocator hands them out, ran 8-13% faster on Zen 5 (AVX-512 and AVX2 builds), prompt tiles
// about 1% (docs/notes.md).
#ifndef MODGEN_KT
#define MODGEN_KT 64
#endif
#ifndef MODGEN_NJ
#define MODGEN_NJ 4
#endif
#ifndef MODGEN_ND
#define MODGEN_ND 4
#endif
#ifndef MODGEN_PF
#define MODGEN_PF 2
#endif
#ifndef MODGEN_PFI
#define MODGEN_PFI 1
#endif
#ifndef MODGEN_SPREAD
#define MODGEN_SPREAD 1
#endif
#ifndef MODGEN_NEXT
#define MODGEN_NEXT 1
#endif
// Grouped decode tiles read a key tile's two halves side by side (group_scores takes four keys
// from each half a step, decode_pv alternates): two streams in flight instead of one. A loop
// that only reads scattered 8 KB blocks ran 57 GB/s on both cores reading two blocks side by
// side and 41 reading one after the other (Zen 5); grouped decode tiles from memory, 5% faster.
#ifndef MODGEN_ILV
#define MODGEN_ILV 1
#endif
constexpr bool ILV = MODGEN_ILV;
constexpr int KT = MODGEN_KT;             // keys per tile
constexpr int MAX_ROWS = 64;              // query rows (query x head) per tile
constexpr int DECODE_ROWS = 16;           // tiles with fewer rows take the dot-product path
constexpr int DC = (HEAD_DIM + W - 1) / W;  // head dim in vectors
constexpr int DP = DC * W;                // head dim padded to whole vectors
constexpr int RV_MAX = MAX_ROWS / W;      // query rows per tile, in vectors
// register blocks: products over rows take NJ keys (or ND head-dim elements) x NC row vectors;
// decode tiles accumulate RB rows x CG head-dim vectors
constexpr int NJ = MODGEN_NJ, ND = MODGEN_ND, NC = NREG >= 32 ? 4 : 2;
constexpr int RB = NREG >= 32 ? 4 : 2;
constexpr int CG = DC < (NREG / 2) / RB ? DC : (NREG / 2) / RB;
static_assert(KT % W == 0 && KT % NJ == 0, "a key tile is whole vectors and whole key blocks");
static_assert(KT % 8 == 0, "the broadcast scores take keys eight at a time");
constexpr int QB = HEAD_DIM / 4 > 0 ? HEAD_DIM / 4 : 1;  // head dim in four-float chunks
// Scores are kept in log2 units (the query scale carries log2(e)), so the softmax takes vexp2.
constexpr float LOG2E = 1.44269504088896341f;

using namespace modgen;

// The W lane sums of W vectors, as one vector, by halving: each level folds pairs of vectors
// into one holding both inputs' partial sums, segment by segment. Output lane i at fold size s
// takes lanes lo(i, s) and lo(i, s) + s of the pair (a, b), a's lanes first.
constexpr int fold_lane(int i, int s) { return (i / s % 2) * W + i / s / 2 * 2 * s + i % s; }

template <int S, std::size_t... I>
inline vf fold(vf a, vf b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, fold_lane(I, S)...) +
         __builtin_shufflevector(a, b, (fold_lane(I, S) + S)...);
}

template <int S>
inline void fold_levels(vf *t, int n) {
  for (int i = 0; i < n / 2; ++i) t[i] = fold<S>(t[2 * i], t[2 * i + 1], std::make_index_sequence<W>{});
  if constexpr (S > 1) fold_levels<S / 2>(t, n / 2);
}

// Sums of t[0] .. t[W - 1] (t is overwritten). The sums land in a fixed lane order: callers put
// key j in slot tree_slots.slot[j] to find its sum in lane j.
inline vf tree_sum(vf *t) {
  fold_levels<W / 2>(t, W);
  return t[0];
}

struct TreeSlots {
  int slot[W];  // slot[j]: the input of tree_sum whose sum lands in lane j
  TreeSlots() {
    vf t[W];
    for (int i = 0; i < W; ++i) t[i] = vf{} + static_cast<float>(i);
    const vf out = tree_sum(t);
    for (int j = 0; j < W; ++j) slot[j] = static_cast<int>(out[j]) / W;
  }
};
const TreeSlots tree_slots;

struct Item {
  int32_t seq, head, q0, nq;  // sequence, first KV head, first query of the tile, queries in it
  int32_t nh;                 // KV heads in the tile (rows: query, then KV head, then group)
};

struct Scratch {
  // decode path (fewer than DECODE_ROWS rows): dot products over the head dim
  vf qv[DECODE_ROWS][DC];       // query rows, pre-scaled
  vf acc[DECODE_ROWS][DC];      // output rows
  float pk[DECODE_ROWS][KT];    // probabilities of a key tile, per row (a group's, grouped)
  vf qb[DECODE_ROWS / RB][QB];  // query rows a group of RB, four dims interleaved (see BCAST)
  float m[DECODE_ROWS], l[DECODE_ROWS], alpha[DECODE_ROWS];
  int64_t qpos[DECODE_ROWS];
  // prompt path (many rows): both products vectorised over query rows
  vf qt[HEAD_DIM][RV_MAX];    // query tile, transposed: qt[d][row vector]
  vf p[KT][RV_MAX];           // scores, then probabilities: p[key][row vector]
  vf acct[HEAD_DIM][RV_MAX];  // output, transposed
};

}  // namespace


namespace {

using Args = ModgenAttentionCall;

// x rotated by its token's cos/sin (Hugging Face's rotate_half convention) into dst: the first
// rot dims rotate in halves, the others (partial rotary) pass through.
inline void rope(const float *x, const float *cos, const float *sin, int64_t rot, float *dst) {
  const int64_t half = rot / 2;
  for (int64_t d = 0; d < half; ++d) dst[d] = x[d] * cos[d] - x[d + half] * sin[d];
  for (int64_t d = half; d < rot; ++d) dst[d] = x[d] * cos[d] + x[d - half] * sin[d];
  for (int64_t d = rot; d < HEAD_DIM; ++d) dst[d] = x[d];
}

// Query row (token t, head) into dst, rotated if the call has rope tables, times the scale.
inline void load_query(const Args &a, int64_t t, int64_t head, float *dst) {
  const float *x = a.q + t * a.q_stride + head * HEAD_DIM;
  if (a.cos != nullptr) {
    rope(x, a.cos + t * a.rot_dim, a.sin + t * a.rot_dim, a.rot_dim, dst);
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] *= a.scale * LOG2E;
  } else {
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] = x[d] * (a.scale * LOG2E);
  }
}

// This step's keys (rotated if the call has rope tables) and values into their cache slots.
inline void write_kv(const Args &a, int64_t t) {
  const int64_t slot = a.slot_mapping[t];
  for (int64_t h = 0; h < a.hkv; ++h) {
    const int64_t off = (slot * a.hkv + h) * HEAD_DIM;
    const float *k = a.k + t * a.k_stride + h * HEAD_DIM;
    if (a.cos != nullptr) {
      rope(k, a.cos + t * a.rot_dim, a.sin + t * a.rot_dim, a.rot_dim, a.k_cache + off);
    } else {
      std::memcpy(a.k_cache + off, k, HEAD_DIM * sizeof(float));
    }
    std::memcpy(a.v_cache + off, a.v + t * a.v_stride + h * HEAD_DIM, HEAD_DIM * sizeof(float));
  }
}

// Where the keys and values of positions p0 .. p0 + KT - 1 (head `head`) sit in the cache, found
// through the block table; positions past the nk real ones repeat the last (they are masked).
inline void key_tile(const Args &a, const int64_t *table, int64_t head, int64_t p0, int nk,
                     const float **kp, const float **vp) {
  int64_t block = p0 / a.block_size, offset = p0 % a.block_size;  // one division per tile
  for (int j = 0; j < KT; ++j) {
    const int64_t off = ((table[block] * a.block_size + offset) * a.hkv + head) * HEAD_DIM;
    kp[j] = a.k_cache + off;
    vp[j] = a.v_cache + off;
    if (j + 1 < nk && ++offset == a.block_size) {  // past the end: repeat the last key
      offset = 0;
      ++block;
    }
  }
}

// A prefetch the compiler keeps (GCC 12 dropped __builtin_prefetch from the decode loops), into L2
// by default (MODGEN_PFI=1, prefetcht1): into L1 (prefetcht0) decode tiles ran 15-20% slower
// while they prefetched a tile in one burst; spread out (below), the level changed nothing.
inline void prefetch(const float *p) {
#if defined(__x86_64__) && MODGEN_PFI == 0
  asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char *>(p)));
#elif defined(__x86_64__) && MODGEN_PFI == 2
  asm volatile("prefetcht2 %0" : : "m"(*reinterpret_cast<const char *>(p)));
#elif defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*reinterpret_cast<const char *>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Ask for a later key tile's keys and values (KV heads head .. head + nh - 1) at once, all 2 x KT
// x nh x HEAD_DIM / 16 lines (MODGEN_SPREAD=0): the burst stalls the core until the miss
// buffers drain, so the tile's products wait on memory instead of overlapping it.
inline void prefetch_tile(const Args &a, const int64_t *table, int64_t head, int64_t nh,
                          int64_t p0, int64_t hi) {
  constexpr int64_t LINE = 64 / sizeof(float);
  int64_t block = p0 / a.block_size, offset = p0 % a.block_size;
  for (int64_t pos = p0; pos < p0 + KT && pos < hi; ++pos) {
    const int64_t off = ((table[block] * a.block_size + offset) * a.hkv + head) * HEAD_DIM;
    if (++offset == a.block_size) {
      offset = 0;
      ++block;
    }
    for (int64_t x = 0; x < nh * HEAD_DIM; x += LINE) {
      prefetch(a.k_cache + off + x);
      prefetch(a.v_cache + off + x);
    }
  }
}

// A later key tile's keys and values, prefetched a key at a time inside the products of this one
// (the score loop takes the keys, the first value block the values). Decode tiles do little
// arithmetic per byte and their blocks lie anywhere in memory; spread out, the prefetches overlap
// the products, and decode tiles over a cache larger than L3 ran 1.1-1.35x faster than with one
// burst a tile, 1.3-1.45x with the next tile's first keys fetched too (docs/notes.md).
struct Ahead {
  const float *k[KT], *v[KT];
  int n = 0;    // keys to prefetch (0: none)
  int len = 0;  // floats a key (every KV head of the tile)
  void fetch(const float *p) const {
    for (int x = 0; x < len; x += 64 / static_cast<int>(sizeof(float))) prefetch(p + x);
  }
};
const Ahead no_ahead{};

// A vector of HEAD_DIM's c-th W floats from src (which need not be aligned); a head dim that is
// not a whole number of vectors is zero-padded.
inline vf load_chunk(const float *src, int c) {
  if constexpr (HEAD_DIM % W == 0) {
    return load(src + c * W);
  } else {
    vf v = vf{};
    const int n = HEAD_DIM - c * W < W ? HEAD_DIM - c * W : W;
    std::memcpy(&v, src + c * W, n * sizeof(float));
    return v;
  }
}

// Keep v in a register: without this GCC folds each reuse of a loaded vector into its FMA as a
// memory operand, so the products' inner loops load as often as they multiply (and on Zen 4 the
// loads, not the FMAs, set the pace). Held in registers, prompt tiles ran 15-20% faster with
// AVX-512 and 5-10% with AVX2 (docs/notes.md).
inline void in_register(vf &v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));  // any of the 32 vector registers
#elif defined(__x86_64__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  (void)v;
#endif
}

// ---- decode path: few query rows, dot products over the head dim --------------------------

// Whether rows r0 .. r0 + n - 1 all read one KV head (merged heads can interleave them: with
// one query head a KV head and three heads, rows 0 .. 3 read heads 0, 1, 2, 0).
inline bool one_head(const int64_t *hoff, int r0, int n) {
  for (int i = 1; i < n; ++i)
    if (hoff[r0 + i] != hoff[r0]) return false;
  return true;
}

// acc[r0 .. r0 + RB)[c0 .. c0 + N) = acc * alpha + p @ v, for nk keys; G: the rows' probabilities
// are in the broadcast path's group layout (one KV head).
template <int N, bool G = false>
inline void decode_pv(Scratch &s, int r0, int c0, const float *const *vp, const int64_t *hoff,
                      int nk, const Ahead &pf) {
  const float *pg = s.pk[r0];
  vf acc[RB][N];
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < N; ++c) acc[i][c] = s.acc[r0 + i][c0 + c] * s.alpha[r0 + i];
  if (one_head(hoff, r0, RB)) {  // one KV head: share each value load
    const bool ilv = G && ILV && nk == KT;  // the order group_scores read the keys in
    for (int jj = 0; jj < nk; ++jj) {
      const int j = ilv ? (jj % 2 ? KT / 2 + jj / 2 : jj / 2) : jj;
      if (j < pf.n) pf.fetch(pf.v[j]);
      for (int c = 0; c < N; ++c) {
        const vf v = load_chunk(vp[j] + hoff[r0], c0 + c);
        for (int i = 0; i < RB; ++i)
          acc[i][c] += (G ? pg[(j / 4) * W + 4 * i + j % 4] : s.pk[r0 + i][j]) * v;
      }
    }
  } else {
    for (int j = 0; j < nk; ++j) {
      if (j < pf.n) pf.fetch(pf.v[j]);
      for (int i = 0; i < RB; ++i)
        for (int c = 0; c < N; ++c)
          acc[i][c] += s.pk[r0 + i][j] * load_chunk(vp[j] + hoff[r0 + i], c0 + c);
    }
  }
  for (int j = nk; j < pf.n; ++j) pf.fetch(pf.v[j]);  // this tile is short: the rest
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < N; ++c) s.acc[r0 + i][c0 + c] = acc[i][c];
}

// Scores of NH x G query rows from r0 against a key tile, one score vector per W keys: rows
// r0 + h G .. r0 + h G + G - 1 share the KV head at hoff[r0 + h G], whose head-dim vectors of each
// key are loaded once for those G rows (grouped-query heads read the same keys), and W keys' dot
// products are summed by one tree per row. With NH = 2 (the two-half tiles, HALVES) each key's
// two head slices are read one after the other: its whole cache row when the heads neighbour.
template <int G, int NH = 1>
inline void decode_scores(const Scratch &s, int r0, const float *const *kp, const int64_t *hoff,
                          vf (*sc)[KT / W], const Ahead &pf) {
  for (int h = 0; h < KT / W; ++h) {
    vf t[NH * G][W];
    for (int j = 0; j < W; ++j) {
      if (h * W + j < pf.n) pf.fetch(pf.k[h * W + j]);
      for (int slice = 0; slice < NH; ++slice) {
        const float *k = kp[h * W + j] + hoff[r0 + slice * G];
        vf kc[DC];
        for (int c = 0; c < DC; ++c) kc[c] = load_chunk(k, c);
        for (int i = slice * G; i < (slice + 1) * G; ++i) {
          vf dot = s.qv[r0 + i][0] * kc[0];
          for (int c = 1; c < DC; ++c) dot += s.qv[r0 + i][c] * kc[c];
          t[i][tree_slots.slot[j]] = dot;
        }
      }
    }
    for (int i = 0; i < NH * G; ++i) sc[i][h] = tree_sum(t[i]);
  }
}

// Row r's online-softmax update from its scores sc against a key tile: probabilities into
// s.pk[r], the rescale of earlier output into s.alpha[r].
inline void decode_softmax_row(const Args &a, Scratch &s, int r, vf *sc, int64_t p0, int nk,
                               bool partial) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr int NV = KT / W;  // score vectors per tile
  vf keep[NV];
  for (int h = 0; h < NV; ++h) keep[h] = vf{} + 1.0f;
  if (partial) {
    const int64_t qp = s.qpos[r];
    for (int j = 0; j < KT; ++j) {
      const int64_t kpos = p0 + j;
      if (!(j < nk && kpos <= qp && (a.window <= 0 || kpos > qp - a.window))) {
        sc[j / W][j % W] = neg_inf;
        keep[j / W][j % W] = 0.0f;
      }
    }
  }
  vf vmax = sc[0];
  for (int h = 1; h < NV; ++h) vmax = sc[h] > vmax ? sc[h] : vmax;
  const float mx = hmax(vmax);
  const float m_new = mx > s.m[r] ? mx : s.m[r];
  float alpha = 1.0f;
  if (m_new != neg_inf) {
    vf vsum = vf{};
    for (int h = 0; h < NV; ++h) {
      const vf pr = vexp2(sc[h] - m_new) * keep[h];
      store(s.pk[r] + h * W, pr);
      vsum += pr;
    }
    const float sum = hsum(vsum);
    alpha = s.m[r] == neg_inf ? 0.0f : std::exp2(s.m[r] - m_new);
    s.l[r] = s.l[r] * alpha + sum;
    s.m[r] = m_new;
  } else {
    for (int j = 0; j < KT; ++j) s.pk[r][j] = 0.0f;
  }
  s.alpha[r] = alpha;
}

// ---- decode scores by four-float broadcasts (the AVX-512 build, see BCAST) -------------------
// A group of RB = W / 4 rows that share one KV head is one vector: lane 4i + e of a key's product
// holds row i's dims 4c + e times the key's (its four floats broadcast to every row's lanes, one
// 128-bit load). A key's RB dot products then fold from four lanes to one, and four keys share
// the folds: three fold steps for four keys of every row, where decode_scores folds W lanes a
// row (W - 1 steps a row for W keys). The probabilities stay in that layout: s.pk[r0 ..] holds
// the group's tile as KT / 4 vectors, lane 4i + e of vector h row i's key 4h + e.
// Four floats at p, repeated over the vector: one broadcast load (GCC 12 turns a four-to-W lane
// __builtin_shufflevector into a trip through the stack, which made this path 3x slower).
inline vf bcast4(const float *p) {
  vf v;
#if defined(__AVX512F__)
  const __m512 x = _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  std::memcpy(&v, &x, sizeof(v));
#else
  for (int i = 0; i < W; ++i) v[i] = p[i % 4];
#endif
  return v;
}

// Lanes of the folds, within each group of four: (a, b) -> {a0 + a2, a1 + a3, b0 + b2, b1 + b3}
// (two keys' four partial sums to two each), then (c, d) -> {c0 + c1, c2 + c3, d0 + d1, d2 + d3}.
constexpr int half_lane(int i, int hi) {
  return i % 4 < 2 ? i / 4 * 4 + i % 4 + 2 * hi : W + i / 4 * 4 + i % 4 - 2 + 2 * hi;
}
constexpr int pair_lane(int i, int hi) {
  return i % 4 < 2 ? i / 4 * 4 + 2 * (i % 4) + hi : W + i / 4 * 4 + 2 * (i % 4 - 2) + hi;
}
template <std::size_t... I>
inline vf fold_half(vf a, vf b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, half_lane(I, 0)...) +
         __builtin_shufflevector(a, b, half_lane(I, 1)...);
}
template <std::size_t... I>
inline vf fold_pair(vf c, vf d, std::index_sequence<I...>) {
  return __builtin_shufflevector(c, d, pair_lane(I, 0)...) +
         __builtin_shufflevector(c, d, pair_lane(I, 1)...);
}

// Scores of group grp (rows sharing the KV head at hoff) against a key tile: sc[h], lane 4i + e,
// is row i's score of key 4h + e. Eight keys at a time, each its own accumulator (eight FMA
// chains in flight), with one key's prefetch in each of the first eight dim steps.
inline void group_scores(const Scratch &s, int grp, const float *const *kp, int64_t hoff,
                         vf *sc, const Ahead &pf) {
  constexpr auto lanes = std::make_index_sequence<W>{};
  for (int t = 0; t < KT / 8; ++t) {
    // step t's keys: four from each half of the tile (ILV), or eight in a row
    int key[8];
    for (int j = 0; j < 8; ++j)
      key[j] = ILV ? (j < 4 ? 4 * t + j : KT / 2 + 4 * t + j - 4) : 8 * t + j;
    const float *k[8];
    for (int j = 0; j < 8; ++j) k[j] = kp[key[j]] + hoff;
    vf acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = s.qb[grp][0] * bcast4(k[j]);
    for (int c = 1; c < QB; ++c) {
      if (c <= 8 && key[c - 1] < pf.n) pf.fetch(pf.k[key[c - 1]]);
      const vf q = s.qb[grp][c];
      for (int j = 0; j < 8; ++j) acc[j] += q * bcast4(k[j] + 4 * c);
    }
    if constexpr (QB < 9)
      for (int j = QB - 1; j < 8; ++j)
        if (key[j] < pf.n) pf.fetch(pf.k[key[j]]);
    for (int h = 0; h < 2; ++h)  // keys key[4h .. 4h + 3]: four in a row
      sc[key[4 * h] / 4] = fold_pair(fold_half(acc[4 * h], acc[4 * h + 1], lanes),
                                     fold_half(acc[4 * h + 2], acc[4 * h + 3], lanes), lanes);
  }
}

// The group's online-softmax update from its scores sc (group_scores' layout): probabilities
// into s.pk[r0 ..] in the same layout, each row's rescale into s.alpha.
inline void group_softmax(const Args &a, Scratch &s, int r0, vf *sc, int64_t p0, int nk,
                          bool partial) {
  constexpr int NV = KT / 4;
  constexpr auto lanes = std::make_index_sequence<W>{};
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (partial) {
    for (int i = 0; i < RB; ++i) {
      const int64_t qp = s.qpos[r0 + i];
      for (int j = 0; j < KT; ++j) {
        const int64_t kpos = p0 + j;
        if (!(j < nk && kpos <= qp && (a.window <= 0 || kpos > qp - a.window)))
          sc[j / 4][4 * i + j % 4] = neg_inf;
      }
    }
  }
  vf mx = sc[0];
  for (int h = 1; h < NV; ++h) mx = sc[h] > mx ? sc[h] : mx;
  mx = swap_lanes<2>(mx, lanes) > mx ? swap_lanes<2>(mx, lanes) : mx;
  mx = swap_lanes<1>(mx, lanes) > mx ? swap_lanes<1>(mx, lanes) : mx;  // a row's max, 4 lanes
  vf m_old;
  for (int x = 0; x < W; ++x) m_old[x] = s.m[r0 + x / 4];
  const vf m_new = mx > m_old ? mx : m_old;
  const vf m_safe = m_new == neg_inf ? vf{} : m_new;  // rows that see no key yet
  vf sum = vf{};
  float *p = s.pk[r0];
  for (int h = 0; h < NV; ++h) {
    const vf pr = sc[h] == neg_inf ? vf{} : vexp2(sc[h] - m_safe);
    store(p + h * W, pr);
    sum += pr;
  }
  sum += swap_lanes<2>(sum, lanes);
  sum += swap_lanes<1>(sum, lanes);
  const vf alpha = m_old == neg_inf ? vf{} : vexp2(m_old - m_safe);
  for (int i = 0; i < RB; ++i) {
    s.l[r0 + i] = s.l[r0 + i] * alpha[4 * i] + sum[4 * i];
    s.m[r0 + i] = m_new[4 * i];
    s.alpha[r0 + i] = alpha[4 * i];
  }
}

// Rows sharing one KV head take their scores GQ at a time (GQ divides RB, so rows_pad is whole
// groups); a group whose rows straddle two KV heads (fewer query heads per KV head than GQ)
// takes them one row at a time. On Zen 4, four at a time made AVX-512 decode tiles 0-13%
// faster, two at a time the AVX2 build's 3-10% (16 registers: four would spill).
#ifndef MODGEN_GQ
#define MODGEN_GQ (NREG >= 32 ? 4 : 2)
#endif
constexpr int GQ = MODGEN_GQ;
static_assert(RB % GQ == 0, "score groups tile the padded rows");

// Whether one-head groups take the broadcast path (group_scores; MODGEN_BCAST=0: never): the
// AVX-512 build only. On Zen 5, interleaved with the dot-product path, AVX-512 decode tiles ran
// 10-20% faster on keys in cache and the same on keys from memory; the AVX2 build (RB = 2) ran
// 5-10% faster in cache and 10% slower from memory (twice the loads a key), so it keeps the
// dot products.
#ifndef MODGEN_BCAST
#define MODGEN_BCAST 1
#endif
constexpr bool BCAST = MODGEN_BCAST && W == 16 && RB * 4 == W && HEAD_DIM % 4 == 0 && GQ == RB;

// Tiles of two four-row halves, each on one KV head, take their scores key by key, both heads'
// slices of each key together (decode_scores with NH = 2), rather than head by head over the
// tile: the dot-product builds' counterpart of pair_scores.
#ifndef MODGEN_HALVES
#define MODGEN_HALVES 1
#endif
constexpr int HH = 4;  // rows a head in those tiles
constexpr bool HALVES = MODGEN_HALVES && !BCAST && 2 * HH <= DECODE_ROWS;

inline void decode_tile_softmax(const Args &a, Scratch &s, int rows_pad, const float *const *kp,
                                const int64_t *hoff, int64_t p0, int nk, bool partial,
                                const Ahead &pf) {
  if (HALVES && rows_pad == 2 * HH && one_head(hoff, 0, HH) && one_head(hoff, HH, HH)) {
    vf sc[2 * HH][KT / W];
    decode_scores<HH, 2>(s, 0, kp, hoff, sc, pf);
    for (int i = 0; i < 2 * HH; ++i) decode_softmax_row(a, s, i, sc[i], p0, nk, partial);
    return;
  }
  vf sc[GQ][KT / W];
  for (int r0 = 0; r0 < rows_pad; r0 += GQ) {
    if (BCAST && one_head(hoff, r0, GQ)) {  // (GQ = RB: the group is a register block)
      vf sg[KT / 4];
      group_scores(s, r0 / RB, kp, hoff[r0], sg, r0 == 0 ? pf : no_ahead);
      group_softmax(a, s, r0, sg, p0, nk, partial);
      continue;
    }
    if (one_head(hoff, r0, GQ)) {
      decode_scores<GQ>(s, r0, kp, hoff, sc, r0 == 0 ? pf : no_ahead);
      for (int i = 0; i < GQ; ++i) decode_softmax_row(a, s, r0 + i, sc[i], p0, nk, partial);
    } else {
      for (int i = 0; i < GQ; ++i) {
        decode_scores<1>(s, r0 + i, kp, hoff, sc, r0 + i == 0 ? pf : no_ahead);
        decode_softmax_row(a, s, r0 + i, sc[0], p0, nk, partial);
      }
    }
  }
}

// ---- decode tiles of two groups, keys read in row order (the AVX-512 build, see PAIRS) --------
// A tile of two score groups (one query, two KV heads of four query heads each: the merged tile
// of a model with two KV heads, or a pair of a larger model's) reads each key's cache row (or
// that pair's part of it) front to back: its scores take four keys a step with both groups'
// products side by side, its value products both groups for each key. Read head by head
// (group_scores, decode_pv: four lines of each 512-byte row, then the other four), the rows' lines
// come out of order and the hardware prefetchers do not follow: a loop that only reads the cache
// that way (experiments/decode_read_order.cpp) ran at 47 GB/s on Zen 5 where reading whole rows
// in turn ran at 61 (blocks in runs, as the blocked allocator hands them out; docs/notes.md).
#ifndef MODGEN_PAIRS
#define MODGEN_PAIRS 1
#endif
constexpr bool PAIRS = MODGEN_PAIRS && BCAST && DC <= 8;
constexpr int PR = DC <= 4 ? 2 : 1;  // rows of each group a pair_pv pass: 2 x PR x DC <= 16
static_assert(!PAIRS || RB % PR == 0, "pair_pv's passes tile a group's rows");

// Both groups' scores against a key tile (group_scores' layout, keys in order): sc[g][h], lane
// 4i + e, is group g's row i's score of key 4h + e; h0 and h1 are the groups' KV head offsets.
inline void pair_scores(const Scratch &s, const float *const *kp, int64_t h0, int64_t h1,
                        vf (*sc)[KT / 4], const Ahead &pf) {
  constexpr auto lanes = std::make_index_sequence<W>{};
  for (int t = 0; t < KT / 4; ++t) {
    const float *k[2][4];
    for (int j = 0; j < 4; ++j) {
      k[0][j] = kp[4 * t + j] + h0;
      k[1][j] = kp[4 * t + j] + h1;
    }
    vf acc[2][4];
    for (int g = 0; g < 2; ++g)
      for (int j = 0; j < 4; ++j) acc[g][j] = s.qb[g][0] * bcast4(k[g][j]);
    for (int c = 1; c < QB; ++c) {
      if (c <= 4 && 4 * t + c - 1 < pf.n) pf.fetch(pf.k[4 * t + c - 1]);
      for (int g = 0; g < 2; ++g) {
        const vf q = s.qb[g][c];
        for (int j = 0; j < 4; ++j) acc[g][j] += q * bcast4(k[g][j] + 4 * c);
      }
    }
    if constexpr (QB < 5)
      for (int j = QB - 1; j < 4; ++j)
        if (4 * t + j < pf.n) pf.fetch(pf.k[4 * t + j]);
    for (int g = 0; g < 2; ++g)
      sc[g][t] = fold_pair(fold_half(acc[g][0], acc[g][1], lanes),
                           fold_half(acc[g][2], acc[g][3], lanes), lanes);
  }
}

// Rows R0 .. R0 + PR - 1 of both groups: acc = acc * alpha + p @ v over nk keys, each key's
// values for both groups read together (probabilities in group_softmax's layout).
template <int R0>
inline void pair_pv(Scratch &s, const float *const *vp, int64_t h0, int64_t h1, int nk,
                    const Ahead &pf) {
  vf acc[2][PR][DC];
  for (int g = 0; g < 2; ++g)
    for (int i = 0; i < PR; ++i)
      for (int c = 0; c < DC; ++c)
        acc[g][i][c] = s.acc[g * RB + R0 + i][c] * s.alpha[g * RB + R0 + i];
  for (int j = 0; j < nk; ++j) {
    if (j < pf.n) pf.fetch(pf.v[j]);
    for (int g = 0; g < 2; ++g) {
      const float *v = vp[j] + (g == 0 ? h0 : h1);
      const float *pg = s.pk[g * RB] + (j / 4) * W + j % 4;
      for (int c = 0; c < DC; ++c) {
        vf vv = load_chunk(v, c);
        in_register(vv);
        for (int i = 0; i < PR; ++i) acc[g][i][c] += pg[4 * (R0 + i)] * vv;
      }
    }
  }
  for (int j = nk; j < pf.n; ++j) pf.fetch(pf.v[j]);  // this tile is short: the rest
  for (int g = 0; g < 2; ++g)
    for (int i = 0; i < PR; ++i)
      for (int c = 0; c < DC; ++c) s.acc[g * RB + R0 + i][c] = acc[g][i][c];
}

// pair_pv's passes from row R0 on (the first prefetches the next tiles' values).
template <int R0>
inline void pair_pv_from(Scratch &s, const float *const *vp, int64_t h0, int64_t h1, int nk,
                         const Ahead &pf) {
  pair_pv<R0>(s, vp, h0, h1, nk, pf);
  if constexpr (R0 + PR < RB) pair_pv_from<R0 + PR>(s, vp, h0, h1, nk, no_ahead);
}

// One key tile of a two-group decode tile: scores, both groups' softmax, the value products
// (the next tiles' keys and values prefetched along, as the other paths do).
inline void pair_tile(const Args &a, Scratch &s, const float *const *kp, const float *const *vp,
                      const int64_t *hoff, int64_t p0, int nk, bool partial, const Ahead &pf) {
  vf sc[2][KT / 4];
  pair_scores(s, kp, hoff[0], hoff[RB], sc, pf);
  group_softmax(a, s, 0, sc[0], p0, nk, partial);
  group_softmax(a, s, RB, sc[1], p0, nk, partial);
  pair_pv_from<0>(s, vp, hoff[0], hoff[RB], nk, pf);
}

// The key positions [lo, hi) a tile's queries see (lo > 0 only under a sliding window).
inline void key_span(const Args &a, const Item &it, int64_t *lo, int64_t *hi) {
  const int64_t qlen = a.query_start[it.seq + 1] - a.query_start[it.seq];
  const int64_t first = a.context_lens[it.seq] - qlen + it.q0;
  *lo = a.window > 0 && first - a.window + 1 > 0 ? first - a.window + 1 : 0;
  *hi = first + it.nq;
}

// Ahead for key tile `tile` (counting from 0) of item it, or none past its last.
inline void ahead_tile(const Args &a, const Item &it, int64_t tile, Ahead *pf) {
  int64_t lo, hi;
  key_span(a, it, &lo, &hi);
  const int64_t p0 = lo + tile * KT;
  if (p0 >= hi) return;
  pf->n = hi - p0 < KT ? static_cast<int>(hi - p0) : KT;
  pf->len = it.nh * HEAD_DIM;
  key_tile(a, a.block_tables + it.seq * a.max_blocks, it.head, p0, pf->n, pf->k, pf->v);
}

// A few-row tile. `next` (or null) is the tile this thread takes next: its first key tiles are
// prefetched during this one's last, so short contexts do not start cold.
void attend_keys(const Args &a, const Item &it, const Item *next, Scratch &s) {
  const int64_t g = a.hq / a.hkv;
  const int64_t qlen = a.query_start[it.seq + 1] - a.query_start[it.seq];
  const int64_t ctx = a.context_lens[it.seq];
  const int64_t *table = a.block_tables + it.seq * a.max_blocks;
  const int per_q = static_cast<int>(g) * it.nh;
  const int rows = it.nq * per_q;
  const int rows_pad = (rows + RB - 1) / RB * RB;
  int64_t hoff[DECODE_ROWS];  // offset of each row's KV head from the tile's first

  for (int r = 0; r < rows_pad; ++r) {
    const int rr = r < rows ? r : rows - 1;  // padding rows repeat the last real row
    const int64_t qi = it.q0 + rr / per_q;
    const int64_t kvh = (rr % per_q) / g;
    const int64_t head = (it.head + kvh) * g + rr % g;
    float row[DP] = {};
    load_query(a, a.query_start[it.seq] + qi, head, row);
    for (int c = 0; c < DC; ++c) s.qv[r][c] = load(row + c * W);
    if constexpr (BCAST)
      for (int c = 0; c < QB; ++c)
        for (int e = 0; e < 4; ++e) s.qb[r / RB][c][4 * (r % RB) + e] = row[4 * c + e];
    hoff[r] = kvh * HEAD_DIM;
    s.qpos[r] = ctx - qlen + qi;
    s.m[r] = -std::numeric_limits<float>::infinity();
    s.l[r] = 0.0f;
    for (int c = 0; c < DC; ++c) s.acc[r][c] = vf{};
  }
  const int64_t first = s.qpos[0], last = s.qpos[rows_pad - 1];
  int64_t lo, hi;
  key_span(a, it, &lo, &hi);
  // two whole groups, each on one KV head: whole cache rows at a time (see PAIRS)
  const bool pairs = PAIRS && rows == 2 * RB && one_head(hoff, 0, RB) && one_head(hoff, RB, RB);

  const float *kp[KT];
  const float *vp[KT];
  for (int64_t p0 = lo; p0 < hi; p0 += KT) {
    const int nk = hi - p0 < KT ? static_cast<int>(hi - p0) : KT;
    key_tile(a, table, it.head, p0, nk, kp, vp);
    const int64_t ahead = p0 + MODGEN_PF * KT;  // prefetch a few tiles ahead of use
    Ahead pf;  // n = 0: nothing to prefetch
#if MODGEN_SPREAD
    if (ahead < hi) {
      pf.n = hi - ahead < KT ? static_cast<int>(hi - ahead) : KT;
      pf.len = it.nh * HEAD_DIM;
      key_tile(a, table, it.head, ahead, pf.n, pf.k, pf.v);
    } else if (next != nullptr && MODGEN_NEXT) {
      // the next tile's first key tiles during this one's last (its first when this is short)
      const int64_t tiles = (hi - lo + KT - 1) / KT;
      ahead_tile(a, *next, (p0 - lo) / KT - tiles + std::min<int64_t>(MODGEN_PF, tiles), &pf);
    }
#else
    if (ahead < hi) prefetch_tile(a, table, it.head, it.nh, ahead, hi);
#endif
    const bool partial = nk < KT || p0 + KT - 1 > first || (a.window > 0 && p0 <= last - a.window);
    if (pairs) {
      pair_tile(a, s, kp, vp, hoff, p0, nk, partial, pf);
      continue;
    }
    decode_tile_softmax(a, s, rows_pad, kp, hoff, p0, nk, partial, pf);
    for (int c0 = 0; c0 + CG <= DC; c0 += CG)
      for (int r0 = 0; r0 < rows_pad; r0 += RB) {
        const Ahead &ahead_v = r0 == 0 && c0 == 0 ? pf : no_ahead;
        if (BCAST && one_head(hoff, r0, RB))  // probabilities in group_softmax's layout
          decode_pv<CG, true>(s, r0, c0, vp, hoff, nk, ahead_v);
        else
          decode_pv<CG>(s, r0, c0, vp, hoff, nk, ahead_v);
      }
    if constexpr (DC % CG != 0)
      for (int r0 = 0; r0 < rows_pad; r0 += RB) {
        if (BCAST && one_head(hoff, r0, RB))
          decode_pv<DC % CG, true>(s, r0, DC - DC % CG, vp, hoff, nk, no_ahead);
        else
          decode_pv<DC % CG>(s, r0, DC - DC % CG, vp, hoff, nk, no_ahead);
      }
  }

  for (int r = 0; r < rows; ++r) {
    const int64_t qi = it.q0 + r / per_q;
    const int64_t head = (it.head + (r % per_q) / g) * g + r % g;
    float *dst = a.out + ((a.query_start[it.seq] + qi) * a.hq + head) * HEAD_DIM;
    const float inv = 1.0f / s.l[r];
    const float *acc = reinterpret_cast<const float *>(s.acc[r]);
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] = acc[d] * inv;
  }
}

// ---- prompt path: many query rows, products vectorised over rows ---------------------------

// Scores of NJ keys against N row vectors: p[j][c] = sum_d k_j[d] * qt[d][c].
template <int N>
inline void score_block(const vf (*qt)[RV_MAX], const float *const *kp, vf (*p)[RV_MAX], int c0) {
  vf acc[NJ][N] = {};
  for (int d = 0; d < HEAD_DIM; ++d) {
    vf q[N];
    for (int c = 0; c < N; ++c) {
      q[c] = qt[d][c0 + c];
      in_register(q[c]);
    }
    for (int j = 0; j < NJ; ++j) {
      const float k = kp[j][d];
      for (int c = 0; c < N; ++c) acc[j][c] += k * q[c];
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int c = 0; c < N; ++c) p[j][c0 + c] = acc[j][c];
}

// Output of DN head-dim elements from d0, N row vectors from c0: acct = acct * alpha + v^T p.
template <int DN, int N>
inline void pv_block(Scratch &s, const vf *alpha, const float *const *vp, int nk, int d0, int c0) {
  vf acc[DN][N];
  for (int d = 0; d < DN; ++d)
    for (int c = 0; c < N; ++c) acc[d][c] = s.acct[d0 + d][c0 + c] * alpha[c0 + c];
  for (int j = 0; j < nk; ++j) {
    vf pj[N];
    for (int c = 0; c < N; ++c) {
      pj[c] = s.p[j][c0 + c];
      in_register(pj[c]);
    }
    for (int d = 0; d < DN; ++d) {
      const float v = vp[j][d0 + d];
      for (int c = 0; c < N; ++c) acc[d][c] += v * pj[c];
    }
  }
  for (int d = 0; d < DN; ++d)
    for (int c = 0; c < N; ++c) s.acct[d0 + d][c0 + c] = acc[d][c];
}

template <int RV, int DN>
inline void pv_rows(Scratch &s, const vf *alpha, const float *const *vp, int nk, int d0) {
  int c0 = 0;
  for (; c0 + NC <= RV; c0 += NC) pv_block<DN, NC>(s, alpha, vp, nk, d0, c0);
  if constexpr (RV % NC != 0) pv_block<DN, RV % NC>(s, alpha, vp, nk, d0, c0);
}

// RV = row vectors in the tile.
template <int RV>
void attend_rows(const Args &a, const Item &it, Scratch &s) {
  const int64_t g = a.hq / a.hkv;
  const int64_t qlen = a.query_start[it.seq + 1] - a.query_start[it.seq];
  const int64_t ctx = a.context_lens[it.seq];
  const int64_t *table = a.block_tables + it.seq * a.max_blocks;
  const int rows = it.nq * static_cast<int>(g);
  constexpr int ROWS = RV * W;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  vi qpos[RV];
  vf m[RV], l[RV], alpha[RV];
  for (int r = 0; r < ROWS; ++r) {
    const int rr = r < rows ? r : rows - 1;  // padding rows repeat the last real row
    const int64_t qi = it.q0 + rr / g;
    const int64_t head = it.head * g + rr % g;
    float row[HEAD_DIM];
    load_query(a, a.query_start[it.seq] + qi, head, row);
    for (int d = 0; d < HEAD_DIM; ++d) s.qt[d][r / W][r % W] = row[d];
    qpos[r / W][r % W] = static_cast<int32_t>(ctx - qlen + qi);
  }
  for (int d = 0; d < HEAD_DIM; ++d)
    for (int c = 0; c < RV; ++c) s.acct[d][c] = vf{};
  for (int c = 0; c < RV; ++c) {
    m[c] = vf{} + neg_inf;
    l[c] = vf{};
  }
  const int64_t first = qpos[0][0], last = qpos[(rows - 1) / W][(rows - 1) % W];
  const int64_t lo = a.window > 0 && first - a.window + 1 > 0 ? first - a.window + 1 : 0;
  const int64_t hi = last + 1;
  const int32_t window = static_cast<int32_t>(a.window);

  const float *kp[KT];
  const float *vp[KT];
  for (int64_t p0 = lo; p0 < hi; p0 += KT) {
    const int nk = hi - p0 < KT ? static_cast<int>(hi - p0) : KT;
    key_tile(a, table, it.head, p0, nk, kp, vp);
    for (int j0 = 0; j0 < nk; j0 += NJ) {
      int c0 = 0;
      for (; c0 + NC <= RV; c0 += NC) score_block<NC>(s.qt, kp + j0, s.p + j0, c0);
      if constexpr (RV % NC != 0) score_block<RV % NC>(s.qt, kp + j0, s.p + j0, c0);
    }
    // online softmax, each lane its own row
    const bool partial = nk < KT || p0 + KT - 1 > first || (a.window > 0 && p0 <= last - a.window);
    for (int c = 0; c < RV; ++c) {
      vf mx = m[c];
      for (int j = 0; j < KT; ++j) {
        if (partial) {
          const int32_t kpos = static_cast<int32_t>(p0 + j);
          vi ok = (j < nk ? vi{} - 1 : vi{}) & (kpos <= qpos[c]);
          if (a.window > 0) ok &= kpos > qpos[c] - window;
          s.p[j][c] = ok ? s.p[j][c] : vf{} + neg_inf;
        }
        mx = s.p[j][c] > mx ? s.p[j][c] : mx;
      }
      const vi none = mx == neg_inf;  // rows that see no key yet
      const vf m_safe = none ? vf{} : mx;
      alpha[c] = m[c] == neg_inf ? vf{} : vexp2(m[c] - m_safe);
      vf sum = vf{};
      for (int j = 0; j < nk; ++j) {
        const vf sj = s.p[j][c];
        const vf pj = sj == neg_inf ? vf{} : vexp2(sj - m_safe);
        s.p[j][c] = pj;
        sum += pj;
      }
      l[c] = l[c] * alpha[c] + sum;
      m[c] = mx;
    }
    int d0 = 0;
    for (; d0 + ND <= HEAD_DIM; d0 += ND) pv_rows<RV, ND>(s, alpha, vp, nk, d0);
    if constexpr (HEAD_DIM % ND != 0) pv_rows<RV, HEAD_DIM % ND>(s, alpha, vp, nk, d0);
  }

  for (int r = 0; r < rows; ++r) {
    const int64_t qi = it.q0 + r / g;
    const int64_t head = it.head * g + r % g;
    float *dst = a.out + ((a.query_start[it.seq] + qi) * a.hq + head) * HEAD_DIM;
    const float inv = 1.0f / l[r / W][r % W];
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] = s.acct[d][r / W][r % W] * inv;
  }
}

using TileFn = void (*)(const Args &, const Item &, Scratch &);

template <std::size_t... I>
constexpr std::array<TileFn, sizeof...(I)> row_kernels(std::index_sequence<I...>) {
  return {&attend_rows<static_cast<int>(I) + 1>...};
}
constexpr auto ROW_KERNELS = row_kernels(std::make_index_sequence<RV_MAX>{});

void attend_tile(const Args &a, const Item &it, const Item *next, Scratch &s) {
  const int rows = it.nq * it.nh * static_cast<int>(a.hq / a.hkv);
  if (rows < DECODE_ROWS) return attend_keys(a, it, next, s);
  ROW_KERNELS[(rows + W - 1) / W - 1](a, it, s);
}

}  // namespace

extern "C" {

int modgen_head_dim() { return HEAD_DIM; }

// The instruction set this library was compiled for, and its vector width in floats.
const char *modgen_isa() { return MODGEN_ISA; }
int modgen_vector_width() { return W; }

// cpu_linear.h's GEMM in this build's instruction set (the torch operators use the widest):
// output columns a panel, packing, and y = x @ W^T + bias (bias may be null).
int modgen_linear_panel_width() { return modgen::NP; }
void modgen_pack_linear_f32(const float *w, int64_t n, int64_t k, float *dst) {
  modgen::pack_panels(w, n, k, dst);
}
void modgen_linear_f32(const float *x, int64_t m, int64_t k, const float *packed, int64_t n,
                       const float *bias, float *y) {
  modgen::linear_panels(x, m, k, packed, n, bias, y);
}
// The gated GEMM (SwiGLU's silu(gate) * up in the epilogue): w [2 * inter][k] packed into gated
// panels (a bias [2 * inter] packs with k = 1), and y [m][inter] from them.
void modgen_pack_linear_gated_f32(const float *w, int64_t inter, int64_t k, float *dst) {
  modgen::pack_panels_gated(w, inter, k, dst);
}
void modgen_linear_silu_mul_f32(const float *x, int64_t m, int64_t k, const float *packed,
                                int64_t inter, const float *packed_bias, float *y) {
  modgen::linear_panels<modgen::Out::silu_gated>(x, m, k, packed, inter, packed_bias, y);
}

// Writes this step's K/V (when call->k is set), then attends. Returns 0, or 1 when the head
// grouping does not fit a tile (hq / hkv > MAX_ROWS).
int modgen_attention_f32(const ModgenAttentionCall *call) {
  const Args &a = *call;
  const int64_t g = a.hq / a.hkv;
  if (g > MAX_ROWS) return 1;
  const int32_t tq = static_cast<int32_t>(MAX_ROWS / g);  // queries per tile
  std::vector<Item> items;
  // few-row tiles take every KV head of their sequence (whole cache rows), unless there are too
  // few sequences to keep every thread busy; where every head would be too many rows (16 query
  // heads or more), decodes of four query heads a KV head take two KV heads a tile (PAIRS)
  const bool merge_heads = a.num_seqs >= 2 * omp_get_max_threads();
  // longest sequences' tiles first: prompt chunks come after decodes in a batch
  for (int64_t b = a.num_seqs - 1; b >= 0; --b) {
    const int64_t qlen = a.query_start[b + 1] - a.query_start[b];
    for (int32_t q0 = 0; q0 < qlen; q0 += tq) {
      const int32_t nq = qlen - q0 < tq ? static_cast<int32_t>(qlen - q0) : tq;
      if (merge_heads && nq * a.hq < DECODE_ROWS) {
        items.push_back({static_cast<int32_t>(b), 0, q0, nq, static_cast<int32_t>(a.hkv)});
      } else if (PAIRS && nq == 1 && g == RB && a.hq >= DECODE_ROWS) {
        for (int32_t h = 0; h < a.hkv; h += 2)  // two KV heads a tile: two groups (PAIRS)
          items.push_back({static_cast<int32_t>(b), h, q0, nq, a.hkv - h < 2 ? 1 : 2});
      } else {
        for (int32_t h = 0; h < a.hkv; ++h)
          items.push_back({static_cast<int32_t>(b), h, q0, nq, 1});
      }
    }
  }
  const int64_t n = static_cast<int64_t>(items.size());
  std::atomic<int64_t> taken{0};
#pragma omp parallel
  {
    if (a.k != nullptr) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < a.num_tokens; ++t) write_kv(a, t);
    }  // the loop's barrier: every key is in place before any tile reads it
    Scratch *s = static_cast<Scratch *>(std::aligned_alloc(64, (sizeof(Scratch) + 63) / 64 * 64));
    // each thread's first tile by its number, then a dynamic schedule, one tile at a time, each
    // thread taking its next tile before it starts this one (so that it can prefetch it); had
    // the first tiles been taken dynamically too, the first thread to arrive could take two
    // while a batch of as many tiles as threads left another idle
    const int64_t nt = omp_get_num_threads();
    int64_t i = omp_get_thread_num();
    while (i < n) {
      const int64_t next = nt + taken.fetch_add(1, std::memory_order_relaxed);
      attend_tile(a, items[i], next < n ? &items[next] : nullptr, *s);
      i = next;
    }
    std::free(s);
  }
  return 0;
}
}
