"""Reliability benchmark (issue #27): a real draft/target/gateway stack on CPU under chaos
(kill -9 and restart), load, fuzzed requests and mid-stream cancellations; prints one table per
scenario and writes one JSON. Not part of `make test`.

    python benchmarks/reliability.py [--quick] [--scenarios chaos,load,fuzz,cancel] [--model DIR]
        [--rev HEAD] [--seed 0] [--out FILE]

--rev REV runs everything (services, client, reference) from `git archive REV` instead of the
working tree, so a half-edited checkout does not decide the numbers.
"""
import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import grpc

from pearl_runtime.client import generate, list_models, request_to_proto
from pearl_runtime.pb import gateway_pb2_grpc

from reliability_procs import ROOT, Stack, scrape, target_metrics, wait_serving

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_GAUGES = ("pearl:kv_cache_usage_perc", "pearl:num_requests_running", "pearl:num_requests_waiting")
PROMPTS = ["Write a short story about {}.", "Explain how {} works, step by step.", "List five facts about {}.",
           "Describe {} to a child.", "What is the history of {}?", "Give three tips about {}."]
TOPICS = ["the moon", "bread", "rivers", "chess", "a lighthouse", "volcanoes", "bees", "trains",
          "the ocean", "clocks", "music", "glaciers"]


# ---- helpers ----

