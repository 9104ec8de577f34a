"""`pearl bench`: ar vs sd vs PEARL in one run on one machine, each mode through the real
services (draft, target, gateway as child processes, as `pearl up` starts them).

Order: device probe (copy bandwidth, HF baseline) in a child process; then per mode: start
the services, wait until the target really uses the draft, warm up every batch size, measure
every batch size; finally the tables and the JSON.
"""
import argparse
import asyncio
import datetime
import json
import logging
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from pearl_runtime import envs
from pearl_runtime import keep_awake
from pearl_runtime.bench import mps, projection, prompts as bench_prompts, report, roofline
from pearl_runtime.bench.measure import BenchError, measure, read_metrics, submit_batch
from pearl_runtime.log import get_logger

log = get_logger(__name__)
ROOT = Path(__file__).resolve().parents[2]
MODES = ("ar", "sd", "pearl", "auto")


def _service_flag(extra_args: str, flag: str) -> str | None:
    """The value a service's extra flags (`--target-args`, `--draft-args`) give `flag` (as
    `flag value` or `flag=value`), else None."""
    args = shlex.split(extra_args)
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _pearl_policy(rows: list[dict]) -> dict:
    """The pearl target's head start and quorum as it reported them (TargetMetrics), for the
    projection; the defaults where no pearl row ran."""
    for r in rows:
        policy = (r.get("metrics_diff") or {}).get("policy")
        if r["mode"] == "pearl" and policy:
            return {"head_start": policy["head_start"], "quorum": policy["head_start_quorum"]}
    return {"head_start": -1, "quorum": projection.HEAD_START_QUORUM}


def _keep_awake_setting(args, tdev: str, ddev: str) -> dict:
    """Whether each service ran its keep-awake spinners (pearl_runtime/keep_awake.py): its
    --keep-awake from --target-args / --draft-args, else the environment's, else auto."""
    default, quota = envs.get("PEARL_KEEP_AWAKE"), keep_awake.cpu_quota()
    return {who: keep_awake.wanted(_service_flag(extra, "--keep-awake") or default, dev, quota)
            for who, extra, dev in (("target", args.target_args, tdev), ("draft", args.draft_args, ddev))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("models")
    m.add_argument("--model", help="target model directory")
    m.add_argument("--draft-model", help="draft model directory")
    m.add_argument("--synthetic", metavar="TARGET/DRAFT",
                   help="shape-faithful synthetic pair, e.g. qwen2.5-7b/qwen2.5-0.5b (random weights)")
    m.add_argument("--accept", type=float, default=0.8, help="synthetic: the draft's calibrated acceptance")
    m.add_argument("--seed", type=int, default=0, help="synthetic: weights seed")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="device of both services (default: cuda if available, else cpu)")
    r.add_argument("--target-device", default=None, help="default: --device")
    r.add_argument("--draft-device", default=None, help="default: --device (the same GPU)")
    r.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    r.add_argument("--modes", default="ar,sd,pearl",
                   help="any of ar, sd, pearl, auto (the target's --mode auto: its pick per batch size)")
    r.add_argument("--batch-sizes", default="1,8,16,32,64")
    r.add_argument("--max-tokens", type=int, default=256, help="tokens every request generates (ignore_eos)")
    r.add_argument("--min-seqs", type=int, default=8,
                   help="sequences each batch size measures at least: batches of bs run one after another "
                        "until they are covered (bs=1: 8 prompts, not one stream)")
    r.add_argument("--warmup-tokens", type=int, default=16)
    r.add_argument("--prompt-len", type=int, default=None, help="cut prompts to this many tokens")
    r.add_argument("--prompts", default=str(bench_prompts.DEFAULT_PROMPTS), help="Spec-Bench style jsonl")
    r.add_argument("--gamma", default="4", help="draft tokens per round (passed to the target), or 'auto'")
    r.add_argument("--pearl-gamma", default=None,
                   help="gamma of the pearl mode only (default: --gamma); 'auto' balances its round")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--mps", action="store_true", help="one GPU: run draft and target under CUDA MPS")
    r.add_argument("--mps-shares", default="100,50",
                   help="SM percentages target,draft under --mps (some shares break cuBLAS on H100: engine/gemm_check.py)")
    r.add_argument("--hf-baseline", action="store_true", help="also time HF transformers generate at bs=1")
    r.add_argument("--kv-cache-gb", type=float, default=None, help="per service (default: sized for the run)")
    r.add_argument("--target-args", default="", help="extra `pearl target` flags, e.g. '--attention triton'")
    r.add_argument("--draft-args", default="", help="extra `pearl draft` flags")
    r.add_argument("--start-timeout", type=float, default=900.0, help="seconds for services to come up")
    r.add_argument("--draft-timeout", type=float, default=300.0, help="seconds for the target to start using the draft")
    r.add_argument("--threads", type=int, default=1, help="CPU threads per service (CPU runs)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<date>_<gpu>_<pair>.json)")
    o.add_argument("--label", default="")
    o.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw tokens/s and speedup over ar against batch size per mode (needs matplotlib: "
                        "the `plot` extra)")
    o.add_argument("--git-commit", default=envs.default("PEARL_GIT_COMMIT"),
                   help="the commit to record (default: git rev-parse HEAD; for a copy of the tree without .git)")


