"""Tensor parallelism over torch.distributed (gloo, two processes on this host): greedy outputs at
``engine.tensor_parallel=2`` are transformers' (and so TP=1's) token for token with last-prompt
logits within 1e-4, for llama and mistral under every scheduler and with preemption, and for
the MoE families; each rank holds only its shard; refusals name the numbers; a rank that dies
or hangs fails the step and makes the engine unhealthy instead of hanging it; torchrun with two
"nodes" on loopback gives the same tokens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_MAX_NEW, MAX_NEW
from test_e2e_hf import capture_first_logits

from modgen import LLM, SamplingParams
from modgen.config import compose_config
from modgen.engine.parallel import Parallel, free_port
from modgen.registry import build
from modgen.weights import WeightLoadError

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
TP2 = ["engine.tensor_parallel=2", "kv_allocator.block_size=5"]

SCHEDULES = {
    "splitfuse-7": ["+scheduler=splitfuse", "scheduler.token_budget=7"],
    "continuous": ["+scheduler=continuous"],
    "static": ["+scheduler=static", "scheduler.max_num_seqs=3"],
    "preempting": [  # 24 slots of 5: the longest request needs 74, so sequences are preempted
        "+scheduler=splitfuse", "scheduler.token_budget=16", "kv_allocator.num_blocks=24",
    ],
}  # fmt: skip


@pytest.fixture(autouse=True)
def _close_engines(monkeypatch):
    """Close every engine a test opens (a process holds one tensor-parallel group at a time)."""
    opened = []
    init = LLM.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(LLM, "__init__", tracked)
    yield
    for llm in opened:
        llm.close()


def check_exact(llm: LLM, prompts, reference, params=GREEDY) -> list:
    logits = capture_first_logits(llm)
    outs = llm.generate(prompts, params)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, reference, strict=True)):
        assert out.error is None, out.error
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])}) diverged"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)
    return outs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_tp2_matches_transformers(kind, schedule, checkpoints, prompts, hf_reference):
    """Llama (Llama-3 RoPE scaling) and Mistral (a window of 8, shorter than most prompts)."""
    llm = LLM(kind, checkpoint=str(checkpoints[kind]), overrides=[*TP2, *SCHEDULES[schedule]])
    assert llm.engine.executor.parallel.world == 2
    outs = check_exact(llm, prompts, hf_reference[kind])
    if schedule == "preempting":
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    report = llm.engine.executor.report()  # rank 0 timed its collectives
    assert report["tensor_parallel"] == 2 and report["all_reduce_calls"] > 0


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gemma"])
def test_other_families_tp2_match_transformers(kind, zoo):
    """MoE (experts split over the ranks: 4 of Mixtral's 8 each; Qwen2-MoE's shared expert split
    by columns) and Gemma (one KV head, replicated on both ranks)."""
    llm = LLM(kind, checkpoint=str(zoo.path(kind)), overrides=[*TP2, *SCHEDULES["splitfuse-7"]])
    params = SamplingParams(max_tokens=FAMILY_MAX_NEW, temperature=0.0, ignore_eos=True)
    check_exact(llm, zoo.prompts, zoo.reference(kind), params)


class Alone(Parallel):
    """A rank's place without its peers: rank 0's choices are plain torch's, broadcast to no one."""

    def broadcast(self, obj=None):
        return (("torch", "torch"), {}, [])


PLAIN_LAYERS = ["model.cpu_kernels=false", "model.cpu_linear=blas"]  # weights as parameters


def shard(kind: str, path: Path, rank: int):
    """Rank ``rank`` of two's model, built in this process (building and loading need no peer)."""
    node = compose_config([f"model={kind}", f"model.checkpoint={path}", *PLAIN_LAYERS]).model
    return build("model", node, device=torch.device("cpu"), parallel=Alone(rank=rank, world=2))


@pytest.mark.parametrize("kind", ["mixtral", "phi3"])
def test_each_rank_holds_only_its_shard(kind, zoo):
    """Every parameter of a rank is its part of the full one: q/k/v and gate/up by columns (Phi-3's
    fused q/k/v and gate/up cut part by part), the output and down projections by rows, the
    vocabulary by rows, whole experts; norms and routers replicated."""
    path = zoo.path(kind)
    full = LLM(kind, checkpoint=str(path), overrides=PLAIN_LAYERS).engine.executor.model
    whole = {n: p.detach() for n, p in full.named_parameters()}
    sizes = [0, 0]
    for rank in (0, 1):
        part = shard(kind, path, rank)
        for name, p in part.named_parameters():
            w = whole[name]
            sizes[rank] += p.numel()
            if p.shape == w.shape:
                if "bias" in name and ("o_proj" in name or "down" in name) and rank == 1:
                    assert not p.any()  # a row-parallel bias is added by rank 0 alone
                else:
                    torch.testing.assert_close(p.detach(), w, msg=name)
                continue
            dim = next(d for d in range(p.dim()) if p.shape[d] != w.shape[d])
            assert p.shape[dim] * 2 >= w.shape[dim], name
    assert max(sizes) < 0.75 * sum(p.numel() for p in whole.values())


