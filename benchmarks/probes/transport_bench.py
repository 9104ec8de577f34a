"""Transport cost of one target <-> draft round, without the models: a draft service process
on loopback, a DraftLink in this process, one sequence, gamma 1. Per round: the target's wait
minus the draft's own reported time (`draft_ms`), the same "xfer" `pearl bench` reports.

    python benchmarks/probes/transport_bench.py MODEL_DIR [ROUNDS]

CPU-only and synthetic: the model is only there to start the service; the number is the
gRPC + protobuf + event-loop + thread-handoff cost a round pays on top of drafting.
"""
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import torch

from pearl_runtime.pb import common_pb2, draft_pb2
from pearl_runtime.config import ModelConfig
from pearl_runtime.engine.llm_engine import load_tokenizer
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.identity import PROTOCOL_VERSION, tokenizer_hash
from target_service.draft_link import DraftLink, TransportSplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(address: str, model: str, rounds: int) -> list[float]:
    tok = load_tokenizer(model)
    vocab = ModelConfig.from_dir(model, torch.float32).vocab_size
    hello = draft_pb2.Hello(target_id="transport-bench", tokenizer_hash=tokenizer_hash(tok), protocol_version=PROTOCOL_VERSION,
                            vocab_size=vocab, device=-1)
    link = DraftLink(address, hello)
    deadline = time.time() + 120
    while True:
        try:
            await link._connect()
            break
        except Exception:
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.2)
    seq = [1, 2, 3, 4]
    xfer = []
    for r in range(1, rounds + 1):
        rnd = draft_pb2.Round(round_id=r, gamma=1)
        if r == 1:
            rnd.adds.add(seq_id=0, token_ids=seq, params=common_pb2.SamplingParams(max_tokens=10**6))
        else:   # accept the draft token: the mirror keeps it
            rnd.verdicts.CopyFrom(tensors.encode(torch.tensor([[0, len(seq), seq[-1]]], dtype=torch.int64)))
        start = time.perf_counter()
        batch = await link.exchange(rnd)
        wall = (time.perf_counter() - start) * 1e3
        seq.append(int(tensors.decode(batch.tokens)[0, 0]))
        xfer.append(wall - batch.draft_ms)
        if r == 10:   # warm-up rounds out of the hop split too
            link.split = TransportSplit()
    await link.mark_down()
    print(f"hops, mean over {link.split.rounds} rounds (ms): out {link.split.out_ms / link.split.rounds:.3f}  "
          f"back {link.split.back_ms / link.split.rounds:.3f}")
    return xfer[10:]   # warm-up rounds out


def main() -> None:
    model, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300
    port = free_port()
    draft = subprocess.Popen([sys.executable, "-m", "pearl_runtime.cli", "draft", "--model", model,
                              "--port", str(port), "--kv-cache-gb", "0.05", "--threads", "1", "--log-level", "warning"])
    try:
        xfer = asyncio.run(measure(f"127.0.0.1:{port}", model, rounds))
    finally:
        draft.terminate()
        draft.wait()
    xfer.sort()
    print(f"transport per round over {len(xfer)} rounds (ms): p50 {statistics.median(xfer):.3f}  "
          f"mean {statistics.fmean(xfer):.3f}  p90 {xfer[int(0.9 * len(xfer))]:.3f}")


if __name__ == "__main__":
    main()