# -- setup -------------------------------------------------------------------------------------
def resolve_models(args) -> tuple[str, str | None, str, dict | None]:
    """(target dir, draft dir, pair name, synthetic spec)."""
    if args.synthetic:
        if args.model or args.draft_model:
            raise SystemExit("give either --synthetic or --model/--draft-model")
        target, _, draft = args.synthetic.partition("/")
        if not draft:
            raise SystemExit("--synthetic wants TARGET/DRAFT, e.g. qwen2.5-7b/qwen2.5-0.5b")
        from pearl_runtime.models.synthetic import prepare_synthetic_pair
        t, d = prepare_synthetic_pair(target, draft, args.accept, args.seed)
        return str(t), str(d), f"{target}_{draft}", {"target": target, "draft": draft, "accept": args.accept,
                                                     "seed": args.seed, "weights": "random, shape-faithful"}
    if not args.model:
        raise SystemExit("give --model (and --draft-model for sd/pearl) or --synthetic TARGET/DRAFT")
    target = str(Path(args.model).resolve())
    draft = str(Path(args.draft_model).resolve()) if args.draft_model else None
    pair = Path(target).name + (f"_{Path(draft).name}" if draft else "")
    return target, draft, pair, None


def free_base_port(tries: int = 200) -> int:
    """A port p with p, p+1, p+2 free on loopback."""
    for _ in range(tries):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for p in range(base, base + 3):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BenchError("no three consecutive free loopback ports")


def run_probe(device: str, dtype: str, target_dir: str, prompt_ids: list[int], max_tokens: int,
              hf: bool) -> dict:
    """Machine info, copy bandwidth and the HF baseline, in a child process (frees its memory)."""
    with tempfile.TemporaryDirectory(prefix="pearl-bench-probe-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"device": device, "dtype": dtype, "prompt_ids": prompt_ids,
                                   "max_tokens": max_tokens, "hf_model": target_dir if hf else None,
                                   "copy_mib": 1024 if device.startswith("cuda") else 64}))
        log.info("probing the device%s", " and timing the HF baseline" if hf else "")
        done = subprocess.run([sys.executable, "-m", "pearl_runtime.bench.probe", str(req), str(res)], cwd=ROOT)
        if done.returncode != 0:
            raise BenchError(f"the device probe failed (rc {done.returncode}); see its output above")
        return json.loads(res.read_text())


def default_out(probe: dict, pair: str, mps_on: bool, device: str) -> Path:
    gpu = probe["machine"].get("gpu") or ("cpu" if device == "cpu" else device)
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    return ROOT / "benchmarks" / "results" / f"{stamp}_{gpu}_{pair}{'_mps' if mps_on else ''}.json"


