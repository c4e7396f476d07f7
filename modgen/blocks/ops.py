"""How a model runs its linear layers and element-wise ops on the CPU, chosen by measurement.

- Linear layers: ``blas`` (torch's ``F.linear`` on the weight as loaded, [out, in]), ``blas_t``
  (the same values stored input-major, the transpose of a contiguous [in, out] matrix) or
  ``onednn`` (the weight reordered once into oneDNN's blocked layout, run by oneDNN's GEMM).
  Which is fastest depends on the CPU (MKL's GEMM on an AMD EPYC ran at 0.3-0.8x oneDNN's here)
  and the shape, so ``model.cpu_linear=auto`` measures each layer shape. Plugins offer more
  (``register_linear``; modgen's C++ kernels offer ``cpp``).
- RMSNorm with its residual add, SwiGLU and the greedy arg-max: torch's ops or a faster
  implementation a plugin registers (``register_ops``; modgen's C++ kernels are one,
  ``modgen.plugins.models.blocks.cpu_ops``); ``model.cpu_kernels``: None measures them.
- A block's output step fused into the linear layer before it (``Block.fusable``: SwiGLU's
  silu(gate) * up into the gate/up projection), where the layer's layout offers it
  (``PackedLinear.fused``): ``choose_fused``, measured against the GEMM and the step apart.

Every choice goes through ``modgen.calibration`` (plain torch unless another is faster by 3%),
so the figures that decided it are logged and cached per machine and shape.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modgen import calibration

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as Hugging Face Llama does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class TorchOps:
    """The element-wise ops in plain torch (the reference; any device and dtype)."""

    name = "torch"

    @property
    def choice(self) -> tuple[str, str]:
        """(fused norm and SwiGLU's implementation, the arg-max's): see ``named_ops``."""
        return self.name, self.name

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(h), h)`` with ``h = x + residual`` (or ``x``)."""
        h = x if residual is None else x + residual
        return rms_norm(h, weight, eps), h

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a packed ``[rows, 2 * inter]`` projection."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The index of each row's largest value."""
        return logits.argmax(dim=-1)


class OpsUnavailable(RuntimeError):
    """A faster implementation of the ops cannot run on this machine (no compiler, say)."""


_FAST: dict[str, tuple[type[TorchOps], Callable[[], str]]] = {}
"""Faster implementations offered to ``choose_ops``, by name: (class, version of its code)."""


def register_ops(version: Callable[[], str]) -> Callable[[type[TorchOps]], type[TorchOps]]:
    """Class decorator: offer a faster implementation of the element-wise ops (for float32 on
    the CPU) to ``choose_ops`` under its ``name``. Its constructor raises OpsUnavailable when it
    cannot run here; ``version()`` (say, its source's hash) keys its cached measurements."""

    def add(cls: type[TorchOps]) -> type[TorchOps]:
        _FAST[cls.name] = (cls, version)
        return cls

    return add


class MixedOps(TorchOps):
    """Fused norm and SwiGLU from one implementation, the arg-max from another."""

    def __init__(self, fused: TorchOps, argmax: TorchOps) -> None:
        self.fused, self._argmax = fused, argmax
        self.name = f"{fused.name}+argmax:{argmax.name}"

    @property
    def choice(self) -> tuple[str, str]:
        return self.fused.name, self._argmax.name

    def rms_norm(self, x, weight, eps, residual=None):
        return self.fused.rms_norm(x, weight, eps, residual)

    def silu_mul(self, gate_up):
        return self.fused.silu_mul(gate_up)

    def argmax(self, logits):
        return self._argmax.argmax(logits)


