"""Steps sized by time: the engine tells the scheduler what each step held and took
(``Scheduler.observe``), ``StepTimeFit`` learns step time from that, and SplitFuse's
``max_step_ms`` cuts prompt chunks so that a step carrying decodes stays within it."""

from __future__ import annotations

import itertools
import random
import statistics

import numpy as np
import pytest
from checkpoints import hf_greedy, hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_engine import make_engine, run

from modgen import LLM, SamplingParams, registry
from modgen.engine.costs import StepFeatures, StepTimeFit, attention_pairs
from modgen.engine.sequence import SeqStatus
from modgen.plugins.schedulers.splitfuse import ONLINE_PREFILL_SHARE

LAW = np.array([3e-3, 1e-4, 6e-5, 4e-8, 2.5e-7])  # fixed, per token, logit, prompt pair, key


def features(rng: random.Random) -> StepFeatures:
    """A step of a few decodes and maybe one prompt chunk, as a server runs them."""
    d, n, start = rng.randint(0, 16), rng.choice([0, 16, 48, 200]), rng.randint(0, 2000)
    completes = n > 0 and rng.random() < 0.3
    pairs = attention_pairs(start, n, None)
    keys = sum(rng.randint(100, 1500) for _ in range(d))
    return StepFeatures(
        num_tokens=d + n, num_seqs=d + (n > 0), num_logits=d + completes, prefill_tokens=n,
        prefill_pairs=pairs, prefill_context=start + n if n else 0, decode_seqs=d,
        decode_pairs=keys, max_context=start + n,
    )  # fmt: skip


def law(f: StepFeatures, scale: float = 1.0) -> float:
    x = [1, f.num_tokens, f.num_logits, f.prefill_pairs, f.decode_pairs]
    return scale * float(LAW @ x)


def test_the_engine_tells_the_scheduler_each_step_and_its_time():
    quiet = make_engine("splitfuse", token_budget=64)  # no limit: nothing to observe
    quiet.scheduler.observe = lambda f, s: pytest.fail("observed without asking")
    run(quiet, [(30, 3)])
    engine = make_engine("splitfuse", token_budget=64, max_step_ms=1e6)  # never binds
    seen: list[tuple[StepFeatures, float]] = []
    engine.scheduler.observe = lambda f, s: seen.append((f, s))  # type: ignore[method-assign]
    run(engine, [(100, 5), (30, 8), (7, 3)], arrivals=[0, 2, 4])
    assert len(seen) == len(engine.stats) > 3
    for (f, seconds), stats in zip(seen, engine.stats, strict=True):
        assert f.num_tokens == stats.num_tokens
        assert f.prefill_tokens == stats.num_prefill_tokens
        assert f.decode_seqs == stats.num_decode_tokens
        assert seconds == stats.duration > 0


def test_step_time_fit_learns_the_law_and_follows_a_machine_that_slows_down():
    rng = random.Random(0)
    fit = StepTimeFit(half_life=64, min_steps=8)
    assert fit.predict(features(rng)) is None  # nothing seen yet
    for _ in range(7):
        fit.add(f := features(rng), law(f))
    assert fit.predict(f) is None  # fewer than min_steps
    for _ in range(300):
        fit.add(f := features(rng), law(f) * (1 + rng.gauss(0, 0.02)))
    coef = fit.coefficients()
    assert coef is not None
    # the well-determined slopes (logits and keys both grow with the decodes: predictions hold)
    np.testing.assert_allclose(coef[[0, 1, 3]], LAW[[0, 1, 3]], rtol=0.1)
    probe = features(random.Random(1))
    assert fit.predict(probe) == pytest.approx(law(probe), rel=0.05)
    for _ in range(400):  # the machine gets twice as slow: recent steps outweigh the old
        fit.add(f := features(rng), law(f, 2.0))
    assert fit.predict(probe) == pytest.approx(law(probe, 2.0), rel=0.05)


def test_step_time_fit_keeps_slopes_non_negative():
    rng = random.Random(2)
    fit = StepTimeFit(min_steps=4)
    for _ in range(50):  # time falls with decode keys: a negative slope, left out
        f = features(rng)
        fit.add(f, 0.01 + 1e-4 * f.num_tokens - 1e-7 * f.decode_pairs)
    coef = fit.coefficients()
    assert coef is not None and (coef[1:] >= 0).all() and coef[4] == 0
    for bad in ({"half_life": 0}, {"min_steps": 0}):
        with pytest.raises(ValueError, match="half_life > 0 and min_steps >= 1"):
            StepTimeFit(**bad)