# -- one mode ------------------------------------------------------------------------------------
def stack_args(args, mode: str, target_dir: str, draft_dir: str | None, device: str, dtype: str,
               kv: dict[str, float], max_bs: int) -> argparse.Namespace:
    def engine(which: str, extra: str) -> list[str]:
        argv = ["--kv-cache-gb", f"{kv[which]:.3f}", "--max-num-seqs", str(max(max_bs, 1))]
        if device == "cpu":
            argv += ["--threads", str(args.threads)]
        return argv + shlex.split(extra)
    return argparse.Namespace(
        model=target_dir, draft_model=draft_dir, mode=mode, gamma=(args.pearl_gamma or args.gamma) if mode == "pearl" else args.gamma, device=device, dtype=dtype,
        target_device=args.target_device or device, draft_device=args.draft_device or device,
        base_port=free_base_port(), log_level="info", start_timeout_s=args.start_timeout,
        draft_wait_s=0,   # the bench waits for the draft itself (wait_for_draft), and fails loudly
        target_argv=engine("target", args.target_args), draft_argv=engine("draft", args.draft_args))


def log_tails(log_dir: Path, n: int = 30) -> str:
    parts = []
    for f in sorted(log_dir.glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()[-n:]
        parts.append(f"--- {f} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


async def wait_serving(stack, gateway: str, mode: str, prompt: list[int], timeout_s: float) -> None:
    """Until one request goes through the gateway and the target answers Metrics (a target
    still loading or capturing graphs makes the gateway park or refuse requests)."""
    import grpc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if any(not p.alive() for p in stack.procs):
            raise BenchError(f"{mode}: a service exited during start-up")
        try:
            await read_metrics(stack.target_address)
            await submit_batch(gateway, [prompt], 1, 60.0)
            return
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            if loop.time() > deadline:
                raise BenchError(f"{mode}: services not serving after {timeout_s:.0f}s: {e}") from e
            await asyncio.sleep(1.0)


async def wait_for_draft(stack, gateway: str, mode: str, prompt: list[int], timeout_s: float) -> None:
    """Until a request's rounds take the `mode` path (the target dialed the draft and uses it);
    auto: until the target's draft link is up (its path is its own choice)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if any(not p.alive() for p in stack.procs):
            raise BenchError(f"{mode}: a service exited while waiting for the draft")
        await submit_batch(gateway, [prompt], 4, timeout_s)
        m = await read_metrics(stack.target_address)
        if m.path == mode or (mode == "auto" and m.draft_connected):
            return
        if loop.time() > deadline:
            raise BenchError(f"{mode}: the target never used the draft in {timeout_s:.0f}s (last round path "
                             f"{m.path!r}); the draft did not connect or was refused (see draft.log/target.log). "
                             f"No fallback: a {mode} row measured in ar would be meaningless.")
        await asyncio.sleep(0.5)


async def until_ready(stack, gateway: str, mode: str, prompt: list[int], args) -> None:
    await wait_serving(stack, gateway, mode, prompt, args.start_timeout)
    if mode != "ar":
        await wait_for_draft(stack, gateway, mode, prompt, args.draft_timeout)
        log.info("%s: the target uses the draft", mode)


async def run_session(stack, gateway: str, mode: str, prompts: list[list[int]], args, batch_sizes) -> list[dict]:
    # CUDA graphs, Triton compiles, allocator: outside the measurement. Each batch size warms
    # twice: the first pass meets its prompts cold, the second finds them in the prefix cache,
    # as the measurement will; a first verify of that shape (the uncached tail plus gamma + 1
    # tokens) can run eagerly, and its kernels compile on first use
    for bs in [b for b in batch_sizes for _ in range(2)]:
        for batch in bench_prompts.batches(prompts, bs, args.min_seqs):
            await submit_batch(gateway, batch, args.warmup_tokens, args.start_timeout, args.temperature)
    rows = []
    for bs in batch_sizes:
        batches = bench_prompts.batches(prompts, bs, args.min_seqs)
        r = await measure(gateway, stack.target_address, batches, args.max_tokens, mode, args.temperature)
        r["_prompts"] = [p for b in batches for p in b]   # each output's prompt, for near_ties
        log.info("%s bs=%d: %.1f tokens/s, MAT %.2f, round %.2f ms", mode, bs, r["tokens_per_s"], r["mat"] or 0,
                 r["round_ms"])
        rows.append(r)
    return rows


def run_mode(args, mode: str, ns: argparse.Namespace, env: dict | None, log_dir: Path, prompts, batch_sizes,
             mps_info: dict | None) -> list[dict]:
    from pearl_runtime.launch import Stack
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(ns, env=env, log_dir=str(log_dir))
    log.info("%s: starting services (logs in %s)", mode, log_dir)
    try:
        gateway = stack.start()
        asyncio.run(until_ready(stack, gateway, mode, prompts[0], args))
        if mps_info is not None:      # the services hold CUDA contexts now: an MPS server must run
            servers = mps.server_list(env["target"])
            mps_info.setdefault("servers", {})[mode] = servers
            if not servers:
                raise BenchError(f"{mode}: --mps is on but the MPS daemon runs no server: the services did not "
                                 "connect through it")
        return asyncio.run(run_session(stack, gateway, mode, prompts, args, batch_sizes))
    except (SystemExit, Exception) as e:
        raise BenchError(f"{mode} failed: {e}\n{log_tails(log_dir)}") from e
    finally:
        stack.stop()


# -- main ----------------------------------------------------------------------------------------
def main(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    from pearl_runtime.config import ModelConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    modes.sort(key=MODES.index)
    if args.plot:
        from pearl_runtime.bench import plot
        plot.check()   # before the run: a missing matplotlib should not cost one
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    target_dir, draft_dir, pair, synthetic = resolve_models(args)
    if draft_dir is None and any(m != "ar" for m in modes):
        raise SystemExit("sd and pearl need --draft-model (or --synthetic)")
    tdev, ddev = args.target_device or device, args.draft_device or device
    one_gpu = mps.same_gpu(tdev, ddev)
    if args.mps and not one_gpu:
        log.warning("--mps with draft and target on different devices (%s, %s): MPS only matters on one GPU",
                    tdev, ddev)
    if warning := mps.sharing_warning(modes, tdev, ddev, args.mps):
        log.warning("%s", warning)

    vocab = ModelConfig.from_dir(target_dir).vocab_size
    texts = bench_prompts.load_turns(args.prompts)[:max(max(batch_sizes), args.min_seqs)]
    prompts = bench_prompts.tokenize(texts, target_dir, vocab, args.prompt_len)
    longest = max(len(p) for p in prompts)
    kv = {"target": args.kv_cache_gb or roofline.kv_cache_gb(target_dir, dtype, max(batch_sizes),
                                                             longest + args.max_tokens + 64)}
    if draft_dir:
        kv["draft"] = args.kv_cache_gb or roofline.kv_cache_gb(draft_dir, dtype, max(batch_sizes),
                                                               longest + args.max_tokens + 64)

    # a TP target (cuda:0,1) is probed on its first GPU: the copy bandwidth is per GPU
    probe = run_probe(tdev.split(",")[0], dtype, target_dir, prompts[0], args.max_tokens, args.hf_baseline)
    out = Path(args.out) if args.out else default_out(probe, pair, args.mps, device)
    logs = out.with_suffix(".logs")
    rows: list[dict] = []
    mps_info = None
    awake = _keep_awake_setting(args, tdev, ddev)

    def describe(complete: bool) -> dict:
        report.add_speedups(rows, greedy=args.temperature == 0)
        modes_done = {r["mode"] for r in rows}
        return {
            "schema": "pearl-bench/1", "label": args.label, "complete": complete,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": sys.argv, "git_commit": args.git_commit or _git_commit(),
            "machine": probe["machine"], "copy_bandwidth": probe["copy"],
            "hf_baseline": probe.get("hf_baseline"),
            "config": {"target_model": target_dir, "draft_model": draft_dir, "pair": pair, "synthetic": synthetic,
                       "device": device, "target_device": tdev, "draft_device": ddev, "one_gpu": one_gpu,
                       "dtype": dtype, "modes": modes, "batch_sizes": batch_sizes, "max_tokens": args.max_tokens,
                       "min_seqs": args.min_seqs,
                       "warmup_tokens": args.warmup_tokens, "gamma": args.gamma, "pearl_gamma": args.pearl_gamma or args.gamma, "temperature": args.temperature,
                       "kv_cache_gb": kv, "target_args": args.target_args, "draft_args": args.draft_args,
                       "mps": mps_info or {"on": False}, "keep_awake": awake},
            "prompts": {"path": str(args.prompts), "count": len(prompts), "prompt_len_cut": args.prompt_len,
                        "tokens": [len(p) for p in prompts]},
            "runs": report.public(rows),
            "hbm": report.hbm(rows, target_dir, dtype, len(prompts[0]), probe, gpus=len(tdev.split(","))) if complete else None,
            "projection": (report.project(rows, same_gpu=one_gpu and not args.mps,
                                          **_pearl_policy(rows))
                           if complete and modes_done & {"sd", "pearl"} else None),
            "logs": str(logs),
        }

    out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as scope:
        env = None
        if args.mps:
            shares = mps.parse_shares(args.mps_shares)
            env = scope.enter_context(mps.mps_daemon(shares))
            mps_info = {"on": True, "shares": {"target": shares[0], "draft": shares[1]},
                        "pipe": env["target"]["CUDA_MPS_PIPE_DIRECTORY"]}
        for mode in modes:
            ns = stack_args(args, mode, target_dir, draft_dir, device, dtype, kv, max(batch_sizes))
            rows += run_mode(args, mode, ns, env, logs / mode, prompts, batch_sizes, mps_info)
            # written after every mode: a run cut short by a time limit keeps what it measured
            out.write_text(json.dumps(describe(complete=False), indent=2))

    judge_near_ties(rows, target_dir, tdev.split(",")[0], dtype)
    result = describe(complete=True)
    out.write_text(json.dumps(result, indent=2))
    note = (f"synthetic pair {synthetic['target']} -> {synthetic['draft']} (random weights, acceptance calibrated "
            f"to {synthetic['accept']})" if synthetic else f"{target_dir} -> {draft_dir}")
    print(f"\npearl bench: {note}; {probe['machine'].get('gpu') or device}, {dtype}, max_tokens {args.max_tokens}"
          f", gamma {args.gamma} (pearl {args.pearl_gamma or args.gamma}), MPS {'on ' + args.mps_shares if args.mps else 'off'}"
          f"{', one GPU shared' if one_gpu else ''}, keep-awake target {'on' if awake['target'] else 'off'} "
          f"/ draft {'on' if awake['draft'] else 'off'}")
    print(report.table(rows))
    for line in (report.start_notes(rows) + report.auto_choice_text(rows) + report.divergence_text(rows)
                 + report.acceptance_text(rows) + report.transport_text(rows)):
        print(line)
    print()
    print(report.hbm_text(result["hbm"]))
    if result["projection"]:
        print()
        print(report.projection_text(result["projection"]))
    print(f"\nwrote {out}")
    if args.plot:
        print(f"plotted {plot.draw(rows, args.plot, note)}")


def judge_near_ties(rows: list[dict], target_dir: str, device: str, dtype: str) -> None:
    """Each greedy divergence from ar, judged at its first differing token by the target's logits
    there (bench/near_ties.py), in a child process like the probe's."""
    report.add_speedups(rows)
    ar = {r["batch_size"]: r for r in rows if r["mode"] == "ar"}
    todo = [(f, ar[r["batch_size"]]["_prompts"][f["request"]] + ar[r["batch_size"]]["_outputs"][f["request"]][:f["index"]])
            for r in rows for f in (r.get("divergence") or {}).get("firsts", []) if "ar_token" in f]
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="pearl-bench-ties-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"model": target_dir, "device": device, "dtype": dtype,
                                   "queries": [[prefix, f["ar_token"], f["token"]] for f, prefix in todo]}))
        log.info("judging %d divergences from ar at their first differing token", len(todo))
        done = subprocess.run([sys.executable, "-m", "pearl_runtime.bench.near_ties", str(req), str(res)], cwd=ROOT)
        if done.returncode != 0:
            log.warning("judging the divergences failed (rc %d): they count as NO", done.returncode)
            return
        for (f, _), judged in zip(todo, json.loads(res.read_text())["judged"]):
            f["judged"] = judged


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
