// modgen's CPU kernels as torch operators (torch.ops.modgen.*), float32: RMSNorm with its
// residual add, SwiGLU's silu(gate) * up and the greedy arg-max (each one pass over memory
// instead of torch's several), a linear layer on a weight packed once (cpu_linear.h), and paged
// attention, which checks its tensors here and runs the kernel build for their head dim
// (cpu_kernels.cpp, registered by modgen/kernels/cpu.py).
//
// Built once per instruction set (the widest the machine runs) against torch's headers, linked
// against torch's OpenMP runtime: one thread pool, sized by torch.set_num_threads. Rows run in
// parallel on it.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>
#include <torch/library.h>

#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cpu_common.h"
#include "cpu_linear.h"

namespace {

using modgen::hmax;
using modgen::hsum;
using modgen::load;
using modgen::store;
using modgen::vexp;
using modgen::vsilu;
using modgen::vf;

// out = weight * h / sqrt(mean(h^2) + eps) per row, where h = x + residual (also written to
// residual_out) when residual is given, else h = x.
void rms_norm_rows(const float *x, const float *residual, float *residual_out,
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
    for (; c + W <= cols; c += W) {
      const vf v = load(h + c);
      sq += v * v;
    }
    float total = hsum(sq);
    for (; c < cols; ++c) total += h[c] * h[c];
    const float inv = 1.0f / std::sqrt(total / static_cast<float>(cols) + eps);
    float *o = out + r * cols;
    for (c = 0; c < cols; ++c) o[c] = weight[c] * (h[c] * inv);
  }
}

void check_plain(const char *name, const at::Tensor &t, int64_t dims) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() &&
                        t.dim() == dims,
                    name, " must be a contiguous float32 CPU tensor of ", dims,
                    " dims, not ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

at::Tensor rms_norm(const at::Tensor &x, const at::Tensor &weight, double eps) {
  check_plain("x", x, 2);
  check_plain("weight", weight, 1);
  TORCH_CHECK_VALUE(weight.size(0) == x.size(1), "weight has ", weight.size(0), " values for ",
                    x.size(1), " columns");
  at::Tensor out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), nullptr, nullptr, weight.data_ptr<float>(),
                out.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps));
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor &x, const at::Tensor &residual,
                                                const at::Tensor &weight, double eps) {
  check_plain("x", x, 2);
  check_plain("residual", residual, 2);
  check_plain("weight", weight, 1);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && weight.size(0) == x.size(1),
                    "x ", x.sizes(), ", residual ", residual.sizes(), " and weight ",
                    weight.sizes(), " do not match");
  at::Tensor out = at::empty_like(x), h = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), residual.data_ptr<float>(), h.data_ptr<float>(),
                weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                static_cast<float>(eps));
  return {out, h};
}

// out[r, :] = silu(gate_up[r, :inter]) * gate_up[r, inter:]
at::Tensor silu_mul(const at::Tensor &gate_up) {
  check_plain("gate_up", gate_up, 2);
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  const float *src = gate_up.data_ptr<float>();
  float *dst = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = src + r * 2 * inter;
    const float *u = g + inter;
    float *o = dst + r * inter;
    int64_t c = 0;
    for (; c + W <= inter; c += W) {
      const vf gv = load(g + c);
      store(o + c, vsilu(gv) * load(u + c));
    }
    for (; c < inter; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
  }
  return out;
}

// Greedy sampling: the index of each row's largest value (the first, on ties, as torch.argmax).
at::Tensor argmax(const at::Tensor &x) {
  check_plain("x", x, 2);
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float *src = x.data_ptr<float>();
  int64_t *dst = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = src + r * cols;
    vf best = vf{} - std::numeric_limits<float>::infinity();
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      const vf v = load(row + c);
      best = v > best ? v : best;
    }
    float m = hmax(best);
    for (; c < cols; ++c) m = row[c] > m ? row[c] : m;
    int64_t idx = 0;
    while (idx < cols && !(row[idx] >= m)) ++idx;
    dst[r] = idx < cols ? idx : 0;
  }
  return out;
}

// ---- linear layers on packed panels (cpu_linear.h) ----------------------------------------

// w [n, k] packed into [ceil(n / NP), k, NP] panels.
at::Tensor pack_linear(const at::Tensor &w) {
  check_plain("weight", w, 2);
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor out = at::empty({(n + modgen::NP - 1) / modgen::NP, k, modgen::NP}, w.options());
  modgen::pack_panels(w.data_ptr<float>(), n, k, out.data_ptr<float>());
  return out;
}

