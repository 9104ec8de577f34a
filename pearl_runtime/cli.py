"""The `pearl` command: services, the local stack, a streaming client, model preparation."""
import argparse
import dataclasses
import asyncio
import os
import signal
import subprocess
import sys
import time

from pearl_runtime import envs, keep_awake


def default_model() -> str:
    from pearl_runtime.models.default_model import prepare_default_model
    return str(prepare_default_model(progress=True))


def default_draft(target: str) -> str:
    """The demo's draft, derived from the target's files (see pearl_runtime/models/derive.py)."""
    from pathlib import Path

    from pearl_runtime.models.derive import derive_quantized_draft
    return str(derive_quantized_draft(target, Path(target).with_name(Path(target).name + "-draft-int4")))


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=envs.default("PEARL_MODEL"), help="HF model directory (default: the embedded SmolLM2)")
    p.add_argument("--host", default=envs.default("PEARL_HOST"))
    p.add_argument("--device", default=envs.default("PEARL_DEVICE"),
                   help="cpu, cuda, cuda:N, or cuda:0,1,... (one GPU per tensor-parallel rank)")
    p.add_argument("--tp", type=int, default=envs.default("PEARL_TP"),
                   help="tensor-parallel ranks (processes); on GPU they take consecutive GPUs from --device")
    p.add_argument("--dtype", default=envs.default("PEARL_DTYPE"), help="float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=envs.default("PEARL_KV_CACHE_GB"))
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--attention", default="auto", help="auto | reference | triton | flash-attn")
    p.add_argument("--skinny-linears", default=envs.default("PEARL_SKINNY_LINEARS"),
                   help="steps of <= 16 tokens with norm/SiLU/residual folded into the linears: "
                        "auto (Triton on GPU for hidden size <= 2048) | triton | reference | off")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute every prompt (default: reuse cached KV blocks of shared prefixes)")
    p.add_argument("--threads", type=int, default=envs.default("PEARL_THREADS"), help="CPU threads for torch")
    p.add_argument("--keep-awake", default=envs.default("PEARL_KEEP_AWAKE"),
                   help="auto | on | off: a lowest-priority busy loop on each core, so a woken thread never "
                        "waits for a halted core (~0.2 ms a gRPC hop on virtual machines); auto: on with a GPU")
    p.add_argument("--log-level", default=envs.default("PEARL_LOG_LEVEL"))


def _engine_config(args, model: str):
    from pearl_runtime.config import EngineConfig
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return EngineConfig(model=model, dtype=dtype, device=args.device, block_size=args.block_size,
                        kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, attention_backend=args.attention,
                        skinny_linears=args.skinny_linears, tp_size=args.tp, enable_prefix_cache=args.prefix_cache, extra={"threads": args.threads})


def cmd_draft(args) -> None:
    from draft_service.server import serve
    from pearl_runtime.log import setup as setup_logging
    from pearl_runtime.rpc.server import run_async
    setup_logging("draft", args.log_level)
    model = args.model or default_draft(default_model())
    # the draft's steps feed one token, two after a bonus token, and a new request's first
    # round feeds the prompt's tail past the prefix cache's full blocks: up to a block. Out of
    # a graph that catch-up ran eagerly (host-bound: a draft round ~28 ms longer once per
    # request, 0.5B on an H200). Longer queries (an uncached prompt) stay eager.
    cfg = dataclasses.replace(_engine_config(args, model), graph_query_lens=tuple(sorted({1, 2, args.block_size})),
                              fp8_weights=args.fp8_weights)
    with keep_awake.for_service(args.keep_awake, args.device):
        run_async(_until_signal(serve(cfg, args.host, args.port)))


def _head_start(text: str) -> int:
    from pearl_runtime.spec.policy import parse_head_start
    try:
        return parse_head_start(text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _quorum(text: str) -> float:
    from pearl_runtime.spec.policy import parse_quorum
    try:
        return parse_quorum(text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def cmd_target(args) -> None:
    from pearl_runtime.log import setup as setup_logging
    from pearl_runtime.rpc.server import run_async
    from target_service.server import serve
    setup_logging("target", args.log_level)
    model = args.model or default_model()
    draft = None if args.mode == "ar" else args.draft
    gamma = None if str(args.gamma) == "auto" else int(args.gamma)
    with keep_awake.for_service(args.keep_awake, args.device):
        run_async(_until_signal(serve(_engine_config(args, model), args.host, args.port, args.mode, draft, gamma,
                                      ar_steps=args.ar_steps, max_gamma=args.max_gamma,
                                      head_start=_head_start(args.head_start),
                                      head_start_quorum=_quorum(args.head_start_quorum),
                                      device_tokens=args.device_tokens == "on",
                                      round_datagrams=args.round_datagrams == "on")))


def cmd_gateway(args) -> None:
    from gateway.server import run
    run(host=args.host, port=args.port, targets=args.targets.split(","), model_dir=args.model or default_model(),
        coalesce_ms=args.coalesce_ms, log_level=args.log_level, tls_cert=args.tls_cert, tls_key=args.tls_key,
        auth_token=args.auth_token)


async def _until_signal(coro) -> None:
    task = asyncio.ensure_future(coro)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait([task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


# -- the local stack ------------------------------------------------------------------------
DRAFT_WAIT_S = 60.0   # pearl up: how long the first request waits for the target's draft link


class Stack:
    """draft + target + gateway as child processes; stopped together. `env`: extra environment
    per service ("draft", "target", "gateway"), e.g. CUDA MPS settings; `log_dir`: each
    service's output goes to <log_dir>/<service>.log instead of this terminal. Optional
    attributes of `args`: dtype, target_device, draft_device, target_argv, draft_argv
    (extra engine flags), start_timeout_s, draft_wait_s (0: do not wait for the draft link)."""

    def __init__(self, args, env: dict | None = None, log_dir=None):
        self.args, self.procs, self.env, self.log_dir = args, [], env or {}, log_dir
        self.target_address = self.draft_address = None

    def start(self) -> str:
        a = self.args
        model = a.model or default_model()
        draft = None if a.mode == "ar" else (a.draft_model or default_draft(model))
        common = ["--log-level", a.log_level] + (["--dtype", a.dtype] if getattr(a, "dtype", None) else [])
        devices = {w: getattr(a, f"{w}_device", None) or a.device for w in ("target", "draft")}
        d, t, g = a.base_port, a.base_port + 1, a.base_port + 2
        self.target_address, self.draft_address = f"127.0.0.1:{t}", f"127.0.0.1:{d}"
        if a.mode != "ar":
            self._spawn("draft", ["--model", draft, "--port", str(d), "--device", devices["draft"]] + common
                        + list(getattr(a, "draft_argv", [])))
        self._spawn("target", ["--model", model, "--port", str(t), "--mode", a.mode, "--gamma", str(a.gamma),
                               "--draft", f"127.0.0.1:{d}", "--device", devices["target"]] + common
                    + list(getattr(a, "target_argv", [])))
        self._spawn("gateway", ["--model", model, "--port", str(g), "--targets", f"127.0.0.1:{t}",
                                "--log-level", a.log_level])
        address = f"127.0.0.1:{g}"
        self._wait_ready(address, draft_port=d if a.mode != "ar" else None,
                         timeout_s=getattr(a, "start_timeout_s", 300))
        return address

    def child_env(self, what: str) -> dict[str, str]:
        """The service's environment: ours plus its extra; an extra None unsets a variable."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env.get(what, {})}
        return {k: v for k, v in env.items() if v is not None}

    def _spawn(self, what: str, argv: list[str]) -> None:
        out = None
        if self.log_dir is not None:
            out = open(os.path.join(self.log_dir, f"{what}.log"), "a")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "pearl_runtime.cli", what] + argv,
                                           env=self.child_env(what),
                                           stdout=out, stderr=subprocess.STDOUT if out else None,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        if out is not None:
            out.close()

    def _wait_ready(self, address: str, draft_port: int | None, timeout_s: float = 300) -> None:
        from pearl_runtime.client import list_models
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self._check_alive()
            try:
                asyncio.run(list_models(address, timeout_s=2))
                break
            except Exception:
                time.sleep(0.5)
        else:
            self.stop()
            raise SystemExit(f"services not ready after {timeout_s}s")
        wait_s = getattr(self.args, "draft_wait_s", DRAFT_WAIT_S)
        if draft_port and wait_s > 0:
            self._wait_draft(wait_s)

    def _check_alive(self) -> None:
        if any(p.poll() is not None for p in self.procs):
            self.stop()
            raise SystemExit("a service exited during start-up (see its log above)")

    def _wait_draft(self, timeout_s: float) -> None:
        """Until the target reports a live draft stream, so the first request already speculates
        (a fixed pause lost that race on a cold machine: the demo's first tokens ran ar)."""
        import grpc

        from pearl_runtime.bench.measure import read_metrics
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self._check_alive()
            try:
                if asyncio.run(read_metrics(self.target_address, timeout_s=2)).draft_connected:
                    return
            except (grpc.RpcError, TimeoutError):   # not answering yet: ask again
                pass
            time.sleep(0.2)
        print(f"warning: the target has no draft after {timeout_s:.0f}s; it serves ar until the draft "
              "connects (see the draft's and the target's logs)", file=sys.stderr, flush=True)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def cmd_up(args) -> None:
    from contextlib import ExitStack

    from pearl_runtime.bench.mps import sharing_warning
    devices = [getattr(args, f"{w}_device", None) or args.device for w in ("target", "draft")]
    if warning := sharing_warning([args.mode], *devices, args.mps):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    with ExitStack() as scope:
        env = None
        if args.mps:
            from pearl_runtime.bench.mps import mps_daemon, parse_shares
            env = scope.enter_context(mps_daemon(parse_shares(args.mps_shares)))
        _run_up(args, Stack(args, env))


def _run_up(args, stack: Stack) -> None:
    address = stack.start()
    print(f"pearl is up: gateway at {address} (Ctrl-C stops all three)", flush=True)
    try:
        if args.prompt:
            _print_generation(address, args.prompt, args.max_tokens)
        else:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def _print_generation(address: str, prompt: str, max_tokens: int, raw: bool = False, **security) -> None:
    from pearl_runtime.client import generate

    def on_delta(text, _ids):
        print(text, end="", flush=True)

    kw = {"prompt": prompt} if raw else {"chat": [("user", prompt)]}
    done = asyncio.run(generate(address, max_tokens=max_tokens, on_delta=on_delta, **kw, **security))
    s = done.stats
    print(f"\n-- prompt tokens {s.prompt_tokens} | new tokens {s.new_tokens} | "
          f"mean accepted tokens {s.mean_accepted_tokens:.2f} | {s.tokens_per_s:.1f} tokens/s | "
          f"first token {s.time_to_first_token_ms:.0f} ms | finish {done.finish_reason} | mode {s.mode}")


def cmd_generate(args) -> None:
    _print_generation(args.address, args.prompt, args.max_tokens, raw=args.raw, auth_token=args.auth_token,
                      tls_ca=args.tls_ca, tls_server_name=args.tls_server_name)


def cmd_models(args) -> None:
    if args.action == "prepare":
        path = default_model()
        print(path)
        print(default_draft(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pearl", description="PEARL speculative decoding as gRPC services")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("draft", help="run the draft service")
    _engine_args(d)
    d.add_argument("--fp8-weights", default=envs.default("PEARL_FP8_WEIGHTS"), choices=("auto", "on", "off"),
                   help="round the draft's linears and LM head to fp8 so its decode steps read half the bytes "
                        "(lossless: the target verifies); auto: on where the Triton skinny kernels run on a GPU "
                        "of compute capability >= 8.9")
    d.add_argument("--port", type=int, default=envs.default("PEARL_DRAFT_PORT"))
    d.set_defaults(fn=cmd_draft)

    t = sub.add_parser("target", help="run the target service")
    _engine_args(t)
    t.add_argument("--port", type=int, default=envs.default("PEARL_TARGET_PORT"))
    t.add_argument("--mode", choices=("pearl", "sd", "ar"), default=envs.default("PEARL_MODE"))
    t.add_argument("--draft", default=envs.default("PEARL_DRAFT_ADDRESS"), help="draft service address")
    t.add_argument("--gamma", default=envs.default("PEARL_GAMMA"),
                   help="draft tokens per round, or 'auto': balance measured draft and verify step times (GPU)")
    t.add_argument("--head-start", default=envs.default("PEARL_HEAD_START"),
                   help="pearl: draft tokens to wait for when most sequences are in pre-verify, verified "
                        "with the first fresh one ('auto': gamma // 2; 0: plain PEARL, one token)")
    t.add_argument("--head-start-quorum", default=envs.default("PEARL_HEAD_START_QUORUM"),
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
    t.set_defaults(fn=cmd_target)

    g = sub.add_parser("gateway", help="run the gateway")
    g.add_argument("--model", default=envs.default("PEARL_MODEL"), help="model directory for the tokenizer")
    g.add_argument("--host", default=envs.default("PEARL_HOST"))
    g.add_argument("--port", type=int, default=envs.default("PEARL_GATEWAY_PORT"))
    g.add_argument("--targets", default=envs.default("PEARL_TARGETS"), help="comma-separated addresses")
    g.add_argument("--coalesce-ms", type=float, default=2.0)
    g.add_argument("--tls-cert", default=envs.default("PEARL_TLS_CERT"), help="PEM certificate: serve over TLS")
    g.add_argument("--tls-key", default=envs.default("PEARL_TLS_KEY"), help="PEM private key of --tls-cert")
    g.add_argument("--auth-token", default=envs.default("PEARL_AUTH_TOKEN"),
                   help="require 'authorization: Bearer <token>' on every call")
    g.add_argument("--log-level", default=envs.default("PEARL_LOG_LEVEL"))
    g.set_defaults(fn=cmd_gateway)

    u = sub.add_parser("up", help="start draft, target and gateway locally")
    u.add_argument("--model", default=envs.default("PEARL_MODEL"))
    u.add_argument("--draft-model", default=envs.default("PEARL_DRAFT_MODEL"))
    u.add_argument("--mode", choices=("pearl", "sd", "ar"), default="pearl")
    u.add_argument("--gamma", type=int, default=4)
    u.add_argument("--device", default="cpu")
    u.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    u.add_argument("--target-device", default=None, help="default: --device")
    u.add_argument("--draft-device", default=None, help="default: --device (the same GPU)")
    u.add_argument("--mps", action="store_true", help="one GPU: run draft and target under CUDA MPS")
    u.add_argument("--mps-shares", default="100,50",
                   help="SM percentages target,draft under --mps (some shares break cuBLAS on H100: engine/gemm_check.py)")
    u.add_argument("--base-port", type=int, default=50050 + 10)
    u.add_argument("--log-level", default="warning")
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
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    gen.add_argument("--auth-token", default=envs.default("PEARL_AUTH_TOKEN"), help="bearer token the gateway expects")
    gen.add_argument("--tls-ca", default=envs.default("PEARL_TLS_CA"), help="PEM certificate to trust: connect over TLS")
    gen.add_argument("--tls-server-name", default=envs.default("PEARL_TLS_SERVER_NAME"),
                     help="name the certificate is issued for, when the address differs")
    gen.set_defaults(fn=cmd_generate)

    m = sub.add_parser("models", help="prepare the embedded default model (and its derived draft)")
    m.add_argument("action", choices=("prepare",))
    m.set_defaults(fn=cmd_models)

    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
