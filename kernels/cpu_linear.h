// A float32 linear layer for the CPU, y = x @ W^T (+ bias), on a weight packed once into panels
// of NP = 2 vectors of output columns, each panel [K][NP] contiguous. Included by cpu_ops.cpp
// (the torch operators modgen::pack_linear and modgen::linear) and by cpu_kernels.cpp (which
// exports each instruction set's build for the tests).
//
// Each thread streams a contiguous run of panels; within a panel, rows go MR at a time, MR x 2
// accumulator vectors, each input element broadcast once against the panel's two vectors. While
// a panel runs, the next panel is prefetched a few lines a step (AVX-512: spread over its register
// blocks of rows, all of them up to two, else the first half), so its weights arrive while this
// one computes. On the Zen 4 of docs/notes.md, with the weights out of cache as they are in a
// model (other layers' weights run between two uses), this ran 1.3-1.4x oneDNN's rate at 16
// rows and 1.5-2x at 8 (decode steps); within 10% of it from 64 rows up. On Zen 5, spreading the
// prefetch (it was all asked for during the first block) made AVX-512 GEMMs of 16 rows 0-14%
// faster and of 64 rows 3-5%, but the AVX2 build's 1-5% slower, so only the AVX-512 build
// spreads it. Knobs for experiments (-D at build time): MODGEN_NPV vectors a panel,
// MODGEN_MR rows a register block, MODGEN_PFSPREAD=0/1 the prefetch in the first block or spread
// (three vectors a panel, 12-row blocks, and passes of 64-256 rows over the panels were within
// the machine's noise of the defaults).
//
// A gated projection ([gate; up], SwiGLU's) may be packed so that each panel holds NP / 2 gate
// columns and the NP / 2 up columns of the same outputs (pack_panels_gated); its GEMM then
// writes silu(gate) * up straight from the accumulators (linear_panels<Out::silu_gated>): the
// [rows, 2 * inter] projection never goes to memory and is never read back.

#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace modgen {

#ifndef MODGEN_NPV
#define MODGEN_NPV 2
#endif
#ifndef MODGEN_MR
#define MODGEN_MR (NREG >= 32 ? 8 : 6)
#endif
#ifndef MODGEN_PFSPREAD
#define MODGEN_PFSPREAD (W == 16)  // the AVX-512 build (see above)
#endif
constexpr int NPV = MODGEN_NPV;          // vectors a panel
constexpr int NP = NPV * W;              // output columns a panel
constexpr int MR = MODGEN_MR;            // rows a register block: MR x NPV accumulators + NPV + 1
static_assert(NPV % 2 == 0, "a gated panel is half gate, half up vectors");

// dst [panels][k][NP]: column c of panel p holds row row_of(p, c) of w [rows][k] (PyTorch's
// Linear layout: a row per output), or zeros where row_of gives -1.
template <class RowOf>
inline void pack_columns(const float *w, int64_t panels, int64_t k, float *dst, RowOf row_of) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    float *panel = dst + p * k * NP;
    for (int c = 0; c < NP; ++c) {
      const int64_t row = row_of(p, c);
      for (int64_t kk = 0; kk < k; ++kk) panel[kk * NP + c] = row >= 0 ? w[row * k + kk] : 0.0f;
    }
  }
}

// dst [ceil(n / NP)][k][NP] from w [n][k]; columns past n are zero.
inline void pack_panels(const float *w, int64_t n, int64_t k, float *dst) {
  pack_columns(w, (n + NP - 1) / NP, k, dst, [n](int64_t p, int c) -> int64_t {
    return p * NP + c < n ? p * NP + c : -1;
  });
}

// dst [ceil(inter / (NP / 2))][k][NP] from w [2 * inter][k] (gate rows, then up rows): each
// panel's first NPV / 2 vectors hold gate columns, the others the up columns of the same
// outputs; columns past inter are zero. A bias [2 * inter] packs the same way with k = 1.
inline void pack_panels_gated(const float *w, int64_t inter, int64_t k, float *dst) {
  constexpr int64_t HP = NP / 2;
  pack_columns(w, (inter + HP - 1) / HP, k, dst, [inter](int64_t p, int c) -> int64_t {
    const int64_t col = p * HP + c % HP;
    return col >= inter ? -1 : c < HP ? col : inter + col;
  });
}

// What a panel's accumulators become: its columns (plain), or silu(gate) * up of a gated
// panel's (after its packed bias, when there is one).
enum class Out { plain, silu_gated };

