"""A failing round reports INTERNAL for its requests and the loop keeps serving."""
import asyncio

import grpc
import pytest

from pearl_runtime.pb import common_pb2, target_pb2
from pearl_runtime.config import EngineConfig
from target_service.rounds import GatewayStream, TargetService


@pytest.mark.parametrize("ar_steps,step_fn", [(1, "forward"), (4, "chain_round")])
def test_round_exception_fails_requests_and_loop_survives(llama_dir, ar_steps, step_fn):
    async def main():
        service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=256), mode="ar", ar_steps=ar_steps)
        loop_task = asyncio.create_task(service.run())
        stream = GatewayStream()
        real_step = getattr(service.core, step_fn)
        calls = {"n": 0}

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected")
            return real_step(*args)

        setattr(service.core, step_fn, flaky)
        params = common_pb2.SamplingParams(max_tokens=5, ignore_eos=True)
        service.submit(stream, target_pb2.Submission(request_id="a", prompt_ids=[5, 6, 7], params=params))
        first = await asyncio.wait_for(stream.out.get(), 30)
        upd = first.tokens.updates[0]
        assert upd.request_id == "a" and "injected" in upd.error
        assert upd.error_code == grpc.StatusCode.INTERNAL.value[0]
        service.submit(stream, target_pb2.Submission(request_id="b", prompt_ids=[5, 6, 7], params=params))
        tokens = []
        while True:
            msg = await asyncio.wait_for(stream.out.get(), 30)
            u = msg.tokens.updates[0]
            tokens += list(u.token_ids)
            if u.finish_reason:
                break
        assert len(tokens) == 5
        loop_task.cancel()

    asyncio.run(main())
