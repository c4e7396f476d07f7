"""The CPU linear layouts (modgen.blocks.ops.with_layout, the plugins' registered ones): each
against F.linear, modgen's packed GEMM in every instruction set this CPU runs, the calibration
that chooses among them, and forcing one (a tied LM head too)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from checkpoints import TINY

from modgen import LLM
from modgen.blocks import ops
from modgen.kernels import cpu


@pytest.mark.parametrize("layout", ["blas", "blas_t", "onednn", "cpp"])
@pytest.mark.parametrize("bias", [False, True])
def test_each_linear_layout_computes_what_f_linear_does(layout, bias):
    gen = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(48, 80, bias=bias)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 5, 48, generator=gen)
    want = torch.nn.functional.linear(x, lin.weight.clone(), None if lin.bias is None else lin.bias)
    module = ops.with_layout(lin, layout)
    torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-4)
    if layout == "blas_t":
        assert module.weight.stride() == (1, 80)  # [out, in] values, stored input-major


@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(1, 5, 13), (9, 37, 100), (64, 512, 768), (17, 64, 96), (0, 5, 13), (3, 0, 7)],
)
def test_packed_linear_kernel_matches_f_linear_at_any_shape(rows, k, n):
    """Row counts around the register block, widths that are not whole panels, any depth, no
    rows, no depth."""
    gen = torch.Generator().manual_seed(rows + k + n)
    w, b, x = (torch.randn(*s, generator=gen) for s in ((n, k), (n,), (rows, k)))
    packed = cpu.pack_linear(w)
    width = packed.shape[2]  # the panel: two vectors of the widest instruction set here
    assert packed.shape == (-(-n // width), k, width) and width in (8, 16, 32)
    for bias in (None, b):
        want = torch.nn.functional.linear(x, w, bias)
        torch.testing.assert_close(cpu.linear(x, packed, n, bias), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="columns; the packed weight"):
        cpu.linear(torch.randn(rows, k + 1), packed, n, None)


def test_packed_linear_kernel_splits_rows_when_panels_are_few():
    """With fewer panels than two a thread, threads share a panel's rows: every output row and
    column still comes out once, bias and all (6 threads, whatever the machine has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        gen = torch.Generator().manual_seed(5)
        for rows, k, n in [(64, 40, 70), (13, 8, 5), (7, 16, 33), (100, 3, 1)]:
            w, b, x = (torch.randn(*s, generator=gen) for s in ((n, k), (n,), (rows, k)))
            got = cpu.linear(x, cpu.pack_linear(w), n, b)
            torch.testing.assert_close(
                got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4
            )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", cpu.machine_isas())
def test_packed_linear_kernel_in_each_instruction_set(isa):
    """Each build's GEMM (AVX-512: panels of 32 columns, rows 8 at a time; AVX2: 16 and 6; SSE
    or NEON: 8 and 6) against F.linear, through the build's C entry points."""
    lib = cpu.load(64, isa)
    width = lib.modgen_linear_panel_width()
    assert width == 2 * {"avx512": 16, "avx2": 8}.get(isa, 4)
    gen = torch.Generator().manual_seed(3)
    for rows, k, n in [(1, 7, 5), (13, 40, 70), (64, 96, 3 * width)]:
        w, b, x = (torch.randn(*s, generator=gen) for s in ((n, k), (n,), (rows, k)))
        packed = torch.empty(-(-n // width), k, width)
        lib.modgen_pack_linear_f32(*_ptrs(w), ctypes.c_int64(n), ctypes.c_int64(k), *_ptrs(packed))
        for bias in (None, b):
            y = torch.empty(rows, n)
            args = (ctypes.c_int64(rows), ctypes.c_int64(k), *_ptrs(packed), ctypes.c_int64(n))
            lib.modgen_linear_f32(*_ptrs(x), *args, *_ptrs(bias), *_ptrs(y))
            want = torch.nn.functional.linear(x, w, bias)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


def _silu_gated(x, w, bias):
    gate_up = torch.nn.functional.linear(x, w, bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize(
    ("rows", "k", "inter"), [(1, 7, 5), (13, 40, 70), (64, 512, 96), (9, 33, 16), (0, 5, 8)]
)
def test_gated_linear_kernel_is_silu_of_gate_times_up(rows, k, inter):
    """SwiGLU's projection with silu(gate) * up in the GEMM's epilogue, against F.linear then
    the activation; widths that are not whole half-panels, no rows; with a whole number of
    vectors it is the unfused C++ GEMM then silu_mul bit for bit."""
    gen = torch.Generator().manual_seed(rows + k + inter)
    w = torch.randn(2 * inter, k, generator=gen) / k**0.5
    b, x = torch.randn(2 * inter, generator=gen), torch.randn(rows, k, generator=gen)
    for bias in (None, b):
        packed, packed_bias = cpu.pack_linear_gated(w, bias)
        width = packed.shape[2]
        assert packed.shape == (-(-inter // (width // 2)), k, width)
        assert packed_bias.numel() == (0 if bias is None else packed.shape[0] * width)
        got = cpu.linear_silu_mul(x, packed, inter, packed_bias)
        torch.testing.assert_close(got, _silu_gated(x, w, bias), rtol=1e-5, atol=1e-5)
    if inter % (width // 2) == 0:
        apart = cpu.silu_mul(cpu.linear(x, cpu.pack_linear(w), 2 * inter, None))
        assert torch.equal(cpu.linear_silu_mul(x, packed, inter, torch.empty(0)), apart)
    with pytest.raises(ValueError, match="columns; the gated weight"):
        cpu.linear_silu_mul(torch.randn(rows, k + 1), packed, inter, packed_bias)
    with pytest.raises(ValueError, match="a gated weight stacks gate and up rows"):
        cpu.pack_linear_gated(torch.randn(3, k))


@pytest.mark.parametrize("isa", cpu.machine_isas())
def test_gated_linear_kernel_in_each_instruction_set(isa):
    """Each build's gated GEMM (half-panels of 16, 8 or 4 columns) through its C entry points."""
    lib = cpu.load(64, isa)
    width = lib.modgen_linear_panel_width()
    gen = torch.Generator().manual_seed(4)
    for rows, k, inter in [(1, 7, 5), (13, 40, 70), (20, 96, 3 * width)]:
        w = torch.randn(2 * inter, k, generator=gen) / k**0.5
        b, x = torch.randn(2 * inter, generator=gen), torch.randn(rows, k, generator=gen)
        panels = -(-inter // (width // 2))
        packed, packed_bias = torch.empty(panels, k, width), torch.empty(panels, width)
        ints = ctypes.c_int64(inter), ctypes.c_int64(k)
        lib.modgen_pack_linear_gated_f32(*_ptrs(w), *ints, *_ptrs(packed))
        lib.modgen_pack_linear_gated_f32(*_ptrs(b), ctypes.c_int64(inter), ctypes.c_int64(1),
                                         *_ptrs(packed_bias))  # fmt: skip
        for bias, pb in ((None, None), (b, packed_bias)):
            y = torch.empty(rows, inter)
            args = (ctypes.c_int64(rows), ctypes.c_int64(k), *_ptrs(packed), ctypes.c_int64(inter))
            lib.modgen_linear_silu_mul_f32(*_ptrs(x), *args, *_ptrs(pb), *_ptrs(y))
            torch.testing.assert_close(y, _silu_gated(x, w, bias), rtol=1e-5, atol=1e-5)


def test_gated_linear_kernel_takes_a_very_negative_gate_to_zero():
    """Gates below -88 (e^-g past float's range) give about 0, as torch does, not garbage."""
    gate = torch.tensor([-200.0, -120.0, -93.9, -88.5, -60.0, -1.0, 0.0, 2.0, 90.0] * 2)
    gate_up = torch.cat([gate, torch.full_like(gate, 3.0)]).unsqueeze(0)
    # x = 1 and a one-column weight holding the gate and up values: the GEMM's output is them
    packed, no_bias = cpu.pack_linear_gated(gate_up.t().contiguous())
    got = cpu.linear_silu_mul(torch.ones(1, 1), packed, gate.numel(), no_bias)[0]
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * 3.0, rtol=1e-5, atol=1e-30)


def _ptrs(*tensors):
    return [ctypes.c_void_p(None if t is None else t.data_ptr()) for t in tensors]


def test_linear_calibration_times_cold_copies_and_makes_none_once_cached(monkeypatch, tmp_path):
    """The first choice times each layout over many copies of the weight (out of cache, as in
    a model); a cached choice copies none."""
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    made = []
    real = ops._layout_copies
    monkeypatch.setattr(ops, "_layout_copies", lambda *a: made.append(a[1:]) or real(*a))
    first = ops.choose_layout("auto", 64, 96, False, torch.float32, (2, 8))
    assert first in ops.linear_layouts()
    copies = {layout: n for layout, n in made}
    assert set(copies) >= {"blas", "cpp"} and all(n == 64 for n in copies.values())
    made.clear()
    assert ops.choose_layout("auto", 64, 96, False, torch.float32, (2, 8)) == first
    assert made == []


def test_a_linear_layout_name_is_registered_once():
    assert {"blas", "cpp"} <= set(ops.linear_layouts())  # built in; the C++ plugin's
    with pytest.raises(ValueError, match="linear layout 'blas' is already registered"):
        ops.register_linear("blas", version=lambda: "1")(lambda linear: linear)
    with pytest.raises(ValueError, match="linear layout 'cpp' is already registered"):
        ops.register_linear("cpp", version=lambda: "1")(lambda linear: linear)


def test_forced_linear_layouts_and_a_tied_head(checkpoints):
    model = LLM(
        "llama", checkpoint=str(checkpoints["llama"]), overrides=["model.cpu_linear=blas_t"]
    ).engine.executor.model
    qkv = model.layers[0].attn.qkv.weight
    assert qkv.stride() == (1, qkv.shape[0]) and qkv.t().is_contiguous()
    tiny = ["model.tie_word_embeddings=true", *TINY]
    tied = LLM("llama", overrides=[*tiny, "model.cpu_linear=blas_t"]).engine.executor.model
    assert tied.lm_head.weight is tied.embed.weight and tied.embed.weight.is_contiguous()
    packed = LLM("llama", overrides=[*tiny, "model.cpu_linear=onednn"]).engine.executor.model
    assert type(packed.lm_head).__name__ == "OneDNNLinear" and packed.embed.weight.is_contiguous()
    with pytest.raises(ValueError, match=r"model.cpu_linear=cpp cannot run here: float32 on"):
        LLM("llama", overrides=[*tiny, "model.dtype=bfloat16", "model.cpu_linear=cpp"])
    with pytest.raises(ValueError, match=r"model.cpu_linear must be auto or one of"):
        LLM("llama", overrides=[*tiny, "model.cpu_linear=mkl"])
