"""A served target releases its engine when serve() stops: a TP group's workers exit and the
process leaves its torch.distributed group, so the same process can serve again (tests and
embedders run services in-process; before this, a second TP target there failed with 'this
process already has a torch.distributed group')."""
import asyncio
import multiprocessing

import torch.distributed as dist

import target_service.server as ts
from pearl_runtime.config import EngineConfig


async def _serve_then_stop(model_dir) -> None:
    ports = {}
    task = asyncio.create_task(ts.serve(
        EngineConfig(model=str(model_dir), block_size=8, num_blocks=48, tp_size=2),
        port=0, mode="ar", ready=lambda p: ports.setdefault("t", p)))
    for _ in range(600):
        if "t" in ports or task.done():
            break
        await asyncio.sleep(0.1)
    assert "t" in ports, task.exception() if task.done() else "the target never came up"
    assert dist.is_initialized()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _serve_twice(model_dir: str) -> None:
    for _ in range(2):   # the second start is what failed
        asyncio.run(_serve_then_stop(model_dir))
        assert not dist.is_initialized()
        assert not [p for p in multiprocessing.active_children() if p.name.startswith("pearl-tp")]


def test_stopped_tp_target_leaves_its_group_and_can_serve_again(llama_dir):
    """In a process of its own, as an embedder's would be: the test runner's process carries the
    state of every test before (its threads, its grpc core), which this one is not about."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_serve_twice, args=(str(llama_dir),), name="serve-twice")
    proc.start()
    proc.join(300)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0, f"the embedding process ended with {proc.exitcode} (see its stderr above)"
