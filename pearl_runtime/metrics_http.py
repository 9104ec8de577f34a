"""Each service's Prometheus registry and its /metrics HTTP endpoint (prometheus-client)."""
from prometheus_client import CollectorRegistry, start_http_server

from pearl_runtime.log import get_logger

log = get_logger(__name__)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port 0: off (None).
    Returns the bound port."""
    if not port:
        log.info("metrics endpoint off", hint="--metrics-port N or PEARL_METRICS_PORT")
        return None
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    log.info("metrics endpoint", url=f"http://{host}:{bound}/metrics")
    return bound
