"""One request's failure stays its own: the target fails it alone, the round's other requests
go on (their tokens equal target-only greedy), and a round that fails as a whole still tells
every request it holds how it ended."""
import asyncio
import math

import grpc
import pytest

from pearl_runtime.config import EngineConfig
from pearl_runtime.pb import common_pb2, target_pb2
from target_service import verifier
from target_service.rounds import GatewayStream, TargetService
from tests.services.procs import reference_greedy

POISON_SEED = 4242


async def collect(stream: GatewayStream, ids: set[str], timeout_s: float = 60.0) -> dict[str, dict]:
    """Each request's tokens and its end: {"tokens", "finish" or "error", "code"}."""
    got = {rid: {"tokens": []} for rid in ids}
    async with asyncio.timeout(timeout_s):
        while any(len(g) == 1 for g in got.values()):
            for u in (await stream.out.get()).tokens.updates:
                g = got[u.request_id]
                g["tokens"] += list(u.token_ids)
                if u.error:
                    g["error"], g["code"] = u.error, grpc.StatusCode(next(
                        c for c in grpc.StatusCode if c.value[0] == u.error_code))
                elif u.finish_reason:
                    g["finish"] = u.finish_reason
    return got


def submission(rid: str, prompt: list[int], max_tokens: int, **params) -> target_pb2.Submission:
    return target_pb2.Submission(request_id=rid, prompt_ids=prompt, params=common_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, **params))


@pytest.fixture
def service(llama_dir):
    async def make(**kw):
        svc = TargetService(EngineConfig(model=str(llama_dir), num_blocks=256), **kw)
        return svc, asyncio.get_running_loop().create_task(svc.run())
    return make


PROMPTS = [[5 + i, 17, 33 + 2 * i, 8, 90 + i] for i in range(8)]


def test_a_request_whose_judge_raises_fails_alone(service, llama_dir, monkeypatch):
    real, calls = verifier.judge, {"n": 0}

    def judge(*args, **kw):
        if args[5].seed == POISON_SEED:   # the params of the poisoned request
            calls["n"] += 1
            if calls["n"] == 3:           # mid-stream, with the other seven in the same round
                raise FloatingPointError("probabilities are NaN")
        return real(*args, **kw)
    monkeypatch.setattr(verifier, "judge", judge)

    async def main():
        svc, loop_task = await service(mode="ar", ar_steps=1)
        stream = GatewayStream()
        for i, p in enumerate(PROMPTS):
            svc.submit(stream, submission(f"r{i}", p, 30 if i == 3 else 12, **({"seed": POISON_SEED} if i == 3 else {})))
        got = await collect(stream, {f"r{i}" for i in range(8)})
        loop_task.cancel()
        return got, svc

    got, svc = asyncio.run(main())
    bad = got.pop("r3")
    assert bad["code"] == grpc.StatusCode.INTERNAL
    assert "FloatingPointError: probabilities are NaN" in bad["error"]
    assert len(bad["tokens"]) == 2   # what it committed before its third round stands
    ref = reference_greedy(llama_dir, [p for i, p in enumerate(PROMPTS) if i != 3], [12] * 7)
    assert [got[f"r{i}"]["tokens"] for i in range(8) if i != 3] == ref
    assert all(g["finish"] == common_pb2.FINISH_REASON_LENGTH for g in got.values())
    assert not svc.core.requests and not svc.core.scheduler.has_work()
    assert svc.core.blocks.num_free == len(svc.core.blocks.blocks)   # the failed one's KV is back


def test_a_failed_round_still_ends_the_requests_it_finished(service, monkeypatch):
    """A request the round finished before the round raised had left the scheduler: it used
    to get no last update and hang until its client's deadline."""
    async def main():
        svc, loop_task = await service(mode="ar", ar_steps=1)
        real, calls = svc.core.finish_round, {"n": 0}

        def finish_then_raise(*args, **kw):
            done = real(*args, **kw)
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected after the commit")
            return done
        monkeypatch.setattr(svc.core, "finish_round", finish_then_raise)
        stream = GatewayStream()
        svc.submit(stream, submission("short", PROMPTS[0], 2))
        svc.submit(stream, submission("long", PROMPTS[1], 20))
        got = await collect(stream, {"short", "long"}, timeout_s=30)
        # the loop goes on serving
        svc.submit(stream, submission("after", PROMPTS[2], 5))
        after = await collect(stream, {"after"}, timeout_s=30)
        loop_task.cancel()
        return got, after

    got, after = asyncio.run(main())
    assert got["short"]["finish"] == common_pb2.FINISH_REASON_LENGTH and len(got["short"]["tokens"]) == 2
    assert got["long"]["code"] == grpc.StatusCode.INTERNAL and "injected after the commit" in got["long"]["error"]
    assert len(after["after"]["tokens"]) == 5


POISONS = {
    "temperature denormal": (dict(temperature=1e-45), "params.temperature"),
    "temperature inf": (dict(temperature=math.inf), "params.temperature"),
    "temperature nan": (dict(temperature=math.nan), "params.temperature"),
    "temperature 1e30": (dict(temperature=1e30), "params.temperature"),
    "top_p nan": (dict(top_p=math.nan), "params.top_p"),
    "top_p inf": (dict(top_p=math.inf), "params.top_p"),
    "top_k negative": (dict(top_k=-2), "params.top_k"),
    "max_tokens int32 max": (dict(max_tokens=2**31 - 1), "params.max_tokens"),
}


def test_the_target_refuses_what_the_gateway_refuses(service):
    """Defence in depth: the same rules on what reaches Serve without a gateway."""
    async def main():
        svc, loop_task = await service(mode="ar")
        stream = GatewayStream()
        for name, (params, _) in POISONS.items():
            p = dict(max_tokens=4, ignore_eos=True) | params
            svc.submit(stream, target_pb2.Submission(request_id=name, prompt_ids=[5, 6, 7],
                                                     params=common_pb2.SamplingParams(**p)))
        svc.submit(stream, submission("x" * 300, [5, 6, 7], 4))   # its refusal echoes the id cut to 256
        svc.submit(stream, target_pb2.Submission(request_id="stops", prompt_ids=[5, 6, 7],
                                                 stop_token_ids=list(range(300)),
                                                 params=common_pb2.SamplingParams(max_tokens=4)))
        svc.submit(stream, submission("fine", [5, 6, 7], 4, temperature=0.7, seed=1))
        got = await collect(stream, set(POISONS) | {"x" * 256, "stops", "fine"})
        loop_task.cancel()
        return got

    got = asyncio.run(main())
    assert got.pop("fine")["finish"] == common_pb2.FINISH_REASON_LENGTH
    want = {name: field for name, (_, field) in POISONS.items()} | {"x" * 256: "request_id",
                                                                    "stops": "stop_token_ids"}
    for name, field in want.items():
        g = got[name]
        assert g["code"] == grpc.StatusCode.INVALID_ARGUMENT and g["error"].startswith(field + ": "), (name, g)
        assert len(g["error"]) < 200, g["error"]