def test_max_step_ms_bounds_the_steps_that_carry_decodes():
    """Simulated (roofline cost model): without the limit some steps with decodes run long;
    with it every one whose prompt chunks were cut to fit stays within 5% of it (the fit's
    error), only steps that got no more than min_chunk prompt tokens may pass it, and every
    request still ends with all its tokens."""
    reqs = [(300 if i % 4 == 0 else 40, 30) for i in range(16)]
    arrivals = [3 * i for i in range(16)]
    limit_ms = 0.18

    reports: list[dict] = []

    def steps(**knobs):
        engine = make_engine("splitfuse", token_budget=256, **knobs)
        seqs = run(engine, reqs, arrivals)
        assert [len(s.output_token_ids) for s in seqs] == [30] * 16
        reports.append(engine.scheduler.report())
        return [s for s in engine.stats if s.num_decode_tokens and s.num_prefill_tokens]

    free = steps()
    assert max(s.duration for s in free) > 1.1 * limit_ms / 1e3  # the test can fail
    assert "step_fit_fixed_ms" not in reports[-1]
    bounded = steps(max_step_ms=limit_ms, min_chunk=4)
    assert reports[-1]["step_fit_fixed_ms"] > 0  # results.json says what the limit used
    cut = [s for s in bounded if s.num_prefill_tokens > 4]
    assert any(s.num_prefill_tokens < 200 for s in cut)  # chunks were cut, not all or nothing
    assert max(s.duration for s in cut) <= 1.05 * limit_ms / 1e3


def served_steps(reqs, arrivals, online=True, **knobs):
    """The simulated engine's steps over ``reqs``, served (``set_online``) or offline, with the
    scheduler's report, the prompt chunks of its steps that carried decodes (tokens, whether
    the chunk completes its prompt), and at the end its step limit and its typical prompt's
    predicted prefill from scratch (seconds)."""
    engine = make_engine("splitfuse", token_budget=512, num_blocks=100_000, **knobs)
    engine.scheduler.set_online(online)
    chunks = []

    def on_step(plan, before):
        if plan.num_decode_tokens:
            chunks.extend((c.num_tokens, c.completes) for c in plan.chunks if not c.seq.is_decode)

    seqs = run(engine, reqs, arrivals, on_step)
    assert [s.num_output_tokens for s in seqs] == [g for _, g in reqs]
    sched = engine.scheduler
    coef = sched.step_fit.coefficients()
    n = statistics.median_low(sched.prompt_lengths)
    prefill = None  # no fit without a limit to serve
    if coef is not None:
        prefill = float(coef[0] + coef[1] * n + coef[2] + coef[3] * attention_pairs(0, n, None))
    return engine.stats, sched.report(), chunks, (sched.step_limit(), prefill)


def test_served_steps_are_held_to_a_share_of_a_typical_prompts_prefill():
    """Served, by default: a step that carries decodes takes at most 0.45 of what a typical
    prompt's prefill from scratch is predicted to take (the median of the admitted prompts,
    by the step fit), so short prompts give short steps and long ones long steps, and a long
    prompt among short ones goes in pieces of that time too. Offline, or with
    prefill_share=0, no limit: steps with decodes then run far past it. (The simulated model's
    steps cost ~0.1 ms whatever they hold, so its prompts are long enough for their prefill to
    dwarf that.)"""
    mix = [(6000 if i % 8 == 0 else 1500, 30) for i in range(24)]  # a long prompt now and then
    arrivals = [2 * i for i in range(24)]
    stats, report, chunks, (limit, prefill) = served_steps(mix, arrivals)
    assert limit == pytest.approx(ONLINE_PREFILL_SHARE * prefill)
    assert report["step_limit_ms_median"] / 1e3 == pytest.approx(limit, rel=0.2)  # fit drifts
    cut = [s for s in stats[8:] if s.num_decode_tokens and s.num_prefill_tokens > 8]  # once fit
    assert cut and max(s.duration for s in cut) <= 1.05 * report["step_limit_ms_max"] / 1e3
    assert any(8 < n < 400 and not done for n, done in chunks)  # cut by the time, not the budget

    _, off_report, off_chunks, _ = served_steps(mix, arrivals, online=False)
    assert "step_limit_ms_median" not in off_report
    assert max(n for n, done in off_chunks if not done) >= 400  # the budget alone cuts them
    _, none_report, _, (none_limit, _) = served_steps(mix, arrivals, prefill_share=0)
    assert "step_limit_ms_median" not in none_report and none_limit is None

    longer = [(p * 3, g) for p, g in mix]  # the same mix, prompts three times as long
    _, _, _, (long_limit, long_prefill) = served_steps(longer, arrivals)
    assert long_limit == pytest.approx(ONLINE_PREFILL_SHARE * long_prefill)
    assert long_limit > 2 * limit

    _, _, _, (lower, lower_prefill) = served_steps(mix, arrivals, prefill_share=0.2)
    assert lower == pytest.approx(0.2 * lower_prefill)


