"""Layer layouts: ``pre_norm`` (norm, attention, residual; norm, feed-forward, residual: Llama),
``parallel`` (attention and feed-forward of the same normed input, both added to the residual:
Phi-2, Falcon) and ``post_norm`` (attention, residual, norm; feed-forward, residual, norm: OPT
with do_layer_norm_before false). Each makes its blocks from the architecture's specs."""

from __future__ import annotations

from typing import Any

import torch

from modgen.blocks import LayerLayout, Step, build_block, register_block


def kept(x: torch.Tensor, step: Step) -> torch.Tensor:
    """``x``'s rows that the layer's output keeps (all of them unless ``step.keep``)."""
    return x if step.keep is None else x[step.keep.rows]


class _Layer(LayerLayout):
    """A layer's attention and feed-forward blocks, and ``norms`` norms (attn_norm, mlp_norm)."""

    tensor_parallel = True  # its blocks reduce their own partial outputs

    def __init__(self, arch: Any, index: int, norms: int) -> None:
        super().__init__()
        self.attn_norm = build_block(arch.norm, arch.hidden_size)
        self.attn = build_block(arch.attention, arch, index)
        self.mlp_norm = build_block(arch.norm, arch.hidden_size) if norms == 2 else None
        self.mlp = build_block(arch.mlp[index], arch)

    @property
    def keeps_rows(self) -> bool:
        return self.attn.keeps_rows


@register_block("layer", "pre_norm")
class PreNormLayer(_Layer):
    """``h += attn(norm(h)); h += mlp(norm(h))``, each residual add fused into the next norm."""

    def __init__(self, arch: Any, index: int) -> None:
        super().__init__(arch, index, norms=2)

    def forward(self, h, step, kv_cache):
        x, _ = self.attn_norm(h, step.ops)
        y = self.attn(x, step, kv_cache)  # the kept rows only, when step.keep says
        x, h = self.mlp_norm(y, step.ops, residual=kept(h, step))
        return h + self.mlp(x, step)


@register_block("layer", "parallel")
class ParallelLayer(_Layer):
    """``h + (attn(norm(h)) + mlp(norm'(h)))``: one norm shared by both (``norms=1``: Phi-2,
    Falcon-7B) or one each (``norms=2``: Falcon's new_decoder_architecture)."""

    def __init__(self, arch: Any, index: int, *, norms: int = 1) -> None:
        super().__init__(arch, index, norms=norms)

    @classmethod
    def check(cls, *, norms: int = 1) -> None:
        if norms not in (1, 2):
            raise ValueError(f"a parallel layer has 1 or 2 norms, not {norms}")

    def forward(self, h, step, kv_cache):
        x, _ = self.attn_norm(h, step.ops)
        y = self.attn(x, step, kv_cache)
        h = kept(h, step)
        xm = kept(x, step) if self.mlp_norm is None else self.mlp_norm(h, step.ops)[0]
        return (y + self.mlp(xm, step)) + h


@register_block("layer", "post_norm")
class PostNormLayer(_Layer):
    """``h = norm(h + attn(h)); h = norm(h + mlp(h))``."""

    def __init__(self, arch: Any, index: int) -> None:
        super().__init__(arch, index, norms=2)

    def forward(self, h, step, kv_cache):
        h, _ = self.attn_norm(self.attn(h, step, kv_cache), step.ops, residual=kept(h, step))
        h, _ = self.mlp_norm(self.mlp(h, step), step.ops, residual=h)
        return h
