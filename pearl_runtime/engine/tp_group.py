"""A tensor-parallel worker group behind the ModelRunner interface.

Rank 0 lives in the calling process and is a ModelRunner: it prepares each step, hands the
StepInput to ranks 1..tp-1 (worker processes started here), and every rank executes it. The
LM head all-gathers the vocab shards, so rank 0 returns full logits like a plain runner.
"""
import atexit
import dataclasses
import os
import pickle
import signal
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.model_runner import ModelRunner
from pearl_runtime.engine.step import StepInput
from pearl_runtime.utils.dist import set_tp, tp_scope
from pearl_runtime import envs
from pearl_runtime.log import get_logger

log = get_logger(__name__)



class TPWorkerError(RuntimeError):
    """A worker rank failed or died: the group cannot run another step."""


def make_runner(cfg: EngineConfig) -> ModelRunner:
    """The engine's model runner: a plain one, or rank 0 of a TP group when cfg.tp_size > 1."""
    return TPModelRunner(cfg) if cfg.tp_size > 1 else ModelRunner(cfg)


JOIN_TIMEOUT_S = 600.0


def _rank_cfg(cfg: EngineConfig, rank: int) -> EngineConfig:
    return dataclasses.replace(cfg, device=cfg.rank_device(rank), devices=None)