def test_the_typical_prompt_counts_its_cached_prefix_too():
    """With a prefix cache, prompts that share a long prefix compute only their suffixes, but
    the typical prompt is the whole one: a limit set by the suffixes would sit below the
    decodes' own step and give every step min_chunk prompt tokens."""
    prefix = [7] * 3000
    reqs = [(prefix + [100 + i] * 200, 20) for i in range(16)]  # 3200 tokens, 200 uncached
    stats, _, _, (limit, prefill) = served_steps(
        reqs, [2 * i for i in range(16)], allocator="prefix"
    )
    assert limit == pytest.approx(ONLINE_PREFILL_SHARE * prefill)
    cached = [s for s in stats[8:] if s.num_decode_tokens and s.num_prefill_tokens]
    assert max(s.num_prefill_tokens for s in cached) > 100  # suffixes not cut to slivers


def test_max_step_ms_wins_over_the_prefill_share():
    reqs, arrivals = [(1500, 20)] * 12, [2 * i for i in range(12)]
    stats, report, _, _ = served_steps(reqs, arrivals, max_step_ms=0.3)
    assert report["step_limit_ms_min"] == report["step_limit_ms_max"] == pytest.approx(0.3)
    cut = [s.duration for s in stats[8:] if s.num_decode_tokens and s.num_prefill_tokens > 8]
    assert cut and statistics.median(cut) == pytest.approx(0.3e-3, rel=0.05)


def test_held_to_a_time_a_short_prompt_goes_before_a_long_one_being_split():
    """Served with a step limit, a prompt being split goes first only while no waiting prompt
    is shorter: a short prompt that arrives while a long one is split gets its first token
    long before the long one does; by FastGen's order (the split prompt's remainder first, as
    offline) it waits for the whole long prompt."""
    reqs = [(1500, 40)] * 4 + [(12000, 5), (1500, 5)]  # decodes running, a long, then a short
    arrivals = [0, 0, 0, 0, 12, 16]
    firsts = {}
    for online in (True, False):
        engine = make_engine("splitfuse", token_budget=512, num_blocks=100_000)
        engine.scheduler.set_online(online)
        seqs = run(engine, reqs, arrivals)
        firsts[online] = [s.metrics.first_token_time for s in seqs[4:]]
    (long_on, short_on), (long_off, short_off) = firsts[True], firsts[False]
    assert short_on < long_on  # the short prompt went first
    assert short_off > long_off  # FastGen's order: behind the whole long prompt


