"""What a gRPC round trip costs without our services: an echo server for Draft.Speculate in a
child process answers each Round with an empty DraftBatch, over the same channel options and
on uvloop, as the services run. The floor under `xfer` (benchmarks/probes/transport_bench.py,
`pearl bench`): what is above it is ours.

    python benchmarks/probes/grpc_echo_bench.py [ROUNDS] [GAP_MS]

GAP_MS idles the client between rounds, as a target does while it verifies: on a virtual
machine whose idle cores halt, each hop then pays their wake-up (pearl_runtime/keep_awake.py).
"""
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
import uvloop  # noqa: E402

from pearl_runtime.pb import draft_pb2, draft_pb2_grpc  # noqa: E402
from pearl_runtime.rpc.server import GRPC_OPTIONS  # noqa: E402


class Echo(draft_pb2_grpc.DraftServicer):
    async def Speculate(self, request_iterator, context):
        async for msg in request_iterator:
            yield draft_pb2.FromDraft(batch=draft_pb2.DraftBatch(round_id=msg.round.round_id))


async def serve(address: str) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    draft_pb2_grpc.add_DraftServicer_to_server(Echo(), server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def ping(address: str, rounds: int, gap_ms: float = 0.0) -> list[float]:
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = draft_pb2_grpc.DraftStub(channel).Speculate()
        times = []
        for i in range(rounds):
            if gap_ms:   # idle between rounds, as a target is while it verifies
                time.sleep(gap_ms / 1e3)
            start = time.perf_counter()
            await call.write(draft_pb2.ToDraft(round=draft_pb2.Round(round_id=i, gamma=4)))
            await call.read()
            times.append((time.perf_counter() - start) * 1e3)
        call.cancel()
    return times[rounds // 10:]   # warm-up out


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        return uvloop.run(serve(sys.argv[2]))
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    gap_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", address])
    try:
        times = uvloop.run(ping(address, rounds, gap_ms))
    finally:
        server.kill()
        server.wait()
    times.sort()
    print(f"gap {gap_ms} ms: echo round trip over {len(times)} rounds (ms): p50 {statistics.median(times):.3f}  "
          f"mean {statistics.fmean(times):.3f}  p90 {times[int(0.9 * len(times))]:.3f}")


if __name__ == "__main__":
    main()
