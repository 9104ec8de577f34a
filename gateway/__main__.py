"""`python -m gateway` (what `pearl gateway` runs): the gateway's flags and process."""
from pearl_runtime import log

log.quiet_native_stderr()   # before grpc and torch load: their C cores read it once

import argparse
import sys

from pearl_runtime import envs
from pearl_runtime.flags import add_operating_args, export_flags
from pearl_runtime.models.default_model import default_model
from pearl_runtime.security_flags import add_caller_args, add_serving_args, caller_options


def build_parser() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(prog="pearl gateway", description="run the gateway")
    g.add_argument("--model", default=envs.default("PEARL_MODEL"), help="model directory for the tokenizer")
    g.add_argument("--host", default=envs.default("PEARL_HOST"))
    g.add_argument("--port", type=int, default=envs.default("PEARL_GATEWAY_PORT"))
    g.add_argument("--http-port", type=int, default=envs.default("PEARL_HTTP_PORT"),
                   help="serve the OpenAI-compatible HTTP API here, beside gRPC (0: off)")
    g.add_argument("--targets", default=envs.default("PEARL_TARGETS"),
                   help="comma-separated HOST:PORT; a HOST that is a DNS name stands for every address it "
                        "resolves to (one connection each), re-resolved every --resolve-interval")
    g.add_argument("--resolve-interval", type=float, default=envs.default("PEARL_RESOLVE_INTERVAL_S"),
                   help="seconds between lookups of the --targets names (0: resolve once at start)")
    g.add_argument("--served-model-name", default=envs.default("PEARL_SERVED_MODEL_NAME"),
                   help="the model name clients see and may ask for (default: what the targets report)")
    g.add_argument("--drain-timeout", type=float, default=envs.default("PEARL_DRAIN_TIMEOUT_S"),
                   help="SIGTERM: seconds the streams in flight may take to finish (NOT_SERVING and no new "
                        "calls at once)")
    g.add_argument("--max-concurrent-requests", type=int, default=envs.default("PEARL_MAX_CONCURRENT_REQUESTS"),
                   help="Generate calls served at once; past it a new one is refused RESOURCE_EXHAUSTED")
    g.add_argument("--coalesce-ms", type=float, default=envs.default("PEARL_COALESCE_MS"))
    add_serving_args(g)
    add_caller_args(g, "target")
    add_operating_args(g)
    return g


def main(argv=None) -> None:
    from pearl_runtime.usage import pop_debug, user_errors
    argv, debug = pop_debug(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    from gateway.resolver import parse_targets
    try:
        parse_targets(args.targets)
    except ValueError as e:
        parser.error(str(e))
    if args.resolve_interval < 0:
        parser.error("--resolve-interval must be >= 0")
    with user_errors("pearl gateway", debug):
        from gateway.server import run
        from gateway.tokenizer import GatewayTokenizer
        from pearl_runtime.rpc.server import check_ports
        export_flags(args, {"PEARL_GC_FREEZE": "gc_freeze"})
        model_dir = args.model or default_model()
        tokenizer = GatewayTokenizer.from_dir(model_dir)   # a bad model directory fails before any log line
        check_ports(args.host, {"--port": args.port, "--metrics-port": args.metrics_port,
                    "--health-port": args.health_port,
                    "--http-port": args.http_port})
        run(host=args.host, port=args.port, targets=args.targets, model_dir=model_dir, tokenizer=tokenizer,
            coalesce_ms=args.coalesce_ms, log_level=args.log_level, tls_cert=args.tls_cert, tls_key=args.tls_key,
            auth_token=args.auth_token, tls_client_ca=args.tls_client_ca, **caller_options(args, "target"),
            metrics_port=args.metrics_port, log_format=args.log_format,
            resolve_interval_s=args.resolve_interval, served_model_name=args.served_model_name,
            health_port=args.health_port, drain_timeout_s=args.drain_timeout,
            max_in_flight=args.max_concurrent_requests, http_port=args.http_port or None)


if __name__ == "__main__":
    main()
