"""`python -m target_service` (what `pearl target` runs): the target service's flags and process."""
from pearl_runtime import log

log.quiet_native_stderr()   # before grpc and torch load: their C cores read it once

import argparse
import dataclasses
import sys

from pearl_runtime import envs, keep_awake
from pearl_runtime.errors import UsageError
from pearl_runtime.config import add_engine_args, engine_config_from_args
from pearl_runtime.log import setup as setup_logging
from pearl_runtime.models.default_model import default_model
from pearl_runtime.models.check import check_model_dir
from pearl_runtime.security_flags import add_caller_args, add_serving_args, caller_options
from pearl_runtime.rpc.server import check_ports, run_async, serve_until_signal
from pearl_runtime.spec.policy import check_round_steps, parse_gamma, parse_head_start, parse_quorum
from pearl_runtime.usage import pop_debug, user_errors


def _flag_type(parse):
    """`parse` as an argparse type: its ValueError's message becomes argparse's one line (exit 2)."""
    def checked(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    checked.__name__ = parse.__name__
    return checked


def _gamma(text: str) -> int | None:
    if str(text) != "auto" and not (str(text).isdigit() and int(text) >= 1):
        raise ValueError(f"wants 'auto' or a number of draft tokens >= 1, got {text!r}")
    return parse_gamma(text)


def _prefill_tokens(text: str) -> str | int:
    if str(text) != "auto" and not str(text).isdigit():
        raise ValueError(f"wants 'auto' or a number of tokens >= 0 (0: no limit), got {text!r}")
    return text if str(text) == "auto" else int(text)


def _engine_config(args, model: str):
    cfg = engine_config_from_args(args, model)
    tokens = args.max_prefill_tokens
    if tokens == "auto":
        tokens = 256 if args.device == "cpu" else 8192   # a CPU prefills slowly: small steps keep streams moving
    return dataclasses.replace(cfg, max_prefill_tokens=tokens)


def build_parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(prog="pearl target", description="run the target service")
    add_engine_args(t)
    t.add_argument("--port", type=int, default=envs.default("PEARL_TARGET_PORT"))
    add_serving_args(t)
    add_caller_args(t, "draft")
    t.add_argument("--drain-timeout", type=float, default=envs.default("PEARL_DRAIN_TIMEOUT_S"),
                   help="SIGTERM: seconds the requests in flight may take to finish (NOT_SERVING at once; what is "
                        "left when it passes, the gateway resubmits elsewhere)")
    t.add_argument("--hung-round-floor", type=float, default=envs.default("PEARL_HUNG_ROUND_FLOOR_S"),
                   help="a round running 100x the mean round, and at least this many seconds, is hung: the target "
                        "goes NOT_SERVING and hands its requests back to the gateway")
    t.add_argument("--max-queued-requests", type=int, default=envs.default("PEARL_MAX_QUEUED_REQUESTS"),
                   help="requests waiting for a batch slot; past it a new one is refused RESOURCE_EXHAUSTED")
    t.add_argument("--max-prefill-tokens", type=_flag_type(_prefill_tokens),
                   default=envs.default("PEARL_MAX_PREFILL_TOKENS"),
                   help="prompt tokens one step admits (whole sequences, one at least), so a burst of long "
                        "sequences, as a restart resubmits, streams after its first step: auto (8192 on a GPU, "
                        "256 on CPU), N, or 0 for no limit")
    t.add_argument("--served-model-name", default=envs.default("PEARL_SERVED_MODEL_NAME"),
                   help="the model name the target reports (Info, metrics) and clients see through a gateway "
                        "without its own (default: the model directory's name)")
    t.add_argument("--mode", choices=("pearl", "sd", "ar", "auto"), default=envs.default("PEARL_MODE"),
                   help="auto: per batch size, whichever of ar, sd and pearl the measured step times and the "
                        "observed acceptance make fastest (pearl only where the draft has its own GPU)")
    t.add_argument("--draft", default=envs.default("PEARL_DRAFT_ADDRESS"), help="draft service address")
    t.add_argument("--gamma", type=_flag_type(_gamma), default=envs.default("PEARL_GAMMA"),
                   help="draft tokens per round, or 'auto': balance measured draft and verify step times (GPU)")
    t.add_argument("--head-start", type=_flag_type(parse_head_start), default=envs.default("PEARL_HEAD_START"),
                   help="pearl: draft tokens to wait for when most sequences are in pre-verify, verified "
                        "with the first fresh one ('auto': gamma // 2; 0: plain PEARL, one token)")
    t.add_argument("--head-start-quorum", type=_flag_type(parse_quorum),
                   default=envs.default("PEARL_HEAD_START_QUORUM"),
                   help="pearl: the share of a batch in pre-verify that earns a head start (the whole "
                        "batch waits for it)")
    t.add_argument("--max-gamma", type=int, default=envs.default("PEARL_MAX_GAMMA"),
                   help="ceiling of auto gamma (verifies longer than the largest graph bucket run eagerly)")
    t.add_argument("--ar-steps", type=int, default=envs.default("PEARL_AR_STEPS"),
                   help="ar mode: greedy decode steps chained on the device per round (1: one step, one sync)")
    t.add_argument("--device-tokens", choices=("on", "off"), default=envs.default("PEARL_DEVICE_TOKENS"),
                   help="sd mode: take greedy draft tokens through a device buffer the draft shares (CUDA IPC), "
                        "not through the host; falls back to inline by itself where it cannot (logged)")
    t.add_argument("--round-datagrams", choices=("on", "off"), default=envs.default("PEARL_ROUND_DATAGRAMS"),
                   help="also send each small Round to the draft as a UDP datagram, ahead of the gRPC stream's "
                        "copy (the draft drafts whichever arrives first); off: the stream alone")
    return t


def run(args) -> None:
    setup_logging("target", args.log_level, args.log_format)
    try:
        check_round_steps(args.mode, args.gamma, args.max_gamma, args.head_start)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = args.model or default_model()
    check_model_dir(model)
    check_ports(args.host, {"--port": args.port, "--metrics-port": args.metrics_port,
                "--health-port": args.health_port})
    from target_service.server import serve   # after the checks: it loads the engine's modules
    draft = None if args.mode == "ar" else args.draft
    with keep_awake.for_service(args.keep_awake, args.device):
        run_async(serve_until_signal(serve(_engine_config(args, model), args.host, args.port, args.mode, draft, args.gamma,
                                      ar_steps=args.ar_steps, max_gamma=args.max_gamma,
                                      head_start=args.head_start,
                                      head_start_quorum=args.head_start_quorum,
                                      device_tokens=args.device_tokens == "on",
                                      round_datagrams=args.round_datagrams == "on",
                                      metrics_port=args.metrics_port, served_model_name=args.served_model_name,
                                      health_port=args.health_port, drain_timeout_s=args.drain_timeout,
                                      max_waiting=args.max_queued_requests,
                                      hung_round_floor_s=args.hung_round_floor, auth_token=args.auth_token,
                                      tls_cert=args.tls_cert, tls_key=args.tls_key,
                                      tls_client_ca=args.tls_client_ca, **caller_options(args, "draft"))))


def main(argv=None) -> None:
    argv, debug = pop_debug(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    with user_errors("pearl target", debug):
        run(args)


if __name__ == "__main__":
    main()
