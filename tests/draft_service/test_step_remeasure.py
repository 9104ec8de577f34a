"""The draft re-times its step when a target connects and reports, per batch size, the lower of
the two readings: on a shared GPU the start-time one can overlap the target's start-up."""
import asyncio

import pytest

from pearl_runtime.pb import draft_pb2
from pearl_runtime.rpc.identity import PROTOCOL_VERSION
from pearl_runtime.config import EngineConfig
from tests.draft_service.servicer_context import StreamContext


def test_hello_reports_the_lower_step_time_of_start_and_connect(llama_dir, monkeypatch):
    import draft_service.server as ds
    readings = iter([{1: 1.29, 16: 2.0}, {1: 0.55, 16: 2.2}])
    calls = []

    def fake_measure(runner, query_len):
        calls.append(query_len)
        return next(readings)

    monkeypatch.setattr(ds, "measure_step_ms", fake_measure)
    monkeypatch.delenv("PEARL_PROFILE_ROUNDS", raising=False)
    servicer = ds.DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64))
    try:
        assert servicer.step_ms == {1: 1.29, 16: 2.0}

        async def requests():
            yield draft_pb2.ToDraft(hello=draft_pb2.Hello(target_id="t", tokenizer_hash=servicer.tok_hash, protocol_version=PROTOCOL_VERSION,
                                                          vocab_size=servicer.drafter.vocab_size))

        async def connect():
            stream = servicer.Speculate(requests(), StreamContext())
            reply = (await anext(stream)).hello
            await stream.aclose()
            return reply

        reply = asyncio.run(connect())
        assert reply.accepted and calls == [1, 1]
        assert dict(zip(reply.step_batch_sizes, reply.step_ms)) == {1: pytest.approx(0.55), 16: 2.0}   # float32 on the wire
    finally:
        servicer.close()
