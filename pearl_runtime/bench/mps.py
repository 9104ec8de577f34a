"""CUDA MPS for draft and target on one GPU: start a private control daemon, give each
service its SM share, stop the daemon afterwards (`pearl bench --mps`, `pearl up --mps`).

Without MPS two processes on one GPU time-slice: the draft's steps and the target's forward
cannot overlap, so PEARL cannot beat sd by overlapping them (see DESIGN.md, "One GPU").
"""
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator

from pearl_runtime.errors import UsageError
from pearl_runtime.log import get_logger

log = get_logger(__name__)

CONTROL = "nvidia-cuda-mps-control"


def parse_shares(text: str) -> tuple[int, int]:
    """"80,20" -> (target %, draft %) of the SMs each may use."""
    try:
        target, draft = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mps-shares wants 'TARGET,DRAFT' percentages, got {text!r}") from None
    if not (0 < target <= 100 and 0 < draft <= 100):
        raise ValueError(f"--mps-shares percentages must be in 1..100, got {text!r}")
    return target, draft


def preflight(shares_text: str) -> tuple[int, int]:
    """--mps checked before anything starts: the shares parse and the control daemon's binary is there."""
    try:
        shares = parse_shares(shares_text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _need_control()
    return shares


def _need_control() -> None:
    if shutil.which(CONTROL) is None:
        raise UsageError(f"--mps: {CONTROL} is not on PATH (it ships with the NVIDIA driver)")


def same_gpu(target_device: str, draft_device: str) -> bool:
    """Whether two --device values name the same GPU ("cuda" is cuda:0)."""
    norm = lambda d: "cuda:0" if d == "cuda" else d   # noqa: E731
    return target_device.startswith("cuda") and norm(target_device) == norm(draft_device)


def sharing_warning(modes, target_device: str, draft_device: str, mps: bool) -> str | None:
    """What to tell a user whose draft and target share one GPU without MPS (None otherwise)."""
    if mps or not same_gpu(target_device, draft_device) or "pearl" not in modes:   # auto leaves pearl out here
        return None
    return (f"draft and target share {target_device} WITHOUT MPS: they time-slice the GPU, so PEARL cannot "
            f"overlap drafting with verifying (on one GPU sd was faster in our runs, benchmarks/journal/BENCHMARKS.md); "
            f"use --mps, or put the draft on another GPU (--draft-device cuda:1)")


@contextmanager
def mps_daemon(shares: tuple[int, int]) -> Iterator[dict[str, dict[str, str]]]:
    """Run a CUDA MPS control daemon for the duration; yields the extra environment of each
    service ({"target": ..., "draft": ..., "gateway": ...}; a None value unsets a variable).
    Its pipe and log directories are private temp dirs, so it neither joins nor disturbs a
    system-wide daemon."""
    _need_control()
    pipe, logs = tempfile.mkdtemp(prefix="pearl-mps-pipe-"), tempfile.mkdtemp(prefix="pearl-mps-log-")
    base = {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": logs}
    env = {**os.environ, **base}
    done = subprocess.run([CONTROL, "-d"], env=env, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        output = " ".join((done.stderr or done.stdout).split())
        raise UsageError(f"--mps: `{CONTROL} -d` failed (rc {done.returncode}): {output or 'no output'}")
    target, draft = shares
    log.warning("CUDA MPS is ON: daemon pipe %s, SM shares target %d%% / draft %d%%", pipe, target, draft)
    client = dict(base)
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        # the MPS server renumbers the GPUs its daemon sees (3 -> 0): a client that kept
        # CUDA_VISIBLE_DEVICES=3 would ask it for a GPU 3 it does not have ("No CUDA GPUs are
        # available"), so the services run without it and see the daemon's GPUs as 0, 1, ...
        client["CUDA_VISIBLE_DEVICES"] = None
        log.warning("MPS renumbers the GPUs CUDA_VISIBLE_DEVICES=%s selects from 0; --target-device and "
                    "--draft-device index those", os.environ["CUDA_VISIBLE_DEVICES"])
    try:
        yield {"target": {**client, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(target)},
               "draft": {**client, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(draft)},
               "gateway": dict(client)}
    finally:
        try:
            subprocess.run([CONTROL], input="quit\n", env=env, capture_output=True, text=True, timeout=30)
            log.warning("CUDA MPS daemon stopped")
        except (subprocess.SubprocessError, OSError) as e:
            log.error("could not stop the CUDA MPS daemon (pipe %s): %s", pipe, e)
        shutil.rmtree(pipe, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def server_list(mps_env: dict[str, str]) -> list[str]:
    """PIDs of the MPS servers the daemon runs (empty: no client has connected through it)."""
    env = {k: v for k, v in {**os.environ, **mps_env}.items() if v is not None}
    done = subprocess.run([CONTROL], input="get_server_list\n", env=env,
                          capture_output=True, text=True, timeout=30)
    return done.stdout.split()