def _join_group(cfg: EngineConfig, rank: int, store: dist.Store) -> None:
    # NVLink multicast (NVLS) buffers fail to allocate on some hosts and containers; the
    # plain NCCL algorithms lose nothing at TP sizes of one node
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    device = torch.device(cfg.rank_device(rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # every rank reaches the store before the group forms: forming it waits only the collective
    # timeout below, and a spawned rank first imports torch, longer than that on a loaded host
    store.set(f"pearl/joined/{rank}", "1")
    store.wait([f"pearl/joined/{r}" for r in range(cfg.tp_size)], timedelta(seconds=JOIN_TIMEOUT_S))
    # PEARL_TP_TIMEOUT_S: how long a collective may wait (torch's default: NCCL 10 min, gloo 30)
    timeout = envs.get("PEARL_TP_TIMEOUT_S")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=cfg.tp_size, timeout=timedelta(seconds=float(timeout)) if timeout else None)


def _exit_with_parent(parent: int) -> None:
    # a worker blocked in a collective would outlive a killed service; NCCL never notices
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker(cfg: EngineConfig, rank: int, port: int, conn, steps, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches every process: rank 0 decides
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        if cfg.device == "cpu":
            torch.set_num_threads(int(cfg.extra.get("threads", 0)) or max(1, os.cpu_count() // cfg.tp_size))
        store = dist.TCPStore("127.0.0.1", port, cfg.tp_size, is_master=False)
        _join_group(cfg, rank, store)
        set_tp(rank, cfg.tp_size)
        runner = ModelRunner(_rank_cfg(cfg, rank))
        conn.send(("ready", None))
        # steps come down a pipe, not a collective: an idle service's workers wait here for as
        # long as no request comes, and a collective would time out (torch's defaults: NCCL
        # 10 min, gloo 30), which killed them at the first request after a quiet spell
        while (step := pickle.loads(steps.recv_bytes())) is not None:
            runner.execute(step)
        runner.release_graphs()
        _leave_group()
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise


def _leave_group() -> None:
    """Leave the group once every rank has stopped stepping. NCCL: abort the communicators,
    because destroying them waits on state that captured CUDA graphs keep alive and was seen
    hanging on two GPUs even after the graphs were dropped (pytorch#115388); gloo: destroy."""
    if dist.get_backend() == "nccl":
        _abort_group()
        log.info("left the NCCL group (communicators aborted)")
    else:
        dist.destroy_process_group()


def _abort_group() -> None:
    """Leave an NCCL group whose peers are gone, without waiting for them."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group
        _abort_process_group()
    except Exception as e:   # a private API: if it moved, the process exits with the group open
        log.warning("could not abort the NCCL group (%s); it stays open until the process exits", e)


def _receive(conn) -> tuple[str, str | None]:
    """A worker's next report: ("ready", None), ("error", traceback) or ("gone", None)."""
    try:
        return conn.recv() if conn.poll(0) else ("gone", None)
    except (EOFError, OSError):
        return "gone", None


class TPModelRunner(ModelRunner):
    chains_on_device = False   # workers get host StepInputs only
    """Rank 0 of a TP group of cfg.tp_size processes; a drop-in ModelRunner. Close it with
    close() (also run at exit). One group per process: it owns the default process group."""

    def __init__(self, cfg: EngineConfig):
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed group; one TP group per process")
        self.tp_size, self.workers, self.ready, self.closed = cfg.tp_size, [], False, False
        self.steps = []   # the send end of each worker's step pipe
        os.environ["NCCL_NVLS_ENABLE"] = "0"   # before any NCCL init, inherited by the workers
        # port 0: the OS picks a free port, so concurrent groups never race for one
        store = dist.TCPStore("127.0.0.1", 0, cfg.tp_size, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        for rank in range(1, cfg.tp_size):
            recv, send = ctx.Pipe(duplex=False)
            step_recv, step_send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(cfg, rank, store.port, send, step_recv, os.getpid()),
                               name=f"pearl-tp{rank}", daemon=True)
            proc.start()
            send.close()
            step_recv.close()
            self.workers.append((proc, recv))
            self.steps.append(step_send)
        atexit.register(self.close)
        try:
            _join_group(cfg, 0, store)
            with tp_scope(0, cfg.tp_size):
                super().__init__(_rank_cfg(cfg, 0))
            self._wait_ready()
        except BaseException as e:
            # a collective that fails (RuntimeError) usually means a worker died: say which
            dead = self._dead_worker(wait_s=2.0 if isinstance(e, RuntimeError) else 0.0)
            self.close()
            if dead and not isinstance(e, TPWorkerError):
                raise TPWorkerError(dead) from e
            raise
        log.info("tensor parallel: %d ranks (%s) on %s", cfg.tp_size, dist.get_backend(),
                 [cfg.rank_device(r) for r in range(cfg.tp_size)])

    def _wait_ready(self) -> None:
        for rank, (proc, conn) in enumerate(self.workers, 1):
            while not conn.poll(0.2):
                if not proc.is_alive():
                    break
            kind, detail = _receive(conn)
            if kind != "ready":
                raise TPWorkerError(self._dead_worker(wait_s=2.0) or f"TP rank {rank} failed while loading:\n{detail}")
        self.ready = True

    def _dead_worker(self, wait_s: float = 0.0) -> str | None:
        """Why a worker is gone (its exit code and traceback), or None while all run."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, (proc, conn) in enumerate(self.workers, 1):
                if proc.exitcode is None:
                    continue
                why = ""
                while (report := _receive(conn))[0] != "gone":
                    why = report[1] if report[0] == "error" else why
                code = proc.exitcode
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return f"TP rank {rank} (pid {proc.pid}) {how}" + (f":\n{why}" if why else "")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def execute(self, step: StepInput, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:   # workers get the StepInput from the host, never a device tensor
            raise ValueError("a TP group's steps take host token ids only (chains_on_device is False)")
        if not self.ready:
            # inside ModelRunner.__init__ (warm-up, calibration): each rank runs these steps itself
            return super().execute(step)
        if self.closed:
            raise RuntimeError("the TP group is closed")
        if dead := self._dead_worker():
            raise TPWorkerError(dead)
        try:
            self._send_step(step)
            return super().execute(step)
        except Exception as e:
            if dead := self._dead_worker(wait_s=1.0):
                raise TPWorkerError(dead) from e
            raise

    def _send_step(self, step: StepInput | None) -> None:
        """The step (None: stop) to every worker, pickled once: a pipe write per worker costs
        less than a gloo broadcast of the same StepInput."""
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        for pipe in self.steps:
            pipe.send_bytes(data)

    def close(self) -> None:
        """Stop the workers (they leave their loop on a None step) and leave the group."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        stopped = False
        if self.ready and self._dead_worker() is None:
            try:
                self._send_step(None)
                stopped = True
            except Exception:   # a worker died meanwhile: terminated below
                pass
        if dist.is_initialized():
            if stopped or dist.get_backend() != "nccl":
                # leave together with the workers, which leave as soon as they see the None
                # step (rank 0 waiting for them to exit first was seen hanging)
                self.release_graphs()
                _leave_group()
            else:
                _abort_group()
        for proc, conn in self.workers:
            proc.join(timeout=10 if self.ready else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        for pipe in self.steps:
            pipe.close()
