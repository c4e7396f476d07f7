"""``attention=cpu`` (the C++ kernel) and ``attention=auto``: the kernel computes what the torch
reference does (RoPE, KV write, causal and windowed attention over the paged cache), says why it
cannot run, and the default picks it where it can and falls back where it cannot."""

from __future__ import annotations

import logging

import pytest
import torch
from batches import random_step
from checkpoints import TINY
from test_e2e_hf import GREEDY, SCHEDULES, capture_first_logits

from modgen import LLM, calibration, registry
from modgen.attention import AttentionSpec
from modgen.blocks import ops
from modgen.blocks.ops import rms_norm
from modgen.kernels import cpu
from modgen.plugins.attention.torch_ref import TorchAttention
from modgen.plugins.models.blocks.cpu_ops import CppOps
from modgen.plugins.models.blocks.position import rotate

# decodes (one over three key tiles), short chunks (one of two tokens over two key tiles), a
# chunk of several query and key tiles
Q_LENS = [1, 7, 1, 12, 3, 1, 70, 1, 2]
CTX_LENS = [9, 7, 20, 40, 13, 1, 100, 150, 90]


def qkv_rope(num_tokens: int, hq: int, hkv: int, d: int, seed: int = 0):
    """q, k, v as strided views of one packed projection (as the model makes them), and rotary
    tables [T, 1, D]."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    angle = torch.randn(num_tokens, 1, d // 2, generator=gen).repeat(1, 1, 2)
    return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d), (angle.cos(), angle.sin())


# enough sequences that decode tiles take every KV head (2 a thread) on any runner
_REPEAT = -(-2 * torch.get_num_threads() // len(Q_LENS))
LENS = {  # many sequences: decode tiles take every KV head; few: a tile per KV head
    "many": (Q_LENS * _REPEAT, CTX_LENS * _REPEAT),
    "few": ([1, 2], [150, 30]),
}


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize(
    ("hq", "hkv", "d"),
    [
        (4, 2, 16),
        (8, 2, 64),
        (8, 2, 32),
        (4, 1, 64),
        (16, 4, 64),
        (8, 2, 128),
        (6, 6, 40),
        (16, 1, 32),
        (3, 3, 24),
    ],
)
@pytest.mark.parametrize("window", [None, 8, 100])  # 100: a window over more than one key tile
@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("isa", cpu.machine_isas())
def test_kernel_matches_the_torch_reference(block_size, hq, hkv, d, window, lens, isa):
    batch, num_slots = random_step(*LENS[lens], block_size, seed=1)
    q, k, v, rope = qkv_rope(batch.num_tokens, hq, hkv, d)
    gen = torch.Generator().manual_seed(2)
    cache = [torch.randn(num_slots, hkv, d, generator=gen) for _ in range(2)]
    ref_cache = [c.clone() for c in cache]
    ref = TorchAttention(TorchAttention.Config())
    want = ref.forward(
        rotate(q, *rope), rotate(k, *rope), v, ref_cache, batch, ref.prepare(batch), 0.3, window
    )
    attn = registry.build("attention", {"name": "cpu", "isa": isa})
    got = attn.forward(q, k, v, cache, batch, attn.prepare(batch), 0.3, window, rope=rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(cache, ref_cache, strict=True):  # the same K/V written, same slots
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [24, 80, 96, 128, 256])
@pytest.mark.parametrize("isa", cpu.machine_isas()[:2])
def test_kernel_serves_any_head_dim(d, isa):
    """Head dims of the model families (Phi-2's 80, Gemma's 256...), whole vectors or not."""
    batch, num_slots = random_step(*LENS["many"], 16, seed=7)
    q, k, v, rope = qkv_rope(batch.num_tokens, 8, 2, d, seed=d)
    cache = [torch.randn(num_slots, 2, d) for _ in range(2)]
    ref = TorchAttention(TorchAttention.Config())
    want = ref.forward(rotate(q, *rope), rotate(k, *rope), v, [c.clone() for c in cache], batch,
                       ref.prepare(batch), d**-0.5, 8)  # fmt: skip
    attn = registry.build("attention", {"name": "cpu", "isa": isa})
    got = attn.forward(q, k, v, cache, batch, None, d**-0.5, 8, rope=rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("d", "rot"), [(80, 32), (20, 8), (64, 48)])
def test_kernel_rotates_the_first_rotary_dims(d, rot):
    """Partial rotary (Phi-2: 32 of 80 dims): the first ``rot`` dims rotate, the rest pass."""
    batch, num_slots = random_step(*LENS["many"], 5, seed=11)
    q, k, v, _ = qkv_rope(batch.num_tokens, 8, 2, d, seed=d)
    angle = torch.randn(batch.num_tokens, 1, rot // 2).repeat(1, 1, 2)
    rope = (angle.cos(), angle.sin())
    cache = [torch.randn(num_slots, 2, d) for _ in range(2)]
    ref_cache = [c.clone() for c in cache]
    ref = TorchAttention(TorchAttention.Config())
    want = ref.forward(rotate(q, *rope), rotate(k, *rope), v, ref_cache, batch,
                       ref.prepare(batch), d**-0.5, None)  # fmt: skip
    attn = registry.build("attention", {"name": "cpu"})
    got = attn.forward(q, k, v, cache, batch, None, d**-0.5, None, rope=rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[0], ref_cache[0], rtol=1e-6, atol=1e-6)


def test_kernel_without_rope_or_write_reads_the_cache_as_it_is():
    batch, num_slots = random_step(Q_LENS, CTX_LENS, 4, seed=3)
    q, _, _, _ = qkv_rope(batch.num_tokens, 8, 2, 32)
    cache = [torch.randn(num_slots, 2, 32) for _ in range(2)]
    ref = TorchAttention(TorchAttention.Config())
    # the reference writes k/v first: hand it what the cache already holds at those slots
    k, v = (c[batch.slot_mapping] for c in cache)
    want = ref.forward(q, k, v, [c.clone() for c in cache], batch, ref.prepare(batch), 0.2, None)
    got = cpu.paged_attention(
        q, *cache, batch.query_start, batch.context_lens, batch.block_tables, 4, 0.2, None
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_names_bad_tensors():
    batch, num_slots = random_step([2], [5], 4)
    q = torch.randn(2, 4, 16)
    cache = [torch.zeros(num_slots, 2, 16) for _ in range(2)]
    args = (batch.query_start, batch.context_lens, batch.block_tables, 4, 1.0, None)
    with pytest.raises(ValueError, match=r"q must be a float32 CPU tensor, not Double"):
        cpu.paged_attention(q.double(), *cache, *args)
    with pytest.raises(ValueError, match=r"q must be \[T, 4, 16\] with packed heads"):
        cpu.paged_attention(q.transpose(1, 2).contiguous().transpose(1, 2), *cache, *args)
    with pytest.raises(ValueError, match="block_tables must be contiguous int64"):
        cpu.paged_attention(q, *cache, *args[:2], batch.block_tables.int(), *args[3:])


def spec(**changes) -> AttentionSpec:
    base = dict(num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    return AttentionSpec(
        **{**base, "device": torch.device("cpu"), "sliding_window": None, **changes}
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(device=torch.device("meta")), "runs on the CPU, not on device 'meta'"),
        (dict(dtype=torch.bfloat16), "computes in float32; the model's dtype is torch.bfloat16"),
        (dict(num_heads=6, num_kv_heads=4), "cannot group 6 query heads over 4 KV heads"),
        (dict(num_heads=130, num_kv_heads=2), "cannot group 130 query heads over 2"),
        (dict(rotary_dim=70), "rotates an even number of dims up to head_dim 64, not rotary"),
    ],
)
def test_check_says_why_it_cannot_run(changes, reason):
    attn = registry.build("attention", {"name": "cpu"})
    attn.check(spec())
    with pytest.raises(ValueError, match=reason):
        attn.check(spec(**changes))


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("MODGEN_CACHE_DIR", str(tmp_path))
    cpu.load.cache_clear()
    try:
        with pytest.raises(ValueError, match="'no-such-compiler' was not found"):
            registry.build("attention", {"name": "cpu"}).check(spec())
    finally:
        cpu.load.cache_clear()


def test_kernel_is_built_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MODGEN_CACHE_DIR", str(tmp_path))
    cpu.load.cache_clear()
    try:
        cpu.load(24)
        built = list(tmp_path.glob("cpu_kernels_d24_*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu.load.cache_clear()
        assert cpu.load(24).modgen_head_dim() == 24
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        cpu.load.cache_clear()


def fake_timings(monkeypatch, timings: dict[str, float]) -> None:
    """Make every calibration measure ``timings`` (per label; others as slow as torch)."""

    def measure(candidates, repeats=5):
        return {n: timings.get(n, timings["torch"]) for n in candidates}

    monkeypatch.setattr(calibration, "measure", measure)


def test_auto_takes_the_fastest_backend_and_keeps_torch_unless_beaten(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    widest = f"cpu/{cpu.machine_isas()[0]}"
    fake_timings(monkeypatch, {"torch": 10e-3, widest: 4e-3})
    auto = registry.build("attention", {"name": "auto"})
    with caplog.at_level(logging.INFO):
        auto.check(spec())
    assert auto.chosen_label == widest and auto.fuses_rope
    assert f"{widest} 4 ms" in caplog.text and "torch 10 ms" in caplog.text
    assert f"-> {widest}" in caplog.text
    fake_timings(monkeypatch, {"torch": 10e-3, widest: 9.8e-3})  # 2% faster: not enough
    auto.check(spec(head_dim=32))
    assert auto.chosen_label == "torch" and not auto.fuses_rope
    fake_timings(monkeypatch, {"torch": 1.0})  # the first decision is cached, not re-measured
    auto.check(spec())
    assert auto.chosen_label == widest and auto.calibration.cached


def test_auto_falls_back_to_torch_and_says_why(monkeypatch, tmp_path, caplog):
    auto = registry.build("attention", {"name": "auto"})
    with caplog.at_level(logging.INFO, logger="modgen.plugins.attention.auto"):
        auto.check(spec(dtype=torch.bfloat16))
    assert auto.chosen_label == "torch" and auto.calibration is None  # nothing to measure
    assert "chose torch; not cpu/" in caplog.text
    assert "attention=cpu computes in float32" in caplog.text
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("MODGEN_CACHE_DIR", str(tmp_path))
    cpu.load.cache_clear()
    try:
        auto.check(spec())
        assert auto.chosen_label == "torch"
    finally:
        cpu.load.cache_clear()


def test_default_attention_is_auto_and_measured(checkpoints):
    llm = LLM("mistral", checkpoint=str(checkpoints["mistral"]))
    attn = llm.engine.executor.attn
    assert attn.registry_name == "auto"
    assert {"torch", f"cpu/{cpu.machine_isas()[0]}"} <= set(attn.calibration.timings)
    assert attn.chosen_label == attn.calibration.name


def test_fused_rms_norm_and_swiglu_match_torch():
    gen = torch.Generator().manual_seed(4)
    x, res = torch.randn(2, 37, 100, generator=gen)  # 100 columns: a vector tail too
    w = torch.randn(100, generator=gen)
    out, h = cpu.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    assert h is x
    out, h = cpu.rms_norm(x, w, 1e-5, residual=res)
    torch.testing.assert_close(h, x + res)
    torch.testing.assert_close(out, rms_norm(x + res, w, 1e-5), rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(37, 2 * 70, generator=gen) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(
        cpu.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="gate_up must be a contiguous float32 CPU tensor"):
        cpu.silu_mul(gate_up.double())


def test_silu_of_a_very_negative_gate_is_zero_not_garbage():
    """e^-g for a gate below -88 overflowed the vector exponential's exponent field into
    garbage (silu(-93.9) * up came out as 2112): it now gives about 0, as torch does."""
    gate = torch.tensor([-200.0, -120.0, -93.9, -88.5, -60.0, -1.0, 0.0, 2.0, 90.0] * 2)
    gate_up = torch.cat([gate, torch.full_like(gate, 3.0)]).unsqueeze(0)
    want = torch.nn.functional.silu(gate) * 3.0
    torch.testing.assert_close(cpu.silu_mul(gate_up)[0], want, rtol=1e-5, atol=1e-30)


def test_argmax_kernel_matches_torch_and_takes_the_first_tie():
    gen = torch.Generator().manual_seed(5)
    for shape in [(33, 32000), (3, 17), (1, 96)]:
        x = torch.randn(*shape, generator=gen)
        assert torch.equal(cpu.argmax(x), x.argmax(-1))
    ties = torch.zeros(3, 40)
    ties[:, [5, 30]] = 1.0
    ties[1, 39] = 2.0
    ties[2] = float("-inf")
    assert cpu.argmax(ties).tolist() == ties.argmax(-1).tolist() == [5, 39, 0]


def test_fused_ops_are_torch_operators_that_need_no_attention_build(monkeypatch):
    """The element-wise kernels and the arg-max are torch operators of one build per
    instruction set: using them builds no attention kernel (none per head dim)."""

    def no_build(*args, **kwargs):
        raise AssertionError("an attention kernel was built")

    monkeypatch.setattr(cpu, "load", no_build)
    fused = CppOps()
    logits = torch.randn(4, 1000)
    assert torch.equal(fused.argmax(logits), logits.argmax(-1))
    assert torch.ops.modgen.argmax.default.name() == "modgen::argmax"
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        fused.rms_norm(x, torch.ones(64), 1e-5)[0], rms_norm(x, torch.ones(64), 1e-5)
    )


def test_model_uses_fused_ops_where_asked_able_or_measured_faster(monkeypatch, tmp_path):
    def ops(*overrides):
        return LLM("llama", overrides=[*TINY, *overrides]).engine.executor.model.ops.name

    assert ops("model.cpu_kernels=true") == "cpp"
    assert ops("model.cpu_kernels=false") == "torch"
    assert ops("model.cpu_kernels=true", "model.dtype=bfloat16") == "torch"
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    fake_timings(monkeypatch, {"torch": 1.0, "cpp": 0.5})
    assert ops() == "cpp"
    fake_timings(monkeypatch, {"torch": 1.0, "cpp": 2.0})
    # a new hidden shape is measured again; the arg-max (same vocabulary) stays as cached
    assert ops("model.intermediate_size=96") == "torch+argmax:cpp"
    assert ops() == "cpp"  # the first shape's decision is cached


def test_swiglu_runs_in_the_gemm_where_asked_able_or_measured_faster(monkeypatch, tmp_path):
    """The gated MLP's silu(gate) * up goes into its projection's GEMM where the layout has a
    fused form (the C++ GEMM; oneDNN's has none): always with cpu_kernels=true, never with
    false, by measurement (against the GEMM and ops' own silu_mul apart) by default."""

    def gate_up(layout: str, *overrides: str) -> str:
        llm = LLM("llama", overrides=[*TINY, f"model.cpu_linear={layout}", *overrides])
        return type(llm.engine.executor.model.layers[0].mlp.gate_up).__name__

    assert gate_up("cpp", "model.cpu_kernels=true") == "CppSiluGatedLinear"
    assert gate_up("cpp", "model.cpu_kernels=false") == "CppLinear"
    assert gate_up("onednn", "model.cpu_kernels=true") == "OneDNNLinear"
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    fake_timings(monkeypatch, {"torch": 1.0, "cpp": 0.5, "separate": 1.0, "fused": 0.5})
    assert gate_up("cpp") == "CppSiluGatedLinear"
    fake_timings(monkeypatch, {"torch": 1.0, "cpp": 0.5, "separate": 1.0, "fused": 0.99})
    assert gate_up("cpp", "model.intermediate_size=96") == "CppLinear"  # not 3% faster
    assert gate_up("cpp") == "CppSiluGatedLinear"  # the first shape's decision is cached


# plain torch throughout, or every C++ kernel and the oneDNN linear layout
PLAIN = ["attention=torch", "model.cpu_kernels=false", "model.cpu_linear=blas"]
KERNELS = ["attention=cpu", "model.cpu_kernels=true", "model.cpu_linear=onednn"]


@pytest.mark.parametrize("path", [KERNELS, PLAIN], ids=["kernels", "plain"])
@pytest.mark.parametrize("schedule", SCHEDULES[1:4], ids=["sf33", "sf1000", "continuous"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_each_backend_matches_transformers(
    kind, schedule, path, checkpoints, prompts, hf_reference
):
    """The default grid (test_e2e_hf) runs whatever calibration chose; each path forced here
    matches too: the C++ kernels with oneDNN's GEMM, and plain torch throughout."""
    llm = LLM(
        kind,
        checkpoint=str(checkpoints[kind]),
        overrides=[*schedule, *path, "kv_allocator.block_size=5"],
    )
    model = llm.engine.executor.model
    assert model.ops.name == ("cpp" if path is KERNELS else "torch")
    assert type(model.layers[0].attn.qkv).__name__ == (
        "OneDNNLinear" if path is KERNELS else "Linear"
    )
    assert llm.engine.executor.attn.registry_name == path[0].split("=")[1]
    logits = capture_first_logits(llm)
    outs = llm.generate(prompts, GREEDY)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, hf_reference[kind], strict=True)):
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])}) diverged"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_the_cpp_linear_layout_matches_transformers(kind, checkpoints, prompts, hf_reference):
    """modgen's own GEMM (every linear layer, the LM head too; SwiGLU in the gate/up
    projection's epilogue) against the oracle."""
    overrides = [*SCHEDULES[1], *KERNELS[:2], "model.cpu_linear=cpp"]
    assert "cpp" in ops.linear_layouts()  # registered by the C++ kernels' plugin
    llm = LLM(kind, checkpoint=str(checkpoints[kind]), overrides=overrides)
    model = llm.engine.executor.model
    assert type(model.lm_head).__name__ == type(model.layers[0].attn.qkv).__name__ == "CppLinear"
    assert type(model.layers[0].mlp.gate_up).__name__ == "CppSiluGatedLinear"
    logits = capture_first_logits(llm)
    outs = llm.generate(prompts, GREEDY)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, hf_reference[kind], strict=True)):
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])}) diverged"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)


def test_one_openmp_runtime_in_the_process():
    """The kernels run on torch's OpenMP runtime: loading them maps no second one (two runtimes
    would keep two thread pools spinning against each other)."""
    for isa in cpu.machine_isas():
        cpu.load(64, isa)
    assert cpu.openmp_runtime() is not None  # exactly one OpenMP library is mapped


@pytest.mark.parametrize("isa", cpu.machine_isas())
def test_each_build_reports_its_instruction_set(isa):
    lib = cpu.load(64, isa)
    assert lib.modgen_isa().decode() == isa
    assert lib.modgen_vector_width() == {"avx512": 16, "avx2": 8}.get(isa, 4)


def test_ops_are_rebuilt_from_their_choice():
    """Ranks other than 0 rebuild rank 0's measured ops from ``ops.choice`` (tensor parallelism)."""
    torch_ops, cpp = ops.TorchOps(), CppOps()
    for chosen in (torch_ops, cpp, ops.MixedOps(torch_ops, cpp), ops.MixedOps(cpp, torch_ops)):
        assert ops.named_ops(chosen.choice).name == chosen.name
