"""An in-process OTLP gRPC trace receiver: what the services export, collected for asserts."""
import threading
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str          # hex
    span_id: str
    parent_span_id: str    # "" for a root span
    name: str
    service: str           # the resource's service.name
    attributes: dict = field(default_factory=dict)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.endpoint = ""
        self.spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received += [ReceivedSpan(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                          resource.get("service.name", ""),
                                          {a.key: _value(a.value) for a in s.attributes})
                             for s in scope_spans.spans]
        with self._changed:
            self.spans += received
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """The spans once at least `count` have arrived; TimeoutError with what did otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.spans) >= count, timeout_s):
                raise TimeoutError(f"{len(self.spans)} of {count} spans arrived: {self.spans}")
            return list(self.spans)


@contextmanager
def otlp_receiver():
    """A receiver on a free loopback port; `.endpoint` is the OTEL_EXPORTER_OTLP_ENDPOINT to give."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.endpoint = f"http://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield receiver
    finally:
        server.stop(None)
