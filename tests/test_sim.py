"""executor=sim: the same schedulers and allocators as the real model, on a virtual clock."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
from sim_engine import COST, SPEC, make_engine, run
from test_e2e_hf import SCHEDULES

from modgen import LLM, SamplingParams, registry
from modgen.bench.loadgen import arrival_times
from modgen.engine.clock import VirtualClock
from modgen.engine.costs import StepFeatures
from modgen.profiling import Profile, ProfileFit

SIM = ["executor=sim", "cost_model=roofline", "cost_model.peak_tflops=1",
       "cost_model.bandwidth_gbps=100"]  # fmt: skip


def record_plans(llm: LLM) -> list:
    """Each step's chunks as (request id, tokens) and its preempted request ids."""
    plans: list = []
    sched = llm.engine.scheduler
    schedule = sched.schedule

    def recording():
        plan = schedule()
        plans.append(
            (
                [(c.seq.request_id, c.num_tokens) for c in plan.chunks],
                [s.request_id for s in plan.preempted],
            )
        )
        return plan

    sched.schedule = recording
    return plans


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(s).replace("+", ""))
def test_sim_plans_the_very_steps_the_model_runs(schedule, block_size, checkpoints, prompts):
    """All requests at once: executor=sim and executor=model take identical step plans
    (sequences, tokens each, preemptions), token counts and finish reasons; a small cache
    forces preemptions in some cases."""
    params = SamplingParams(max_tokens=12, min_tokens=3, temperature=0, ignore_eos=True)
    blocks = -(-100 // block_size)  # 100 slots: the longest request needs 76, all of them 311
    base = [*schedule, f"kv_allocator.block_size={block_size}", f"kv_allocator.num_blocks={blocks}"]
    outs, plans = {}, {}
    for name, extra in (("model", []), ("sim", SIM)):
        llm = LLM("mistral", checkpoint=str(checkpoints["mistral"]), overrides=[*base, *extra])
        plans[name] = record_plans(llm)
        outs[name] = [(len(o.token_ids), o.finish_reason) for o in llm.generate(prompts, params)]
    assert plans["sim"] == plans["model"]
    assert outs["sim"] == outs["model"] == [(12, "length")] * len(prompts)


def test_a_70b_model_simulates_in_seconds_with_no_weights():
    overrides = ["executor=sim", "cost_model=a100-80gb", "engine.tensor_parallel=4",
                 "kv_allocator.memory_gb=160"]  # fmt: skip
    llm = LLM("llama-2-70b", overrides=overrides)
    engine = llm.engine
    assert engine.spec.num_layers == 80 and engine.clock.virtual
    assert not hasattr(engine.executor, "model")  # nothing was built
    outs = llm.generate([[5] * 2600, [6] * 100], SamplingParams(max_tokens=60, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [60, 60]
    # 70B on 4 A100s: a 512-token step takes tens of milliseconds of virtual time
    steps = engine.stats
    assert all(s.duration > 0 for s in steps)
    assert 0.01 < max(s.duration for s in steps) < 1.0
    assert outs[0].metrics.finish_time == pytest.approx(engine.clock.now())


def test_tensor_parallel_splits_work_and_adds_all_reduces():
    f = StepFeatures.of([(0, 512, False, True)], None)
    cost = {n: registry.build("cost_model", {**COST, "link_latency_us": 10.0}, SPEC, n)
            for n in (1, 4)}  # fmt: skip
    one, four = cost[1].step_time(f), cost[4].step_time(f)
    overhead = (100 + 5) * 1e-6  # the per-step and per-sequence defaults
    comm = 2 * SPEC.num_layers * (10e-6 + 2 * 3 / 4 * 512 * SPEC.hidden_size * 4 / 300e9)
    assert four == pytest.approx((one - overhead) / 4 + comm + overhead, rel=1e-6)


def test_bench_runs_closed_open_and_trace_loops_in_virtual_time(tmp_path):
    """The bench task drives the simulator through the same load generator: arrivals and
    every token stamped on the virtual clock (seconds of virtual time in milliseconds)."""
    base = ["model.num_hidden_layers=2", "task=bench", "task.warmup=0", *SIM]
    for mode in ("mode=closed", "mode=open", "mode=trace"):
        extra = ["workload=fixed", "workload.num_requests=6", "workload.prompt_len=64",
                 "workload.output_len=8"]  # fmt: skip
        if mode == "mode=trace":
            trace = tmp_path / "trace.jsonl"
            trace.write_text("".join(f'{{"arrival": {10.0 * i}, "prompt_len": 64, "output_len": '
                                     f'8}}\n' for i in range(6)))  # fmt: skip
            extra = ["workload=trace", f"workload.path={trace}"]
        out = tmp_path / mode.split("=")[1]
        res = subprocess.run(
            [sys.executable, "-m", "modgen", *base, f"task.{mode}", "task.rate=0.5", *extra,
             f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        summary = json.loads((out / "results.json").read_text())["summary"]
        assert summary["completed"] == 6 and summary["machine"].startswith("simulated: roofline")
        last = {"mode=closed": 0.0, "mode=open": arrival_times(6, 0.5)[-1], "mode=trace": 50.0}
        # the run spans its arrivals in virtual time (taking milliseconds of real time)
        assert last[mode] < summary["wall_time_s"] < last[mode] + 10.0
        if mode == "mode=trace":
            assert summary["ttft_p50_s"] < 1.0  # each request found the engine idle


def synthetic_profile(**kw) -> Profile:
    """A profile of a made-up machine whose steps cost exactly 1 ms + 10 us/token + 1 ns/pair."""

    def sample(f: StepFeatures) -> dict:
        t = 1e-3 + 1e-5 * f.num_tokens + 1e-9 * (f.prefill_pairs + f.decode_pairs)
        return {**asdict(f), "seconds": t}

    grid = [sample(StepFeatures.of([(s, n, False, True)], None)) for n in (16, 64, 128, 512)
            for s in (0, 1024)]  # fmt: skip
    grid += [sample(StepFeatures.of([(c, 1, True, True)] * b, None)) for b in (1, 16, 64)
             for c in (128, 1024)]  # fmt: skip
    grid += [sample(StepFeatures.of([(1024, 1, True, True)] * b + [(0, 512 - b, False, True)],
                                    None)) for b in (8, 32)]  # fmt: skip
    return Profile(model=asdict(SPEC), attention="auto", attention_chosen="auto (test)",
                   token_budget=512, grid=grid, **kw)  # fmt: skip


def test_profile_fit_interpolates_and_counts_extrapolation(tmp_path):
    fit = ProfileFit(synthetic_profile())
    inside = StepFeatures.of([(900, 1, True, True)] * 20 + [(300, 200, False, True)], None)
    want = 1e-3 + 1e-5 * inside.num_tokens + 1e-9 * (inside.prefill_pairs + inside.decode_pairs)
    assert fit.executor_time(inside) == pytest.approx(want, rel=0.02)
    assert not fit.outside(inside)
    beyond = StepFeatures.of([(4000, 1000, False, True)], None)
    assert fit.outside(beyond)  # more tokens and a longer context than the grid
    path = synthetic_profile().save(tmp_path / "p.json")
    cost = registry.build("cost_model", {"name": "profiled", "profile": str(path)}, SPEC)
    cost.step_time(inside)
    cost.step_time(beyond)
    assert cost.report()["steps_extrapolated"] == 1 and cost.report()["steps_predicted"] == 2


def test_a_profile_of_another_model_is_refused_unless_allowed(tmp_path):
    path = synthetic_profile().save(tmp_path / "p.json")
    other = replace(SPEC, hidden_size=128, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"model hidden_size 64 \(the run's: 128\).*dtype float32"):
        registry.build("cost_model", {"name": "profiled", "profile": str(path)}, other)
    with pytest.raises(ValueError, match=r"attention auto \(the run's: torch\)"):
        registry.build("cost_model", {"name": "profiled", "profile": str(path)}, SPEC, 1, "torch")
    cost = registry.build(
        "cost_model", {"name": "profiled", "profile": str(path), "allow_mismatch": True}, other
    )
    assert "dtype float32 (the run's: bfloat16)" in cost.report()["profile_mismatch"]
    with pytest.raises(FileNotFoundError, match="task=profile"):
        registry.build("cost_model", {"name": "profiled", "profile": str(tmp_path / "none")}, SPEC)


def test_sim_with_a_checkpoint_but_no_config_json_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        LLM("llama", checkpoint=str(tmp_path), overrides=SIM)


def test_virtual_clock_loop_jumps_to_timers():
    import asyncio

    clock = VirtualClock()

    async def main():
        await asyncio.sleep(3600)
        return clock.now()

    assert clock.run(main()) == pytest.approx(3600)


def test_schedulers_run_the_engine_without_a_model():
    engine = make_engine("splitfuse", token_budget=32)
    seqs = run(engine, [(40, 5), (10, 3)], arrivals=[0, 2])
    assert [s.num_output_tokens for s in seqs] == [5, 3]
    assert engine.clock.now() == pytest.approx(sum(s.duration for s in engine.stats))


def test_a_simulated_sweep_ends_with_its_comparison(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "modgen", "-m", "executor=sim", "model=llama-2-70b",
         "cost_model=a100-80gb", "engine.tensor_parallel=4", "kv_allocator.memory_gb=160",
         "task=bench", "workload=synthetic", "workload.num_requests=40", "task.clients=8",
         "task.warmup=0", "+scheduler=splitfuse", "scheduler.token_budget=256,1024",
         f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert len(rows) == 3 and {"scheduler.token_budget=256", "scheduler.token_budget=1024"} <= {
        r.split(",")[1] for r in rows[1:]
    }
    assert (tmp_path / "latency_vs_throughput.png").is_file()
