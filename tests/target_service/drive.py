"""Drive an in-process TargetService round by round, without a gateway (and a draft service
in the same process to link it to)."""
import asyncio
from contextlib import asynccontextmanager

from pearl_runtime.pb import common_pb2, draft_pb2_grpc, target_pb2
from pearl_runtime.config import EngineConfig
from pearl_runtime.rpc.server import bind, new_server
from target_service.rounds import GatewayStream


@asynccontextmanager
async def draft_server(draft_dir, num_blocks: int = 256, **engine):
    """A draft service on a loopback port of this process: yields (its servicer, its address).
    `engine`: more EngineConfig fields (fp8_weights="on", ...)."""
    from draft_service.server import DraftServicer
    draft = DraftServicer(EngineConfig(model=str(draft_dir), num_blocks=num_blocks, **engine))
    server = new_server()
    draft_pb2_grpc.add_DraftServicer_to_server(draft, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        yield draft, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        draft.close()


@asynccontextmanager
async def linked(service):
    """The service's draft link kept up (as `run` does) and connected before the body runs;
    marked down after it."""
    keeper = asyncio.get_running_loop().create_task(service.link.maintain())
    try:
        async with asyncio.timeout(60):
            while not service.link.connected:
                await asyncio.sleep(0.01)
        yield service
    finally:
        keeper.cancel()
        await service.link.mark_down()


async def one_round(service, stream: GatewayStream, got: dict[str, list[int]]) -> list[str]:
    """One round as `run` takes it (the inbox drained first), the stream's updates added to
    `got` by request id. Returns the ids of the requests that finished in it."""
    service._drain_inbox()
    await service.round()
    finished = []
    while not stream.out.empty():
        for u in stream.out.get_nowait().tokens.updates:
            got[u.request_id] += list(u.token_ids)
            if u.finish_reason:
                finished.append(u.request_id)
    return finished


async def generate(service, prompt: list[int], n: int) -> list[int]:
    """Greedy-generate n tokens for one request, one `service.round()` at a time."""
    stream = GatewayStream()
    service.submit(stream, target_pb2.Submission(request_id="a", prompt_ids=prompt,
                                                 params=common_pb2.SamplingParams(max_tokens=n, ignore_eos=True)))
    got = []
    while len(got) < n:
        service._drain_inbox()
        await service.round()
        while not stream.out.empty():
            got += [t for u in stream.out.get_nowait().tokens.updates for t in u.token_ids]
    return got