def table(title: str, headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def token_prompts(model: str, n: int, rng: random.Random) -> list[list[int]]:
    """n chat-free prompts as token ids (the model's own tokenizer), varied by template and topic."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    texts = [rng.choice(PROMPTS).format(rng.choice(TOPICS)) + f" ({i})" for i in range(n)]
    return [tok.encode(t).ids for t in texts]


def reference_greedy(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Target-only greedy completions from the in-process engine: what every stream must equal."""
    import torch

    from pearl_runtime.config import EngineConfig
    from pearl_runtime.engine.llm_engine import LLMEngine
    from pearl_runtime.sampling import SamplingParams
    torch.set_num_threads(1)    # more threads on a small shared CPU only slow it down
    eng = LLMEngine(EngineConfig(model=model, num_blocks=2048), load_tok=False)
    return eng.generate([list(p) for p in prompts], [SamplingParams(max_tokens=max_tokens, ignore_eos=True)
                                                    for _ in prompts])


async def greedy(stack: Stack, prompt: list[int], max_tokens: int, on_delta=None, timeout_s=900.0):
    return await generate(stack.gateway.address, token_ids=prompt, max_tokens=max_tokens, ignore_eos=True,
                          temperature=0.0, on_delta=on_delta, timeout_s=timeout_s)


async def settle(stack: Stack, timeout_s: float = 60.0) -> dict:
    """Until the target has nothing running or waiting; its gauges then."""
    deadline = time.time() + timeout_s
    while True:
        g = scrape(stack.target, TARGET_GAUGES)
        if g["pearl:num_requests_running"] == 0 and g["pearl:num_requests_waiting"] == 0 or time.time() > deadline:
            return g
        await asyncio.sleep(0.1)


# ---- chaos: kill -9 draft and target mid-run, restart each ----

async def chaos(stack: Stack, prompts, refs, max_tokens: int, kills: list[str], rng: random.Random) -> dict:
    total = len(prompts) * max_tokens
    texts = [[] for _ in prompts]
    progress = {"tokens": 0, "last": 0.0}

    def on_delta(i):
        def f(text, ids):
            texts[i].append(text)
            progress["tokens"] += len(ids)
            progress["last"] = time.time()
        return f

    async def run_all():
        return await asyncio.gather(*(greedy(stack, p, max_tokens, on_delta(i)) for i, p in enumerate(prompts)),
                                    return_exceptions=True)

    # one kill per equal slot of [2%, 70%] of the tokens, so the last still finds streams running
    width = 0.68 / len(kills)
    plan = [(v, total * (0.02 + width * (i + rng.uniform(0, 0.8)))) for i, v in enumerate(kills)]
    requests = asyncio.create_task(run_all())
    events = []
    t0 = time.time()
    for victim, at_tokens in plan:
        while progress["tokens"] < at_tokens and not requests.done():
            await asyncio.sleep(0.02)
        if requests.done():
            events.append({"victim": victim, "skipped": "all requests had finished"})
            continue
        events.append(await kill_and_restart(stack, victim, progress))
        events[-1]["at_tokens"] = int(at_tokens)
    outs = await requests
    wall = time.time() - t0
    checks = []
    for i, out in enumerate(outs):
        if isinstance(out, BaseException):
            checks.append({"i": i, "ok": False, "error": repr(out)[:300]})
            continue
        checks.append({"i": i, "ok": out.token_ids == refs[i] and "".join(texts[i]) == out.text,
                       "equal_ar": out.token_ids == refs[i], "text_consistent": "".join(texts[i]) == out.text,
                       "tokens": len(out.token_ids), "finish": out.finish_reason})
    return {"requests": len(prompts), "max_tokens": max_tokens, "wall_s": round(wall, 2),
            "all_complete_equal_ar": all(c["ok"] for c in checks), "failed": [c for c in checks if not c["ok"]],
            "kills": events}


async def kill_and_restart(stack: Stack, victim: str, progress: dict) -> dict:
    """kill -9 `victim`, restart it on its port, and time its recovery from its readiness: the
    target's to the first new token on any stream, the draft's to the target's next speculative
    round (and to its link being up)."""
    svc = getattr(stack, victim)
    before = await target_metrics(stack.target)
    killed_at = time.time()
    svc.kill9()
    svc.start()
    ready = await wait_serving(svc)
    ev = {"victim": victim, "down_to_ready_s": round(ready - killed_at, 2)}
    if victim == "target":
        while progress["last"] < ready:
            await asyncio.sleep(0.01)
        ev["tokens_after_ready_s"] = round(progress["last"] - ready, 3)
        return ev
    base = (await target_metrics(stack.target)).speculative_rounds
    link = None
    deadline = ready + 60
    while time.time() < deadline:
        m = await target_metrics(stack.target)
        if link is None and m.draft_connected:
            link = time.time()
        if m.speculative_rounds > base:
            ev["speculation_after_ready_s"] = round(time.time() - ready, 3)
            break
        await asyncio.sleep(0.02)
    else:
        ev["speculation_after_ready_s"] = None
    ev["link_after_ready_s"] = None if link is None else round(link - ready, 3)
    ev["speculative_rounds_before_kill"] = before.speculative_rounds
    return ev


def chaos_table(r: dict) -> str:
    rows = []
    for e in r["kills"]:
        if "skipped" in e:
            rows.append([e["victim"], None, None, None, e["skipped"]])
            continue
        rec = e.get("tokens_after_ready_s", e.get("speculation_after_ready_s"))
        rows.append([e["victim"], e["at_tokens"], e["down_to_ready_s"], rec,
                     "pass" if rec is not None and rec <= 2.0 else "FAIL (> 2 s)"])
    head = (f"chaos: {r['requests']} greedy requests x {r['max_tokens']} tokens, {r['wall_s']} s; "
            f"all complete == ar, text intact: {r['all_complete_equal_ar']} ({len(r['failed'])} failed)")
    return table(head, ["kill -9", "at token", "kill->ready s", "recovery s", "bar 2 s"], rows) + (
        "recovery: target = its readiness -> the first new token on a stream; "
        "draft = its readiness -> the target's next speculative round\n")


# ---- load: N concurrent streams for a while ----

async def load(stack: Stack, concurrency: int, duration_s: float, prompts, max_tokens: int) -> dict:
    codes, ttfts = Counter(), []
    rss_start = stack.rss_mb()
    stop_at = time.time() + duration_s
    in_flight = {"n": 0}

    async def worker(w: int):
        await asyncio.sleep(w * 0.002)    # a ramp of a second at 500, not one burst
        k = 0
        while time.time() < stop_at:
            prompt, k = prompts[(w + k) % len(prompts)], k + 1
            t0, first = time.time(), []
            in_flight["n"] += 1
            try:
                await greedy(stack, prompt, max_tokens, lambda _t, _i: first or first.append(time.time()),
                             timeout_s=duration_s + 60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.1)
            finally:
                in_flight["n"] -= 1
                if first:
                    ttfts.append(first[0] - t0)

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(duration_s)
    cut = in_flight["n"]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    settled = await settle(stack)
    return {"concurrency": concurrency, "duration_s": duration_s, "max_tokens": max_tokens,
            "statuses": dict(codes), "cut_at_end": cut, "resource_exhausted": codes.get("RESOURCE_EXHAUSTED", 0),
            "ttft_s": {"n": len(ttfts), "p50": pct(ttfts, 0.5), "p99": pct(ttfts, 0.99)},
            "rss_mb_start": rss_start, "rss_mb_end": stack.rss_mb(), "alive": stack.alive(),
            "target_after": settled}


def load_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        errors = {k: v for k, v in r["statuses"].items() if k != "OK"}
        rss = " ".join(f"{k} {r['rss_mb_start'][k]}->{r['rss_mb_end'][k]}" for k in r["rss_mb_start"])
        rows.append([r["concurrency"], r["duration_s"], r["statuses"].get("OK", 0), errors or "none",
                     r["cut_at_end"], r["resource_exhausted"], r["ttft_s"]["p50"], r["ttft_s"]["p99"], rss])
    return table(f"load: greedy streams of {runs[0]['max_tokens']} tokens, closed loop (in-flight ones cut at "
                 "the end are not errors)",
                 ["streams", "s", "ok", "errors", "cut", "refused", "ttft p50", "ttft p99", "RSS MB start->end"],
                 rows)


# ---- fuzz: hypothesis requests over every field ----

async def fuzz(stack: Stack, n: int, seed: int, model_name: str, vocab: int, deadline_s: float,
               concurrency: int = 32) -> dict:
    import reliability_fuzz
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reqs = reliability_fuzz.requests(n, seed, vocab, model_name)
    codes, bad, details = Counter(), [], Counter()
    queue = iter(enumerate(reqs))

    async def worker(ch):
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for i, req in queue:
            try:
                async for _ in stub.Generate(request_to_proto(req), timeout=deadline_s):
                    pass
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    details[f"{e.code().name}: {(e.details() or '')[:120]}"] += 1
                if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and len(bad) < 50:
                    bad.append({"i": i, "status": e.code().name, "details": (e.details() or "")[:300],
                                "request": repr(req)[:600]})

    t0 = time.time()
    async with grpc.aio.insecure_channel(stack.gateway.address) as ch:
        await asyncio.gather(*(worker(ch) for _ in range(concurrency)))
    wall = time.time() - t0
    await settle(stack)
    return {"requests": n, "seed": seed, "deadline_s": deadline_s, "wall_s": round(wall, 1),
            "statuses": dict(codes), "internal": codes.get("INTERNAL", 0), "internal_or_unknown": bad,
            "internal_or_unknown_by_details": dict(details),
            "alive_after": stack.alive()}


def fuzz_table(r: dict) -> str:
    rows = [[k, v] for k, v in sorted(r["statuses"].items(), key=lambda kv: -kv[1])]
    head = (f"fuzz: {r['requests']} hypothesis requests (seed {r['seed']}, deadline {r['deadline_s']} s), "
            f"{r['wall_s']} s; INTERNAL {r['internal']}; all up after: {all(r['alive_after'].values())}; "
            f"a greedy request == ar after: {r.get('after_equal_ar')}")
    rows += [[f"  {k}", v] for k, v in r["internal_or_unknown_by_details"].items()]
    return table(head, ["status", "count"], rows)


# ---- cancel: streams cancelled mid-way, then the target's KV back to its baseline ----

async def cancel(stack: Stack, n: int, prompts, max_tokens: int, rng: random.Random) -> dict:
    baseline = await settle(stack)
    cut_at = [rng.randrange(0, max_tokens // 2) for _ in range(n)]

    async def one(i: int):
        got, reached = [0], asyncio.Event()

        def on_delta(_t, ids):
            got[0] += len(ids)
            if got[0] >= cut_at[i]:
                reached.set()
        if cut_at[i] == 0:    # before its first token: after a random moment instead
            asyncio.get_running_loop().call_later(rng.uniform(0, 1.0), reached.set)
        call = asyncio.create_task(greedy(stack, prompts[i % len(prompts)], max_tokens, on_delta, timeout_s=300))
        waiter = asyncio.create_task(reached.wait())
        await asyncio.wait([call, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if call.done():
            return "finished" if not call.exception() else call.exception().code().name
        call.cancel()    # cancels the gRPC call on the client side
        await asyncio.gather(call, return_exceptions=True)
        return "cancelled"

    t0 = time.time()
    outcomes = Counter(await asyncio.gather(*(one(i) for i in range(n))))
    cancelled_at = time.time()
    trace = []
    while True:
        g = scrape(stack.target, TARGET_GAUGES)
        trace.append(g)
        back = (g["pearl:num_requests_running"] == baseline["pearl:num_requests_running"]
                and g["pearl:num_requests_waiting"] == baseline["pearl:num_requests_waiting"]
                and g["pearl:kv_cache_usage_perc"] <= baseline["pearl:kv_cache_usage_perc"] + 1e-9)
        if back or time.time() - cancelled_at > 30:
            break
        await asyncio.sleep(0.05)
    return {"streams": n, "max_tokens": max_tokens, "wall_s": round(cancelled_at - t0, 1),
            "outcomes": dict(outcomes), "baseline": baseline, "after": g, "back_to_baseline": back,
            "back_after_s": round(time.time() - cancelled_at, 2), "peak_kv": max(
                t["pearl:kv_cache_usage_perc"] for t in trace)}


def cancel_table(r: dict) -> str:
    rows = [[k.removeprefix("pearl:"), r["baseline"][k], r["after"][k]] for k in TARGET_GAUGES]
    head = (f"cancel: {r['streams']} streams cancelled at random points ({r['outcomes']}), {r['wall_s']} s; "
            f"back to baseline: {r['back_to_baseline']} after {r['back_after_s']} s")
    return table(head, ["target gauge", "baseline", "after"], rows)


# ---- the run ----

def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "nproc": os.cpu_count(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def git_commit() -> dict:
    rev = os.environ.get("RELIABILITY_REV")
    if rev:
        return {"commit": rev, "tree": "git archive of the commit"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split("\n")
    return {"commit": head, "tree": "working tree", "modified": [l[3:] for l in dirty if l.strip()]}


def snapshot_and_reexec(rev: str) -> None:
    """Re-run this command from `git archive rev`: its pearl_runtime first on the path, and the
    services' cwd (reliability_procs.ROOT follows pearl_runtime)."""
    here = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "rev-parse", rev], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"pearl-{sha[:8]}-"))
    archive = subprocess.run(["git", "archive", sha], cwd=here, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    argv = [a for i, a in enumerate(sys.argv) if a != "--rev" and (i == 0 or sys.argv[i - 1] != "--rev")]
    env = {**os.environ, "PYTHONPATH": str(tree), "RELIABILITY_REV": sha}
    print(f"running from {tree} (git archive {sha})", flush=True)
    os.execve(sys.executable, [sys.executable, *argv], env)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="chaos,load,fuzz,cancel")
    p.add_argument("--quick", action="store_true", help="a short smoke version (~2 minutes)")
    p.add_argument("--model", default=None, help="target model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--draft-model", default=None, help="default: the draft derived from --model")
    p.add_argument("--rev", default=None, help="run from `git archive REV` instead of the working tree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<date>_cpu_reliability_<commit>.json)")
    p.add_argument("--log-dir", default=None, help="the services' logs (default: a temp dir)")
    return p.parse_args(argv)


def sizes(quick: bool) -> dict:
    if quick:
        return dict(chaos_requests=8, chaos_tokens=96, kills=["draft", "target"], load=[(50, 10.0)],
                    load_tokens=8, fuzz=150, cancel=16, cancel_tokens=32)
    return dict(chaos_requests=32, chaos_tokens=128, kills=["draft"] * 3 + ["target"] * 2,
                load=[(200, 60.0), (500, 60.0)], load_tokens=16, fuzz=2000, cancel=100, cancel_tokens=48)


async def run(args, model: str, draft: str, log_dir: Path) -> dict:
    rng = random.Random(args.seed)
    size, scenarios = sizes(args.quick), args.scenarios.split(",")
    prompts = token_prompts(model, max(size["chaos_requests"], 64), rng)
    check_prompt = prompts[0]
    chaos_prompts = prompts[:size["chaos_requests"]]   # the first is also fuzz's check afterwards
    t0 = time.time()
    refs = reference_greedy(model, chaos_prompts if "chaos" in scenarios else [check_prompt], size["chaos_tokens"])
    print(f"ar reference: {len(refs)} x {size['chaos_tokens']} tokens in {time.time() - t0:.1f} s", flush=True)
    stack = Stack(model, draft, log_dir)
    results = {}
    try:
        t0 = time.time()
        await stack.start()
        print(f"stack up in {time.time() - t0:.1f} s (logs: {log_dir})", flush=True)
        for name in scenarios:
            t0 = time.time()
            if name == "chaos":
                kills = list(size["kills"])
                rng.shuffle(kills)
                r = await chaos(stack, chaos_prompts, refs, size["chaos_tokens"], kills, rng)
                out = chaos_table(r)
            elif name == "load":
                runs = [await load(stack, c, d, prompts, size["load_tokens"]) for c, d in size["load"]]
                r, out = {"runs": runs}, load_table(runs)
            elif name == "fuzz":
                served = (await list_models(stack.gateway.address))[0]
                r = await fuzz(stack, size["fuzz"], args.seed, served, vocab_size(model), deadline_s=2.0)
                after = await greedy(stack, check_prompt, size["chaos_tokens"], timeout_s=300)
                r["after_equal_ar"] = after.token_ids == refs[0]
                r["alive_after"] = stack.alive()
                out = fuzz_table(r)
            elif name == "cancel":
                r = await cancel(stack, size["cancel"], prompts, size["cancel_tokens"], rng)
                out = cancel_table(r)
            else:
                raise SystemExit(f"unknown scenario {name!r} (chaos, load, fuzz, cancel)")
            r["scenario_s"] = round(time.time() - t0, 1)
            results[name] = r
            print("\n" + out, flush=True)
    finally:
        stack.stop()
    results["logs"] = str(log_dir)
    return results


def vocab_size(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rev:
        snapshot_and_reexec(args.rev)
    from pearl_runtime.models.default_model import default_draft, default_model
    model = args.model or default_model()
    draft = args.draft_model or default_draft(model)
    date = datetime.datetime.now(datetime.timezone.utc)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pearl-reliability-"))
    results = asyncio.run(run(args, model, draft, log_dir))
    git = git_commit()
    # the commit in the name: a second run on one day keeps the first's record
    name = f"{date:%Y-%m-%d}_cpu_reliability{'_quick' if args.quick else ''}_{str(git.get('commit') or 'nogit')[:7]}"
    out = Path(args.out or RESULTS / f"{name}.json")
    record = {"schema": "pearl-reliability/1", "date": date.isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "machine": machine(), "git": git,
              "model": model, "draft_model": draft, "quick": args.quick, "seed": args.seed,
              "synthetic": "nothing: the real embedded SmolLM2-135M-Instruct and its int4-derived draft; "
                           "prompts are generated templates, fuzz requests are hypothesis-generated",
              "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
