"""The `pearl` command: services, the local stack, a streaming client, model preparation."""
import argparse
import asyncio
import os
import signal
import sys

from pearl_runtime import envs, launch
from pearl_runtime.launch import Stack, new_auth_token
from pearl_runtime.models.default_model import default_draft, default_model


def cmd_up(args) -> None:
    from contextlib import ExitStack

    from pearl_runtime.bench.mps import sharing_warning
    _check_up(args)
    devices = [getattr(args, f"{w}_device", None) or args.device for w in ("target", "draft")]
    if warning := sharing_warning([args.mode], *devices, args.mps):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    with ExitStack() as scope:
        env = None
        if args.mps:
            from pearl_runtime.bench.mps import mps_daemon, preflight
            env = scope.enter_context(mps_daemon(preflight(args.mps_shares)))
        _run_up(args, Stack(args, env))


def _check_up(args) -> None:
    """What would stop a service at start, found before any starts: the model directories, the ports."""
    from pearl_runtime.models.check import check_model_dir
    from pearl_runtime.rpc.server import check_ports
    if args.model:
        check_model_dir(args.model, fast_tokenizer=True)   # the gateway's tokenizer too
    if args.draft_model and args.mode != "ar":
        check_model_dir(args.draft_model)
    b, m = args.base_port, args.metrics_port
    ports = {"the draft's, --base-port": b if args.mode != "ar" else 0, "the target's, --base-port + 1": b + 1,
             "the gateway's, --base-port + 2": b + 2}
    if m:
        ports |= {"the draft's metrics, --metrics-port": m, "the target's metrics, --metrics-port + 1": m + 1,
                  "the gateway's metrics, --metrics-port + 2": m + 2}
    check_ports("127.0.0.1", ports)


def _run_up(args, stack: Stack) -> None:
    args.auth_token = new_auth_token()   # every hop of this run requires it; never printed
    address = stack.start()
    print(f"pearl is up: gateway at {address} (Ctrl-C stops all three)", flush=True)
    try:
        if args.prompt:
            _print_generation(address, args.prompt, args.max_tokens, auth_token=args.auth_token)
        else:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def _print_generation(address: str, prompt: str, max_tokens: int, raw: bool = False, as_json: bool = False,
                      **request) -> None:
    """Stream one completion to stdout: the text as it comes and a stats line, or (`as_json`)
    one JSON object at the end."""
    from pearl_runtime.client import generate

    def on_delta(text, _ids):
        print(text, end="", flush=True)

    kw = {"prompt": prompt} if raw else {"chat": [("user", prompt)]}
    done = asyncio.run(generate(address, max_tokens=max_tokens, on_delta=None if as_json else on_delta,
                                **kw, **request))
    s = done.stats
    if as_json:
        import dataclasses
        import json
        print(json.dumps({"request_id": done.request_id, "text": done.text, "finish_reason": done.finish_reason,
                          "token_ids": done.token_ids, "stats": dataclasses.asdict(s)}), flush=True)
        return
    print(f"\n-- prompt tokens {s.prompt_tokens} | new tokens {s.new_tokens} | "
          f"mean accepted tokens {s.mean_accepted_tokens:.2f} | {s.tokens_per_s:.1f} tokens/s | "
          f"first token {s.time_to_first_token_ms:.0f} ms | finish {done.finish_reason} | mode {s.mode}")


def cmd_generate(args) -> None:
    _print_generation(args.address, args.prompt, args.max_tokens, raw=args.raw, as_json=args.json,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                      stop=tuple(args.stop), model=args.model, auth_token=args.auth_token,
                      tls_ca=args.tls_ca, tls_server_name=args.tls_server_name)


def cmd_health(args) -> None:
    """One health check for probes and Docker HEALTHCHECK: the status on stdout, exit 0 only when SERVING."""
    from pathlib import Path

    import grpc

    from pearl_runtime.rpc.health import check
    creds = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes()) if args.tls_ca else None
    status = asyncio.run(check(args.address, args.service, args.timeout, creds))
    print(status, flush=True)
    sys.exit(0 if status == "SERVING" else 1)


class _ProbeParser(argparse.ArgumentParser):
    """Docker reserves exit code 2 in healthchecks: a usage error exits 1, in one stderr line."""

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message}\n")


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", help="host:port of a gateway, target or draft")
    p.add_argument("--service", default="", help='"" (overall readiness, the default), liveness, or a pearl service name')
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before the service counts as unreachable")
    p.add_argument("--tls-ca", default=envs.default("PEARL_TLS_CA"), help="PEM certificate to trust: connect over TLS")
    p.set_defaults(fn=cmd_health)


