"""What a stream waiting on another process's CUDA IPC event does when that process dies before
its GPU work reaches the record (a draft killed mid-round, with its tokens' event pending).

A child enqueues ~2 s of GPU work, records an interprocess event behind it, sends the handle,
and is killed 0.3 s later. This process then (1) polls event.query() on the host for 10 s and
(2) enqueues a stream wait on the event plus a marker event, and polls the marker for 10 s.
Prints what each saw. python3 scripts/ipc_event_death_probe.py
"""
import os
import signal
import time

import torch
import torch.multiprocessing as mp


def child(conn) -> None:
    torch.cuda.set_device(0)
    ev = torch.cuda.Event(interprocess=True)
    torch.cuda._sleep(4_000_000_000)   # ~2 s on a 2 GHz GPU
    ev.record()
    conn.send(ev.ipc_handle())
    time.sleep(60)


def poll(ev, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ev.query():
                return f"completed after {seconds - (deadline - time.monotonic()):.2f} s"
        except RuntimeError as e:
            return f"error: {str(e)[:120]}"
        time.sleep(0.001)
    return f"not complete after {seconds:.0f} s"


def main():
    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda")
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=child, args=(there,))
    proc.start()
    handle = here.recv()
    ev = torch.cuda.Event.from_ipc_handle(torch.device("cuda", 0), handle)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    print("child killed before its record ran (exit code", proc.exitcode, ")")
    print("host poll of the imported event:", poll(ev, 10))
    stream = torch.cuda.Stream()
    marker = torch.cuda.Event()
    with torch.cuda.stream(stream):
        stream.wait_event(ev)
        torch.cuda._sleep(1000)
        marker.record()
    print("stream wait on it, then a marker:", poll(marker, 10))
    t = time.monotonic()
    torch.cuda._sleep(1000)
    torch.cuda.current_stream().synchronize()
    print(f"another stream of this process still runs: synced in {time.monotonic() - t:.3f} s")


if __name__ == "__main__":
    main()
