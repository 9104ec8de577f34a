"""TLS (mTLS between services) and the bearer token, on both sides of a hop. Services bind to
loopback by default; whoever publishes one beyond it should turn both on. The server side's
token check is pearl_runtime/rpc/auth.py."""
from dataclasses import dataclass
from pathlib import Path

import grpc

from pearl_runtime.rpc.server import GRPC_OPTIONS


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with `cert`/`key`; with `client_ca`, every client must show a certificate it signed."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                       require_client_auth=True)


def serving_credentials(cert: str | None, key: str | None, client_ca: str | None = None):
    """A service's --tls-cert/--tls-key/--tls-client-ca: its server credentials, None for plaintext."""
    if bool(cert) != bool(key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if client_ca and not cert:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)")
    return server_credentials(cert, key, client_ca) if cert else None


@dataclass(frozen=True)
class Dialer:
    """How a caller reaches a service: TLS when given the CA to trust (a client certificate
    too, for a server that requires one), and the token its calls present."""
    tls_ca: str | None = None
    tls_cert: str | None = None      # with tls_key: the client certificate (mTLS)
    tls_key: str | None = None
    token: str | None = None
    server_name: str | None = None

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate needs both its cert and its key")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("a client certificate is for TLS: give the CA to trust too")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return token_metadata(self.token)

    def channel(self, address: str) -> grpc.aio.Channel:
        return channel(address, self.tls_ca, self.server_name, self.tls_cert, self.tls_key)


PLAINTEXT = Dialer()


def channel(address: str, tls_ca: str | None = None, server_name: str | None = None,
            tls_cert: str | None = None, tls_key: str | None = None) -> grpc.aio.Channel:
    """A client channel: TLS when given the CA (or self-signed certificate) to trust."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
    options = list(GRPC_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
    return grpc.aio.secure_channel(address, creds, options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
