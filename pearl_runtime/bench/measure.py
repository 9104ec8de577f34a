"""One measurement: batches of `bs` requests at once through the gateway, one batch after
another (so a small batch size still covers several prompts: at bs=1 a single 128-token
stream decides the acceptance, and bf16 near-ties pick which stream), the target's round
counters read before and after, turned into the columns of the bench table.

Columns (per batch size; "a round" is one batched target forward, Metrics diff / rounds):
- tokens_per_s: tokens / wall, wall = the sum over batches of first submit to last final message.
- mat: mean accepted tokens, per sequence: committed tokens / target forwards that
  sequence took part in (1.0 for ar). tokens_per_round is the same over the batch.
- accept_rate: draft tokens accepted / draft tokens judged (each round judges the pending
  tokens plus the first fresh one in PEARL, the gamma fresh ones in sd; positions after the
  first rejection count as judged and rejected).
- round_ms: the target's wall time of a round, from scheduling to handing the committed
  tokens to the gateway stream.
- draft_ms: the draft service's time for the round as it reports it: apply the verdicts,
  gamma draft steps, encode the batch (0 in ar).
- target_ms: the target's forward, including the device synchronize.
- wait_ms: pearl: time the target sat idle after its forward until the draft's batch came
  (0 when the draft was first); sd: the whole draft round trip (send the round, receive the
  batch), i.e. draft_ms + transport; ar: 0.
- host_ms = round - target - wait: the target's own host work per round (scheduling, building
  the round message, judging, committing, streaming, the hop to the forward thread) that
  nothing overlaps. In PEARL the draft exchange runs during the forward, so its transport is
  hidden there or shows up in wait_ms.
- sd with the drafts left on the device (TargetMetrics.device_token_rounds): draft_ms is the
  draft's device time (its steps run on after it replies; reported a round late), xfer_ms the
  two hops (out + back), host_ms = round - draft - target - xfer: host work and the GPU's idle
  gaps between draft and verify.
- xfer_ms = exchange - draft: the draft round trip's transport (gRPC, serialization, the
  draft's event loop) beyond the draft's own time, per round. exchange is the time from
  sending the round to receiving the draft's batch; in sd it equals wait, in PEARL it runs
  beside the forward, so this transport costs a round only where it shows up in wait_ms.
  xfer_share = xfer / round.
- ttft_ms: time to first token of each request (gateway stats): mean, p50, max.
- gamma: the mean draft tokens a sequence of the row's speculative rounds, rounded (gamma_mean
  unrounded); gamma_by_batch: auto gamma's picks per batch bucket after the row.
- decode_tokens_per_s: tokens after each request's first / (wall - the latest first token of
  each batch): the rate once every request of a batch is decoding. With short outputs the start
  (prefill, and in sd the draft's prefill before the target's) is a large share of the wall
  time; this column leaves it out. tokens_per_s stays the headline.
- full_batch_tokens_per_s: the rate while every request of a batch is decoding, from its
  latest first token to its earliest last token (per batch, summed). Speculative rounds
  commit a varying number of tokens, so the requests of a batch finish rounds apart and the
  last rounds run a smaller batch (at batch 8, 128 tokens and MAT ~5, the slowest of 8
  requests needs ~19% more rounds than the mean one, by the round model); ar's requests
  finish together. This column keeps the batch at the size the row is named after, as in
  steady serving, where a finished request's slot goes to the next one.
"""
import asyncio
from collections import Counter
import hashlib
import statistics
import time

import grpc

from pearl_runtime.pb import target_pb2, target_pb2_grpc
from pearl_runtime.bench.projection import acceptance_by_position
from pearl_runtime.rpc.security import token_metadata
from pearl_runtime.rpc.server import GRPC_OPTIONS

COUNTERS = ("rounds", "speculative_rounds", "draft_ms", "target_ms", "wait_ms", "exchange_ms", "round_ms",
            "committed_tokens", "drafted_tokens", "accepted_tokens", "head_start_rounds", "gamma_sum",
            "xfer_out_ms", "xfer_back_ms", "xfer_rounds", "device_token_rounds")


class BenchError(RuntimeError):
    pass


