"""A decoder-only LM assembled from registered blocks.

A family subclasses ``DecoderLM`` with its typed ``Config`` (the config.json fields it reads,
with Hugging Face's defaults), the ``model_type`` values it loads, its weight-name map and an
``arch`` method that names the blocks its config describes. Everything else (building, loading,
the model description, the CPU fast paths, the forward pass) is here, the same for every family.
"""

from __future__ import annotations

import logging
import re
from abc import abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from modgen.attention import AttentionBackend, AttentionSpec
from modgen.blocks import ops as cpu_ops
from modgen.blocks.hf import as_ids, merge_hf
from modgen.blocks.interfaces import Block, Keep, Step, tp_heads
from modgen.blocks.registry import BlockSpec, build_block, get_block
from modgen.engine.batch import RaggedBatch
from modgen.engine.parallel import Parallel
from modgen.model import CausalLM, ModelConfig, ModelSpec, read_hf_config, resolve_dtype
from modgen.weights import Split, WeightRule, load_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DecoderArch:
    """A decoder as blocks: its shape, and which registered block (with which settings) makes
    each part. Families build it from their config; ``mlp`` and ``windows`` are per layer."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """Width of the dense MLP, or of one expert (for the model description)."""
    max_position_embeddings: int
    """The longest context served."""
    norm: BlockSpec
    """Every norm of the model (the layers' and the final one)."""
    position: BlockSpec
    attention: BlockSpec
    mlp: tuple[BlockSpec, ...] | BlockSpec
    """Each layer's feed-forward block (a dense MLP or a mixture of experts); one spec for all."""
    layer: BlockSpec
    windows: tuple[int | None, ...] | None = None
    """Each layer's sliding window (None: full attention); None for no window anywhere."""
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    final_norm: bool = True
    embed_scale: float | None = None
    """Embeddings are multiplied by this (Gemma: sqrt(hidden_size))."""
    embed_dim: int | None = None
    """Width of the embeddings when it differs from hidden_size (OPT's word_embed_proj_dim:
    projected in and out)."""
    lm_head_bias: bool = False
    gated_mlp: bool = True
    num_experts: int = 0
    experts_per_token: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """Family settings blocks read (for example Falcon's fused QKV layout)."""
    tp_rank: int = 0
    """This rank's place among ``tp_world`` tensor-parallel ranks; blocks build their shard."""
    tp_world: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.mlp, BlockSpec):
            object.__setattr__(self, "mlp", (self.mlp,) * self.num_layers)
        if self.windows is None:
            object.__setattr__(self, "windows", (None,) * self.num_layers)
        for name in ("mlp", "windows"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, not one a layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.num_heads} query heads do not group evenly over {self.num_kv_heads} "
                "KV heads"
            )

    @property
    def local_heads(self) -> int:
        """Query heads this rank holds."""
        return tp_heads(self)[0]

    @property
    def local_kv_heads(self) -> int:
        """KV heads this rank holds (one, replicated, when the ranks outnumber them)."""
        return tp_heads(self)[1]

    @property
    def local_vocab(self) -> int:
        """Vocabulary rows this rank holds (the last rank's part padded with zero rows)."""
        return -(-self.vocab_size // self.tp_world)

    def check_split(self) -> None:
        """Refuse, with the numbers, a tensor-parallel degree this shape cannot take."""
        n, hkv = self.tp_world, self.num_kv_heads
        if self.num_heads % n:
            raise ValueError(f"tensor_parallel={n} does not divide {self.num_heads} query heads")
        if hkv % n and n % hkv:
            raise ValueError(
                f"tensor_parallel={n} neither divides nor is a multiple of {hkv} KV heads"
            )

    @property
    def uniform_window(self) -> int | None:
        """The window every layer has, else None (some layer attends to everything)."""
        first = self.windows[0]
        return first if all(w == first for w in self.windows) else None


class DecoderLM(CausalLM):
    """A decoder assembled from the blocks its family's ``arch`` names.

    Over ``parallel``'s tensor-parallel ranks (Megatron's split) each rank builds and loads its
    shard: its query and KV heads, its columns of the MLP, its experts, its rows of the
    vocabulary (embedding and LM head); the blocks sum their partial outputs over the ranks and
    the logits are gathered. Norms, positions and routers are replicated."""

    supports_tensor_parallel = True
    packed_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "qkv": ("q", "k", "v"),
        "gate_up": ("gate", "up"),
        "experts_gate_up": ("gate", "up"),
    }
    """Packed parameters (by their module's attribute) and their parts, in row order."""

    hf_model_types: tuple[str, ...] = ()
    """config.json ``model_type`` values this family loads."""
    weight_rules: tuple[WeightRule, ...] = ()
    """Checkpoint name -> parameter map (explicit; no fuzzy matching)."""
    ignored_weights: tuple[str, ...] = (r"rotary_emb\.inv_freq$",)
    """Regexes of checkpoint tensors that are not weights."""

    @classmethod
    @abstractmethod
    def arch(cls, shape: Any) -> DecoderArch:
        """The architecture ``shape`` (this family's Config, filled from config.json when a
        checkpoint is given) describes; a value modgen does not implement is refused by name."""

    @classmethod
    def shape_of(cls, config: ModelConfig) -> tuple[Any, dict[str, Any] | None]:
        """The family config with the checkpoint's config.json fields (the preset's fields
        without a checkpoint), and the checkpoint's config (None without one)."""
        if not config.checkpoint:
            return config, None
        hf = read_hf_config(config.checkpoint)
        if hf.get("model_type") not in cls.hf_model_types:
            raise ValueError(
                f"model '{cls.registry_name}' loads model_type {list(cls.hf_model_types)}, "
                f"but {config.checkpoint} is '{hf.get('model_type')}' (model=auto picks the "
                "family from config.json)"
            )
        return merge_hf(config, hf), hf

    @classmethod
    def arch_of(cls, config: ModelConfig) -> tuple[DecoderArch, dict[str, Any] | None]:
        """The architecture of ``config`` and the checkpoint's config.json (None without)."""
        shape, hf = cls.shape_of(config)
        arch = cls.arch(shape)
        position = get_block("position", arch.position.name)
        served = position.served_context(arch.max_position_embeddings, **arch.position.params)
        if served != arch.max_position_embeddings:
            log.info(
                "%s: serving a context of %d, not the configured %d (%s position encoding)",
                cls.registry_name, served, arch.max_position_embeddings, arch.position.name,
            )  # fmt: skip
        eos = as_ids(getattr(shape, "eos_token_id", None))
        return replace(arch, eos_token_ids=eos, max_position_embeddings=served), hf

    @classmethod
    def describe(cls, config: ModelConfig) -> ModelSpec:
        arch, hf = cls.arch_of(config)
        return ModelSpec(
            family=cls.registry_name, vocab_size=arch.vocab_size,
            max_position_embeddings=arch.max_position_embeddings,
            eos_token_ids=arch.eos_token_ids, num_layers=arch.num_layers,
            hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
            num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
            sliding_window=arch.uniform_window,
            dtype=str(resolve_dtype(config.dtype, hf)).removeprefix("torch."),
            gated_mlp=arch.gated_mlp, num_experts=arch.num_experts,
            experts_per_token=arch.experts_per_token,
            tie_word_embeddings=arch.tie_word_embeddings, checkpoint=config.checkpoint,
        )  # fmt: skip

    def __init__(
        self, config: ModelConfig, device: torch.device, parallel: Parallel | None = None
    ) -> None:
        super().__init__(config, device, parallel)
        arch, hf = self.arch_of(config)
        self.arch = replace(arch, tp_rank=self.parallel.rank, tp_world=self.parallel.world)
        self.arch.check_split()
        self.spec = self.describe(config)
        self.dtype = resolve_dtype(config.dtype, hf)
        self._shape_attributes(self.spec)
        self._build(self.arch)
        if config.checkpoint:
            self.load_checkpoint(config.checkpoint)
        else:
            self.init_random(config.seed)
        self.to(device=device, dtype=self.dtype)
        for module in self.modules():
            if isinstance(module, Block):
                module.post_load()
        self.embed_scale = None  # Gemma's normalizer: a tensor in the model's dtype, as in HF
        if self.arch.embed_scale is not None:
            self.embed_scale = torch.tensor(self.arch.embed_scale, dtype=self.dtype, device=device)
        self._fast_paths(config, torch.device(device))
        self.eval()

    def _fast_paths(self, config: ModelConfig, device: torch.device) -> None:
        """The element-wise ops, each linear layer's layout on the CPU and the blocks' steps
        fused into their linear layers, measured; over several ranks rank 0 measures and every
        rank takes its choices, so the computations every rank repeats (norms, routers) stay bit
        for bit the same on all."""
        a, first, cpu = self.arch, self.parallel.is_first, device.type == "cpu"
        choice, layouts, fused = None, {}, []
        if self.parallel.world > 1:  # measure once every rank is built and waiting, not busy
            self.parallel.broadcast(None)
        if first:
            self.ops = cpu_ops.choose_ops(
                config.cpu_kernels, device, self.dtype, a.hidden_size,
                a.intermediate_size // a.tp_world, a.vocab_size,
            )  # fmt: skip
            choice = self.ops.choice
            layouts = self._choose_layouts(config.cpu_linear) if cpu else {}
            fused = self._choose_fusions(config.cpu_kernels, layouts)
        if self.parallel.world > 1:
            choice, layouts, fused = self.parallel.broadcast((choice, layouts, fused))
            if not first:
                self.ops = cpu_ops.named_ops(choice)
        if not cpu:
            return
        self._apply_layouts(layouts)
        for name in fused:
            block_name, _, attr = name.rpartition(".")
            block = self.get_submodule(block_name)
            block.use_fused(attr, getattr(block, attr).fused(block.fusable()[attr]))

    def _choose_fusions(self, setting: bool | None, layouts: dict[tuple, str]) -> list[str]:
        """The linear layers (by name) that will run their block's next step fused into their
        GEMM, once in their layouts: each shape measured once (``cpu_ops.choose_fused``;
        ``model.cpu_kernels`` False never fuses, True fuses wherever the layout can)."""
        keys = {id(lin): key for _, lin, key in self._linears()}
        decided: dict[tuple, bool] = {}
        fused = []
        for block_name, block in self.named_modules():
            if not isinstance(block, Block):
                continue
            for attr, step in block.fusable().items():
                key = keys.get(id(getattr(block, attr)))
                if key not in layouts:
                    continue  # run as loaded (torch's GEMM): nothing to fuse into
                if (key, step) not in decided:
                    decided[key, step] = cpu_ops.choose_fused(
                        setting, layouts[key], *key[:3], self.dtype, step, self.ops, key[3]
                    )
                if decided[key, step]:
                    fused.append(f"{block_name}.{attr}")
        return fused

    def _shape_attributes(self, spec: ModelSpec) -> None:
        self.num_layers, self.num_heads = spec.num_layers, spec.num_heads
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.vocab_size, self.max_position_embeddings = (
            spec.vocab_size,
            spec.max_position_embeddings,
        )
        self.sliding_window, self.eos_token_ids = spec.sliding_window, list(spec.eos_token_ids)
        self.num_heads, self.num_kv_heads = self.arch.local_heads, self.arch.local_kv_heads

    def _build(self, a: DecoderArch) -> None:
        width = a.embed_dim or a.hidden_size
        self.embed = nn.Embedding(a.local_vocab, width)
        self.position = build_block(a.position, a)
        self.project_in = nn.Linear(width, a.hidden_size, bias=False) if a.embed_dim else None
        self.layers = nn.ModuleList(build_block(a.layer, a, i) for i in range(a.num_layers))
        self.norm = build_block(a.norm, a.hidden_size) if a.final_norm else None
        self.project_out = nn.Linear(a.hidden_size, width, bias=False) if a.embed_dim else None
        self.lm_head = nn.Linear(width, a.local_vocab, bias=a.lm_head_bias)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if a.tp_world > 1:
            serial = [
                f"{name} ({type(m).__name__})"
                for name, m in self.named_modules()
                if isinstance(m, Block) and not m.tensor_parallel
            ]
            if serial:
                raise ValueError(
                    f"model '{self.registry_name}' has blocks that cannot be split over "
                    f"{a.tp_world} ranks: {', '.join(serial)}"
                )

    def attention_spec(self) -> AttentionSpec:
        return replace(super().attention_spec(), rotary_dim=self.position.rotary_dim)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self.ops.argmax(logits)

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
        """Load safetensors weights by ``weight_rules``."""
        a = self.arch

        def slicer(heads: int, kv_heads: int):
            q, kv = heads * a.head_dim, kv_heads * a.head_dim
            packed = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}

            def shard_slice(shard: str, rows: int) -> slice:
                halves = {"gate": slice(0, rows // 2), "up": slice(rows // 2, rows)}
                return packed[shard] if shard in packed else halves[shard]

            return shard_slice

        shard_slice = slicer(a.local_heads, a.local_kv_heads)
        split = None
        if a.tp_world > 1:
            split = Split(
                rank=a.tp_rank, world=a.tp_world,
                global_slice=slicer(a.num_heads, a.num_kv_heads),
                parts=self._packed_parts_of,
                vocab_size=a.vocab_size,
            )  # fmt: skip

        rules, ignore = self.checkpoint_rules(), self.ignored_weights
        if a.tie_word_embeddings:  # a tied head may be saved too: it is the embedding
            heads = [r.hf for r in rules if r.param == "lm_head.weight"]
            ignore = (*ignore, *(f"^{re.escape(h)}$" for h in heads))
        load_weights(self, checkpoint, rules, shard_slice, a.num_layers, ignore, split)
        log.info("loaded %s from %s", self.registry_name, checkpoint)

    def _packed_parts_of(self, param: str) -> tuple[str, ...]:
        """The parts of a packed parameter (by its name), in row order; () if not packed."""
        *_, module, leaf = ("", *param.split("."))
        return self.packed_parts.get(leaf, self.packed_parts.get(module, ()))

    def checkpoint_rules(self) -> list[WeightRule]:
        """The weight map of this model's checkpoint (``weight_rules``; a family whose layouts
        name their tensors differently picks by ``self.arch``)."""
        return list(self.weight_rules)

    def _linears(self) -> list[tuple[str, nn.Linear, tuple]]:
        """Each linear layer, its name and its shape key (in, out, bias, rows a step feeds: the
        LM head sees a row a sequence sampled, a decode batch's 8 to 64; the others a step's
        tokens, a decode batch's 32 to a prompt chunk's 512)."""
        out = []
        for name, lin in list(self.named_modules()):
            if isinstance(lin, nn.Linear):
                rows = (8, 64) if name == "lm_head" else (32, 512)
                key = (lin.in_features, lin.out_features, lin.bias is not None, rows)
                out.append((name, lin, key))
        return out

    def _choose_layouts(self, setting: str) -> dict[tuple, str]:
        """The layout ``model.cpu_linear`` gives each linear shape (``auto``: the layout
        measured fastest for its shape, at the rows a step feeds it)."""
        chosen: dict[tuple, str] = {}
        for _, _, key in self._linears():
            if key not in chosen:
                chosen[key] = cpu_ops.choose_layout(setting, *key[:3], self.dtype, key[3])
        return chosen

    def _apply_layouts(self, chosen: dict[tuple, str]) -> None:
        """Run each linear layer in its shape's layout. A tied LM head gets a packed copy or
        none: the embedding keeps its rows contiguous for the lookup."""
        tied = self.lm_head.weight is self.embed.weight
        for name, lin, key in self._linears():
            in_place = key in chosen and cpu_ops.linear_layout(chosen[key]).in_place
            if key not in chosen or (tied and name == "lm_head" and in_place):
                continue  # as loaded; a tied head: F.linear on the embedding's own rows
            parent_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent_name), attr, cpu_ops.with_layout(lin, chosen[key]))

    def forward(
        self,
        batch: RaggedBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionBackend,
        attn_meta: Any,
    ) -> torch.Tensor:
        rope = self.position.tables(batch.positions, self.dtype)
        step = Step(batch, attn, attn_meta, self.ops, rope, self.parallel)
        h = self._embed(batch.input_ids)  # [T, hidden]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.project_in is not None:
            h = self.project_in(h)
        h = self.position.embed(h, batch.positions)
        last = len(self.layers) - 1
        rows = batch.logits_indices
        keep = self.layers[last].keeps_rows and rows.shape[0] < batch.num_tokens
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i == last and keep:  # only the rows that need logits come out of the last layer
                kept = batch.only_rows(rows)
                step = replace(step, keep=Keep(rows, kept, attn.prepare(kept)))
            h = layer(h, step, cache)
        if not keep:
            h = h[rows]
        if self.norm is not None:
            h, _ = self.norm(h, self.ops)
        if self.project_out is not None:
            h = self.project_out(h)
        logits = self.lm_head(h)  # [R, vocab] (this rank's rows of it)
        if self.parallel.world > 1:  # rank 0 samples: the whole vocabulary there
            logits = self.parallel.gather_last(logits)
            if self.parallel.is_first:
                logits = logits[:, : self.arch.vocab_size]
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; over ranks each looks up the ids in its rows, zero for the others,
        and the parts are summed."""
        if self.parallel.world == 1:
            return self.embed(ids)
        n = self.arch.local_vocab
        local = ids - self.parallel.rank * n
        mine = (local >= 0) & (local < n)
        h = self.embed(local.clamp(0, n - 1)) * mine.unsqueeze(-1).to(self.dtype)
        return self.parallel.all_reduce(h)