def cmd_models(args) -> None:
    if args.action == "prepare":
        path = default_model()
        print(path)
        print(default_draft(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pearl", description="PEARL speculative decoding as gRPC services")
    sub = p.add_subparsers(dest="cmd", required=True)

    for what, about in (("draft", "run the draft service"), ("target", "run the target service"),
                        ("gateway", "run the gateway")):
        sub.add_parser(what, help=f"{about} (python -m {launch.MODULES[what]}; its --help lists the flags)",
                       add_help=False)
    u = sub.add_parser("up", help="start draft, target and gateway locally")
    u.add_argument("--model", default=envs.default("PEARL_MODEL"))
    u.add_argument("--draft-model", default=envs.default("PEARL_DRAFT_MODEL"))
    u.add_argument("--mode", choices=("auto", "pearl", "sd", "ar"), default=envs.default("PEARL_MODE"),
                   help="auto: per batch size, whichever of ar, sd and pearl measures fastest (pearl only where "
                        "the draft has its own GPU, or under --mps where its rounds measure it faster)")
    u.add_argument("--gamma", default=envs.default("PEARL_GAMMA"),
                   help="draft tokens per round, or auto (the target's default)")
    u.add_argument("--device", default="cpu")
    u.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    u.add_argument("--target-device", default=None, help="default: --device")
    u.add_argument("--draft-device", default=None, help="default: --device (the same GPU)")
    u.add_argument("--mps", action="store_true", help="one GPU: run draft and target under CUDA MPS")
    u.add_argument("--mps-shares", default="100,50",
                   help="SM percentages target,draft under --mps (some shares break cuBLAS on H100: engine/gemm_check.py)")
    u.add_argument("--base-port", type=int, default=50050 + 10)
    u.add_argument("--log-level", default=envs.default("PEARL_LOG_LEVEL", fallback="warning"),
                   help="of all three services (default: warning, so a prompt's text stands out)")
    u.add_argument("--metrics-port", type=int, default=0,
                   help="first of three /metrics ports: draft N, target N+1, gateway N+2 (0: off)")
    u.add_argument("--prompt", help="run one streamed generation, print stats, then stop")
    u.add_argument("--max-tokens", type=int, default=96)
    u.set_defaults(fn=cmd_up)

    from pearl_runtime.bench.run import add_arguments as bench_arguments
    from pearl_runtime.bench.run import main as bench_main
    b = sub.add_parser("bench", help="ar vs sd vs PEARL: tokens/s, speedup, round split, HBM bandwidth")
    bench_arguments(b)
    b.set_defaults(fn=bench_main)

    gen = sub.add_parser("generate", help="stream a completion from a gateway")
    gen.add_argument("prompt")
    gen.add_argument("--address", default=envs.default("PEARL_GATEWAY"))
    gen.add_argument("--model", default="", help="the served model name to ask for (default: the gateway's)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the gateway's, greedy)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the probability mass kept")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--seed", type=int, default=None, help="the sampling seed: the same seed, the same text")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end the completion before this text (repeat for several)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object at the end (text, finish_reason, token_ids, stats), not a stream")
    gen.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    gen.add_argument("--auth-token", default=envs.default("PEARL_AUTH_TOKEN"), help="bearer token the gateway expects")
    gen.add_argument("--tls-ca", default=envs.default("PEARL_TLS_CA"), help="PEM certificate to trust: connect over TLS")
    gen.add_argument("--tls-server-name", default=envs.default("PEARL_TLS_SERVER_NAME"),
                     help="name the certificate is issued for, when the address differs")
    gen.set_defaults(fn=cmd_generate)

    add_health_arguments(sub.add_parser("health", help="check a service's gRPC health: exit 0 when SERVING, else 1"))

    m = sub.add_parser("models", help="prepare the embedded default model (and its derived draft)")
    m.add_argument("action", choices=("prepare",))
    m.set_defaults(fn=cmd_models)

    return p


def main(argv=None) -> None:
    from pearl_runtime.usage import pop_debug, user_errors
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in launch.MODULES:   # a service runs as its own process, with its own flags
        os.execv(sys.executable, launch.service_argv(argv[0], argv[1:]))
    if argv[:1] == ["health"]:   # its own parser, so that a usage error exits 1, not 2
        health = _ProbeParser(prog="pearl health", description="check a service's gRPC health")
        add_health_arguments(health)
        args = health.parse_args(argv[1:])
        return args.fn(args)   # outside user_errors: its exit codes are 0 and 1 only
    argv, debug = pop_debug(argv)
    args = build_parser().parse_args(argv)
    with user_errors(f"pearl {args.cmd}", debug, address=getattr(args, "address", None)):
        if getattr(args, "mps", False):   # pearl up, pearl bench
            from pearl_runtime.bench.mps import preflight
            preflight(args.mps_shares)
        args.fn(args)


if __name__ == "__main__":
    main()
