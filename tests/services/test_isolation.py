"""One bad request never hurts another, through real processes: a request that fails in the
target's round fails alone (the rest of its batch == ar), and numeric edge cases are refused
by the gateway and, for a caller that skips it, by the target."""
import asyncio
import math
import random
from unittest import mock

import grpc
import pytest

from pearl_runtime import launch
from pearl_runtime.client import generate
from pearl_runtime.pb import common_pb2, target_pb2, target_pb2_grpc
from pearl_runtime.rpc.server import GRPC_OPTIONS
from tests.services.poisoned_target import POISON_SEED
from tests.services.procs import Stack, reference_greedy, run


@pytest.fixture(scope="module")
def poisoned(cluster) -> Stack:
    """gateway -> PEARL target whose judge raises for the request seeded POISON_SEED -> copy draft."""
    if "copy" not in cluster.drafts:
        cluster.drafts["copy"] = cluster.new_draft(cluster.draft_models["copy"], "draft-copy")
    draft = cluster.drafts["copy"]
    target = cluster.new_target("pearl", draft, "target-poisoned")
    gateway = cluster.new_gateway(target, "gateway-poisoned")
    with mock.patch.dict(launch.MODULES, target="tests.services.poisoned_target"):
        cluster.launch([draft, target, gateway], handshakes=[draft])
    yield Stack(gateway, target, draft, "pearl", "copy", cluster.target_model)
    for s in (gateway, target):
        s.kill()


def test_a_poisoned_request_fails_alone_and_its_batch_equals_ar(poisoned, service_models):
    rng = random.Random(27)
    prompts = [[rng.randrange(448) for _ in range(rng.randrange(4, 20))] for _ in range(8)]
    want = reference_greedy(service_models[0], prompts, [40] * 8)

    async def body():
        # one gather: the gateway coalesces them into one Submit, the target runs them as one batch
        return await asyncio.gather(*(
            generate(poisoned.gateway.address, token_ids=p, max_tokens=40, ignore_eos=True,
                     seed=POISON_SEED if i == 5 else None, timeout_s=60)
            for i, p in enumerate(prompts)), return_exceptions=True)

    got = run(body())
    bad = got.pop(5)
    assert isinstance(bad, grpc.aio.AioRpcError), bad
    assert bad.code() == grpc.StatusCode.INTERNAL
    assert "FloatingPointError: poisoned: probabilities are NaN" in bad.details()
    assert "Traceback" not in bad.details()
    del want[5]
    assert [g.token_ids for g in got] == want
    assert all(g.finish_reason == "length" for g in got)
    assert "round failed" not in poisoned.target.log()   # contained in the request, not the round
    # the target serves on
    again = run(generate(poisoned.gateway.address, token_ids=prompts[0], max_tokens=40, ignore_eos=True))
    assert again.token_ids == want[0]


@pytest.mark.parametrize("value", [1e-45, math.inf, -math.inf, math.nan, 1e30, 1e-30],
                         ids=["denormal", "inf", "-inf", "nan", "1e30", "1e-30"])
def test_the_gateway_refuses_an_edge_case_temperature(poisoned, value):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(generate(poisoned.gateway.address, token_ids=[5, 6, 7], max_tokens=4, temperature=value, timeout_s=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("params.temperature: "), e.value.details()


STRAIGHT = {
    "max_tokens int32 max": (dict(max_tokens=2**31 - 1), "params.max_tokens"),
    "temperature denormal": (dict(temperature=1e-45), "params.temperature"),
    "temperature 1e30": (dict(temperature=1e30), "params.temperature"),
    "top_p nan": (dict(top_p=math.nan), "params.top_p"),
}


def test_the_target_refuses_what_skips_the_gateway(poisoned):
    """Target.Serve, called directly, applies the gateway's rules (one validation module)."""
    async def body():
        async with grpc.aio.insecure_channel(poisoned.target.address, options=GRPC_OPTIONS) as ch:
            call = target_pb2_grpc.TargetStub(ch).Serve()
            items = [target_pb2.Submission(request_id=name, prompt_ids=[5, 6, 7],
                                           params=common_pb2.SamplingParams(**({"max_tokens": 4} | params)))
                     for name, (params, _) in STRAIGHT.items()]
            items.append(target_pb2.Submission(request_id="fine", prompt_ids=[5, 6, 7],
                                               params=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)))
            await call.write(target_pb2.TargetIn(submit=target_pb2.SubmitBatch(items=items)))
            ended = {}
            while len(ended) < len(items):
                out = await asyncio.wait_for(call.read(), 60)
                assert out is not grpc.aio.EOF
                for u in out.tokens.updates:
                    if u.error or u.finish_reason:
                        ended[u.request_id] = (u.error_code, u.error, u.finish_reason)
            await call.done_writing()
            return ended

    ended = run(body())
    assert ended.pop("fine")[2] == common_pb2.FINISH_REASON_LENGTH
    for name, (_, field) in STRAIGHT.items():
        code, error, _ = ended[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and error.startswith(field + ": "), (name, error)