def test_bad_splits_are_refused_with_the_numbers(checkpoints, zoo):
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide the model's 4 query"):
        LLM("llama", checkpoint=str(checkpoints["llama"]), overrides=["engine.tensor_parallel=3"])
    cores = os.cpu_count()
    with pytest.raises(ValueError, match=f"but this host has {cores} cores"):
        wide = ["model.num_attention_heads=64", "model.num_key_value_heads=64"]
        LLM("llama", overrides=[f"engine.tensor_parallel={2 * cores}", *wide])
    with pytest.raises(ValueError, match="fused q/k/v layout 'falcon_grouped'"):
        shard("falcon", zoo.path("falcon_new"), 0)


def edited(src: Path, dst: Path, changes: dict) -> Path:
    """A copy of checkpoint ``src`` with tensors replaced (a tensor) or added (a name: tensor)."""
    from safetensors.torch import save_file

    from modgen.weights import iter_tensors

    dst.mkdir(exist_ok=True)
    tensors = dict(iter_tensors(src))
    tensors.update(changes)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_a_checkpoint_that_cannot_be_cut_names_the_tensor(ckpt_dir, zoo):
    """Cut as TP=1 loads it, or refused naming the tensor: a short up_proj (not a whole number
    of parts), a k_proj of one KV head (would pass for a replicated head), an embedding of fewer
    rows than the vocabulary, an expert beyond the experts (on either rank)."""
    from checkpoints import make_checkpoint

    from modgen.weights import iter_tensors

    path = make_checkpoint(ckpt_dir / "odd_vocab", "llama", vocab_size=95)  # 95 rows: 48 + 47
    part = shard("llama", path, 1)  # the last rank's vocabulary part is padded, not refused
    assert part.embed.weight.shape[0] == 48 and not part.embed.weight[47].any()
    full = dict(iter_tensors(path))
    up, k, emb = (
        f"model.{n}.weight"
        for n in ("layers.1.mlp.up_proj", "layers.0.self_attn.k_proj", "embed_tokens")
    )
    cases = {
        "short_up": ({up: full[up][:96]}, rf"{up}: cannot be"),
        "one_kv_head": ({k: full[k][:16]}, rf"{k}: cannot be"),
        "short_vocab": ({emb: full[emb][:94]}, rf"{emb}: expected \(95, 64\)"),
    }
    for name, (changes, error) in cases.items():
        bad = edited(path, ckpt_dir / name, changes)
        for rank in (0, 1):
            with pytest.raises(WeightLoadError, match=error.replace(".", r"\.")):
                shard("llama", bad, rank)
    moe = zoo.path("mixtral")
    w2 = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    extra = {w2.replace(".0.w2", ".8.w2"): dict(iter_tensors(moe))[w2]}
    bad = edited(moe, ckpt_dir / "ninth_expert", extra)
    for rank in (0, 1):
        with pytest.raises(WeightLoadError, match=r"unexpected weights: .*experts\.8\.w2"):
            shard("mixtral", bad, rank)


def test_a_dead_rank_fails_the_step_and_the_engine_is_unhealthy(checkpoints, prompts):
    llm = LLM("llama", checkpoint=str(checkpoints["llama"]), overrides=TP2)
    assert llm.generate(prompts[:1], GREEDY)[0].error is None
    worker = llm.engine.executor.workers[0]
    worker.kill()
    worker.wait()
    out = llm.generate(prompts[:2], GREEDY)
    assert all(o.finish_reason == "error" for o in out)
    assert "rank 1" in out[0].error and "exited" in out[0].error
    assert not llm.engine.is_healthy


def test_an_idle_engine_outlives_the_collective_timeout(checkpoints, prompts, hf_reference):
    """The other ranks wait for the next step inside a collective that times out after
    engine.tp_timeout_s; rank 0's heartbeats keep an idle engine (a quiet server, a pause
    between generate calls) alive past it."""
    overrides = [*TP2, "engine.tp_timeout_s=2"]
    llm = LLM("llama", checkpoint=str(checkpoints["llama"]), overrides=overrides)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert llm.generate(prompts[:1], params)[0].error is None
    time.sleep(5)  # 2.5 timeouts idle
    out = llm.generate(prompts[:2], params)
    assert [o.token_ids for o in out] == [ref[:4] for ref, _ in hf_reference["llama"][:2]]
    assert llm.engine.is_healthy


