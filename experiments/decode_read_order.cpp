// How fast the decode tiles' reads of the paged KV cache can go, by the order they come in: a
// loop that only reads (no arithmetic), on the peers' shape (2 KV heads of 64 floats: a token's
// cache row is 512 bytes of keys and 512 of values), 256 sequences of 1024 tokens in blocks of 16,
// the blocks of each sequence shuffled over the cache or in one run (as the blocked allocator
// hands them out), key tiles of 32, the next-but-one tile prefetched a key at a time or not.
// Orders: "heads" reads a tile's keys head by head (four of each row's eight lines, then the
// other four: the decode tiles before pair_scores / pair_pv), "rows" each key's whole row in
// turn. Never part of CI; the figures are in docs/notes.md.
//
//   g++ -O2 -march=native -fopenmp experiments/decode_read_order.cpp -o /tmp/read_order
//   OMP_NUM_THREADS=2 /tmp/read_order

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));

constexpr int SEQS = 256, CTX = 1024, BS = 16, KT = 32, ROW = 128;  // ROW: floats a token
constexpr size_t BLOCK = size_t(BS) * ROW;                            // floats a block

double gbps(bool rows, bool prefetch, bool runs) {
  const int per_seq = CTX / BS, blocks = SEQS * per_seq;
  std::vector<float> k(blocks * BLOCK, 1.0f), v(blocks * BLOCK, 1.0f);
  std::vector<int> table(blocks);
  std::iota(table.begin(), table.end(), 0);
  if (!runs) std::shuffle(table.begin(), table.end(), std::mt19937(0));
  double best = 1e30;
  float sink = 0;
  for (int rep = 0; rep < 15; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
    for (int s = 0; s < SEQS; ++s) {
      const int *tab = &table[s * per_seq];
      auto row = [&](const std::vector<float> &c, int pos) {
        return c.data() + tab[pos / BS] * BLOCK + (pos % BS) * ROW;
      };
      v16 acc = {};
      for (int p0 = 0; p0 < CTX; p0 += KT)
        for (const auto *cache : {&k, &v}) {
          for (int pass = 0; pass < (rows ? 1 : 2); ++pass)
            for (int j = 0; j < KT; ++j) {
              const int ahead = p0 + 2 * KT + j;
              if (prefetch && pass == 0 && ahead < CTX)
                for (int x = 0; x < ROW; x += 16) __builtin_prefetch(row(*cache, ahead) + x, 0, 2);
              const float *r = row(*cache, p0 + j) + (rows ? 0 : pass * ROW / 2);
              for (int x = 0; x < (rows ? ROW : ROW / 2); x += 16) {
                v16 line;
                __builtin_memcpy(&line, r + x, sizeof(line));
                acc += line;
              }
            }
        }
      for (int i = 0; i < 16; ++i) sink += acc[i];
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (sink == 42.0f) std::puts("");  // keep the reads
  return 2.0 * blocks * BLOCK * sizeof(float) / best / 1e9;
}

int main() {
  std::printf("%d threads; GB/s, best of 15 passes over %zu MB\n", omp_get_max_threads(),
              2 * size_t(SEQS) * CTX * ROW * sizeof(float) >> 20);
  for (bool runs : {false, true})
    for (bool rows : {false, true})
      for (bool pf : {false, true})
        std::printf("blocks %-8s order %-5s prefetch %-3s %6.1f\n", runs ? "in runs" : "shuffled",
                    rows ? "rows" : "heads", pf ? "yes" : "no", gbps(rows, pf, runs));
}
