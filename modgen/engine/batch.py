"""The ragged batch one forward pass runs: flat tokens of many sequences over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modgen.engine.kv import KVAllocator
from modgen.engine.scheduling import StepPlan


@dataclass
class RaggedBatch:
    """Flat token ids of every chunk in a step plus what attention needs to find each one's KV.

    T = tokens in the step, B = sequences (chunks), R = rows that need logits.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    seq_index: torch.Tensor  # [T] int64, which chunk each token belongs to
    query_start: torch.Tensor  # [B + 1] int64, offsets of each chunk's tokens in the flat batch
    query_lens: torch.Tensor  # [B] int64
    context_lens: torch.Tensor  # [B] int64, KV length of each sequence once the step has run
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, KV slot each new token is written to
    logits_indices: torch.Tensor  # [R] int64, flat rows whose logits are sampled
    block_size: int
    max_query_len: int
    max_context_len: int

    @property
    def num_tokens(self) -> int:
        """T."""
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        """B."""
        return self.query_lens.shape[0]

    def only_rows(self, rows: torch.Tensor) -> RaggedBatch:
        """The batch of the queries at flat rows ``rows`` alone, each a one-token query over
        its sequence's keys up to its own position (whose K/V this batch writes): for a layer
        whose other rows' outputs no one reads (the last layer's rows that need no logits)."""
        seqs = self.seq_index[rows]
        positions = self.positions[rows]
        context_lens = positions + 1
        n = rows.shape[0]
        return RaggedBatch(
            input_ids=self.input_ids[rows],
            positions=positions,
            seq_index=torch.arange(n, device=rows.device),
            query_start=torch.arange(n + 1, device=rows.device),
            query_lens=torch.ones_like(rows),
            context_lens=context_lens,
            block_tables=self.block_tables[seqs],
            slot_mapping=self.slot_mapping[rows],
            logits_indices=torch.arange(n, device=rows.device),
            block_size=self.block_size,
            max_query_len=1,
            max_context_len=int(context_lens.max()) if n else 0,
        )


def step_inputs(plan: StepPlan, kv: KVAllocator) -> dict[str, Any]:
    """What a step's ragged batch is made of (token ids, chunk starts and lengths, padded block
    tables, which chunks complete, the block size), as CPU tensors: one pass over the chunks.
    Small: it is what tensor-parallel ranks are sent each step."""
    token_ids: list[int] = []
    starts: list[int] = []
    lens: list[int] = []
    tables: list[list[int]] = []
    for chunk in plan.chunks:
        seq = chunk.seq
        start = seq.num_computed
        token_ids.extend(seq.token_ids[start : start + chunk.num_tokens])
        starts.append(start)
        lens.append(chunk.num_tokens)
        tables.append(kv.block_table(seq.seq_id))
    max_blocks = max(len(t) for t in tables)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]

    def as_tensor(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64)

    return {
        "input_ids": as_tensor(token_ids),
        "starts": as_tensor(starts),
        "lens": as_tensor(lens),
        "block_tables": as_tensor(padded),
        "completes": as_tensor([c.completes for c in plan.chunks]).bool(),
        "block_size": kv.block_size,
    }


def build_ragged_batch(plan: StepPlan, kv: KVAllocator, device: torch.device) -> RaggedBatch:
    """Flatten ``plan`` into tensors on ``device``; the rest is tensor arithmetic."""
    return batch_of(step_inputs(plan, kv), device)


def batch_of(inputs: dict[str, Any], device: torch.device) -> RaggedBatch:
    """The RaggedBatch of ``step_inputs``, on ``device``."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return ragged_batch(**moved)


def ragged_batch(
    input_ids: torch.Tensor,  # [T]
    starts: torch.Tensor,  # [B] position of each chunk's first token
    lens: torch.Tensor,  # [B] tokens of each chunk
    block_tables: torch.Tensor,  # [B, max_blocks]
    completes: torch.Tensor,  # [B] bool: the chunk's last row needs logits
    block_size: int,
) -> RaggedBatch:
    """The RaggedBatch of chunks given by their starts, lengths and block tables."""
    device = lens.device
    query_start = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=query_start[1:])
    seq_index = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)  # [T]
    offsets = torch.arange(len(seq_index), device=device) - query_start[seq_index]
    positions = starts[seq_index] + offsets  # [T]
    bs = block_size
    slot_mapping = block_tables[seq_index, positions // bs] * bs + positions % bs
    context_lens = starts + lens
    return RaggedBatch(
        input_ids=input_ids,
        positions=positions,
        seq_index=seq_index,
        query_start=query_start,
        query_lens=lens,
        context_lens=context_lens,
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        logits_indices=(query_start[1:] - 1)[completes],
        block_size=bs,
        max_query_len=int(lens.max()),
        max_context_len=int(context_lens.max()),
    )
