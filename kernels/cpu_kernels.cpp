// CPU kernels, float32: paged attention, and the ops around it that torch would run in several
// passes (RMSNorm with its residual add, SwiGLU's silu(gate) * up, the greedy arg-max).
//
// Paged attention: one call per layer attends every query of a ragged batch (prompt chunks and
// decodes) to its sequence's keys and values, read straight out of the paged cache through the
// block table. No gathered copy of the context, no mask tensor, no work on masked tiles: each
// query tile walks only the keys it can see, in tiles of KT keys, with an online softmax. First
// this step's keys and values are written into their cache slots (keys rotated by RoPE when
// rotary tables are given); then the tiles run in parallel on OpenMP threads (torch's: the
// runtime is shared). Tiles with many query rows (prompt chunks) vectorise scores over rows;
// tiles with few (decodes; every KV head of a sequence in one tile when there are enough
// sequences to fill the threads) take dot products over the head dim. Layouts: see
// ModgenAttentionCall.
//
// Built at run time by modgen/kernels/cpu.py with -DHEAD_DIM=<d> (and -march=native), loaded
// through ctypes. Vectors are GCC vector extensions, so the same source becomes AVX-512, AVX2 or
// NEON code on whatever machine builds it.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<head dim>"
#endif

namespace {

constexpr int KT = 16;                                  // keys per tile: one vector of scores
constexpr int DC = (HEAD_DIM + KT - 1) / KT;            // head dim in vectors of KT floats
constexpr int DP = DC * KT;                             // head dim padded to whole vectors
constexpr int RB = 4;                                   // query rows computed together
constexpr int MAX_ROWS = 64;                            // query rows (query x head) per tile

typedef float vf __attribute__((vector_size(KT * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(KT * sizeof(int32_t))));

// exp for a vector: 2^n * e^f with |f| <= ln2 / 2 and a degree-6 polynomial for e^f (relative
// error near 2e-7). Inputs below -87 give e^-87 (about 1.6e-38): masked lanes are zeroed apart.
inline vf vexp(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;
  vf t = x * 1.44269504088896341f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (t + magic) - magic;
  vf f = x - n * 0.693359375f;
  f = f + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  vf y = p * f * f + f + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int j = 1; j < KT; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

inline float hsum(vf v) {
  float s = 0.0f;
  for (int j = 0; j < KT; ++j) s += v[j];
  return s;
}

struct Item {
  int32_t seq, head, q0, nq;  // sequence, first KV head, first query of the tile, queries in it
  int32_t nh;                 // KV heads in the tile (rows: query, then KV head, then group)
};

constexpr int RV_MAX = MAX_ROWS / KT;  // query rows per tile, in vectors

struct Scratch {
  // decode path (fewer than KT rows): dot products over the head dim
  vf qv[KT][DC];       // query rows, pre-scaled
  float pk[KT][KT];    // probabilities of a key tile, per row
  float m[KT], l[KT];  // running max and sum, per row
  int64_t qpos[KT];
  // prompt path (many rows): scores vectorised over query rows
  vf qt[HEAD_DIM][RV_MAX];  // query tile, transposed: qt[d][row vector]
  vf p[KT][RV_MAX];         // scores, then probabilities: p[key][row vector]
  // both
  float alpha[MAX_ROWS];  // per row: how much a key tile rescales the accumulated output
  vf acc[MAX_ROWS][DC];
};

}  // namespace

extern "C" {
// One call's arguments (mirrored by a ctypes.Structure in modgen/kernels/cpu.py).
struct ModgenAttentionCall {
  const float *q;  // [T, hq, HEAD_DIM] rows q_stride floats apart
  const float *k;  // [T, hkv, HEAD_DIM] rows k_stride apart: this step's keys, or null
  const float *v;  // [T, hkv, HEAD_DIM] rows v_stride apart: this step's values
  const float *cos, *sin;       // [T, HEAD_DIM] rotary tables, or null: q and k are rotated
  const int64_t *slot_mapping;  // [T] cache slot of each new key and value
  float *k_cache, *v_cache;     // [slots, hkv, HEAD_DIM]
  float *out;                   // [T, hq, HEAD_DIM], contiguous
  const int64_t *query_start, *context_lens, *block_tables;
  int64_t q_stride, k_stride, v_stride, num_tokens, num_seqs, max_blocks;
  int64_t hq, hkv, block_size, window;
  float scale;
};
}

namespace {

using Args = ModgenAttentionCall;

// x rotated by its token's cos/sin (Hugging Face's rotate_half convention) into dst.
inline void rope(const float *x, const float *cos, const float *sin, float *dst) {
  constexpr int half = HEAD_DIM / 2;
  for (int d = 0; d < half; ++d) dst[d] = x[d] * cos[d] - x[d + half] * sin[d];
  for (int d = half; d < HEAD_DIM; ++d) dst[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

// Query row (token t, head) into dst, rotated if the call has rope tables, times the scale.
inline void load_query(const Args &a, int64_t t, int64_t head, float *dst) {
  const float *x = a.q + t * a.q_stride + head * HEAD_DIM;
  if (a.cos != nullptr) {
    rope(x, a.cos + t * HEAD_DIM, a.sin + t * HEAD_DIM, dst);
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] *= a.scale;
  } else {
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] = x[d] * a.scale;
  }
}

// This step's keys (rotated if the call has rope tables) and values into their cache slots.
inline void write_kv(const Args &a, int64_t t) {
  const int64_t slot = a.slot_mapping[t];
  for (int64_t h = 0; h < a.hkv; ++h) {
    const int64_t off = (slot * a.hkv + h) * HEAD_DIM;
    const float *k = a.k + t * a.k_stride + h * HEAD_DIM;
    if (a.cos != nullptr) {
      rope(k, a.cos + t * HEAD_DIM, a.sin + t * HEAD_DIM, a.k_cache + off);
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

// A prefetch the compiler keeps: GCC 12 drops __builtin_prefetch from the loop below.
inline void prefetch(const float *p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char *>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// Ask for the next key tile's keys and values (KV heads head .. head + nh - 1) while this one is
// computed. Decode tiles do little arithmetic per byte and their blocks lie anywhere in memory:
// this makes them 1.2-1.3x faster once the cache is larger than L3 (docs/notes.md).
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

// A vector of HEAD_DIM's c-th KT floats from src (which need not be aligned); a head dim that is
// not a whole number of vectors is zero-padded.
inline vf load_chunk(const float *src, int c) {
  vf v;
  if constexpr (HEAD_DIM % KT == 0) {
    std::memcpy(&v, src + c * KT, sizeof(v));
  } else {
    v = vf{};
    const int n = HEAD_DIM - c * KT < KT ? HEAD_DIM - c * KT : KT;
    std::memcpy(&v, src + c * KT, n * sizeof(float));
  }
  return v;
}

// The 16 lane sums of 16 vectors, as one vector: level by level, each pair of vectors becomes one
// holding both halves' partial sums. The tree leaves the sums in a fixed lane order, so callers
// feed key j in slot tree_slot[j] to get key j's sum in lane j.
inline vf tree_sum(vf *t) {
  vf b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(t[2 * i], t[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14,
                                   15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26,
                                   27, 14, 15, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                                 14, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15,
                                 31);
}

struct TreeSlots {
  int slot[KT];  // slot[j]: the input of tree_sum whose sum lands in lane j
  TreeSlots() {
    vf t[KT];
    for (int i = 0; i < KT; ++i) t[i] = vf{} + static_cast<float>(i);
    const vf out = tree_sum(t);
    for (int j = 0; j < KT; ++j) slot[j] = static_cast<int>(out[j]) / KT;
  }
};
const TreeSlots tree_slots;

// Few query rows (decodes): each score is a dot product over the head dim, vectorised over it;
// a tile's 16 dot products per row are summed by one tree_sum. Keys and values are read straight
// from the cache.
void attend_keys(const Args &a, const Item &it, Scratch &s) {
  const int64_t g = a.hq / a.hkv;
  const int64_t qlen = a.query_start[it.seq + 1] - a.query_start[it.seq];
  const int64_t ctx = a.context_lens[it.seq];
  const int64_t *table = a.block_tables + it.seq * a.max_blocks;
  const int per_q = static_cast<int>(g) * it.nh;
  const int rows = it.nq * per_q;
  const int rows_pad = (rows + RB - 1) / RB * RB;
  int64_t hoff[KT];  // offset of each row's KV head from the tile's first
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int r = 0; r < rows_pad; ++r) {
    const int rr = r < rows ? r : rows - 1;  // padding rows repeat the last real row
    const int64_t qi = it.q0 + rr / per_q;
    const int64_t kvh = (rr % per_q) / g;
    const int64_t head = (it.head + kvh) * g + rr % g;
    float row[DP] = {};
    load_query(a, a.query_start[it.seq] + qi, head, row);
    for (int c = 0; c < DC; ++c) s.qv[r][c] = load_chunk(row, c);
    hoff[r] = kvh * HEAD_DIM;
    s.qpos[r] = ctx - qlen + qi;
    s.m[r] = neg_inf;
    s.l[r] = 0.0f;
    for (int c = 0; c < DC; ++c) s.acc[r][c] = vf{};
  }
  const int64_t first = s.qpos[0], last = s.qpos[rows_pad - 1];
  const int64_t lo = a.window > 0 && first - a.window + 1 > 0 ? first - a.window + 1 : 0;
  const int64_t hi = last + 1;

  const float *kp[KT];
  const float *vp[KT];
  for (int64_t p0 = lo; p0 < hi; p0 += KT) {
    const int nk = hi - p0 < KT ? static_cast<int>(hi - p0) : KT;
    key_tile(a, table, it.head, p0, nk, kp, vp);
    if (p0 + KT < hi) prefetch_tile(a, table, it.head, it.nh, p0 + KT, hi);
    const bool partial = nk < KT || p0 + KT - 1 > first || (a.window > 0 && p0 <= last - a.window);
    for (int r = 0; r < rows_pad; ++r) {
      vf t[KT];
      for (int j = 0; j < KT; ++j) {
        const float *k = kp[j] + hoff[r];
        vf dot = s.qv[r][0] * load_chunk(k, 0);
        for (int c = 1; c < DC; ++c) dot += s.qv[r][c] * load_chunk(k, c);
        t[tree_slots.slot[j]] = dot;
      }
      vf sc = tree_sum(t);
      vf keep = vf{} + 1.0f;
      if (partial) {
        const int64_t qp = s.qpos[r];
        for (int j = 0; j < KT; ++j) {
          const int64_t kpos = p0 + j;
          if (!(j < nk && kpos <= qp && (a.window <= 0 || kpos > qp - a.window))) {
            sc[j] = neg_inf;
            keep[j] = 0.0f;
          }
        }
      }
      const float mx = hmax(sc);
      const float m_new = mx > s.m[r] ? mx : s.m[r];
      vf pr = vf{};
      float alpha = 1.0f;
      if (m_new != neg_inf) {
        pr = vexp(sc - m_new) * keep;
        alpha = s.m[r] == neg_inf ? 0.0f : std::exp(s.m[r] - m_new);
        s.l[r] = s.l[r] * alpha + hsum(pr);
        s.m[r] = m_new;
      }
      std::memcpy(s.pk[r], &pr, sizeof(pr));
      s.alpha[r] = alpha;
    }
    for (int r0 = 0; r0 < rows_pad; r0 += RB) {
      vf acc[RB][DC];
      for (int i = 0; i < RB; ++i)
        for (int c = 0; c < DC; ++c) acc[i][c] = s.acc[r0 + i][c] * s.alpha[r0 + i];
      if (hoff[r0] == hoff[r0 + RB - 1]) {  // one KV head: share each value load
        for (int j = 0; j < nk; ++j) {
          for (int c = 0; c < DC; ++c) {
            const vf v = load_chunk(vp[j] + hoff[r0], c);
            for (int i = 0; i < RB; ++i) acc[i][c] += s.pk[r0 + i][j] * v;
          }
        }
      } else {
        for (int j = 0; j < nk; ++j)
          for (int i = 0; i < RB; ++i)
            for (int c = 0; c < DC; ++c)
              acc[i][c] += s.pk[r0 + i][j] * load_chunk(vp[j] + hoff[r0 + i], c);
      }
      for (int i = 0; i < RB; ++i)
        for (int c = 0; c < DC; ++c) s.acc[r0 + i][c] = acc[i][c];
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

// Many query rows (prompt chunks): scores are vectorised over query rows, so keys and values are
// read straight from the cache (broadcast and row loads), nothing is transposed per key tile and
// the softmax needs no horizontal reductions. RV = row vectors in the tile.
template <int RV>
void attend_rows(const Args &a, const Item &it, Scratch &s) {
  const int64_t g = a.hq / a.hkv;
  const int64_t qlen = a.query_start[it.seq + 1] - a.query_start[it.seq];
  const int64_t ctx = a.context_lens[it.seq];
  const int64_t *table = a.block_tables + it.seq * a.max_blocks;
  const int rows = it.nq * static_cast<int>(g);
  constexpr int ROWS = RV * KT;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float *qt = reinterpret_cast<float *>(s.qt);  // [HEAD_DIM][RV_MAX * KT]
  float *p = reinterpret_cast<float *>(s.p);    // [KT][RV_MAX * KT]
  constexpr int LD = RV_MAX * KT;

  vi qpos[RV];
  vf m[RV], l[RV];
  for (int r = 0; r < ROWS; ++r) {
    const int rr = r < rows ? r : rows - 1;  // padding rows repeat the last real row
    const int64_t qi = it.q0 + rr / g;
    const int64_t head = it.head * g + rr % g;
    float row[HEAD_DIM];
    load_query(a, a.query_start[it.seq] + qi, head, row);
    for (int d = 0; d < HEAD_DIM; ++d) qt[d * LD + r] = row[d];
    qpos[r / KT][r % KT] = static_cast<int32_t>(ctx - qlen + qi);
    for (int c = 0; c < DC; ++c) s.acc[r][c] = vf{};
  }
  for (int c = 0; c < RV; ++c) {
    m[c] = vf{} + neg_inf;
    l[c] = vf{};
  }
  const int64_t first = qpos[0][0], last = qpos[(rows - 1) / KT][(rows - 1) % KT];
  const int64_t lo = a.window > 0 && first - a.window + 1 > 0 ? first - a.window + 1 : 0;
  const int64_t hi = last + 1;
  const int32_t window = static_cast<int32_t>(a.window);

  const float *kp[KT];
  const float *vp[KT];
  for (int64_t p0 = lo; p0 < hi; p0 += KT) {
    const int nk = hi - p0 < KT ? static_cast<int>(hi - p0) : KT;
    key_tile(a, table, it.head, p0, nk, kp, vp);
    // scores: 4 keys x RV row vectors at a time
    for (int j0 = 0; j0 < KT; j0 += 4) {
      vf acc[4][RV];
      for (int jj = 0; jj < 4; ++jj)
        for (int c = 0; c < RV; ++c) acc[jj][c] = vf{};
      for (int d = 0; d < HEAD_DIM; ++d) {
        vf q[RV];
        for (int c = 0; c < RV; ++c) q[c] = s.qt[d][c];
        for (int jj = 0; jj < 4; ++jj) {
          const float k = kp[j0 + jj][d];
          for (int c = 0; c < RV; ++c) acc[jj][c] += k * q[c];
        }
      }
      for (int jj = 0; jj < 4; ++jj)
        for (int c = 0; c < RV; ++c) s.p[j0 + jj][c] = acc[jj][c];
    }
    // online softmax, each lane its own row
    const bool partial = nk < KT || p0 + KT - 1 > first || (a.window > 0 && p0 <= last - a.window);
    for (int c = 0; c < RV; ++c) {
      vf mx = m[c];
      if (partial) {
        for (int j = 0; j < KT; ++j) {
          const int32_t kpos = static_cast<int32_t>(p0 + j);
          vi ok = (j < nk ? vi{} - 1 : vi{}) & (kpos <= qpos[c]);
          if (a.window > 0) ok &= kpos > qpos[c] - window;
          s.p[j][c] = ok ? s.p[j][c] : vf{} + neg_inf;
        }
      }
      for (int j = 0; j < KT; ++j) mx = s.p[j][c] > mx ? s.p[j][c] : mx;
      const vi none = mx == neg_inf;  // rows that see no key yet
      const vf m_safe = none ? vf{} : mx;
      const vf alpha = m[c] == neg_inf ? vf{} : vexp(m[c] - m_safe);
      vf sum = vf{};
      for (int j = 0; j < KT; ++j) {
        const vf sj = s.p[j][c];
        const vf pj = sj == neg_inf ? vf{} : vexp(sj - m_safe);
        s.p[j][c] = pj;
        sum += pj;
      }
      l[c] = l[c] * alpha + sum;
      m[c] = mx;
      std::memcpy(s.alpha + c * KT, &alpha, sizeof(alpha));
    }
    // acc = acc * alpha + p @ v, 4 rows at a time
    for (int r0 = 0; r0 < ROWS; r0 += 4) {
      vf acc[4][DC];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < DC; ++c) acc[i][c] = s.acc[r0 + i][c] * s.alpha[r0 + i];
      for (int j = 0; j < nk; ++j) {
        float pj[4];
        for (int i = 0; i < 4; ++i) pj[i] = p[j * LD + r0 + i];
        for (int c = 0; c < DC; ++c) {
          const vf v = load_chunk(vp[j], c);
          for (int i = 0; i < 4; ++i) acc[i][c] += pj[i] * v;
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < DC; ++c) s.acc[r0 + i][c] = acc[i][c];
    }
  }

  float lsum[ROWS];
  for (int c = 0; c < RV; ++c) std::memcpy(lsum + c * KT, &l[c], sizeof(vf));
  for (int r = 0; r < rows; ++r) {
    const int64_t qi = it.q0 + r / g;
    const int64_t head = it.head * g + r % g;
    float *dst = a.out + ((a.query_start[it.seq] + qi) * a.hq + head) * HEAD_DIM;
    const float inv = 1.0f / lsum[r];
    const float *acc = reinterpret_cast<const float *>(s.acc[r]);
    for (int d = 0; d < HEAD_DIM; ++d) dst[d] = acc[d] * inv;
  }
}

void attend_tile(const Args &a, const Item &it, Scratch &s) {
  const int rows = it.nq * it.nh * static_cast<int>(a.hq / a.hkv);
  if (rows < KT) return attend_keys(a, it, s);
  switch ((rows + KT - 1) / KT) {
    case 1: return attend_rows<1>(a, it, s);
    case 2: return attend_rows<2>(a, it, s);
    case 3: return attend_rows<3>(a, it, s);
    default: return attend_rows<4>(a, it, s);
  }
}

}  // namespace

extern "C" {

int modgen_head_dim() { return HEAD_DIM; }

// Writes this step's K/V (when call->k is set), then attends. Returns 0, or 1 when the head
// grouping does not fit a tile (hq / hkv > MAX_ROWS).
int modgen_attention_f32(const ModgenAttentionCall *call) {
  const Args &a = *call;
  const int64_t g = a.hq / a.hkv;
  if (g > MAX_ROWS) return 1;
  const int32_t tq = static_cast<int32_t>(MAX_ROWS / g);  // queries per tile
  std::vector<Item> items;
  // few-row tiles take every KV head of their sequence (whole cache rows), unless there are too
  // few sequences to keep every thread busy
  const bool merge_heads = a.num_seqs >= 2 * omp_get_max_threads();
  // longest sequences' tiles first: prompt chunks come after decodes in a batch
  for (int64_t b = a.num_seqs - 1; b >= 0; --b) {
    const int64_t qlen = a.query_start[b + 1] - a.query_start[b];
    for (int32_t q0 = 0; q0 < qlen; q0 += tq) {
      const int32_t nq = qlen - q0 < tq ? static_cast<int32_t>(qlen - q0) : tq;
      if (merge_heads && nq * a.hq < KT) {
        items.push_back({static_cast<int32_t>(b), 0, q0, nq, static_cast<int32_t>(a.hkv)});
      } else {
        for (int32_t h = 0; h < a.hkv; ++h)
          items.push_back({static_cast<int32_t>(b), h, q0, nq, 1});
      }
    }
  }
  const int64_t n = static_cast<int64_t>(items.size());
#pragma omp parallel
  {
    if (a.k != nullptr) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < a.num_tokens; ++t) write_kv(a, t);
    }  // the loop's barrier: every key is in place before any tile reads it
    Scratch *s = static_cast<Scratch *>(std::aligned_alloc(64, (sizeof(Scratch) + 63) / 64 * 64));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) attend_tile(a, items[i], *s);
    std::free(s);
  }
  return 0;
}
}

// Fused element-wise ops: one pass over memory each instead of torch's four or five; rows in
// parallel.
extern "C" {

// out = weight * h / sqrt(mean(h^2) + eps) per row, where h = x + residual (also written to
// residual_out) when residual is given, else h = x.
void modgen_rms_norm_f32(const float *x, const float *residual, float *residual_out,
                         const float *weight, float *out, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *h = x + r * cols;
    if (residual != nullptr) {
      float *hr = residual_out + r * cols;
      const float *rr = residual + r * cols;
      for (int64_t c = 0; c < cols; ++c) hr[c] = h[c] + rr[c];
      h = hr;
    }
    vf sq = vf{};
    int64_t c = 0;
    for (; c + KT <= cols; c += KT) {
      vf v;
      std::memcpy(&v, h + c, sizeof(v));
      sq += v * v;
    }
    float total = hsum(sq);
    for (; c < cols; ++c) total += h[c] * h[c];
    const float inv = 1.0f / std::sqrt(total / static_cast<float>(cols) + eps);
    float *o = out + r * cols;
    for (c = 0; c < cols; ++c) o[c] = weight[c] * (h[c] * inv);
  }
}

// out[r, :] = silu(gate_up[r, :inter]) * gate_up[r, inter:]
void modgen_silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = gate_up + r * 2 * inter;
    const float *u = g + inter;
    float *o = out + r * inter;
    int64_t c = 0;
    for (; c + KT <= inter; c += KT) {
      vf gv, uv;
      std::memcpy(&gv, g + c, sizeof(gv));
      std::memcpy(&uv, u + c, sizeof(uv));
      const vf res = gv / (1.0f + vexp(vf{} - gv)) * uv;
      std::memcpy(o + c, &res, sizeof(res));
    }
    for (; c < inter; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
  }
}
}

// Greedy sampling: the index of each row's largest value (the first, on ties, as torch.argmax).
extern "C" void modgen_argmax_f32(const float *x, int64_t *out, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = x + r * cols;
    vf best = vf{} - std::numeric_limits<float>::infinity();
    int64_t c = 0;
    for (; c + KT <= cols; c += KT) {
      vf v;
      std::memcpy(&v, row + c, sizeof(v));
      best = v > best ? v : best;
    }
    float m = hmax(best);
    for (; c < cols; ++c) m = row[c] > m ? row[c] : m;
    int64_t idx = 0;
    while (idx < cols && !(row[idx] >= m)) ++idx;
    out[r] = idx < cols ? idx : 0;
  }
}
