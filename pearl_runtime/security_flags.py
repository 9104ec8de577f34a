"""The security flags: what a service requires of its callers, and what a caller presents to
the service it calls. Torch- and grpc-free, for the parsers."""
import argparse

from pearl_runtime import envs


def add_serving_args(p: argparse.ArgumentParser) -> None:
    """--auth-token, --tls-cert, --tls-key, --tls-client-ca: every service takes them."""
    s = p.add_argument_group("security (serving)")
    s.add_argument("--auth-token", default=envs.default("PEARL_AUTH_TOKEN"),
                   help="require 'authorization: Bearer <token>' on every call but health and reflection")
    s.add_argument("--tls-cert", default=envs.default("PEARL_TLS_CERT"), help="PEM certificate: serve over TLS")
    s.add_argument("--tls-key", default=envs.default("PEARL_TLS_KEY"), help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", default=envs.default("PEARL_TLS_CLIENT_CA"),
                   help="PEM CA: require a client certificate it signed (mTLS)")


def add_caller_args(p: argparse.ArgumentParser, callee: str) -> None:
    """--<callee>-tls-ca, -tls-cert, -tls-key, -auth-token: how this service dials `callee`
    (its token defaults to --auth-token, so one secret serves a whole stack)."""
    c = p.add_argument_group(f"security (calling the {callee})")
    up = callee.upper()
    c.add_argument(f"--{callee}-tls-ca", default=envs.default(f"PEARL_{up}_TLS_CA"),
                   help=f"PEM CA to trust: dial the {callee} over TLS")
    c.add_argument(f"--{callee}-tls-cert", default=envs.default(f"PEARL_{up}_TLS_CERT"),
                   help=f"PEM client certificate, for a {callee} that requires one (mTLS)")
    c.add_argument(f"--{callee}-tls-key", default=envs.default(f"PEARL_{up}_TLS_KEY"),
                   help=f"PEM private key of --{callee}-tls-cert")
    c.add_argument(f"--{callee}-auth-token", default=envs.default(f"PEARL_{up}_AUTH_TOKEN"),
                   help=f"the token the {callee} requires (default: --auth-token)")


def caller_options(args, callee: str) -> dict:
    """The parsed caller flags as keyword arguments (`<callee>_tls_ca`, ...)."""
    return {f"{callee}_{k}": getattr(args, f"{callee}_{k}") for k in ("tls_ca", "tls_cert", "tls_key", "auth_token")}
