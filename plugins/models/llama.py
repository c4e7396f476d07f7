"""``model=llama`` and ``model=mistral``: Llama-architecture decoders (GQA, RoPE, RMSNorm, SwiGLU),
with Mistral's sliding-window attention when the config sets ``sliding_window``."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from modgen.attention import AttentionBackend
from modgen.blocks import ops as cpu_ops
from modgen.blocks.ops import TorchOps, rms_norm
from modgen.engine.batch import RaggedBatch
from modgen.model import CausalLM, ModelConfig, ModelSpec, read_hf_config, resolve_dtype
from modgen.registry import register
from modgen.weights import WeightRule, load_weights

log = logging.getLogger(__name__)

# Hugging Face weight names -> modgen parameters (q/k/v and gate/up are packed).
WEIGHT_RULES = [
    WeightRule("model.embed_tokens.weight", "embed.weight"),
    WeightRule("model.norm.weight", "norm"),
    WeightRule("lm_head.weight", "lm_head.weight"),
    WeightRule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm"),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_norm"),
    WeightRule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.qkv.weight", "q"),
    WeightRule("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.qkv.weight", "k"),
    WeightRule("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.qkv.weight", "v"),
    WeightRule("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.qkv.bias", "q"),
    WeightRule("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.qkv.bias", "k"),
    WeightRule("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.qkv.bias", "v"),
    WeightRule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.o_proj.weight"),
    WeightRule("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.o_proj.bias"),
    WeightRule("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.gate_up.weight", "gate"),
    WeightRule("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.gate_up.weight", "up"),
    WeightRule("model.layers.{i}.mlp.gate_proj.bias", "layers.{i}.gate_up.bias", "gate"),
    WeightRule("model.layers.{i}.mlp.up_proj.bias", "layers.{i}.gate_up.bias", "up"),
    WeightRule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.down.weight"),
    WeightRule("model.layers.{i}.mlp.down_proj.bias", "layers.{i}.down.bias"),
]
IGNORED_WEIGHTS = (r"rotary_emb\.inv_freq$",)
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(kw_only=True)
class LlamaShape(ModelConfig):
    """Architecture fields, named as in a Hugging Face config.json (used without a checkpoint)."""

    vocab_size: int = 32000
    """Vocabulary size."""
    hidden_size: int = 512
    """Model width."""
    intermediate_size: int = 1536
    """MLP width."""
    num_hidden_layers: int = 8
    """Decoder layers."""
    num_attention_heads: int = 8
    """Query heads."""
    num_key_value_heads: int = 2
    """KV heads (grouped-query attention when fewer than query heads)."""
    head_dim: int | None = None
    """Head size; None means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 4096
    """Longest context."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling, as in Hugging Face (rope_type default, linear or llama3)."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    sliding_window: int | None = None
    """Attend to at most this many most recent tokens (Mistral); None attends to all."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections."""
    mlp_bias: bool = False
    """Biases on the MLP projections."""
    eos_token_id: int | None = 2
    """End-of-sequence token id."""


