"""Per-round host + transport overhead of sd and pearl rounds, measured on CPU.

Starts the real draft and target services (child processes, `python -m pearl_runtime.cli`)
on a tiny random-weight pair (tests/tiny_models.py: 2 layers, hidden 64), so model time is
small and what is left of a round is our own Python and gRPC. Talks to the target's Serve
stream directly (no gateway: one process less on a small CPU), diffs the target's Metrics
around each batch and prints per-round averages:

    round   target's wall time of a round
    draft   the draft's own time for the round (DraftBatch.draft_ms)
    target  the target's forward
    wait    target idle waiting for the draft batch
    xfer    exchange - draft: the draft round trip beyond the draft's own time
    out     of xfer: the round written -> off the draft's stream
    back    of xfer: the batch handed to the draft's stream -> read by the target
    host    round - target - wait: the target's own host work nothing overlaps

    .venv/bin/python scripts/round_overhead.py --repeats 3
    .venv/bin/python scripts/round_overhead.py --profile /tmp/prof   # cProfile both services

With --profile every service thread runs under cProfile (one .prof file per thread, written
when the service stops); the script prints the top functions of each.
"""
import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from pearl_runtime.pb import common_pb2, target_pb2, target_pb2_grpc  # noqa: E402
from pearl_runtime.rpc.server import GRPC_OPTIONS  # noqa: E402
from tests.services.procs import Service  # noqa: E402

COUNTERS = ("rounds", "speculative_rounds", "draft_ms", "target_ms", "wait_ms", "exchange_ms", "round_ms",
            "committed_tokens", "head_start_rounds", "xfer_out_ms", "xfer_back_ms", "xfer_rounds")


def child(out_prefix: str, argv: list[str]) -> None:
    """Run one service under cProfile in every thread; dump on exit (SIGTERM ends it cleanly)."""
    import cProfile
    import threading
    profiles = []

    def start(frame, event, arg):   # first event in a new thread: swap in a real profiler
        p = cProfile.Profile()
        profiles.append((threading.current_thread().name, p))
        p.enable()

    threading.setprofile(start)
    main = cProfile.Profile()
    profiles.append(("main", main))
    from pearl_runtime.cli import main as cli_main
    main.enable()
    try:
        cli_main(argv)
    finally:
        for name, p in profiles:
            p.disable()
            p.dump_stats(f"{out_prefix}.{name}.prof")


def build_models(root: Path, kind: str) -> tuple[Path, Path]:
    from tests.tiny_models import derive_draft, make_tiny_model
    target = make_tiny_model(root / "target", "llama", seed=0)
    return target, derive_draft(target, root / f"draft-{kind}", kind)


def service(kind: str, args: list[str], log_dir: Path, name: str, profile: str | None) -> Service:
    """tests/services/procs.Service, under cProfile when asked (the same argv after the program)."""
    svc = Service(kind, args, log_dir, name, log_level="info" if kind == "draft" else "warning")
    if profile:
        svc.argv = [sys.executable, __file__, "--child", f"{profile}.{kind}", "--", *svc.argv[3:]]
    return svc


async def metrics(stub) -> dict:
    m = await stub.Metrics(target_pb2.MetricsRequest(), timeout=10)
    return {k: getattr(m, k) for k in COUNTERS} | {"draft_connected": m.draft_connected}


async def generate(stub, prompts: list[list[int]], max_tokens: int, tag: str) -> list[list[int]]:
    """All prompts at once on one Serve stream; returns each completion's tokens."""
    out = {f"{tag}-{i}": [] for i in range(len(prompts))}
    params = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    submit = target_pb2.TargetIn(submit=target_pb2.SubmitBatch(items=[
        target_pb2.Submission(request_id=rid, prompt_ids=p, params=params) for rid, p in zip(out, prompts)]))
    done = 0
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(submit)

    async def requests():
        while (msg := await queue.get()) is not None:
            yield msg

    call = stub.Serve(requests())
    async for msg in call:
        for u in msg.tokens.updates:
            if u.error:
                raise RuntimeError(f"{u.request_id}: {u.error}")
            out[u.request_id] += u.token_ids
            done += u.finish_reason != 0
        if done == len(prompts):
            break
    queue.put_nowait(None)
    call.cancel()
    return list(out.values())


def prompts_for(bs: int, length: int = 24) -> list[list[int]]:
    # varied but fixed prompts over the byte tokens of the tiny tokenizer
    return [[(7 * i + 13 * j + 40) % 250 + 3 for j in range(length)] for i in range(bs)]


