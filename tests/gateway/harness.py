"""Start fake targets and a real gateway on free loopback ports, inside one event loop."""
import asyncio
import contextlib

from gateway.server import serve_gateway
from tests.gateway.fake_target import start_target


def run(coro, timeout_s: float = 30.0):
    """Run one async test body in a fresh event loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@contextlib.asynccontextmanager
async def gateway_over(tokenizer_dir, *fakes, ready: bool = True, **gateway_kwargs):
    """Yields (gateway, [(target server, port)]) once every target is ready (unless `ready` is
    False); everything is stopped on exit."""
    targets = [await start_target(f) for f in fakes]
    gw = await serve_gateway(targets=[f"127.0.0.1:{port}" for _, port in targets],
                             model_dir=tokenizer_dir, **gateway_kwargs)
    if ready:       # placement is then predictable
        await eventually(lambda: all(t.ready for t in gw.router.targets))
    try:
        yield gw, targets
    finally:
        await gw.stop(None)
        for server, _ in targets:
            await server.stop(None)


async def eventually(predicate, timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