def test_held_to_a_time_a_long_prompt_among_a_stream_of_short_ones_still_advances():
    """Shortest first has a bound: short prompts arriving every step would take every step's
    prompt time, but a prompt being split that went max_prompt_wait steps without a chunk goes
    first for one. With the wait unbounded the long prompt goes without for much longer."""
    reqs = [(1500, 200)] * 4 + [(20000, 2)] + [(300, 2)] * 120
    arrivals = [0, 0, 0, 0, 12] + [14 + i for i in range(120)]

    def longest_gap(wait: int) -> int:
        engine = make_engine("splitfuse", token_budget=512, num_blocks=100_000,
                             max_prompt_wait=wait)  # fmt: skip
        engine.scheduler.set_online(True)
        served: list[int] = []  # plans in which the long prompt got a chunk

        def on_step(plan, before):
            on_step.n = getattr(on_step, "n", 0) + 1
            if any(c.seq.request_id == "4" and not c.seq.is_decode for c in plan.chunks):
                served.append(on_step.n)

        seqs = run(engine, reqs, arrivals, on_step)
        assert seqs[4].num_output_tokens == 2
        return max(b - a for a, b in itertools.pairwise(served))

    bounded, unbounded = longest_gap(3), longest_gap(10_000)
    assert bounded <= 6  # 3 steps, and prompts that waited as long may go before it
    assert unbounded > 2 * bounded  # the test can fail


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 20), st.integers(0, 30)),
                  min_size=1, max_size=12),
    name=st.sampled_from(["splitfuse", "splitfuse_priority", "splitfuse_spf"]),
    limit=st.sampled_from([("ms", 0.01), ("ms", 0.05), ("ms", 0.1), ("ms", 0.2),
                           ("share", 0.02), ("share", 0.25), ("share", 1.0)]),
    min_chunk=st.integers(1, 16),
    budget=st.integers(1, 256),
    allocator=st.sampled_from(["blocked", "prefix"]),
)  # fmt: skip
def test_a_step_limit_keeps_decodes_first_and_never_starves_a_prompt(
    reqs, name, limit, min_chunk, budget, allocator
):
    """Whatever the limit: decodes first within the budget, a step with room after its decodes
    gives prompts at least min_chunk tokens (or all they have), no prompt is admitted (KV taken)
    without a chunk, and every request ends in full; with a prefix cache too (the prompts here
    share prefixes); served by a share of a typical prefill as well as by a fixed time."""
    kind, value = limit
    knob = {"max_step_ms": value} if kind == "ms" else {"prefill_share": value}
    engine = make_engine(name, token_budget=budget, min_chunk=min_chunk, allocator=allocator,
                         **knob)  # fmt: skip
    sched = engine.scheduler
    sched.set_online(kind == "share")

    def on_step(plan, before):
        kinds = [c.seq.is_decode for c in plan.chunks]
        assert kinds == sorted(kinds, reverse=True) and plan.num_tokens <= budget
        room = budget - plan.num_decode_tokens
        assert plan.num_prefill_tokens >= min(min_chunk, room, before["uncached_prompt_tokens"])
        planned = {c.seq.seq_id for c in plan.chunks}
        for seq in sched.running:  # admitted now, or served before
            assert seq.seq_id in planned or seq.seq_id in sched._last_served, "KV, no chunk"

    seqs = run(engine, [(p, g) for p, g, _ in reqs], [a for *_, a in reqs], on_step)
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [g for _, g, _ in reqs]


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"max_step_ms": -1}, "max_step_ms must be >= 0"),
        ({"min_chunk": 0}, "min_chunk"),
        ({"prefill_share": -0.5}, "prefill_share must be >= 0"),
        ({"typical_prompts": 0}, "typical_prompts must be >= 1"),
        ({"max_prompt_wait": -1}, "max_prompt_wait must be >= 0"),
    ],
)
def test_bad_step_time_settings_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        registry.to_config("scheduler", {"name": "splitfuse", **knobs})


def test_a_real_engine_with_a_step_limit_generates_the_same_tokens(checkpoints):
    """On the tiny checkpoint, prompts arriving while others decode: a limit below any step's
    time cuts each prompt to min_chunk tokens a step once the fit has its steps, and the greedy
    tokens are those of the plain budget and of transformers."""
    rng = random.Random(3)
    reqs = [([rng.randrange(3, 96) for _ in range(rng.randint(20, 90))], 10) for _ in range(6)]
    arrivals = [0, 0, 3, 9, 12, 15]
    ckpt = str(checkpoints["mistral"])
    outputs, stats = [], []
    for extra in ([], ["scheduler.max_step_ms=0.001", "scheduler.min_chunk=3"]):
        engine = LLM("mistral", checkpoint=ckpt, overrides=["+scheduler=splitfuse", *extra]).engine
        seqs, step = [], 0
        while len(seqs) < len(reqs) or engine.has_unfinished():
            for prompt, n in reqs[len(seqs) :]:
                if arrivals[len(seqs)] > step:
                    break
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                seqs.append(engine.add_request(prompt, params))
            engine.step()
            step += 1
        outputs.append([s.output_token_ids for s in seqs])
        stats.append(engine.stats)
    hf = hf_model(checkpoints["mistral"])
    assert outputs[0] == outputs[1] == [hf_greedy(hf, p, n)[0] for p, n in reqs]
    late = [s for s in stats[1][8:] if s.num_decode_tokens and s.num_prefill_tokens]
    assert late and all(s.num_prefill_tokens <= 3 for s in late)
    assert max(s.num_prefill_tokens for s in stats[0] if s.num_decode_tokens) > 3