def shape_from_hf(hf: dict[str, Any], base: LlamaShape) -> tuple[LlamaShape, list[int]]:
    """The architecture in a checkpoint's config.json (keeping ``base``'s other settings), and
    its end-of-sequence token ids."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
    values = {k: hf[k] for k in asdict(base) if k in hf and k not in ("rope_scaling", "dtype")}
    values.update(
        rope_theta=theta,
        rope_scaling=rope or None,
        eos_token_id=eos_ids[0] if eos_ids else None,
        head_dim=hf.get("head_dim") or None,
    )
    return replace(base, **values), eos_ids


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"rope_type '{kind}' is not supported; supported: {SUPPORTED_ROPE}")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding to ``x`` [T, H, D] with ``cos``/``sin`` [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """Pre-norm attention and SwiGLU MLP with residuals."""

    def __init__(self, s: LlamaShape, head_dim: int, window: int | None) -> None:
        super().__init__()
        self.s, self.head_dim, self.window = s, head_dim, window
        self.q_size = s.num_attention_heads * head_dim
        self.kv_size = s.num_key_value_heads * head_dim
        self.input_norm = nn.Parameter(torch.ones(s.hidden_size))
        self.post_norm = nn.Parameter(torch.ones(s.hidden_size))
        self.qkv = nn.Linear(s.hidden_size, self.q_size + 2 * self.kv_size, bias=s.attention_bias)
        self.o_proj = nn.Linear(self.q_size, s.hidden_size, bias=s.attention_bias)
        self.gate_up = nn.Linear(s.hidden_size, 2 * s.intermediate_size, bias=s.mlp_bias)
        self.down = nn.Linear(s.intermediate_size, s.hidden_size, bias=s.mlp_bias)

    def forward(self, h, cos, sin, kv_cache, batch, attn, meta, ops: TorchOps):  # h: [T, hidden]
        """``ops``: the fused RMSNorm and SwiGLU (torch's or the C++ kernels)."""
        s, d = self.s, self.head_dim
        x, _ = ops.rms_norm(h, self.input_norm, s.rms_norm_eps)
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, s.num_attention_heads, d)
        k = k.view(-1, s.num_key_value_heads, d)
        v = v.view(-1, s.num_key_value_heads, d)
        if attn.fuses_rope:  # the backend rotates q/k in its KV-write kernel
            o = attn.forward(q, k, v, kv_cache, batch, meta, d**-0.5, self.window, rope=(cos, sin))
        else:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            o = attn.forward(q, k, v, kv_cache, batch, meta, d**-0.5, self.window)
        y = self.o_proj(o.reshape(-1, self.q_size))
        x, h = ops.rms_norm(y, self.post_norm, s.rms_norm_eps, residual=h)
        return h + self.down(ops.silu_mul(self.gate_up(x)))


