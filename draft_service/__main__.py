"""`python -m draft_service` (what `pearl draft` runs): the draft service's flags and process."""
from pearl_runtime import log

log.quiet_native_stderr()   # before grpc and torch load: their C cores read it once

import argparse
import dataclasses
import sys

from pearl_runtime import envs, keep_awake
from pearl_runtime.config import add_engine_args, engine_config_from_args
from pearl_runtime.flags import export_flags
from pearl_runtime.log import setup as setup_logging
from pearl_runtime.models.default_model import default_draft, default_model
from pearl_runtime.models.check import check_model_dir
from pearl_runtime.security_flags import add_serving_args
from pearl_runtime.rpc.server import check_ports, run_async, serve_until_signal
from pearl_runtime.usage import pop_debug, user_errors


def build_parser() -> argparse.ArgumentParser:
    d = argparse.ArgumentParser(prog="pearl draft", description="run the draft service")
    add_engine_args(d)
    d.add_argument("--fp8-weights", default=envs.default("PEARL_FP8_WEIGHTS"), choices=("auto", "on", "off"),
                   help="round the draft's linears and LM head to fp8 so its decode steps read half the bytes "
                        "(lossless: the target verifies); auto: on where the Triton skinny kernels run on a GPU "
                        "of compute capability >= 8.9")
    d.add_argument("--port", type=int, default=envs.default("PEARL_DRAFT_PORT"))
    add_serving_args(d)
    m = d.add_argument_group("measurement")
    m.add_argument("--profile-rounds", type=int, default=envs.default("PEARL_PROFILE_ROUNDS"),
                   help="profile this many rounds after a warm-up with the torch profiler, log the table (0: off)")
    m.add_argument("--round-times", type=int, default=envs.default("PEARL_ROUND_TIMES"),
                   help="log the mean round phases every N rounds (0: off)")
    return d


def run(args) -> None:
    setup_logging("draft", args.log_level, args.log_format)
    model = args.model or default_draft(default_model())
    check_model_dir(model)
    check_ports(args.host, {"--port": args.port, "--metrics-port": args.metrics_port,
                "--health-port": args.health_port})
    from draft_service.server import serve   # after the checks: it loads the engine's modules
    # the draft's steps feed one token, two after a bonus token, and a new request's first
    # round feeds the prompt's tail past the prefix cache's full blocks: up to a block. Out of
    # a graph that catch-up ran eagerly (host-bound: a draft round ~28 ms longer once per
    # request). Longer queries (an uncached prompt) stay eager.
    export_flags(args, {"PEARL_PROFILE_ROUNDS": "profile_rounds", "PEARL_ROUND_TIMES": "round_times"})
    cfg = dataclasses.replace(engine_config_from_args(args, model), graph_query_lens=tuple(sorted({1, 2, args.block_size})),
                              fp8_weights=args.fp8_weights)
    with keep_awake.for_service(args.keep_awake, args.device):
        run_async(serve_until_signal(serve(cfg, args.host, args.port, metrics_port=args.metrics_port,
                                         health_port=args.health_port, auth_token=args.auth_token,
                                         tls_cert=args.tls_cert, tls_key=args.tls_key,
                                         tls_client_ca=args.tls_client_ca)))


def main(argv=None) -> None:
    argv, debug = pop_debug(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    with user_errors("pearl draft", debug):
        run(args)


if __name__ == "__main__":
    main()
