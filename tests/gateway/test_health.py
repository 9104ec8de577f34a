"""The gateway's grpc health follows its targets' health; routing goes only to SERVING targets."""
import asyncio

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pearl_runtime.client import generate, list_models
from pearl_runtime.rpc.health import Health, check
from tests.gateway.fake_target import FakeTarget, expected_tokens
from tests.gateway.harness import eventually, gateway_over, run

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=5)
    return reply.status


async def _until_status(address: str, service: str, want: int, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (got := await _status(address, service)) != want:
        assert asyncio.get_running_loop().time() < deadline, f"{service!r} stayed {got}"
        await asyncio.sleep(0.02)


def test_gateway_is_ready_only_once_its_target_is(tokenizer_dir):
    async def body():
        fake = FakeTarget(serving=False)
        async with gateway_over(tokenizer_dir, fake, ready=False) as (gw, _):
            await eventually(lambda: gw.router.targets[0].live and gw.router.targets[0].health.status != "UNKNOWN")
            assert await _status(gw.address, "") == NOT_SERVING
            assert await _status(gw.address, "pearl.v1.Gateway") == NOT_SERVING
            assert await _status(gw.address, "liveness") == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await list_models(gw.address)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no target is ready" in e.value.details()

            await fake.set_serving(True)
            await _until_status(gw.address, "", SERVING)
            assert await _status(gw.address, "pearl.v1.Gateway") == SERVING
            assert await list_models(gw.address) == ["tiny"]
    run(body())


def test_new_requests_go_only_to_the_serving_target(tokenizer_dir):
    async def body():
        idle, busy = FakeTarget(serving=False), FakeTarget()
        async with gateway_over(tokenizer_dir, idle, busy, ready=False) as (gw, _):
            await eventually(lambda: gw.router.targets[1].ready and gw.router.targets[0].live)
            outs = await asyncio.gather(*(generate(gw.address, token_ids=[1, 2], max_tokens=4, timeout_s=10)
                                          for _ in range(4)))
            assert all(o.token_ids == expected_tokens(2, 4) for o in outs)
            assert idle.batches == [] and sum(len(b) for b in busy.batches) == 4
    run(body())


def test_a_request_waits_while_no_target_is_serving_then_runs(tokenizer_dir):
    async def body():
        fake = FakeTarget()
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            await fake.set_serving(False)
            await _until_status(gw.address, "", NOT_SERVING)
            call = asyncio.create_task(generate(gw.address, token_ids=[3], max_tokens=5, timeout_s=10))
            await asyncio.sleep(0.2)
            assert not call.done() and fake.batches == []         # parked, not refused
            await fake.set_serving(True)
            assert (await call).token_ids == expected_tokens(1, 5)
    run(body())


def test_a_target_without_grpc_health_is_routed_by_its_connection(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(serving=None)) as (gw, _):
            await _until_status(gw.address, "", SERVING)
            out = await generate(gw.address, token_ids=[1], max_tokens=3, timeout_s=10)
            assert out.token_ids == expected_tokens(1, 3)

    with structlog.testing.capture_logs() as logs:
        run(body())
    legacy = [e for e in logs if e["event"] == "target has no grpc health; routing by its connection state"]
    assert len(legacy) == 1 and legacy[0]["health"] == "UNIMPLEMENTED"


def test_a_target_whose_health_does_not_know_its_service_is_routed_by_its_connection(tokenizer_dir):
    async def body():
        older = FakeTarget()
        older.health = Health("pearl.v1.SomethingElse")     # health, but not for pearl.v1.Target
        async with gateway_over(tokenizer_dir, older) as (gw, _):
            assert gw.router.targets[0].health.status == "SERVICE_UNKNOWN"
            assert (await generate(gw.address, token_ids=[1], max_tokens=2, timeout_s=10)).token_ids == [1, 2]
    run(body())


def test_stopping_turns_readiness_off_before_the_server_closes(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget()) as (gw, _):
            await _until_status(gw.address, "", SERVING)
            seen_at_stop = []
            real_stop = gw.server.stop

            async def stop(grace):
                seen_at_stop.append(await check(gw.address, "", timeout_s=5))   # still answering
                await real_stop(grace)
            gw.server.stop = stop
            await gw.stop(0.5)
            assert seen_at_stop == ["NOT_SERVING"]
            assert gw.readiness.health.reason == "shutting down"
    run(body())


def test_a_target_turning_not_serving_finishes_what_it_has(tokenizer_dir):
    async def body():
        draining, other = FakeTarget(step_s=0.01), FakeTarget(step_s=0.01)
        async with gateway_over(tokenizer_dir, draining, other) as (gw, _):
            first = asyncio.create_task(generate(gw.address, token_ids=[4], max_tokens=30, timeout_s=10))
            await eventually(lambda: draining.batches or other.batches)
            i = 0 if draining.batches else 1
            busy, idle, conn = [draining, other][i], [other, draining][i], gw.router.targets[i]
            await busy.set_serving(False)
            await eventually(lambda: not conn.ready)
            await eventually(lambda: gw.metrics.registry.get_sample_value(
                "pearl:gateway_target_ready", {"target": conn.address}) == 0)
            second = await generate(gw.address, token_ids=[5], max_tokens=3, timeout_s=10)
            assert (await first).token_ids == expected_tokens(1, 30)      # finished where it was
            assert second.token_ids == expected_tokens(1, 3)
            assert len(busy.batches) == 1 and len(idle.batches) == 1      # the new one went elsewhere
            assert await _status(gw.address, "") == SERVING                # one ready target is enough
    run(body())
