"""A fake in-process Target service: deterministic tokens, no model.

Token at absolute position p is p % CYCLE (ids 0..89 are the printable ASCII bytes of the test
tokenizer), so a resubmitted continuation (prompt + tokens so far) yields exactly the tokens the
first target would have produced next.

Its grpc health ("pearl.v1.Target") starts as `serving` says and flips with set_serving; with
serving=None it has no health service at all, like an older target."""
import asyncio

import grpc

from pearl_runtime.pb import common_pb2, target_pb2, target_pb2_grpc
from pearl_runtime.rpc.health import Health

CYCLE = 90
POISON = 7          # a prompt starting with this id is refused with RESOURCE_EXHAUSTED


def expected_tokens(prompt_len: int, n: int) -> list[int]:
    return [(prompt_len + i) % CYCLE for i in range(n)]


class FakeTarget(target_pb2_grpc.TargetServicer):
    def __init__(self, *, vocab_size: int = 451, max_model_len: int = 256, step_s: float = 0.002,
                 tokens_per_forward: int = 1, model: str = "tiny", mode: str = "pearl",
                 eos_token_ids=(450,), tokenizer_hash: str = "", serving: bool | None = True):
        self.info = target_pb2.ModelInfo(model=model, vocab_size=vocab_size, max_model_len=max_model_len,
                                         eos_token_ids=eos_token_ids, mode=mode,
                                         tokenizer_hash=tokenizer_hash)
        self.step_s = step_s
        self.tokens_per_forward = tokens_per_forward
        self.batches: list[list[target_pb2.Submission]] = []
        self.cancels: list[str] = []
        self.sent: dict[str, list[int]] = {}
        self.serving = serving
        self.health = Health("pearl.v1.Target") if serving is not None else None

    async def set_serving(self, serving: bool) -> None:
        await self.health.set_ready(serving, "flipped by the test")

    async def Info(self, request, context):
        return self.info

    async def Serve(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}

        async def consume():
            async for msg in request_iterator:
                if msg.HasField("submit"):
                    self.batches.append(list(msg.submit.items))
                    for s in msg.submit.items:
                        running[s.request_id] = asyncio.create_task(self._generate(s, out))
                else:
                    self.cancels.extend(msg.cancel.request_ids)
                    for rid in msg.cancel.request_ids:
                        if (task := running.pop(rid, None)) is not None:
                            task.cancel()

        reader = asyncio.create_task(consume())
        try:
            while True:
                update = await out.get()
                yield target_pb2.TargetOut(tokens=target_pb2.TokenBatch(updates=[update]))
        finally:
            reader.cancel()
            for task in running.values():
                task.cancel()

    async def _generate(self, s: target_pb2.Submission, out: asyncio.Queue) -> None:
        if s.prompt_ids[0] == POISON:
            out.put_nowait(target_pb2.SeqUpdate(request_id=s.request_id, error="KV cache is full",
                                                error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]))
            return
        n, budget, forwards = len(s.prompt_ids), s.params.max_tokens, 0
        sent = self.sent.setdefault(s.request_id, [])
        produced = 0
        while True:
            await asyncio.sleep(self.step_s)
            forwards += 1
            tokens, finish = [], common_pb2.FINISH_REASON_UNSPECIFIED
            for _ in range(self.tokens_per_forward):
                pos = n + produced
                tokens.append(pos % CYCLE)
                produced += 1
                if tokens[-1] in s.stop_token_ids:
                    finish = common_pb2.FINISH_REASON_STOP
                elif produced >= budget or pos + 1 >= self.info.max_model_len:
                    finish = common_pb2.FINISH_REASON_LENGTH
                if finish:
                    break
            sent.extend(tokens)
            out.put_nowait(target_pb2.SeqUpdate(request_id=s.request_id, token_ids=tokens,
                                                finish_reason=finish, target_forwards=forwards))
            if finish:
                return


async def start_target(fake: FakeTarget, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    target_pb2_grpc.add_TargetServicer_to_server(fake, server)
    if fake.health is not None:
        fake.health.add_to(server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if fake.serving:
        await fake.set_serving(True)
    return server, port
