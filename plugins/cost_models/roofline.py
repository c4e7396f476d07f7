"""``cost_model=roofline`` (and its device presets ``cpu``, ``a100-80gb``, ``h100-sxm``, ``h200``):
each part of a step costs max(FLOPs / peak, bytes / bandwidth), scaled by efficiency factors."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.bench.roofline import machine
from modgen.engine.costs import CostModel, CostModelConfig, StepFeatures
from modgen.model import ModelSpec
from modgen.registry import register


@register("cost_model", "roofline")
class RooflineCost(CostModel):
    """A step is the linear layers (weights read once, 2 FLOPs per parameter per token), the LM
    head for the rows that need logits, attention over prompt chunks (compute-bound) and over
    decodes (KV reads), plus a fixed and a per-sequence overhead. Each part takes
    max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)). With ``tensor_parallel``
    N, FLOPs and bytes are split N ways and each layer adds two ring all-reduces of the step's
    activations over the link."""

    @dataclass(kw_only=True)
    class Config(CostModelConfig):
        """A device's datasheet figures and how much of them a step gets."""

        device: str = "cpu"
        """Name of the device the figures describe (shown in results)."""
        peak_tflops: float | None = None
        """Dense matmul peak in the model's dtype, TFLOP/s; None: this machine's measured rate
        (``python -m modgen.bench.roofline``)."""
        bandwidth_gbps: float | None = None
        """Memory bandwidth, GB/s; None: this machine's measured rate."""
        linear_efficiency: float = 0.75
        """Share of the peak the linear layers reach."""
        attention_efficiency: float = 0.5
        """Share of the peak attention over prompt chunks reaches."""
        memory_efficiency: float = 0.8
        """Share of the bandwidth weight and KV reads reach."""
        step_overhead_us: float = 100.0
        """Fixed time per step (scheduling, launches, sampling), microseconds."""
        seq_overhead_us: float = 5.0
        """Time per sequence in a step, microseconds."""
        link_bandwidth_gbps: float = 300.0
        """Per-direction bandwidth between tensor-parallel ranks, GB/s."""
        link_latency_us: float = 8.0
        """Latency of one all-reduce, microseconds."""

        def __post_init__(self) -> None:
            for name in ("linear_efficiency", "attention_efficiency", "memory_efficiency"):
                if not 0 < getattr(self, name) <= 1:
                    raise ValueError(f"cost_model.{name} must be in (0, 1]")

    config: Config

    def __init__(
        self, config: Config, spec: ModelSpec, tensor_parallel: int = 1, attention: str = "auto"
    ) -> None:
        super().__init__(config, spec, tensor_parallel, attention)
        c = config
        measured = machine() if c.peak_tflops is None or c.bandwidth_gbps is None else {}
        self.flops = (c.peak_tflops or measured["matmul_gflops"] / 1e3) * 1e12  # FLOP/s
        self.bandwidth = (c.bandwidth_gbps or measured["memory_gbps"]) * 1e9  # B/s
        s, n = spec, tensor_parallel
        self.linear_flops_per_token = 2 * s.active_params_per_token() / n
        self.skipped_flops_per_row = 2 * s.skipped_params_per_row() / n  # rows with no logits
        self.last_layer_share = 1 / s.num_layers
        self.layer_weight_bytes = s.layer_weight_bytes() / n
        self.head_flops_per_row = 2 * s.hidden_size * s.vocab_size / n
        self.head_bytes = s.hidden_size * s.vocab_size * s.dtype_bytes / n
        self.attn_flops_per_pair = 4 * s.num_layers * s.num_heads * s.head_dim / n
        self.kv_bytes_per_key = s.kv_bytes_per_token() / n
        self.allreduce_bytes_per_token = s.hidden_size * s.dtype_bytes

    def _part(self, flops: float, bytes_: float, efficiency: float) -> float:
        c = self.config
        return max(
            flops / (self.flops * efficiency), bytes_ / (self.bandwidth * c.memory_efficiency)
        )

    def step_time(self, f: StepFeatures) -> float:
        c = self.config
        lin, attn = c.linear_efficiency, c.attention_efficiency
        kv = self.kv_bytes_per_key
        linear = f.num_tokens * self.linear_flops_per_token
        linear -= (f.num_tokens - f.num_logits) * self.skipped_flops_per_row
        t = self._part(linear, self.layer_weight_bytes, lin)
        t += self._part(f.num_logits * self.head_flops_per_row, self.head_bytes, lin)
        # the last layer attends only the rows that produce a token (a prompt chunk's last row
        # is not counted there: one row of the chunk)
        pairs = f.prefill_pairs * (1 - self.last_layer_share)
        t += self._part(pairs * self.attn_flops_per_pair, f.prefill_context * kv, attn)
        t += self._part(f.decode_pairs * self.attn_flops_per_pair, f.decode_pairs * kv, attn)
        n = self.tensor_parallel
        if n > 1:  # two all-reduces per layer (after attention and after the MLP), ring
            size = f.num_tokens * self.allreduce_bytes_per_token
            one = c.link_latency_us * 1e-6 + 2 * (n - 1) / n * size / (c.link_bandwidth_gbps * 1e9)
            t += 2 * self.spec.num_layers * one
        return t + (c.step_overhead_us + c.seq_overhead_us * f.num_seqs) * 1e-6

    def describe(self) -> str:
        c = self.config
        tp = f", tensor parallel {self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        return (f"roofline: {c.device}, {self.flops / 1e12:.3g} TFLOP/s, "
                f"{self.bandwidth / 1e9:.4g} GB/s{tp}")  # fmt: skip
