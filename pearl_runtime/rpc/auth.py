"""The bearer token every service may require: one server interceptor for all three.

With a token set, each call must carry `authorization: Bearer <token>` or is answered
UNAUTHENTICATED before any servicer runs. Health and reflection stay open: probes and
`pearl health` carry no secret, and neither says more than whether the service is up."""
import hmac

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
REFUSAL = "authorization: missing or wrong bearer token"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES) or self._allows(details):
            return handler
        return _refusing(handler)

    def _allows(self, details) -> bool:
        sent = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        sent = sent.encode() if isinstance(sent, str) else sent
        return hmac.compare_digest(sent, self._expected)   # constant time: no guessing byte by byte


def interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """What a server installs ahead of the others: nothing without a token."""
    return [AuthInterceptor(token)] if token else []


async def _refuse(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


def _refusing(handler):
    """A handler of the same kind as `handler` that only refuses (a streaming method read as
    unary would wait for a request the client may never send)."""
    kind = (grpc.unary_unary_rpc_method_handler if handler.unary_unary else
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else
            grpc.stream_unary_rpc_method_handler if handler.stream_unary else
            grpc.stream_stream_rpc_method_handler)
    return kind(_refuse, handler.request_deserializer, handler.response_serializer)
