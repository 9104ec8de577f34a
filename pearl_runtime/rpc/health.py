"""Standard gRPC health (grpc.health.v1) and reflection for a service.

Readiness is the overall service "" and the pearl service name (e.g. pearl.v1.Target):
NOT_SERVING until the service can do its job, SERVING while it can, NOT_SERVING again once
it cannot (shutdown begun, a hung step, no ready target). Liveness is its own name,
`liveness`: SERVING while the process and its event loop answer, also while draining, so a
liveness probe never restarts a service for what readiness already says.
"""
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from pearl_runtime.log import get_logger
from pearl_runtime.rpc.server import bind

log = get_logger(__name__)

OVERALL = ""
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Health:
    """One service's health states. `name`: its pearl service name (pearl.v1.Target, ...)."""

    def __init__(self, name: str):
        self.name = name
        self.servicer = HealthServicer()
        self.serving = False
        self.reason = "starting"
        self.plain: grpc.aio.Server | None = None
        self.stopped = False      # shutdown begun: readiness never comes back

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register health and reflection on `server`, before it starts: readiness starts
        NOT_SERVING, liveness SERVING."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        reflection.enable_server_reflection([self.name, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
        for service in (OVERALL, self.name):
            self.servicer._server_status[service] = NOT_SERVING   # set() is async; the server is not up yet
        self.servicer._server_status[LIVENESS] = SERVING

    async def set_ready(self, ready: bool, reason: str = "") -> None:
        """Readiness of the overall service and the pearl service; logged when it changes."""
        if self.stopped:
            return
        if ready == self.serving and (ready or reason == self.reason):
            return
        self.serving, self.reason = ready, "" if ready else reason
        status = SERVING if ready else NOT_SERVING
        for service in (OVERALL, self.name):
            await self.servicer.set(service, status)
        log.info("readiness", service_name=self.name, status=health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                 **({"reason": reason} if reason else {}))

    async def open_plain_port(self, host: str, port: int) -> int:
        """Also serve this health service alone, in plaintext, on `port` (0: not): kubelet's gRPC
        probes and `pearl health` speak no TLS and present no token. Returns the bound port."""
        if not port:
            return 0
        self.plain = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.plain)
        bound = bind(self.plain, host, port)
        await self.plain.start()
        log.info("health port open (plaintext, health only)", address=f"{host}:{bound}")
        return bound

    async def close_plain_port(self) -> None:
        if self.plain is not None:
            await self.plain.stop(0)
            self.plain = None

    async def stopping(self) -> None:
        """Shutdown begun: readiness NOT_SERVING for good, liveness SERVING until the process exits."""
        await self.set_ready(False, "shutting down")
        self.stopped = True


async def check(address: str, service: str = OVERALL, timeout_s: float = 5.0,
                credentials: grpc.ChannelCredentials | None = None) -> str:
    """The health status name of `service` at `address`, or UNREACHABLE / UNKNOWN_SERVICE / the
    status code's name when the call fails."""
    channel = (grpc.aio.secure_channel(address, credentials) if credentials
               else grpc.aio.insecure_channel(address))
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return "UNKNOWN_SERVICE"
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "UNREACHABLE"
        return e.code().name
    finally:
        await channel.close()
