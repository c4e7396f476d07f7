"""The roofline of a run: its FLOPs and bytes against this machine's measured matmul rate and
memory bandwidth, so every bench result says how far it is from what the hardware allows.

The machine is measured once and cached (``python -m modgen.bench.roofline --measure`` redoes
it). FLOPs count the linear layers for every token run through the model (the last layer's output
projection, MLP and attention only for rows that produce a token, as the engine runs it),
attention by context length (capped by a sliding window), and the LM head only for rows that
produce a token. Bytes count the weights read once per step and the KV cache each token reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from typing import Any

import torch
from torch import nn

from modgen import machine as this_machine
from modgen.blocks.ops import OpsUnavailable, linear_layouts, with_layout
from modgen.engine.costs import attention_pairs
from modgen.model import ModelSpec

log = logging.getLogger(__name__)

MEASURE_COMMAND = "python -m modgen.bench.roofline --measure"
MEASURE_FORMAT = 2
"""What the measurement covers; a cached one of another format is measured again (2: every
linear layout among the matmuls, 1: torch's and oneDNN's)."""


def request_cost(spec: ModelSpec, prompt: int, output: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one request run prompt-first then token by token, one step per token."""
    tokens = prompt + max(output - 1, 0)  # the last generated token is never fed back
    window = spec.sliding_window
    pairs = attention_pairs(0, tokens, window)

    def keys_seen(p: int) -> int:  # by the row at position p
        return min(p + 1, window or p + 1)

    # rows that produce a token: the prompt's last, then every decode; the others stop in the
    # last layer after its q/k/v projection
    sampled = [keys_seen(p) for p in range(tokens - output, tokens)]
    flops = 2 * (spec.active_params_per_token() * tokens)
    flops -= 2 * spec.skipped_params_per_row() * (tokens - len(sampled))
    flops += 2 * spec.hidden_size * spec.vocab_size * output
    layer_pairs = (spec.num_layers - 1) * pairs + sum(sampled)
    flops += 4 * spec.num_heads * spec.head_dim * layer_pairs
    ctx = [keys_seen(p) for p in range(prompt, tokens)]
    kv_bytes = (sum(ctx) + tokens) * spec.kv_bytes_per_token()  # decode reads + every write
    return float(flops), float(kv_bytes)


@torch.inference_mode()
def measure_machine(size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Best fp32 matmul rate (torch.mm, or any linear layout the engine may run: oneDNN's,
    modgen's own packed GEMM, a plugin's, each where it runs here) and memory read bandwidth
    over a few repeats, with torch's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    gemms = {"torch.mm": lambda: torch.mm(a, b)}
    for name in linear_layouts():
        linear = nn.Linear(size, size, bias=False)
        linear.weight.data = b.t().contiguous()
        try:
            gemms[name] = partial(with_layout(linear, name), a)
        except OpsUnavailable as err:
            log.info("roofline: linear layout %s is not measured here (%s)", name, err)
    rates = {}
    for name, fn in gemms.items():
        fn()
        rates[name] = 2 * size**3 / min(_timed(fn) for _ in range(repeats)) / 1e9
    big = torch.randn(64 * 2**20)  # 256 MiB
    big.sum()
    read = min(_timed(big.sum) for _ in range(repeats))
    return {
        "format": MEASURE_FORMAT,
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
    count or torch; a measurement beside busy processes, as calibration's, is not cached)."""
    cache = this_machine.cache_root() / "machine.json"
    if not refresh and cache.is_file():
        data = json.loads(cache.read_text())
        if (data.get("fingerprint"), data.get("format")) == (
            this_machine.fingerprint(),
            MEASURE_FORMAT,
        ):
            return data
    with this_machine.OtherLoad() as load:
        data = measure_machine()
    if load.busy:
        log.warning(
            "roofline: the machine was measured while other processes kept %.0f%% of the CPUs "
            "busy: used for this run, not cached (the next run measures again)",
            100 * load.fraction,
        )
        return data
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({**data, "format": MEASURE_FORMAT}, indent=1))
    return data


def roofline(
    spec: ModelSpec, requests: list[tuple[int, int]], steps: int, wall_time: float
) -> dict[str, Any]:
    """FLOPs, bytes, the machine's bound and the run's efficiency (wall time / bound).

    ``requests`` are (prompt tokens, output tokens); ``steps`` the forward passes run.
    """
    m = machine()
    flops = bytes_ = 0.0
    for prompt, output in requests:
        f, b = request_cost(spec, prompt, output)
        flops += f
        bytes_ += b
    bytes_ += steps * spec.weight_bytes()
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