def choose_ops(
    setting: bool | None, device: torch.device, dtype: torch.dtype, hidden: int, inter: int,
    vocab: int,
) -> TorchOps:  # fmt: skip
    """The element-wise ops for a model: torch's off the CPU, outside float32, with ``setting``
    False or when no faster implementation (``register_ops``) can run here; the first that can
    with ``setting`` True; with ``setting`` None, each measured against torch's (the fused norm
    + SwiGLU, and the arg-max, separately) and the fastest kept."""
    if setting is False or device.type != "cpu" or dtype != torch.float32:
        return TorchOps()
    built: dict[str, TorchOps] = {}
    for name, (cls, _) in _FAST.items():
        try:
            built[name] = cls()
        except OpsUnavailable as err:
            log.info("model.cpu_kernels: %s cannot run here: %s", name, err)
    if not built:
        return TorchOps()
    if setting is True:
        return next(iter(built.values()))
    built["torch"] = TorchOps()
    version = "+".join(_FAST[name][1]() for name in built if name != "torch")
    gen = torch.Generator().manual_seed(0)
    x, res = (torch.randn(512, hidden, generator=gen) for _ in "xr")
    w, gate_up = torch.ones(hidden), torch.randn(512, 2 * inter, generator=gen)
    logits = torch.randn(32, vocab, generator=gen)

    def fused(ops: TorchOps) -> Callable[[], Any]:
        return lambda: (ops.rms_norm(x, w, 1e-5, res), ops.silu_mul(gate_up))

    def argmax(ops: TorchOps) -> Callable[[], Any]:
        return lambda: ops.argmax(logits)

    shape = {"hidden": hidden, "intermediate": inter}
    runs = {name: fused(ops) for name, ops in built.items()}
    f = calibration.choose("rmsnorm+swiglu", shape, runs, "torch", version).name
    runs = {name: argmax(ops) for name, ops in built.items()}
    a = calibration.choose("argmax", {"vocab": vocab}, runs, "torch", version).name
    return named_ops((f, a), built)


def named_ops(choice: tuple[str, str], built: dict[str, TorchOps] | None = None) -> TorchOps:
    """The ops ``choice`` names (``ops.choice`` of another's: the fused norm and SwiGLU's
    implementation, then the arg-max's; ``torch`` or a registered name), reusing ``built``."""
    pick = {"torch": TorchOps(), **(built or {})}
    for name in choice:
        if name not in pick:
            pick[name] = _FAST[name][0]()
    f, a = choice
    return pick[f] if f == a else MixedOps(pick[f], pick[a])


