"""Optional TLS and a bearer token for the client-facing API. Services bind to loopback by
default; whoever publishes the gateway beyond it should turn both on."""
import hmac
from pathlib import Path

import grpc

from pearl_runtime.rpc.server import GRPC_OPTIONS


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def channel(address: str, tls_ca: str | None = None, server_name: str | None = None) -> grpc.aio.Channel:
    """A client channel: TLS when given the CA (or self-signed certificate) to trust."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
    options = list(GRPC_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    return grpc.aio.secure_channel(address, creds, options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def authorize(context: grpc.aio.ServicerContext, token: str | None) -> None:
    """UNAUTHENTICATED unless the call carries `authorization: Bearer <token>` (when one is set)."""
    if not token:
        return
    sent = dict(context.invocation_metadata() or ()).get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "authorization: missing or wrong bearer token")