// x [m, k] @ W^T (+ bias) -> [m, n] with W packed by pack_linear.
at::Tensor linear(const at::Tensor &x, const at::Tensor &packed, int64_t n,
                  const std::optional<at::Tensor> &bias) {
  check_plain("x", x, 2);
  check_plain("packed weight", packed, 3);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK_VALUE(packed.size(1) == k && packed.size(2) == modgen::NP &&
                        packed.size(0) == (n + modgen::NP - 1) / modgen::NP,
                    "x has ", k, " columns; the packed weight ", packed.sizes(), " is not ", n,
                    " outputs of ", k, " in panels of ", modgen::NP);
  if (bias.has_value()) {
    check_plain("bias", *bias, 1);
    TORCH_CHECK_VALUE(bias->size(0) == n, "bias has ", bias->size(0), " values for ", n,
                      " outputs");
  }
  at::Tensor y = at::empty({m, n}, x.options());
  modgen::linear_panels(x.data_ptr<float>(), m, k, packed.data_ptr<float>(), n,
                        bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

// [gate; up] w [2 * inter, k] packed into [ceil(inter / (NP / 2)), k, NP] gated panels, and its
// bias [2 * inter], if any, into [ceil(inter / (NP / 2)), NP] alike (an empty tensor if none).
std::tuple<at::Tensor, at::Tensor> pack_linear_gated(const at::Tensor &w,
                                                     const std::optional<at::Tensor> &bias) {
  check_plain("weight", w, 2);
  TORCH_CHECK_VALUE(w.size(0) % 2 == 0, "a gated weight stacks gate and up rows; got ",
                    w.size(0), " rows");
  const int64_t inter = w.size(0) / 2, k = w.size(1), hp = modgen::NP / 2;
  const int64_t panels = (inter + hp - 1) / hp;
  at::Tensor out = at::empty({panels, k, modgen::NP}, w.options());
  modgen::pack_panels_gated(w.data_ptr<float>(), inter, k, out.data_ptr<float>());
  at::Tensor pb = at::empty({0}, w.options());
  if (bias.has_value()) {
    check_plain("bias", *bias, 1);
    TORCH_CHECK_VALUE(bias->size(0) == 2 * inter, "bias has ", bias->size(0), " values for ",
                      2 * inter, " gate and up outputs");
    pb = at::empty({panels, modgen::NP}, w.options());
    modgen::pack_panels_gated(bias->data_ptr<float>(), inter, 1, pb.data_ptr<float>());
  }
  return {out, pb};
}

// silu(x @ gate^T + gate bias) * (x @ up^T + up bias) -> [m, inter], on the weight (and bias)
// pack_linear_gated packed: the GEMM of a SwiGLU projection with silu_mul done in its epilogue.
at::Tensor linear_silu_mul(const at::Tensor &x, const at::Tensor &packed, int64_t inter,
                           const at::Tensor &packed_bias) {
  check_plain("x", x, 2);
  check_plain("packed weight", packed, 3);
  const int64_t m = x.size(0), k = x.size(1), hp = modgen::NP / 2;
  const int64_t panels = (inter + hp - 1) / hp;
  TORCH_CHECK_VALUE(packed.size(1) == k && packed.size(2) == modgen::NP &&
                        packed.size(0) == panels,
                    "x has ", k, " columns; the gated weight ", packed.sizes(), " is not ", inter,
                    " outputs of ", k, " in panels of ", hp, " gate and ", hp, " up columns");
  const bool has_bias = packed_bias.numel() > 0;
  if (has_bias) {
    check_plain("packed bias", packed_bias, 2);
    TORCH_CHECK_VALUE(packed_bias.size(0) == panels && packed_bias.size(1) == modgen::NP,
                      "the packed bias ", packed_bias.sizes(), " does not match ", panels,
                      " panels of ", modgen::NP);
  }
  at::Tensor y = at::empty({m, inter}, x.options());
  modgen::linear_panels<modgen::Out::silu_gated>(
      x.data_ptr<float>(), m, k, packed.data_ptr<float>(), inter,
      has_bias ? packed_bias.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

// ---- paged attention: the kernel builds, by instruction set and head dim ------------------

using AttentionFn = int (*)(const ModgenAttentionCall *);
std::mutex kernels_mutex;
std::map<std::pair<std::string, int64_t>, AttentionFn> kernels;

void register_attention(const std::string &isa, int64_t head_dim, int64_t address) {
  std::lock_guard<std::mutex> lock(kernels_mutex);
  kernels[{isa, head_dim}] = reinterpret_cast<AttentionFn>(address);
}

AttentionFn attention_kernel(const std::string &isa, int64_t head_dim) {
  std::lock_guard<std::mutex> lock(kernels_mutex);
  auto it = kernels.find({isa, head_dim});
  TORCH_CHECK_VALUE(it != kernels.end(), "no ", isa, " attention kernel for head dim ", head_dim,
                    " is loaded (modgen.kernels.cpu.load builds it)");
  return it->second;
}

// Row stride of a [T, heads, head_dim] float32 CPU tensor whose heads are packed.
int64_t packed_rows(const char *name, const at::Tensor &t, int64_t heads, int64_t head_dim) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
                    " must be a float32 CPU tensor, not ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(1) == heads && t.size(2) == head_dim &&
                        t.stride(2) == 1 && t.stride(1) == head_dim,
                    name, " must be [T, ", heads, ", ", head_dim,
                    "] with packed heads; got shape ", t.sizes(), ", strides ", t.strides());
  return t.stride(0);
}

at::Tensor paged_attention(const at::Tensor &q, const at::Tensor &k_cache,
                           const at::Tensor &v_cache, const at::Tensor &query_start,
                           const at::Tensor &context_lens, const at::Tensor &block_tables,
                           int64_t block_size, double scale, int64_t window,
                           const std::optional<at::Tensor> &k, const std::optional<at::Tensor> &v,
                           const std::optional<at::Tensor> &slot_mapping,
                           const std::optional<at::Tensor> &cos,
                           const std::optional<at::Tensor> &sin, const std::string &isa) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [T, heads, head_dim], got ", q.sizes());
  const int64_t num_tokens = q.size(0), hq = q.size(1), d = q.size(2), hkv = k_cache.size(1);
  ModgenAttentionCall c{};
  c.q_stride = packed_rows("q", q, hq, d);
  c.q = q.data_ptr<float>();
  for (const auto &[name, t] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}}) {
    packed_rows(name, *t, hkv, d);
    TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
  }
  for (const at::Tensor *t : {&query_start, &context_lens, &block_tables})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kLong && t->is_contiguous(),
                      "query_start, context_lens and block_tables must be contiguous int64");
  if (k.has_value()) {
    TORCH_CHECK_VALUE(v.has_value() && slot_mapping.has_value(), "k needs v and slot_mapping");
    c.k_stride = packed_rows("k", *k, hkv, d);
    c.v_stride = packed_rows("v", *v, hkv, d);
    c.k = k->data_ptr<float>();
    c.v = v->data_ptr<float>();
    TORCH_CHECK_VALUE(slot_mapping->scalar_type() == at::kLong && slot_mapping->is_contiguous() &&
                          slot_mapping->numel() == num_tokens,
                      "slot_mapping must be ", num_tokens, " contiguous int64");
    c.slot_mapping = slot_mapping->data_ptr<int64_t>();
  }
  if (cos.has_value()) {
    TORCH_CHECK_VALUE(sin.has_value(), "rope needs both cos and sin");
    const int64_t rot = cos->size(-1);
    for (const at::Tensor *t : {&*cos, &*sin})
      TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                            t->numel() == num_tokens * rot,
                        "rope tables must be contiguous float32 [T, R]");
    TORCH_CHECK_VALUE(rot % 2 == 0 && rot <= d, "rope tables rotate ", rot,
                      " dims: an even number up to ", d, " is needed");
    c.cos = cos->data_ptr<float>();
    c.sin = sin->data_ptr<float>();
    c.rot_dim = rot;
  }
  at::Tensor out = at::empty({num_tokens, hq, d}, q.options());
  c.k_cache = k_cache.data_ptr<float>();
  c.v_cache = v_cache.data_ptr<float>();
  c.out = out.data_ptr<float>();
  c.query_start = query_start.data_ptr<int64_t>();
  c.context_lens = context_lens.data_ptr<int64_t>();
  c.block_tables = block_tables.data_ptr<int64_t>();
  c.num_tokens = num_tokens;
  c.num_seqs = context_lens.size(0);
  c.max_blocks = block_tables.size(1);
  c.hq = hq;
  c.hkv = hkv;
  c.block_size = block_size;
  c.window = window;
  c.scale = static_cast<float>(scale);
  TORCH_CHECK_VALUE(attention_kernel(isa, d)(&c) == 0, hq, " query heads over ", hkv,
                    " KV heads: groups over 64 are not supported");
  return out;
}

}  // namespace

TORCH_LIBRARY(modgen, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("pack_linear_gated(Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("linear_silu_mul(Tensor x, Tensor packed, int inter, Tensor packed_bias) -> Tensor");
  m.def("register_attention(str isa, int head_dim, int address) -> ()", &register_attention);
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start, "
      "Tensor context_lens, Tensor block_tables, int block_size, float scale, int window, "
      "Tensor? k, Tensor? v, Tensor? slot_mapping, Tensor? cos, Tensor? sin, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(modgen, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax", &argmax);
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
  m.impl("pack_linear_gated", &pack_linear_gated);
  m.impl("linear_silu_mul", &linear_silu_mul);
  m.impl("paged_attention", &paged_attention);
}