class PackedLinear(nn.Module):
    """A linear layer whose weight was packed once for some GEMM (``self.packed``, a plain
    attribute: no state_dict, no .to()): subclasses pack in ``__init__`` and multiply 2-D
    inputs in ``matmul``; any leading dims are flattened around it."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] (contiguous) @ W^T + bias -> [rows, out]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], -1)
        return self.matmul(x.contiguous())

    def fused(self, step: str) -> nn.Module | None:
        """A module computing this layer's output followed by ``step`` (one of
        ``OUTPUT_STEPS``) as its GEMM writes the output, or None where this layout has no such
        form (the default)."""
        return None


OUTPUT_STEPS: dict[str, Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]] = {
    "silu_mul": lambda ops: ops.silu_mul,
}
"""Steps a block may ask to have fused into the linear layer before them (``Block.fusable``),
each as the ops object runs it on its own: ``silu_mul`` is SwiGLU's silu(gate) * up of a
[gate; up] projection."""


class OneDNNLinear(PackedLinear):
    """A linear layer whose weight oneDNN reordered once into its blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight = linear.weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # opaque to torch

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed linear ops for the CPU."""
    mkldnn = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
    )


@dataclass(frozen=True)
class LinearLayout:
    """A way to run a linear layer: ``factory(linear)`` gives the module (same values),
    ``version()`` names its code (keys cached measurements; empty for torch's own), and
    ``in_place`` says the factory restrides ``linear``'s own weight instead of making a copy."""

    factory: Callable[[nn.Linear], nn.Module]
    version: Callable[[], str]
    in_place: bool = False


_LINEARS: dict[str, LinearLayout] = {}
"""Every linear layout by name: the built-in ones below, then those plugins register."""


def register_linear(
    name: str, version: Callable[[], str], in_place: bool = False
) -> Callable[[Callable[[nn.Linear], nn.Module]], Callable[[nn.Linear], nn.Module]]:
    """Decorator: offer ``factory(linear) -> module`` (the same values, run another way) as the
    linear layout ``name``, for ``model.cpu_linear=name`` and for ``auto``'s measurement. The
    factory raises OpsUnavailable when it cannot run here (no compiler, another dtype);
    ``version()`` keys its cached measurements; ``in_place``: it restrides ``linear``'s own
    weight (a tied LM head then stays as it is). A name already taken raises ValueError."""

    def add(factory: Callable[[nn.Linear], nn.Module]) -> Callable[[nn.Linear], nn.Module]:
        if _LINEARS.get(name, LinearLayout(factory, version)).factory is not factory:
            raise ValueError(f"linear layout {name!r} is already registered")
        _LINEARS[name] = LinearLayout(factory, version, in_place)
        return factory

    return add


def _torchs_own() -> str:
    """No version of its own: torch's code, and the calibration cache is per torch already."""
    return ""


@register_linear("blas", version=_torchs_own, in_place=True)
def _blas(linear: nn.Linear) -> nn.Module:
    """torch's F.linear on the [out, in] weight as loaded."""
    linear.weight.data = linear.weight.data.contiguous()
    return linear


@register_linear("blas_t", version=_torchs_own, in_place=True)
def _blas_t(linear: nn.Linear) -> nn.Module:
    """torch's F.linear on the same values stored input-major."""
    linear.weight.data = linear.weight.data.t().contiguous().t()
    return linear


@register_linear("onednn", version=_torchs_own)
def _onednn(linear: nn.Linear) -> nn.Module:
    """oneDNN's GEMM on a weight it reordered once."""
    if not onednn_available():
        raise OpsUnavailable("this torch has no oneDNN linear ops")
    return OneDNNLinear(linear)


def linear_layouts() -> tuple[str, ...]:
    """Every linear layout: the built-in ones, then those plugins registered."""
    from modgen.registry import load_plugins

    load_plugins()
    return tuple(_LINEARS)


def linear_layout(name: str) -> LinearLayout:
    """The layout ``name`` (ValueError naming the layouts there are if there is none)."""
    if name not in linear_layouts():
        raise ValueError(f"unknown linear layout {name!r}; layouts: {list(linear_layouts())}")
    return _LINEARS[name]


@torch.no_grad()
def with_layout(linear: nn.Linear, layout: str) -> nn.Module:
    """``linear`` (values unchanged) run the way ``layout`` names."""
    return linear_layout(layout).factory(linear)


def choose_layout(
    setting: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
    rows: tuple[int, ...],
) -> str:  # fmt: skip
    """The layout for a CPU linear layer of this shape: ``setting`` unless it is ``auto``, else
    the fastest of the available layouts over calls of ``rows`` rows each, each row count
    weighted alike (as many calls of the fewer rows as make up the most: decode steps' small
    products count as much as prompt chunks' large ones).

    Each call takes the next of enough copies of the weight (about 64 MB of them, at most 64)
    that none is still in cache from its last call, as in a model, where the other layers'
    weights run between two calls of one: the layouts' order changed with that at decode steps'
    row counts."""
    if setting != "auto":
        if (why := _cannot_run(setting, bias, dtype)) is not None:
            raise ValueError(f"model.cpu_linear={setting} cannot run here: {why}")
        return setting
    base, copies, xs = _timing_setup(in_features, out_features, bias, dtype, rows)
    runs = {}
    for layout in linear_layouts():
        if (why := _cannot_run(layout, bias, dtype)) is not None:
            log.info("model.cpu_linear: %s cannot run here: %s", layout, why)
            continue
        # the copies are made at the first run: only if the cache has no answer
        runs[layout] = _rotating(functools.partial(_layout_copies, base, layout, copies), xs)
    shape = {"in": in_features, "out": out_features, "bias": bias,
             "dtype": str(dtype).removeprefix("torch."), "rows": list(rows)}  # fmt: skip
    # the protocol (cold copies, rows weighted alike) and the plugins' code key the cache
    version = "+".join(["v3", *(f"{name}:{v}" for name in runs if (v := _LINEARS[name].version()))])
    with torch.inference_mode():
        return calibration.choose("linear", shape, runs, "blas", version).name


def choose_fused(
    setting: bool | None, layout: str, in_features: int, out_features: int, bias: bool,
    dtype: torch.dtype, step: str, ops: Any, rows: tuple[int, ...] = (32, 512),
) -> bool:  # fmt: skip
    """Whether a linear layer run in ``layout`` takes ``step`` into its GEMM (``fused``): never
    with ``setting`` False or where the layout has no fused form, always where it has one with
    True; with None, measured against the layout's GEMM followed by ``ops``' own ``step``, on
    cold copies of the weight with rows weighted alike, as ``choose_layout`` measures."""
    separate = OUTPUT_STEPS[step](ops)
    probe = with_layout(nn.Linear(8, 16, bias=bias).to(dtype), layout)
    if setting is False or not isinstance(probe, PackedLinear) or probe.fused(step) is None:
        return False
    if setting is True:
        return True
    base, copies, xs = _timing_setup(in_features, out_features, bias, dtype, rows)
    make = functools.partial(_layout_copies, base, layout, copies)
    runs = {
        "separate": _rotating(lambda: [_then(m, separate) for m in make()], xs),
        "fused": _rotating(lambda: [m.fused(step) for m in make()], xs),
    }
    shape = {"in": in_features, "out": out_features, "bias": bias, "layout": layout,
             "step": step, "ops": type(ops).__name__, "rows": list(rows)}  # fmt: skip
    version = _LINEARS[layout].version()
    with torch.inference_mode():
        return calibration.choose("fused linear", shape, runs, "separate", version).name == "fused"


def _timing_setup(
    in_features: int, out_features: int, bias: bool, dtype: torch.dtype, rows: tuple[int, ...]
) -> tuple[nn.Linear, int, list[torch.Tensor]]:
    """A layer of the shape, how many copies of its weight make about 64 MB (at most 64), and
    the inputs of one timed run: as many calls of the fewer rows as make up the most."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    copies = max(1, min(64, -(-(64 << 20) // max(1, base.weight.nbytes))))
    xs = [torch.randn(m, in_features, generator=gen).to(dtype) for m in rows]
    return base, copies, [x for x in xs for _ in range(-(-max(rows) // x.shape[0]))]


def _then(first: Callable[[torch.Tensor], Any], step: Callable[[Any], Any]) -> Callable:
    return lambda x: step(first(x))


def _cannot_run(layout: str, bias: bool, dtype: torch.dtype) -> str | None:
    """Why ``layout`` cannot run a layer of this dtype here (a small layer tells), or None."""
    try:
        with_layout(nn.Linear(8, 8, bias=bias).to(dtype), layout)
    except RuntimeError as err:  # OpsUnavailable, or oneDNN without an fp16 path here
        return str(err)
    return None


def _layout_copies(base: nn.Linear, layout: str, n: int) -> list[nn.Module]:
    return [with_layout(_copy(base), layout) for _ in range(n)]


def _rotating(
    make: Callable[[], list[Callable]], xs: list[torch.Tensor]
) -> Callable[[], list[Any]]:
    """A run of one call per input, each on the next module (or callable) in turn (round and
    round) of those ``make()`` gives at the first run."""
    turn: Iterator[Callable] | None = None

    def run() -> list[Any]:
        nonlocal turn
        if turn is None:
            turn = itertools.cycle(make())
        return [next(turn)(x) for x in xs]

    return run


def _copy(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` in memory of its own (no initialisation of weights it overwrites)."""
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", dtype=linear.weight.dtype)  # fmt: skip
    state = {name: t.detach().clone() for name, t in linear.state_dict().items()}
    new.load_state_dict(state, assign=True)
    return new