async def read_metrics(target_address: str, timeout_s: float = 10.0,
                       auth_token: str | None = None) -> target_pb2.TargetMetrics:
    async with grpc.aio.insecure_channel(target_address, options=GRPC_OPTIONS) as ch:
        return await target_pb2_grpc.TargetStub(ch).Metrics(target_pb2.MetricsRequest(), timeout=timeout_s,
                                                             metadata=token_metadata(auth_token))


def diff(after: target_pb2.TargetMetrics, before: target_pb2.TargetMetrics) -> dict:
    d = {k: getattr(after, k) - getattr(before, k) for k in COUNTERS}
    d.update(path=after.path, gamma=after.gamma, gamma_by_batch=dict(after.gamma_by_batch),
             policy={"head_start": after.head_start, "head_start_quorum": round(after.head_start_quorum, 4),
                     "auto_gamma": after.auto_gamma},
             verify_times=[[v.batch, v.query, v.ms] for v in after.verify_times])
    runs = Counter({(r.judged, r.accepted): r.count for r in after.judged_runs})
    runs.subtract({(r.judged, r.accepted): r.count for r in before.judged_runs})
    d["judged_runs"] = sorted([j, a, c] for (j, a), c in runs.items() if c > 0)
    return d


async def submit_batch(address: str, prompts: list[list[int]], max_tokens: int, timeout_s: float,
                       temperature: float = 0.0) -> tuple[list, float, list]:
    """All prompts at once over one channel; returns (completions, wall seconds, arrivals):
    arrivals[i] lists (seconds since the submit, tokens) of each delta request i received."""
    from pearl_runtime.client import generate
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        await asyncio.wait_for(ch.channel_ready(), timeout_s)
        t0 = time.perf_counter()

        def note(i):
            return lambda text, ids: arrivals[i].append((time.perf_counter() - t0, len(ids)))
        done = await asyncio.gather(*(generate(address, token_ids=p, max_tokens=max_tokens, ignore_eos=True,
                                               temperature=temperature, seed=i if temperature else None,
                                               timeout_s=timeout_s, channel=ch, on_delta=note(i))
                                      for i, p in enumerate(prompts)))
        return list(done), time.perf_counter() - t0, arrivals


async def measure(gateway: str, target: str, batches: list[list[list[int]]], max_tokens: int, mode: str,
                  temperature: float = 0.0, timeout_s: float = 1800.0) -> dict:
    """Batches of one size, one after another: Metrics, submit each and wait for all of it,
    Metrics; the row of the bench table."""
    before = await read_metrics(target)
    runs = [await submit_batch(gateway, b, max_tokens, timeout_s, temperature) for b in batches]
    m = diff(await read_metrics(target), before)
    bs = len(batches[0])
    completions = [c for done, _, _ in runs for c in done]
    tokens = sum(len(c.token_ids) for c in completions)
    short = [(i, len(c.token_ids), c.finish_reason) for i, c in enumerate(completions)
             if len(c.token_ids) != max_tokens or c.stats.new_tokens != max_tokens]
    if short:
        raise BenchError(f"{mode} bs={bs}: not every request generated exactly max_tokens={max_tokens} tokens "
                         f"(index, tokens, finish): {short[:5]}")
    if m["committed_tokens"] != tokens:
        raise BenchError(f"{mode} bs={bs}: the target committed {m['committed_tokens']} tokens, the clients "
                         f"received {tokens} (another client on this target?)")
    if mode not in ("ar", "auto") and m["speculative_rounds"] != m["rounds"]:   # auto serves ar by choice
        raise BenchError(f"{mode} bs={bs}: {m['rounds'] - m['speculative_rounds']} of {m['rounds']} rounds ran "
                         f"without the draft (the draft link dropped; see the service logs)")
    return row(mode, bs, max_tokens, runs, m)


def full_batch_rate(runs: list[tuple[list, float, list]]) -> float | None:
    """Tokens per second over the windows where every request of a batch is decoding: from
    the batch's latest first token to its earliest last token (see the module docstring)."""
    tokens, seconds = 0, 0.0
    for _, _, arrivals in runs:
        start = max(a[0][0] for a in arrivals)
        end = min(a[-1][0] for a in arrivals)
        if end > start:
            tokens += sum(n for a in arrivals for t, n in a if start < t <= end)
            seconds += end - start
    return tokens / seconds if seconds > 0 else None


