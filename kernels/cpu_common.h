// What modgen's CPU kernels share: the instruction set they are built for (-march flags from
// cpu.py), its vector type of native width, a few vector helpers, and the argument block of one
// attention call. Included by cpu_kernels.cpp (the attention kernel, one build per head dim) and
// cpu_ops.cpp (the torch operators and element-wise kernels).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#ifndef MODGEN_SCALEF
#define MODGEN_SCALEF 1
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define MODGEN_ISA "avx512"
constexpr int W = 16, NREG = 32;
#elif defined(__AVX2__)
#include <immintrin.h>
#define MODGEN_ISA "avx2"
constexpr int W = 8, NREG = 16;
#elif defined(__ARM_NEON) || defined(__aarch64__)
#define MODGEN_ISA "neon"
constexpr int W = 4, NREG = 32;
#elif defined(__SSE2__)
#define MODGEN_ISA "sse"
constexpr int W = 4, NREG = 16;
#else
#define MODGEN_ISA "generic"
constexpr int W = 4, NREG = 16;
#endif

namespace modgen {

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf load(const float *src) {
  vf v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

inline void store(float *dst, vf v) { std::memcpy(dst, &v, sizeof(v)); }

#if defined(__AVX512F__)
inline __m512 to_m512(vf v) {
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
#endif

// x clamped to [lo, hi] by one max and one min, x the second operand of each so that a NaN stays
// NaN. Written as comparisons (x < lo ? lo : x) GCC made a compare and a blend of each: prompt
// tiles ran 2-3% slower with AVX-512, 1-2% with AVX2 (docs/notes.md).
inline vf clamp(vf x, float lo, float hi) {
#if defined(__AVX512F__)
  const __m512 r = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), to_m512(x)));
  std::memcpy(&x, &r, sizeof(x));
  return x;
#elif defined(__AVX2__)
  __m256 v;
  std::memcpy(&v, &x, sizeof(v));
  const __m256 r = _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v));
  std::memcpy(&x, &r, sizeof(x));
  return x;
#else
  x = x < lo ? vf{} + lo : x;
  return x > hi ? vf{} + hi : x;
#endif
}

// t rounded to the nearest integer, ties to even (vrndscaleps with AVX-512, else a magic-number
// add and subtract: the same bits).
inline vf round_even(vf t) {
#if defined(__AVX512F__) && MODGEN_SCALEF
  vf n;
  const __m512 r = _mm512_roundscale_ps(to_m512(t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(&n, &r, sizeof(n));
  return n;
#else
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  return (t + magic) - magic;
#endif
}

// y * 2^n for whole n in [-126, 127] (vscalefps with AVX-512, else n shifted into an exponent
// field: the same bits).
inline vf times_pow2(vf y, vf n) {
#if defined(__AVX512F__) && MODGEN_SCALEF
  const __m512 r = _mm512_scalef_ps(to_m512(y), to_m512(n));
  vf out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
#else
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
#endif
}

// exp for a vector: 2^n * e^f with |f| <= ln2 / 2 and a degree-6 polynomial for e^f (relative
// error near 2e-7). Inputs below -87 give e^-87 (about 1.6e-38): masked lanes are zeroed apart.
// Inputs above 88 give e^88 (about 1.7e38, finite): past it 2^n overflowed the exponent field
// into garbage, which made silu(g) = g / (1 + e^-g) of a gate below -88 come out huge. With
// AVX-512 the rounding and the scaling by 2^n are one instruction each (vrndscaleps, vscalefps),
// bit for bit the results of the portable code: prompt tiles 1-1.5% faster on Zen 5.
inline vf vexp(vf x) {
  x = clamp(x, -87.0f, 88.0f);
  const vf n = round_even(x * 1.44269504088896341f);
  vf f = x - n * 0.693359375f;
  f = f + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  return times_pow2(p * f * f + f + 1.0f, n);
}

// 2^t for a vector, the attention softmax's exp (its scores come in log2 units: the query scale
// carries log2(e)): 2^n * 2^f with n = round(t), |f| <= 1/2, and the degree-6 Taylor polynomial
// of 2^f = e^(f ln 2) (it truncates at 1.2e-7; with float rounding up to 2.4e-7 relative was
// measured, about vexp's). Three instructions fewer than vexp (no multiply by log2(e), no
// two-step reduction by ln 2): the reduction is exact. Inputs are clamped to [-126, 127]: 2^-126
// is float's smallest normal (masked lanes are zeroed apart), and 2^127.5 is still finite.
inline vf vexp2(vf t) {
  t = clamp(t, -126.0f, 127.0f);
  const vf n = round_even(t);
  const vf f = t - n;
  vf p = vf{} + 1.5403530393381606e-4f;  // (ln 2)^k / k!, k = 6 .. 1
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  return times_pow2(p * f + 1.0f, n);
}

// silu(g) = g / (1 + e^-g): SwiGLU's gate, in the element-wise kernel and the GEMM's epilogue
// alike (so the fused path is the unfused one bit for bit).
inline vf vsilu(vf g) { return g / (1.0f + vexp(vf{} - g)); }

// Lane i of v moved to lane i ^ S (pairs S lanes apart swapped).
template <int S, std::size_t... I>
inline vf swap_lanes(vf v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, static_cast<int>(I ^ S)...);
}

// Horizontal max and sum by halving (log2 W shuffles): a lane-by-lane scalar loop made each
// reduction a W-long dependency chain, which set the pace of decode tiles' softmax.
inline float hmax(vf v) {
  constexpr auto lanes = std::make_index_sequence<W>{};
  if constexpr (W >= 16) v = v > swap_lanes<8>(v, lanes) ? v : swap_lanes<8>(v, lanes);
  if constexpr (W >= 8) v = v > swap_lanes<4>(v, lanes) ? v : swap_lanes<4>(v, lanes);
  v = v > swap_lanes<2>(v, lanes) ? v : swap_lanes<2>(v, lanes);
  v = v > swap_lanes<1>(v, lanes) ? v : swap_lanes<1>(v, lanes);
  return v[0];
}

inline float hsum(vf v) {
  constexpr auto lanes = std::make_index_sequence<W>{};
  if constexpr (W >= 16) v += swap_lanes<8>(v, lanes);
  if constexpr (W >= 8) v += swap_lanes<4>(v, lanes);
  v += swap_lanes<2>(v, lanes);
  v += swap_lanes<1>(v, lanes);
  return v[0];
}

}  // namespace modgen

extern "C" {
// One attention call's arguments (cpu_ops.cpp fills them from the operator's tensors).
struct ModgenAttentionCall {
  const float *q;  // [T, hq, HEAD_DIM] rows q_stride floats apart
  const float *k;  // [T, hkv, HEAD_DIM] rows k_stride apart: this step's keys, or null
  const float *v;  // [T, hkv, HEAD_DIM] rows v_stride apart: this step's values
  const float *cos, *sin;       // [T, rot_dim] rotary tables, or null: q and k are rotated
  const int64_t *slot_mapping;  // [T] cache slot of each new key and value
  float *k_cache, *v_cache;     // [slots, hkv, HEAD_DIM]
  float *out;                   // [T, hq, HEAD_DIM], contiguous
  const int64_t *query_start, *context_lens, *block_tables;
  int64_t q_stride, k_stride, v_stride, num_tokens, num_seqs, max_blocks;
  int64_t hq, hkv, block_size, window;
  int64_t rot_dim;  // head dims the rotary tables rotate (the first ones; partial rotary)
  float scale;
};
}
