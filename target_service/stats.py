"""The target's accounting: cumulative round counters, read by the Metrics RPC (benchmarks diff
two readings) and by Prometheus at /metrics (rounds, queue, KV, speculation, the draft link)."""
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pearl_runtime.pb import target_pb2

ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                 0.2, 0.5, 1.0, 2.5, 5.0)
# sd rounds by how their draft tokens came (TargetService.token_paths) -> the transport label
TRANSPORT = {"device": "ipc", "device, read on the host (the round feeds a prompt)": "ipc", "inline": "inline"}


@dataclass
class RoundStats:
    rounds: int = 0
    speculative_rounds: int = 0
    rounds_without_draft: int = 0   # pearl/sd rounds served ar while the draft was away
    draft_ms: float = 0.0
    target_ms: float = 0.0
    wait_ms: float = 0.0
    exchange_ms: float = 0.0     # round sent -> draft batch received, overlapped or not
    round_ms: float = 0.0
    committed_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    head_start_rounds: int = 0
    gamma_sum: int = 0           # each speculative round's gamma (its early part not counted)
    judged_runs: Counter = field(default_factory=Counter)   # (judged, accepted) -> sequence-rounds

    def add_round(self, rnd, draft_ms: float, target_ms: float, wait_ms: float, exchange_ms: float,
                  round_ms: float) -> None:
        """One round's times; `rnd` is its Round when drafts were judged, else None."""
        self.rounds += 1
        self.target_ms += target_ms
        self.wait_ms += wait_ms
        self.round_ms += round_ms
        if rnd is not None:
            self.speculative_rounds += 1
            self.gamma_sum += rnd.gamma - rnd.early
            self.draft_ms += draft_ms
            self.exchange_ms += exchange_ms

    def count(self, reqs, before: list[tuple], speculative: bool) -> tuple[int, int]:
        """A judged round's tokens: committed, judged and accepted per request against
        `before` (each request's (committed, drafted, accepted) before the round). Returns the
        round's (judged, accepted)."""
        judged = taken = 0
        for r, (n, drafted, accepted) in zip(reqs, before):
            self.committed_tokens += len(r.seq) - n
            judged += r.drafted - drafted
            taken += r.accepted - accepted
            if r.drafted > drafted:
                self.judged_runs[(r.drafted - drafted, r.accepted - accepted)] += 1
        self.drafted_tokens += judged
        self.accepted_tokens += taken
        return judged, taken

    def count_chain(self, reqs, before: list[int], steps: int, target_ms: float, round_ms: float) -> None:
        """An ar round of `steps` chained decode steps (each request's length `before` it)."""
        self.rounds += steps   # a round in the counters is one target forward
        self.target_ms += target_ms
        self.round_ms += round_ms
        self.committed_tokens += sum(len(r.seq) - n for r, n in zip(reqs, before))

    def accepted_per_position(self) -> dict[int, int]:
        """Judged runs whose k-th drafted token was accepted (so were 1..k-1), by k."""
        out: Counter = Counter()
        for (_, accepted), n in self.judged_runs.items():
            for k in range(1, accepted + 1):
                out[k] += n
        return dict(sorted(out.items()))


def metrics_message(service) -> target_pb2.TargetMetrics:
    s, link = service.stats, service.link
    split = {} if link is None else {"xfer_out_ms": link.split.out_ms, "xfer_back_ms": link.split.back_ms,
                                     "xfer_rounds": link.split.rounds}
    cost = service.policy.verify_cost
    return target_pb2.TargetMetrics(
        rounds=s.rounds, speculative_rounds=s.speculative_rounds, draft_ms=s.draft_ms, target_ms=s.target_ms,
        wait_ms=s.wait_ms, exchange_ms=s.exchange_ms, round_ms=s.round_ms, committed_tokens=s.committed_tokens,
        drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens, path=service.last_path or "",
        gamma=service.gamma, head_start_rounds=s.head_start_rounds,
        draft_connected=link is not None and link.connected, gamma_sum=s.gamma_sum,
        gamma_by_batch=service.policy.tuner.picks,
        verify_times=[target_pb2.VerifyTime(batch=b, query=q, ms=t) for q, row in cost.table.items()
                      for b, t in row.items()],
        judged_runs=[target_pb2.JudgedRun(judged=j, accepted=a, count=c) for (j, a), c in s.judged_runs.items()],
        device_token_rounds=service.token_paths["device"], head_start=service.policy.head_start,
        head_start_quorum=service.policy.quorum, auto_gamma=service.policy.auto, **split)


