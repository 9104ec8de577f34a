"""Optional OpenTelemetry tracing: one trace per request across gateway, target and draft.

On only with the `otel` extra installed and OTEL_EXPORTER_OTLP_ENDPOINT set (spans go over
OTLP gRPC; the exporter reads the endpoint, OTEL_EXPORTER_OTLP_INSECURE and headers itself,
and talks plaintext to an http:// endpoint). Otherwise every function is a cheap no-op.
Spans cross processes as W3C traceparent strings, so callers never see an OpenTelemetry type.
"""
import os
from contextlib import contextmanager
from typing import Iterator

from pearl_runtime.log import get_logger

log = get_logger(__name__)

_provider = None   # the SDK TracerProvider while tracing is on
_tracer = None


class Span:
    """A started span, or the no-op one while tracing is off."""

    def __init__(self, span=None):
        self._span = span

    @property
    def traceparent(self) -> str:
        """This span's W3C traceparent, for the next hop to parent its spans on; "" when off."""
        if self._span is None:
            return ""
        from opentelemetry.trace import set_span_in_context
        carrier: dict[str, str] = {}
        _propagator().inject(carrier, context=set_span_in_context(self._span))
        return carrier.get("traceparent", "")

    def set(self, key: str, value) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def end(self) -> None:
        if self._span is not None:
            self._span.end()


_OFF = Span()


def setup(service: str) -> bool:
    """Turn tracing on for this process if it can be; one log line says whether and why.
    `service`: the role (gateway, target, draft); spans carry service.name pearl-<role>."""
    global _provider, _tracer
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        log.info("tracing off", reason="OTEL_EXPORTER_OTLP_ENDPOINT unset")
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        log.warning("tracing off", reason=f"the otel extra is not installed ({e.name} missing)", endpoint=endpoint)
        return False
    _provider = TracerProvider(resource=Resource.create({"service.name": f"pearl-{service}"}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("pearl_runtime")
    log.info("tracing on", endpoint=endpoint, service_name=f"pearl-{service}")
    return True


def _propagator():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator()


def _parent(traceparent: str | None):
    """The context to start a span in: the remote parent's, else (None) the current one."""
    return _propagator().extract({"traceparent": traceparent}) if traceparent else None


@contextmanager
def span(name: str, traceparent: str | None = None, **attributes) -> Iterator[Span]:
    """A span over the block, current inside it (spans started within are its children); its
    parent is `traceparent` when given, else the current span. An exception ends it as an error."""
    if _tracer is None:
        yield _OFF
        return
    with _tracer.start_as_current_span(name, context=_parent(traceparent), attributes=attributes) as s:
        yield Span(s)


def start(name: str, traceparent: str | None = None, **attributes) -> Span:
    """A span that outlives a block (a request's life over many rounds): call `.end()`."""
    if _tracer is None:
        return _OFF
    return Span(_tracer.start_span(name, context=_parent(traceparent), attributes=attributes))


def shutdown() -> None:
    """Export the spans still queued; call at service exit."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
        _provider = _tracer = None
