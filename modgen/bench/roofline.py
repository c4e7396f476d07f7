"""The roofline of a run: its FLOPs and bytes against this machine's measured matmul rate and
memory bandwidth, so every bench result says how far it is from what the hardware allows.

The machine is measured once and cached (``python -m modgen.bench.roofline --measure`` redoes
it). FLOPs count the linear layers for every token run through the model, attention by context
length (capped by a sliding window), and the LM head only for rows that produce a token. Bytes
count the weights read once per step and the KV cache each token reads.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from modgen import machine as this_machine
from modgen.model import read_hf_config

MEASURE_COMMAND = "python -m modgen.bench.roofline --measure"


@dataclass
class Shape:
    """What the cost model needs of a Llama-family model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    window: int | None
    dtype_bytes: int

    @classmethod
    def from_model_config(cls, node: Any) -> Shape:
        """From a composed ``model`` node (the checkpoint's config.json when it names one)."""
        cfg = dict(node)
        if cfg.get("checkpoint"):
            cfg.update(read_hf_config(cfg["checkpoint"]))
        dtype = {"bfloat16": 2, "float16": 2}.get(str(node.get("dtype")), 4)
        heads = cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"],
            window=cfg.get("sliding_window") if cfg.get("name", "mistral") != "llama" else None,
            dtype_bytes=dtype,
        )

    @property
    def linear_params(self) -> int:
        """Parameters of the per-token linear layers (without the LM head)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = (
            self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        )
        return self.layers * per_layer

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights (read once per step)."""
        return (self.linear_params + 2 * self.vocab * self.hidden) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def attention_pairs(start: int, n: int, window: int | None) -> int:
    """Query-key pairs of ``n`` queries at positions ``start .. start+n-1`` (causal, windowed)."""

    def upto(x: int) -> int:  # pairs of the queries at positions 0 .. x-1
        if window is None or x <= window:
            return x * (x + 1) // 2
        return window * (window + 1) // 2 + (x - window) * window

    return upto(start + n) - upto(start)


def request_cost(shape: Shape, prompt: int, output: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one request run prompt-first then token by token, one step per token."""
    tokens = prompt + max(output - 1, 0)  # the last generated token is never fed back
    pairs = attention_pairs(0, tokens, shape.window)
    flops = 2 * shape.linear_params * tokens + 2 * shape.hidden * shape.vocab * output
    flops += 4 * shape.layers * shape.heads * shape.head_dim * pairs
    ctx = [min(p + 1, shape.window or p + 1) for p in range(prompt, tokens)]
    kv_bytes = (sum(ctx) + tokens) * shape.kv_bytes_per_token  # decode reads + every write
    return float(flops), float(kv_bytes)


def measure_machine(size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Best fp32 matmul rate (torch's GEMM, or oneDNN's on a packed weight where it is faster:
    the engine may run either) and memory read bandwidth over a few repeats, with torch's
    threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    gemms = {"torch.mm": lambda: torch.mm(a, b)}
    mkldnn = torch.ops.mkldnn
    if torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise"):
        packed = mkldnn._reorder_linear_weight(b.t().contiguous(), None)
        gemms["onednn"] = lambda: mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    rates = {}
    for name, fn in gemms.items():
        fn()
        rates[name] = 2 * size**3 / min(_timed(fn) for _ in range(repeats)) / 1e9
    big = torch.randn(64 * 2**20)  # 256 MiB
    big.sum()
    read = min(_timed(big.sum) for _ in range(repeats))
    return {
        "matmul_gflops": max(rates.values()),
        "matmul_gflops_by_gemm": rates,
        "memory_gbps": big.numel() * 4 / read / 1e9,
        "fingerprint": this_machine.fingerprint(),
        "machine": this_machine.machine_line(),
        "measured_with": MEASURE_COMMAND,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine(refresh: bool = False) -> dict[str, Any]:
    """The cached machine figures (measured on first use, and again on another CPU, thread
    count or torch)."""
    cache = this_machine.cache_root() / "machine.json"
    if not refresh and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("fingerprint") == this_machine.fingerprint():
            return data
    data = measure_machine()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data, indent=1))
    return data


def roofline(
    shape: Shape, requests: list[tuple[int, int]], steps: int, wall_time: float
) -> dict[str, Any]:
    """FLOPs, bytes, the machine's bound and the run's efficiency (wall time / bound).

    ``requests`` are (prompt tokens, output tokens); ``steps`` the forward passes run.
    """
    m = machine()
    flops = bytes_ = 0.0
    for prompt, output in requests:
        f, b = request_cost(shape, prompt, output)
        flops += f
        bytes_ += b
    bytes_ += steps * shape.weight_bytes
    compute_s = flops / (m["matmul_gflops"] * 1e9)
    memory_s = bytes_ / (m["memory_gbps"] * 1e9)
    bound = max(compute_s, memory_s)
    return {
        "flops": flops,
        "bytes": bytes_,
        "machine_gflops": m["matmul_gflops"],
        "machine_gbps": m["memory_gbps"],
        "bound_compute_s": compute_s,
        "bound_memory_s": memory_s,
        "bound_s": bound,
        "efficiency": wall_time / bound if bound else float("nan"),
    }


def main() -> None:
    """``python -m modgen.bench.roofline [--measure]``: print (or re-measure) this machine."""
    parser = argparse.ArgumentParser(prog="python -m modgen.bench.roofline")
    parser.add_argument("--measure", action="store_true", help="measure again and cache")
    args = parser.parse_args()
    print(json.dumps(machine(refresh=args.measure), indent=1))


if __name__ == "__main__":
    main()