@register("model", "llama")
class LlamaForCausalLM(CausalLM):
    """Llama 2/3 decoder; loads Hugging Face ``llama`` checkpoints."""

    hf_model_types: tuple[str, ...] = ("llama",)

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Llama settings; the shape fields apply when no checkpoint is given."""

    @classmethod
    def shape_of(cls, config: LlamaShape) -> tuple[LlamaShape, list[int], dict[str, Any] | None]:
        """The architecture (the checkpoint's config.json, else the preset), its end-of-sequence
        ids, and the checkpoint's config (None without one)."""
        hf = read_hf_config(config.checkpoint) if config.checkpoint else None
        if hf is None:
            return config, [] if config.eos_token_id is None else [config.eos_token_id], None
        if hf.get("model_type") not in cls.hf_model_types:
            raise ValueError(
                f"model '{cls.registry_name}' loads model_type {cls.hf_model_types}, "
                f"but {config.checkpoint} is '{hf.get('model_type')}'"
            )
        s, eos_ids = shape_from_hf(hf, config)
        return s, eos_ids, hf

    @classmethod
    def describe(cls, config: LlamaShape) -> ModelSpec:
        s, eos_ids, hf = cls.shape_of(config)
        dtype = str(resolve_dtype(config.dtype, hf)).removeprefix("torch.")
        return ModelSpec(
            family=cls.registry_name, vocab_size=s.vocab_size,
            max_position_embeddings=s.max_position_embeddings, eos_token_ids=tuple(eos_ids),
            num_layers=s.num_hidden_layers, hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size, num_heads=s.num_attention_heads,
            num_kv_heads=s.num_key_value_heads,
            head_dim=s.head_dim or s.hidden_size // s.num_attention_heads,
            sliding_window=cls.window_of(s), dtype=dtype,
            tie_word_embeddings=s.tie_word_embeddings, checkpoint=config.checkpoint,
        )  # fmt: skip

    def __init__(self, config: LlamaShape, device: torch.device) -> None:
        super().__init__(config, device)
        s, _, hf = self.shape_of(config)
        self.shape, self.spec = s, self.describe(config)
        self.dtype = resolve_dtype(config.dtype, hf)
        spec = self.spec
        self.num_layers, self.num_heads, self.num_kv_heads = (
            spec.num_layers,
            spec.num_heads,
            spec.num_kv_heads,
        )
        self.head_dim, self.vocab_size = spec.head_dim, spec.vocab_size
        self.max_position_embeddings = spec.max_position_embeddings
        self.sliding_window, self.eos_token_ids = spec.sliding_window, list(spec.eos_token_ids)
        inv_freq = rope_inv_freq(self.head_dim, s.rope_theta, s.rope_scaling)
        self.embed = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(s, self.head_dim, self.sliding_window) for _ in range(self.num_layers)
        )
        self.norm = nn.Parameter(torch.ones(s.hidden_size))
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.checkpoint:
            self.load_checkpoint(config.checkpoint)
        else:
            self.init_random(config.seed)
        self.to(device=device, dtype=self.dtype)
        self.inv_freq = inv_freq.to(device)  # float32 whatever the model's dtype
        self.ops = cpu_ops.choose_ops(
            config.cpu_kernels, torch.device(device), self.dtype, s.hidden_size,
            s.intermediate_size, s.vocab_size,
        )  # fmt: skip
        if torch.device(device).type == "cpu":
            self._cpu_linear_layouts(config.cpu_linear)
        self.eval()

    def _cpu_linear_layouts(self, setting: str) -> None:
        """Run each linear layer the way ``model.cpu_linear`` says (``auto``: the layout
        measured fastest for its shape, at the rows a step feeds it). A tied LM head gets a
        packed copy or none: the embedding keeps its rows contiguous for the lookup."""
        tied = self.lm_head.weight is self.embed.weight
        groups = [(layer, name, (32, 512)) for layer in self.layers
                  for name in ("qkv", "o_proj", "gate_up", "down")]  # fmt: skip
        groups.append((self, "lm_head", (32,)))
        chosen: dict[tuple, str] = {}
        for owner, name, rows in groups:
            lin = getattr(owner, name)
            key = (lin.in_features, lin.out_features, lin.bias is not None, rows)
            if key not in chosen:
                chosen[key] = cpu_ops.choose_layout(setting, *key[:3], self.dtype, rows)
            layout = chosen[key]
            if tied and name == "lm_head" and layout != "onednn":
                continue  # F.linear on the embedding's own [vocab, hidden] rows
            setattr(owner, name, cpu_ops.with_layout(lin, layout))

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self.ops.argmax(logits)

    @classmethod
    def window_of(cls, s: LlamaShape) -> int | None:
        """Llama ignores ``sliding_window``; Mistral honours it."""
        return None

    def init_random(self, seed: int) -> None:
        """Seeded N(0, 0.02) weights, unit norms, zero biases."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(0.0 if name.endswith("bias") else 1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)

    def load_checkpoint(self, checkpoint: str) -> None:
        """Load safetensors weights by WEIGHT_RULES."""
        s = self.shape
        q, kv, inter = (
            s.num_attention_heads * self.head_dim,
            s.num_key_value_heads * self.head_dim,
            s.intermediate_size,
        )
        shards = {
            "q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, inter), "up": slice(inter, 2 * inter),
        }  # fmt: skip
        params = dict(self.named_parameters(remove_duplicate=False))
        rules = [r for r in WEIGHT_RULES if r.param.replace("{i}", "0") in params]
        ignore = IGNORED_WEIGHTS
        if s.tie_word_embeddings:
            rules = [r for r in rules if r.param != "lm_head.weight"]
            ignore = (*ignore, r"^lm_head\.weight$")
        load_weights(self, checkpoint, rules, shards, self.num_layers, ignore)
        log.info("loaded %s from %s", type(self).registry_name, checkpoint)

    def forward(self, batch: RaggedBatch, kv_caches, attn: AttentionBackend, attn_meta):
        freqs = batch.positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        h = self.embed(batch.input_ids)  # [T, hidden]
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, cache, batch, attn, attn_meta, self.ops)
        h = rms_norm(h[batch.logits_indices], self.norm, self.shape.rms_norm_eps)
        return self.lm_head(h)  # [R, vocab]


@register("model", "mistral")
class MistralForCausalLM(LlamaForCausalLM):
    """Mistral decoder: Llama's layers, sliding-window attention if ``sliding_window`` is set."""

    hf_model_types = ("mistral",)

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Mistral settings; the shape fields apply when no checkpoint is given."""

    @classmethod
    def window_of(cls, s: LlamaShape) -> int | None:
        return s.sliding_window
