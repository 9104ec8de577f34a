"""How long the GPU idles when one process hands work to another on the same GPU.

Two processes alternate, as a draft and a target do in sd: A runs `--a-ms` of GPU work, then B
runs `--b-ms`, and so on. Two hand-offs are timed:

  host   A syncs, tells B over a pipe, B launches (what the services do now, minus gRPC)
  event  A records a CUDA IPC event after its work and tells B at once; B enqueues a wait on
         that event before its work, so the GPU passes from A to B without a host in between

The idle time per hand-off is (wall per round - a_ms - b_ms) / 2 (B -> A goes over the host
in both). python3 benchmarks/probes/ipc_handoff_probe.py [--rounds 200] [--a-ms 3] [--b-ms 4.5]
"""
import argparse
import time

import torch
import torch.multiprocessing as mp


def cycles_per_ms() -> float:
    torch.cuda._sleep(1_000_000)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def side_b(conn, b_cycles: int) -> None:
    torch.cuda.set_device(0)
    torch.cuda._sleep(1000)
    ev = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, handle = msg
        if kind == "event":
            if ev is None:
                ev = torch.cuda.Event.from_ipc_handle(torch.device("cuda", 0), handle)
            torch.cuda.current_stream().wait_event(ev)
        torch.cuda._sleep(b_cycles)
        torch.cuda.synchronize()
        conn.send("done")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--a-ms", type=float, default=3.0)
    ap.add_argument("--b-ms", type=float, default=4.5)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    cpm = cycles_per_ms()
    a_cycles, b_cycles = int(args.a_ms * cpm), int(args.b_ms * cpm)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=side_b, args=(there, b_cycles))
    proc.start()
    ev = torch.cuda.Event(interprocess=True)
    handle = ev.ipc_handle()
    # alone: A's and B's work back to back in one process, no hand-off
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.rounds):
        torch.cuda._sleep(a_cycles)
        torch.cuda._sleep(b_cycles)
    torch.cuda.synchronize()
    alone = (time.perf_counter() - t) / args.rounds * 1e3
    print(f"GPU cycles a ms {cpm:.0f}; one process, a + b back to back: {alone:.3f} ms a round")
    for kind in ("host", "event", "host", "event"):
        for _ in range(5):   # warm up
            torch.cuda._sleep(a_cycles)
            torch.cuda.synchronize()
            here.send(("host", None))
            here.recv()
        t = time.perf_counter()
        for _ in range(args.rounds):
            torch.cuda._sleep(a_cycles)
            if kind == "event":
                ev.record()
                here.send(("event", handle))
            else:
                torch.cuda.synchronize()
                here.send(("host", None))
            here.recv()
        wall = (time.perf_counter() - t) / args.rounds * 1e3
        print(f"{kind:5s}: {wall:.3f} ms a round, {wall - alone:.3f} ms over one process "
              f"(B -> A always over the host)")
    here.send(None)
    proc.join()


if __name__ == "__main__":
    main()