def row(mode: str, bs: int, max_tokens: int, runs: list[tuple[list, float, list]], m: dict) -> dict:
    """`runs`: (completions, wall seconds, arrivals) of each batch (submit_batch)."""
    completions = [c for done, _, _ in runs for c in done]
    wall = sum(w for _, w, _ in runs)
    # per batch: its wall after its latest first token, and the tokens that came in it
    decode_wall = sum(w - max(c.stats.time_to_first_token_ms for c in done) / 1e3 for done, w, _ in runs)
    rounds = max(1, m["rounds"])
    per = {k: m[k] / rounds for k in ("draft_ms", "target_ms", "wait_ms", "exchange_ms", "round_ms")}
    xfer = max(0.0, per["exchange_ms"] - per["draft_ms"]) if mode != "ar" else 0.0
    host = per["round_ms"] - per["target_ms"] - per["wait_ms"]
    if mode == "sd" and m["device_token_rounds"] and m["xfer_rounds"]:
        # drafts left on the device: the draft reports its steps' device time (they run on
        # after it has replied), so the round trip is the two hops and the rest of the round
        # is host work and the GPU's idle gaps between draft and verify
        xfer = (m["xfer_out_ms"] + m["xfer_back_ms"]) / m["xfer_rounds"]
        host = per["round_ms"] - per["draft_ms"] - per["target_ms"] - xfer
    forwards = sum(c.stats.target_forwards for c in completions)
    tokens = sum(c.stats.new_tokens for c in completions)
    ttft = [c.stats.time_to_first_token_ms for c in completions]
    return {
        "mode": mode, "batch_size": bs, "batches": len(runs), "max_tokens": max_tokens, "tokens": tokens,
        "wall_s": wall, "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": (tokens - len(completions)) / decode_wall if decode_wall > 0 else None,
        "full_batch_tokens_per_s": full_batch_rate(runs),
        "mat": tokens / forwards if forwards else None,
        "tokens_per_round": m["committed_tokens"] / rounds,
        "accept_rate": m["accepted_tokens"] / m["drafted_tokens"] if m["drafted_tokens"] else None,
        "round_ms": per["round_ms"], "draft_ms": per["draft_ms"], "target_ms": per["target_ms"],
        "wait_ms": per["wait_ms"],
        "host_ms": host,
        "xfer_ms": xfer, "xfer_share": xfer / per["round_ms"] if per["round_ms"] else 0.0,
        # its two hops, where the draft shares the target's clock (TargetMetrics.xfer_out_ms)
        "xfer_out_ms": m["xfer_out_ms"] / m["xfer_rounds"] if m["xfer_rounds"] else None,
        "xfer_back_ms": m["xfer_back_ms"] / m["xfer_rounds"] if m["xfer_rounds"] else None,
        "ttft_ms": {"mean": statistics.fmean(ttft), "p50": statistics.median(ttft), "max": max(ttft)},
        # the mean draft length of the row's rounds (the service's last gamma may be another
        # bucket's: a batch shrinks as its requests finish)
        "gamma": round(m["gamma_sum"] / m["speculative_rounds"]) if m["speculative_rounds"] else m["gamma"],
        "gamma_mean": m["gamma_sum"] / m["speculative_rounds"] if m["speculative_rounds"] else None,
        "gamma_by_batch": m["gamma_by_batch"], "path": m["path"], "metrics_diff": m,
        # the round paths each request took (the gateway's stats: "sd+ar" when it met both)
        "paths": dict(Counter(getattr(c.stats, "mode", "") for c in completions)),
        "accept_by_position": acceptance_by_position(m["judged_runs"]),
        "outputs_sha256": hashlib.sha256(repr([c.token_ids for c in completions]).encode()).hexdigest(),
        "_outputs": [list(c.token_ids) for c in completions],   # kept in memory, not in the JSON
    }