class TargetCollector:
    """The target's Prometheus series, read from the service when scraped (the round loop
    pays nothing for the counters); round durations are the one histogram it observes."""

    def __init__(self, service, registry: CollectorRegistry, model_name: str):
        self.service, self.model = service, model_name
        self.round_seconds = Histogram("pearl:round_duration_seconds", "a target round's wall time",
                                       ("mode", "phase"), buckets=ROUND_BUCKETS, registry=registry)
        registry.register(self)

    def observe_round(self, mode: str, phase: str, seconds: float) -> None:
        self.round_seconds.labels(mode, phase).observe(seconds)

    def collect(self):
        svc, s, m = self.service, self.service.stats, [self.model]
        sched, blocks, link = svc.core.scheduler, svc.core.blocks, svc.link

        def gauge(name, doc, value, labels=("model_name",), values=m):
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            g.add_metric(list(values), value)
            return g

        def counter(name, doc, value, labels=("model_name",), values=m):
            c = CounterMetricFamily(name, doc, labels=list(labels))
            c.add_metric(list(values), value)
            return c

        yield gauge("pearl:num_requests_running", "requests in the running batch", len(sched.running))
        yield gauge("pearl:num_requests_waiting", "requests admitted and waiting for the batch",
                    len(sched.waiting) + svc.queued_submissions())
        used = 1.0 - blocks.num_free / max(1, len(blocks.blocks))
        yield gauge("pearl:kv_cache_usage_perc", "share of KV cache blocks in use (0..1)", used)
        yield counter("pearl:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                      blocks.prefix_queries)
        yield counter("pearl:prefix_cache_hits", "prompt tokens served from the prefix cache", blocks.prefix_hits)
        yield counter("pearl:spec_decode_num_drafts", "judged runs of draft tokens (a sequence in a round)",
                      sum(s.judged_runs.values()))
        yield counter("pearl:spec_decode_num_draft_tokens", "draft tokens judged", s.drafted_tokens)
        yield counter("pearl:spec_decode_num_accepted_tokens", "draft tokens accepted", s.accepted_tokens)
        per_pos = CounterMetricFamily("pearl:spec_decode_num_accepted_tokens_per_pos",
                                      "judged runs whose k-th draft token was accepted",
                                      labels=["model_name", "position"])
        for k, n in svc.accepted_per_position().items():
            per_pos.add_metric([self.model, str(k)], n)
        yield per_pos
        yield counter("pearl:target_committed_tokens", "tokens the target committed", s.committed_tokens)
        yield counter("pearl:head_start_rounds", "PEARL rounds that waited for a head start", s.head_start_rounds)
        yield gauge("pearl:spec_gamma", "gamma of the last speculative round", svc.gamma)
        if (chooser := svc.policy.chooser) is not None:   # --mode auto: 1 for each bucket's mode
            chosen = GaugeMetricFamily("pearl:mode_chosen", "--mode auto: the mode each batch bucket runs (1)",
                                       labels=["model_name", "batch_bucket", "mode"])
            for b, mode in chooser.picks.items():
                chosen.add_metric([self.model, str(b), mode], 1)
            yield chosen
        yield gauge("pearl:draft_link_up", "1 while the draft link is up", int(link is not None and link.connected))
        yield counter("pearl:draft_unreachable", "dials of the draft that failed (none there, or not ready)",
                      link.unreachable if link is not None else 0)
        yield counter("pearl:draft_reconnects", "draft link connects after the first",
                      max(0, link.generation - 1) if link is not None else 0)
        refused = CounterMetricFamily("pearl:draft_refused", "draft handshakes refused, by reason",
                                      labels=["reason"])
        for reason, n in (link.refused.items() if link is not None else ()):
            refused.add_metric([reason], n)
        yield refused
        yield counter("pearl:rounds_without_draft", "pearl/sd rounds served ar while the draft was away",
                      s.rounds_without_draft)
        transport = CounterMetricFamily("pearl:draft_transport_rounds", "sd rounds by how draft tokens came",
                                        labels=["path"])
        by_path = Counter()
        for path, n in svc.token_paths.items():
            by_path[TRANSPORT.get(path, path)] += n
        for path, n in by_path.items():
            transport.add_metric([path], n)
        yield transport
