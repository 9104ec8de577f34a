"""Each service's Prometheus registry and its /metrics HTTP endpoint (prometheus-client)."""
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

from pearl_runtime.log import get_logger

log = get_logger(__name__)


@dataclass
class MetricsEndpoint:
    """A running /metrics server; `close()` frees its port (a service shut down in-process, as
    the tests do, must not keep it)."""
    port: int
    _server: object
    _thread: object

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=1.0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint | None:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port 0: off (None)."""
    if not port:
        log.info("metrics endpoint off", hint="--metrics-port N or PEARL_METRICS_PORT")
        return None
    server, thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(server.server_port, server, thread)
    log.info("metrics endpoint", url=f"http://{host}:{endpoint.port}/metrics")
    return endpoint
