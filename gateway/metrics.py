"""The gateway's Prometheus series, declared in one place; the servicer reports plain numbers."""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's latency buckets, with small ones added for fast models
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class GatewayMetrics:
    """Every gateway series on `registry` (the gateway's own: several services share a process in
    tests). `model_name`: the model_name label; None: the served model's name, per request."""

    def __init__(self, registry: CollectorRegistry, model_name: str | None = None):
        self.registry = registry
        self.model_name = model_name
        m, r = ["model_name"], registry
        self.ttft = Histogram("pearl:time_to_first_token_seconds", "Time to the first streamed token.",
                              m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pearl:inter_token_latency_seconds", "Gap between streamed tokens.",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pearl:e2e_request_latency_seconds", "Request latency, arrival to final.",
                             m, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pearl:prompt_tokens", "Prompt tokens of accepted requests.", m, registry=r)
        self.generation_tokens = Counter("pearl:generation_tokens", "Tokens streamed to clients.", m, registry=r)
        self.success = Counter("pearl:request_success", "Requests that finished.", m + ["finished_reason"],
                               registry=r)
        self.failure = Counter("pearl:request_failure", "Requests that ended in an error status.",
                               m + ["code"], registry=r)
        self.in_flight = Gauge("pearl:gateway_requests_in_flight", "Generate calls being served.", registry=r)
        self.resubmissions = Counter("pearl:gateway_resubmissions",
                                     "Requests resubmitted to another target after one died.", registry=r)
        self.target_ready_gauge = Gauge("pearl:gateway_target_ready", "1 while the target is ready (SERVING).",
                                        ["target"], registry=r)

    def request(self, served_model: str) -> "RequestMetrics":
        """One Generate call's measurements, from now (its arrival) on."""
        return RequestMetrics(self, self.model_name or served_model or "unknown")

    def resubmitted(self) -> None:
        self.resubmissions.inc()

    def target_ready(self, address: str, ready: bool) -> None:
        self.target_ready_gauge.labels(target=address).set(1 if ready else 0)

    def target_gone(self, address: str) -> None:
        """A replica removed (its address left its name's DNS answer): its series goes too."""
        try:
            self.target_ready_gauge.remove(address)
        except KeyError:
            pass


class RequestMetrics:
    """Latencies and tokens of one request; it ends once, as a success or a failure code."""

    def __init__(self, metrics: GatewayMetrics, model: str):
        self._m = metrics
        self._model = model
        self._t0 = self._last = time.perf_counter()
        self._first = True
        self._ended = False
        metrics.in_flight.inc()

    def accepted(self, prompt_tokens: int) -> None:
        self._m.prompt_tokens.labels(self._model).inc(prompt_tokens)

    def streamed(self, n_tokens: int) -> None:
        """`n_tokens` sent to the client now: the first is TTFT, later gaps split per token."""
        if not n_tokens:
            return
        now = time.perf_counter()
        if self._first:
            self._m.ttft.labels(self._model).observe(now - self._t0)
            self._first = False
        else:
            itl = self._m.itl.labels(self._model)
            for _ in range(n_tokens):
                itl.observe((now - self._last) / n_tokens)
        self._last = now
        self._m.generation_tokens.labels(self._model).inc(n_tokens)

    def finished(self, reason: str | None) -> None:
        if self._end():
            self._m.success.labels(self._model, reason or "unknown").inc()
            self._m.e2e.labels(self._model).observe(time.perf_counter() - self._t0)

    def failed(self, code: str) -> None:
        if self._end():
            self._m.failure.labels(self._model, code).inc()

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        self._m.in_flight.dec()
        return True
