"""Soak test of ``task=serve`` (never part of CI): mixed traffic for a while, then a check that
nothing is left behind.

Starts the server on the peers' 57M Mistral checkpoint (experiments/peers/make_checkpoint.py)
and sends, from concurrent clients: completions and chat requests whole and streamed, streams
that the client aborts part-way, bad requests (the ones of issue 10, huge and malformed bodies),
and bursts beyond ``serve.max_queued``. Every few seconds it samples the server's KV blocks in
use, running and waiting requests (from /metrics) and its resident memory (/proc). At the end it
reports whether KV use and running requests came back to zero, whether memory grew after the
warm-up, and whether every accepted request finished or was aborted by its client.

    python benchmarks/soak.py --minutes 10 --out results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "{% for m in messages %}{{ m.content }} {% endfor %}"
MAX_QUEUED = 24
BAD = [  # (body, expected status); the first four once stopped the engine loop for good
    ({"seed": 18446744073709551616}, 400),
    ({"seed": 18446744073709551615, "n": 2}, 400),
    ({"top_k": 9223372036854775808}, 200),
    ({"min_tokens": 1, "stop_token_ids": [999999]}, 400),
    ({"max_tokens": 10**9}, 400),
    ({"temperature": float("inf")}, 400),
    ({"prompt": [1.5]}, 400),
    ({"prompt": [5, 32000]}, 400),
    ({"prompt": "t5 " * 1_700_000}, 400),  # 5 MB: refused before tokenizing
    ({"prompt": "t5 " * 6_000_000}, 413),  # 18 MB: beyond serve.max_body_mb
    ({"n": 0}, 400),
    ({"stop": [""]}, 400),
    ({"bogus": 1}, 400),
]


class Tally:
    """What the clients saw."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.accepted_choices = 0
        self.problems: list[str] = []

    def problem(self, what: str) -> None:
        self.counts["problem"] += 1
        if len(self.problems) < 20:
            self.problems.append(what)


def prompt(rng: random.Random) -> list[int] | str:
    n = rng.randint(16, 512)
    if rng.random() < 0.5:
        return [rng.randrange(3, 32000) for _ in range(n)]
    return " ".join(f"t{rng.randrange(3, 32000)}" for _ in range(n))


