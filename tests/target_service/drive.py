"""Drive an in-process TargetService round by round, without a gateway."""
from pearl.v1 import common_pb2, target_pb2
from target_service.server import GatewayStream


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
