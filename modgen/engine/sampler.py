"""Turns logits rows into next tokens, each row by its own request's SamplingParams."""

from __future__ import annotations

from collections.abc import Callable

import torch

from modgen.engine.sequence import Sequence


class Sampler:
    """Greedy rows take the arg-max; sampled rows apply temperature, top-k and top-p, then draw
    with the request's own generator (seeded requests), so a seed gives the same tokens whatever
    else is in the batch."""

    def __init__(
        self, seed: int = 0, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """``argmax``: the greedy pick of each row of [R, V] logits (a model's own, e.g. a C++
        kernel); default torch's."""
        self._default = torch.Generator().manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}
        self._argmax = argmax or (lambda logits: logits.argmax(dim=-1))

    def forget(self, seq: Sequence) -> None:
        """Drop a finished request's generator."""
        self._generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self._default
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = self._generators[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)
        return gen

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], banned: list[list[int]]
    ) -> list[int]:
        """One token per row of ``logits`` [R, V]; ``banned[r]`` ids are excluded (min_tokens)."""
        logits = logits.float()
        for r, ids in enumerate(banned):
            if ids:
                logits[r, ids] = float("-inf")
        out = self._argmax(logits)  # [R]
        rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            picked = self._sample_rows(logits[rows], [seqs[r] for r in rows])
            out[rows] = picked
        return out.tolist()

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        # any validated value is safe here: a temperature beyond float32 is its largest (a
        # uniform draw, not inf / inf), a top_k beyond the vocabulary keeps all
        temp = torch.tensor([s.params.temperature for s in seqs], device=device)
        temp = temp.clamp(max=torch.finfo(temp.dtype).max)
        top_k = torch.tensor([min(s.params.top_k, vocab) for s in seqs], device=device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
        sorted_logits, order = (logits / temp[:, None]).sort(dim=-1, descending=True)  # [n, V]
        rank = torch.arange(vocab, device=device)[None, :]
        keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
        probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        keep &= before < top_p[:, None]
        keep[:, 0] = True  # the most likely token stays, however small top_p is
        probs = probs.masked_fill(~keep, 0.0)
        cdf = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=self._generator(s)) for s in seqs]).to(device)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
        return order.gather(1, idx).squeeze(1)