async def measure_mode(address: str, batch_sizes: list[int], max_tokens: int, repeats: int) -> dict:
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        stub = target_pb2_grpc.TargetStub(ch)
        deadline = time.time() + 60
        while not (await metrics(stub))["draft_connected"]:   # the target dials the draft on its own
            if time.time() > deadline:
                raise RuntimeError("the target never connected to its draft")
            await asyncio.sleep(0.1)
        rows = {}
        for bs in batch_sizes:
            await generate(stub, prompts_for(bs), 16, f"warm{bs}")
            runs, outputs = [], None
            for r in range(repeats):
                before = await metrics(stub)
                toks = await generate(stub, prompts_for(bs), max_tokens, f"b{bs}r{r}")
                after = await metrics(stub)
                d = {k: after[k] - before[k] for k in COUNTERS}
                if d["speculative_rounds"] != d["rounds"]:
                    raise RuntimeError(f"bs={bs}: {d['rounds'] - d['speculative_rounds']} rounds ran without the draft")
                n = d["rounds"]
                runs.append({"round": d["round_ms"] / n, "draft": d["draft_ms"] / n, "target": d["target_ms"] / n,
                             "wait": d["wait_ms"] / n, "xfer": (d["exchange_ms"] - d["draft_ms"]) / n,
                             # its two hops (the draft's stamps): round out, batch back
                             "out": d["xfer_out_ms"] / max(1, d["xfer_rounds"]),
                             "back": d["xfer_back_ms"] / max(1, d["xfer_rounds"]),
                             "host": (d["round_ms"] - d["target_ms"] - d["wait_ms"]) / n,
                             "tok/rnd": d["committed_tokens"] / n, "head%": 100 * d["head_start_rounds"] / n,
                             "rounds": n})
                outputs = outputs or toks
                assert toks == outputs, "greedy outputs differ between repeats"
            rows[bs] = (runs, outputs)
        return rows


COLS = ("round", "draft", "target", "wait", "xfer", "out", "back", "host", "tok/rnd", "head%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="sd,pearl")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--draft-kind", default="perturbed", choices=("copy", "perturbed"),
                   help="copy: every draft token accepted; perturbed: ~70%% greedy agreement")
    p.add_argument("--profile", metavar="PREFIX", help="cProfile every service thread to PREFIX.<svc>.<thread>.prof")
    p.add_argument("--top", type=int, default=25, help="--profile: functions listed per thread")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        tmp = Path(tmp)
        target_dir, draft_dir = build_models(tmp, args.draft_kind)
        engine = ["--kv-cache-gb", "0.05", "--threads", "1"]
        for mode in args.modes.split(","):
            prof = f"{args.profile}.{mode}" if args.profile else None
            draft = service("draft", ["--model", str(draft_dir), *engine], tmp, f"draft-{mode}", prof)
            target = service("target", ["--model", str(target_dir), *engine, "--mode", mode, "--gamma",
                                        str(args.gamma), "--draft", draft.address], tmp, f"target-{mode}", prof)
            try:
                for svc in (draft, target):
                    svc.start().wait_listening(time.time() + 120)
                results[mode] = asyncio.run(measure_mode(target.address, batch_sizes, args.max_tokens,
                                                         args.repeats))
            finally:
                for svc in (target, draft):   # SIGTERM: a profiled service dumps its stats on the way out
                    svc.kill(signal.SIGTERM, timeout_s=20)
    print(f"\nper round, ms (mean over {args.repeats} runs of {args.max_tokens} tokens a request; "
          f"[min-max] of the runs); gamma {args.gamma}, draft {args.draft_kind}")
    print(f"{'mode':6} {'bs':>3} {'rounds':>6} " + " ".join(f"{c:>15}" for c in COLS))
    for mode, rows in results.items():
        for bs, (runs, outputs) in rows.items():
            cells = []
            for c in COLS:
                vals = [r[c] for r in runs]
                cells.append(f"{statistics.fmean(vals):6.3f} [{min(vals):.2f}-{max(vals):.2f}]"
                             if c not in ("tok/rnd", "head%") else f"{statistics.fmean(vals):15.2f}")
            print(f"{mode:6} {bs:>3} {runs[0]['rounds']:>6} " + " ".join(f"{c:>15}" for c in cells))
    outs = {(m, bs): o for m, rows in results.items() for bs, (_, o) in rows.items()}
    for bs in batch_sizes:   # lossless: every mode commits the same greedy tokens
        same = {repr(o) for (m, b), o in outs.items() if b == bs}
        print(f"bs={bs}: outputs identical across modes: {len(same) == 1}")
    if args.profile:
        import glob
        import pstats
        for path in sorted(glob.glob(f"{args.profile}.*.prof")):
            st = pstats.Stats(path)
            if st.total_tt < 0.5:
                continue
            print(f"\n=== {path} ({st.total_tt:.2f} s)")
            st.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
