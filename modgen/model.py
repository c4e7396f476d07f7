"""Model interface: a causal LM that runs a RaggedBatch over the paged KV cache."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modgen.attention import AttentionBackend, AttentionSpec
from modgen.engine.batch import RaggedBatch
from modgen.engine.parallel import Parallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class ModelConfig:
    """Settings every model has."""

    checkpoint: str | None = None
    """Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json); when None,
    the preset's shape is built with seeded random weights."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16, float16, or auto (the checkpoint's)."""
    seed: int = 0
    """Seed of the random weights when no checkpoint is given."""
    cpu_kernels: bool | None = None
    """On the CPU in float32, run the element-wise ops a model fuses (RMSNorm with its residual
    add, SwiGLU, the greedy arg-max) through modgen's C++ kernels, built with g++ on first use:
    true forces them, false keeps plain torch, null (the default) measures both on this machine
    and keeps the faster (no compiler: torch, logged)."""
    cpu_linear: str = "auto"
    """On the CPU, how linear layers run: blas (torch's F.linear on [out, in] weights), blas_t
    (weights stored input-major), onednn (weights packed for oneDNN's GEMM), a layout a plugin
    registers (modgen's C++ kernels: cpp, weights packed in panels for its own GEMM), or auto
    (each layer shape measured on this machine; the fastest is kept)."""

    def __post_init__(self) -> None:
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"model.dtype must be one of {[*DTYPES, 'auto']}, got {self.dtype!r}")
        if self.cpu_linear != "auto":
            from modgen.blocks.ops import linear_layouts  # built in, and plugins' layouts

            if self.cpu_linear not in linear_layouts():
                raise ValueError(
                    f"model.cpu_linear must be auto or one of {list(linear_layouts())}, "
                    f"got {self.cpu_linear!r}"
                )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What the engine, the simulator's cost models and the roofline need of a model, read from
    its config alone (a preset or a checkpoint's config.json; no weights)."""

    family: str
    """The model's registry name."""
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    hidden_size: int
    intermediate_size: int
    """MLP width (of one expert, for a mixture of experts)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    dtype: str
    """float32, bfloat16 or float16."""
    gated_mlp: bool = True
    """Gate and up projections (SwiGLU), or one up projection."""
    num_experts: int = 0
    """Experts per MoE layer (0: a dense MLP)."""
    experts_per_token: int = 0
    """Experts each token is routed to."""
    tie_word_embeddings: bool = False
    checkpoint: str | None = None

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one weight or activation element."""
        return 4 if self.dtype == "float32" else 2

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def attention_params(self) -> int:
        """Parameters of one layer's q/k/v/o projections."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    def mlp_params(self, experts: int = 1) -> int:
        """Parameters of ``experts`` experts' MLPs (one dense MLP by default) in one layer."""
        mats = 3 if self.gated_mlp else 2
        return experts * mats * self.hidden_size * self.intermediate_size

    def active_params_per_token(self) -> int:
        """Linear-layer parameters one token goes through (without the LM head)."""
        experts = self.experts_per_token if self.num_experts else 1
        return self.num_layers * (self.attention_params() + self.mlp_params(experts))

    def skipped_params_per_row(self) -> int:
        """Of ``active_params_per_token``, those a row that needs no logits skips: the last
        layer's output projection and MLP (it stops there after its q/k/v projection)."""
        experts = self.experts_per_token if self.num_experts else 1
        return self.num_heads * self.head_dim * self.hidden_size + self.mlp_params(experts)

    def layer_weight_bytes(self) -> int:
        """Bytes of the decoder layers' weights (every expert)."""
        per_layer = self.attention_params() + self.mlp_params(self.num_experts or 1)
        return self.num_layers * per_layer * self.dtype_bytes

    def weight_bytes(self) -> int:
        """Bytes of every weight: the layers, the embedding and the LM head."""
        head = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.layer_weight_bytes() + head * self.dtype_bytes


def describe_model(node: Any) -> ModelSpec:
    """The description of the model a composed ``model`` config node names (no weights)."""
    from modgen import registry

    config = registry.to_config("model", node)
    return registry.get("model", config.name).describe(config)


def read_hf_config(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; a clear error if the directory is not one."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"model.checkpoint '{checkpoint}' is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model.checkpoint '{checkpoint}' has no config.json")
    return json.loads(config.read_text())


def resolve_dtype(name: str, hf_config: dict[str, Any] | None) -> torch.dtype:
    """The torch dtype for ``model.dtype`` (``auto`` reads the checkpoint's, else float32)."""
    if name == "auto":
        name = (hf_config or {}).get("torch_dtype") or (hf_config or {}).get("dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {list(DTYPES)}")
    return DTYPES[name]


class CausalLM(nn.Module, ABC):
    """A decoder-only LM. Implementations set the shape attributes below in ``__init__``."""

    Config = ModelConfig
    supports_tensor_parallel: bool = False
    """Whether the model can be built as one rank's shard (``parallel``) of several."""

    spec: ModelSpec
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    eos_token_ids: list[int]
    dtype: torch.dtype

    def __init__(
        self, config: ModelConfig, device: torch.device, parallel: Parallel | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.device = device
        self.parallel = parallel or Parallel()
        if self.parallel.world > 1 and not self.supports_tensor_parallel:
            raise ValueError(
                f"model '{type(self).registry_name}' cannot be split over ranks "
                "(engine.tensor_parallel must be 1 for it)"
            )

    @classmethod
    @abstractmethod
    def describe(cls, config: ModelConfig) -> ModelSpec:
        """The model's description from its config alone (the checkpoint's config.json when one
        is named), without building or loading weights: it must take seconds even for a 70B
        model, since a simulated run needs nothing else."""

    @abstractmethod
    def forward(
        self,
        batch: RaggedBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionBackend,
        attn_meta: Any,
    ) -> torch.Tensor:
        """Logits ``[len(batch.logits_indices), vocab]`` for the rows that need them."""

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row of ``logits`` [R, vocab] (a model may run it through a
        faster kernel)."""
        return logits.argmax(dim=-1)

    def attention_spec(self) -> AttentionSpec:
        """What this model asks of its attention backend."""
        return AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            sliding_window=self.sliding_window,
        )

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over all layers."""
        return self.spec.kv_bytes_per_token()
