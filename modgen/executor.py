"""Executors turn a StepPlan into logits: the real one runs a torch model over the paged cache."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from modgen.attention import AttentionBackend
from modgen.batch import build_ragged_batch
from modgen.kv import KVAllocator
from modgen.model import CausalLM
from modgen.scheduling import StepPlan


class Executor(ABC):
    """Runs one step."""

    @abstractmethod
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits ``[R, vocab]``, one row per chunk that completes its sequence, in plan order.

        Reads each sequence's ``num_computed`` as the chunk's start: call before advancing it.
        """


class ModelExecutor(Executor):
    """Owns the KV-cache tensors; builds the ragged batch and runs the model with an attention
    backend."""

    def __init__(self, model: CausalLM, attn: AttentionBackend, kv: KVAllocator) -> None:
        attn.check(model.attention_spec())
        self.model, self.attn, self.kv = model, attn, kv
        self.device = model.device
        num_slots = kv.num_blocks * kv.block_size
        shape = (num_slots, model.num_kv_heads, model.head_dim)
        with torch.inference_mode():
            self.kv_caches = [
                (
                    torch.zeros(shape, dtype=model.dtype, device=self.device),
                    torch.zeros(shape, dtype=model.dtype, device=self.device),
                )
                for _ in range(model.num_layers)
            ]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        batch = build_ragged_batch(plan, self.kv, self.device)
        meta = self.attn.prepare(batch)
        return self.model(batch, self.kv_caches, self.attn, meta)