def test_a_hung_rank_times_out_instead_of_hanging(checkpoints, prompts):
    llm = LLM(
        "llama", checkpoint=str(checkpoints["llama"]), overrides=[*TP2, "engine.tp_timeout_s=3"]
    )
    worker = llm.engine.executor.workers[0]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        out = llm.generate(prompts[:1], GREEDY)
        assert out[0].finish_reason == "error" and "tensor-parallel step failed" in out[0].error
        assert not llm.engine.is_healthy
    finally:
        os.kill(worker.pid, signal.SIGKILL)


TORCHRUN_SCRIPT = """
import json, sys
from modgen import LLM, SamplingParams
llm = LLM("llama", checkpoint=sys.argv[1], overrides=["engine.tensor_parallel=2"])
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=6, temperature=0))
print("TOKENS", json.dumps([o.token_ids for o in outs]))
"""


def _wait_all(procs: list[subprocess.Popen], outputs: list[Path], timeout_s: float) -> list[str]:
    """Every process's output (written to ``outputs``) once all have exited. When one fails,
    the others are killed (torchrun's agent whose workers succeeded waits 300 s at its exit
    barrier for a failed peer), and all outputs are printed whole: an assertion message is cut
    short."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    logs = [path.read_text() for path in outputs]
    if any(p.returncode != 0 for p in procs):
        for i, log in enumerate(logs):
            print(f"----- node {i} (exit {procs[i].returncode}) -----\n{log}")
    return logs


def test_torchrun_two_nodes_on_loopback(tmp_path, checkpoints, prompts, hf_reference):
    """``torchrun --nnodes=2 --nproc-per-node=1`` with its rendezvous on 127.0.0.1: rank 0 runs
    the engine, rank 1 (the other "node") serves its steps; the tokens are transformers'."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    port = free_port()
    torchrun = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"),
        *("--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tp-test"),
    ]
    args = [str(script), str(checkpoints["llama"]), json.dumps(prompts[:3])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    nodes = []
    for n, path in enumerate(outputs):
        with open(path, "w") as out:
            cmd = [*torchrun, f"--node-rank={n}", *args]
            nodes.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
    logs = _wait_all(nodes, outputs, timeout_s=240)
    assert [node.returncode for node in nodes] == [0, 0], "\n=====\n".join(logs)
    printed = [line for log in logs for line in log.splitlines() if "TOKENS" in line]
    assert len(printed) == 1, logs  # only rank 0 runs the engine's caller
    tokens = json.loads(printed[0].split("TOKENS", 1)[1])
    assert tokens == [ref[:6] for ref, _ in hf_reference["llama"][:3]]


LEAVE_SCRIPT = """
import os, torch
import torch.distributed as dist
from modgen.engine import parallel as par
par.init(0, 1, f"tcp://127.0.0.1:{par.free_port()}", torch.device("cpu"), 30)
import torch.distributed.nn.functional  # as transformers' FSDP glue does, on its first config
dist.broadcast_object_list([("stop", None)], src=0)
dist.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("GLOO THREADS", sum("gloo" in name for name in names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc/self/task")
def test_leaving_the_group_ends_its_threads_whatever_was_imported_meanwhile():
    """``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument when it
    is imported: imported while a group is live (transformers does, through its FSDP glue, on
    the first config it reads) it kept the group and its gloo threads alive after
    destroy_process_group, and a collective's last reference then died in a gloo thread while
    the interpreter finalized: the process aborted at exit (torchrun's rank 0, now and then).
    Joining the group imports it first, so leaving ends the threads."""
    run = subprocess.run(
        [sys.executable, "-c", LEAVE_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "GLOO THREADS 0" in run.stdout, run.stdout + run.stderr


def test_a_served_engine_whose_rank_dies_answers_503_and_exits_non_zero(checkpoints, tmp_path):
    """``task=serve engine.tensor_parallel=2``: it serves; once rank 1 is killed the request in
    flight gets a 500 naming the rank, /health is 503 and the server exits non-zero (so a
    supervisor, or the balancer of ``serve.replicas``, restarts it)."""
    import httpx
    from serve_utils import wait_until_serving

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        "task=serve", f"serve.port={port}", "model=llama", "engine.tensor_parallel=2",
        f"model.checkpoint={checkpoints['llama']}", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "modgen", *args], stdout=out, stderr=out)

    body = {"model": "llama", "prompt": [5, 6, 7], "max_tokens": 3}
    try:
        wait_until_serving(proc, url, log)
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children:  # the rank the server started
            os.kill(int(pid), signal.SIGKILL)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "rank 1" in r.json()["error"]["message"]
        with contextlib.suppress(httpx.TransportError):  # unless it has stopped listening
            assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0, log.read_text()
    assert "the executor cannot run steps any more: tensor-parallel rank 1" in log.read_text()