// y[0 .. R)[cols] of one panel for R rows of x; prefetches `ahead` (the next panel, `lines`
// cache lines) over the first `lines` steps when given.
template <int R, Out O>
inline void panel_rows(const float *x, int64_t k, const float *panel, float *y, int64_t ldy,
                       int cols, const float *ahead, int64_t lines, const float *pbias) {
  vf acc[R][NPV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NPV; ++v) acc[r][v] = vf{};
  const int64_t per_step = ahead != nullptr && k > 0 ? (lines + k - 1) / k : 0;
  int64_t line = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    for (int64_t i = 0; i < per_step && line < lines; ++i, ++line)
      __builtin_prefetch(ahead + line * (64 / sizeof(float)), 0, 2);
    vf wv[NPV];
    for (int v = 0; v < NPV; ++v) wv[v] = load(panel + kk * NP + v * W);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * k + kk];  // broadcast (vf{} + xs would add a zero vector: -0.0)
      for (int v = 0; v < NPV; ++v) acc[r][v] += xs * wv[v];
    }
  }
  if constexpr (O == Out::silu_gated) {
    constexpr int H = NPV / 2;
    for (int r = 0; r < R; ++r) {
      float tmp[NP / 2];
      float *dst = cols == NP / 2 ? y + r * ldy : tmp;
      for (int v = 0; v < H; ++v) {
        vf g = acc[r][v], u = acc[r][v + H];
        if (pbias != nullptr) {
          g += load(pbias + v * W);
          u += load(pbias + (v + H) * W);
        }
        store(dst + v * W, vsilu(g) * u);
      }
      if (dst == tmp) std::memcpy(y + r * ldy, tmp, cols * sizeof(float));
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    if (cols == NP) {
      for (int v = 0; v < NPV; ++v) store(y + r * ldy + v * W, acc[r][v]);
    } else {  // the last panel of a width that is not a whole number of panels
      float tmp[NP];
      for (int v = 0; v < NPV; ++v) store(tmp + v * W, acc[r][v]);
      std::memcpy(y + r * ldy, tmp, cols * sizeof(float));
    }
  }
}

template <int R, Out O>
inline void panel_block(int rows, const float *x, int64_t k, const float *panel, float *y,
                        int64_t ldy, int cols, const float *ahead, int64_t lines,
                        const float *pbias) {
  if constexpr (R > 1) {
    if (rows < R)
      return panel_block<R - 1, O>(rows, x, k, panel, y, ldy, cols, ahead, lines, pbias);
  }
  panel_rows<R, O>(x, k, panel, y, ldy, cols, ahead, lines, pbias);
}

// y [m][n] = x [m][k] @ W^T + bias (bias may be null), W packed by pack_panels; or, with
// O = silu_gated, y [m][n] = silu(gate) * up of W packed by pack_panels_gated (n = inter, bias
// packed alike or null). The work is (panel, row group) items, each thread a contiguous run of
// them, panel by panel; rows are split into groups only when there are too few panels to give
// every thread two.
template <Out O = Out::plain>
inline void linear_panels(const float *x, int64_t m, int64_t k, const float *packed, int64_t n,
                          const float *bias, float *y) {
  constexpr int64_t OC = O == Out::plain ? NP : NP / 2;  // output columns a panel
  const int64_t panels = (n + OC - 1) / OC, lines = k * NP * sizeof(float) / 64;
  const int64_t blocks = (m + MR - 1) / MR;  // register blocks of rows
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t groups = panels >= 2 * nt ? 1 : (2 * nt + panels - 1) / std::max<int64_t>(panels, 1);
    groups = std::max<int64_t>(1, std::min(groups, blocks));
    const int64_t items = panels * groups, i0 = items * t / nt, i1 = items * (t + 1) / nt;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / groups, g = i % groups;
      const int64_t m0 = blocks * g / groups * MR, m1 = std::min(m, blocks * (g + 1) / groups * MR);
      const float *panel = packed + p * k * NP;
      // the next panel, prefetched during this item's rows when this thread runs it next
      const float *ahead = i + 1 < i1 && (i + 1) / groups != p ? panel + k * NP : nullptr;
      const int cols = n - p * OC < OC ? static_cast<int>(n - p * OC) : static_cast<int>(OC);
      const float *pbias = O == Out::silu_gated && bias != nullptr ? bias + p * NP : nullptr;
      const int64_t nb = (m1 - m0 + MR - 1) / MR;  // register blocks in this item
      for (int64_t r0 = m0, b = 0; r0 < m1; r0 += MR, ++b) {
        const int rows = m1 - r0 < MR ? static_cast<int>(m1 - r0) : MR;
        // this block's share of the next panel's lines
        const int64_t nbp = MODGEN_PFSPREAD ? (nb <= 2 ? nb : (nb + 1) / 2) : 1;
        const int64_t l0 = b < nbp ? lines * b / nbp : lines;
        const int64_t l1 = b < nbp ? lines * (b + 1) / nbp : lines;
        const float *pf = ahead != nullptr && l1 > l0 ? ahead + l0 * 64 / sizeof(float) : nullptr;
        panel_block<MR, O>(rows, x + r0 * k, k, panel, y + r0 * n + p * OC, n, cols, pf, l1 - l0,
                           pbias);
      }
      if (O == Out::plain && bias != nullptr)
        for (int64_t r = m0; r < m1; ++r)
          for (int c = 0; c < cols; ++c) y[r * n + p * NP + c] += bias[p * NP + c];
    }
  }
}

}  // namespace modgen