def body(rng: random.Random, stream: bool, chat: bool = False) -> dict:
    b = {"model": "mistral", "max_tokens": rng.randint(8, 96), "stream": stream,
         "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(2**63)}  # fmt: skip
    if rng.random() < 0.2:
        b["n"] = rng.randint(2, 3)
    if chat:
        text = " ".join(f"t{rng.randrange(3, 32000)}" for _ in range(rng.randint(16, 256)))
        b["messages"] = [{"role": "user", "content": text}]
    else:
        b["prompt"] = prompt(rng)
    return b


async def whole(http: httpx.AsyncClient, t: Tally, b: dict, chat: bool) -> None:
    r = await http.post("/v1/chat/completions" if chat else "/v1/completions", json=b)
    if r.status_code == 429:
        t.counts["429"] += 1
        return
    if r.status_code != 200:
        t.problem(f"whole: {r.status_code} {r.text[:200]}")
        return
    choices = r.json()["choices"]
    t.accepted_choices += len(choices)
    if all(c["finish_reason"] in ("length", "stop") for c in choices):
        t.counts["finished"] += len(choices)
    else:
        t.problem(f"whole: finish reasons {[c['finish_reason'] for c in choices]}")


async def stream(http: httpx.AsyncClient, t: Tally, b: dict, chat: bool, abort_after: int) -> None:
    """A streamed request read to the end, or closed after ``abort_after`` events (if > 0)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with http.stream("POST", path, json=b) as r:
        if r.status_code == 429:
            t.counts["429"] += 1
            return
        if r.status_code != 200:
            t.problem(f"stream: {r.status_code} {(await r.aread())[:200]!r}")
            return
        n = b.get("n", 1)
        t.accepted_choices += n
        events, reasons, done = 0, {}, False
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            data = json.loads(line[6:])
            if "error" in data:
                t.problem(f"stream error event: {line[:200]}")
                return
            for c in data["choices"]:
                if c.get("finish_reason"):
                    reasons[c["index"]] = c["finish_reason"]
            events += 1
            if 0 < abort_after <= events:
                t.counts["aborted by client"] += n - len(reasons)
                t.counts["finished"] += len(reasons)
                return  # leaving the block closes the connection: the server aborts the rest
    if done and len(reasons) == n and set(reasons.values()) <= {"length", "stop"}:
        t.counts["finished"] += n
    else:
        t.problem(f"stream ended without all finish reasons: {reasons}, done={done}")


async def bad(http: httpx.AsyncClient, t: Tally, rng: random.Random) -> None:
    extra, want = rng.choice(BAD)
    b = {"model": "mistral", "prompt": "t5 t6", "max_tokens": 2, **extra}
    content = json.dumps(b).encode() if rng.random() < 0.9 else b'{"model": "mistral", "pro'
    want = want if content.endswith(b"}") else 400
    try:
        r = await http.post("/v1/completions", content=content,
                            headers={"content-type": "application/json"})  # fmt: skip
    except httpx.TransportError:
        if want != 413:
            raise
        # answered 413 from its Content-Length and closed the connection while the client was
        # still sending: httpx then reports a read or write error instead of the answer
        t.counts["bad -> 413 (closed while sending)"] += 1
        return
    t.counts[f"bad -> {r.status_code}"] += 1
    if r.status_code == 200:
        t.accepted_choices += 1
        t.counts["finished"] += 1
    if r.status_code != want:
        t.problem(f"bad {str(extra)[:80]}: {r.status_code}, expected {want}")


async def burst(http: httpx.AsyncClient, t: Tally, rng: random.Random) -> None:
    """More short requests at once than the server queues: some get 429, the rest finish."""
    bodies = [{"model": "mistral", "prompt": [rng.randrange(3, 32000) for _ in range(16)],
               "max_tokens": 4, "temperature": 0} for _ in range(2 * MAX_QUEUED)]  # fmt: skip
    await asyncio.gather(*(whole(http, t, b, chat=False) for b in bodies))
    t.counts["bursts"] += 1


async def client(url: str, t: Tally, seed: int, deadline: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < deadline:
            roll = rng.random()
            chat = rng.random() < 0.3
            try:
                if roll < 0.35:
                    await stream(http, t, body(rng, True, chat), chat, abort_after=0)
                elif roll < 0.55:
                    b = body(rng, True, chat)
                    await stream(http, t, b, chat, abort_after=rng.randint(1, 6))
                elif roll < 0.80:
                    await whole(http, t, body(rng, False, chat), chat)
                elif roll < 0.97:
                    await bad(http, t, rng)
                else:
                    await burst(http, t, rng)
            except httpx.HTTPError as exc:
                t.problem(f"client error: {type(exc).__name__}: {exc}")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("modgen_kv_cache_used_blocks", "modgen_num_requests_running",
                 "modgen_num_requests_waiting"):  # fmt: skip
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        out[name] = float(m.group(1)) if m else float("nan")
    for m in re.finditer(r'^modgen_requests_finished_total\{finish_reason="(\w+)"\} (\S+)$',
                         text, re.MULTILINE):  # fmt: skip
        out[f"finished_{m.group(1)}"] = float(m.group(2))
    return out


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def sampler(url: str, pid: int, t0: float, samples: list[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        row = await asyncio.to_thread(scrape, url)
        samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(pid), **row})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0)


def start_server(ckpt: Path, out: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable, "-m", "modgen", "task=serve", "model=mistral",
        f"model.checkpoint={ckpt}", "+scheduler=splitfuse", f"serve.port={port}",
        f"serve.max_queued={MAX_QUEUED}", f"serve.chat_template='{TEMPLATE}'",
        f"hydra.run.dir={out / 'server'}",
    ]  # fmt: skip
    log = open(out / "server.log", "w")  # noqa: SIM115 (the server writes it until the end)
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: see {out / 'server.log'}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


async def soak(url: str, pid: int, minutes: float, clients: int) -> tuple[Tally, list[dict]]:
    t, samples, stop = Tally(), [], asyncio.Event()
    t0 = time.monotonic()
    watch = asyncio.create_task(sampler(url, pid, t0, samples, stop))
    deadline = t0 + minutes * 60
    await asyncio.gather(*(client(url, t, seed, deadline) for seed in range(clients)))
    await asyncio.sleep(3.0)  # aborts are applied at the next step boundary
    stop.set()
    await watch
    samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(pid), **scrape(url)})
    return t, samples


def summarize(t: Tally, samples: list[dict], warmup_s: float) -> dict:
    end = samples[-1]
    after = [s for s in samples if s["t"] >= warmup_s]
    slope = 0.0
    if len(after) > 2:  # least squares, MB per minute
        mt = sum(s["t"] for s in after) / len(after)
        mr = sum(s["rss_mb"] for s in after) / len(after)
        num = sum((s["t"] - mt) * (s["rss_mb"] - mr) for s in after)
        slope = 60 * num / sum((s["t"] - mt) ** 2 for s in after)
    server_ended = sum(v for k, v in end.items() if k.startswith("finished_"))
    return {
        "client": dict(t.counts),
        "accepted choices (client)": t.accepted_choices,
        "ended requests by reason (server)": {k[9:]: v for k, v in end.items() if "finished_" in k},
        "every accepted request finished or was aborted by its client": (
            t.counts["problem"] == 0 and server_ended == t.accepted_choices
            and end.get("finished_error", 0) == 0
        ),
        "kv blocks used / running / waiting at the end": [
            end["modgen_kv_cache_used_blocks"], end["modgen_num_requests_running"],
            end["modgen_num_requests_waiting"],
        ],
        "peak kv blocks used / running": [
            max(s["modgen_kv_cache_used_blocks"] for s in samples),
            max(s["modgen_num_requests_running"] for s in samples),
        ],
        "rss MB at warm-up end / max after / end": [
            after[0]["rss_mb"] if after else None,
            max(s["rss_mb"] for s in after) if after else None, end["rss_mb"],
        ],
        "rss slope after warm-up (MB/min)": round(slope, 2),
        "problems": t.problems,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup-minutes", type=float, default=2.0)
    ap.add_argument("--checkpoint", type=Path, help="default: the peers' 57M checkpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "soak")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint
    if ckpt is None:
        sys.path.insert(0, str(ROOT / "experiments" / "peers"))
        from make_checkpoint import make

        ckpt = make(args.out / "mistral-57m")
    proc, url = start_server(ckpt, args.out)
    try:
        t, samples = asyncio.run(soak(url, proc.pid, args.minutes, args.clients))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    summary = summarize(t, samples, args.warmup_minutes * 60)
    summary["server exit code after SIGTERM"] = code
    (args.out / "samples.json").write_text(json.dumps(samples, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
