"""Draft tokens that stay on the GPU: a buffer the draft shares with its target (CUDA IPC).

Through the host, an sd round's hand-off is: the draft syncs on its last step, the tokens go out
in the DraftBatch, and the target copies them back up before it launches the verify, while the
GPU waits for all of it. With a shared buffer the draft writes the round's tokens into it on
the device, records an interprocess event and sends the DraftBatch at once (an IpcSlice in
place of the bytes); the target polls the event and launches its verify the moment it
completes, and reads the tokens back after the verify, with its logits. The draft's sync and
the batch's hop back then happen while the draft's steps still run. (Not a stream wait on
the event: see `written`.)
A hand-off over the host leaves the GPU idle longer than one over an event, even before
gRPC is counted (benchmarks/probes/ipc_handoff_probe.py; measured: benchmarks/journal/BENCHMARKS.md).

A reader in the owner's own process (tests run both services in one) takes the buffer object
itself and opens nothing; that also works on CPU.
"""
import itertools
import os
import uuid

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from pearl_runtime.pb import common_pb2

PROCESS = uuid.uuid4().hex   # who owns a buffer: pids repeat across containers (each may be pid 1)
_generations = itertools.count(1)
_exports: dict[int, "TokenExport"] = {}   # this process's live exports, by generation


class IpcUnavailable(Exception):
    """The buffer cannot be opened here; the tokens travel inline instead."""


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


class TokenExport:
    """The draft's side, one per target stream: room for [rows x cols] int32 tokens and the
    event recorded after each round's write."""

    def __init__(self, device: torch.device, rows: int, cols: int):
        self.device, self.rows, self.cols = device, rows, cols
        self.flat = torch.zeros(rows * cols, dtype=torch.int32, device=device)
        self.event = None
        if device.type == "cuda":
            with torch.cuda.device(device):
                self.event = torch.cuda.Event(interprocess=True)
                self.event.record()   # an event has no handle until it exists on a device
        self.generation = next(_generations)
        _exports[self.generation] = self

    def describe(self) -> common_pb2.IpcBuffer:
        msg = common_pb2.IpcBuffer(index=0, generation=self.generation, pid=os.getpid(), process=PROCESS,
                                   dtype="int32", shape=[self.rows * self.cols], gpu_uuid=gpu_uuid(self.device))
        if self.event is not None:
            (_, _, _, _, _, _, _, handle, size, offset, _, rc_handle, rc_offset, ev_handle,
             ev_sync) = reduce_tensor(self.flat)[1]
            msg.mem_handle, msg.storage_size, msg.storage_offset = handle, size, offset
            msg.ref_counter_handle, msg.ref_counter_offset = rc_handle, rc_offset
            msg.storage_event_handle, msg.storage_event_sync = ev_handle, ev_sync
            msg.event_handle = self.event.ipc_handle()
        return msg

    def fits(self, seqs: int, gamma: int) -> bool:
        return seqs * gamma <= self.flat.numel()

    def publish(self, tokens: torch.Tensor) -> common_pb2.Tensor:
        """Write a round's tokens ([n, gamma], on this export's device) behind the work that
        made them, record the event, and describe them for the DraftBatch."""
        n, g = tokens.shape
        self.flat[:n * g].view(n, g).copy_(tokens)
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(self.device))
        return common_pb2.Tensor(dtype="int32", shape=[n, g],
                                 ipc=common_pb2.IpcSlice(buffer=0, offset=0, generation=self.generation))

    def close(self) -> None:
        _exports.pop(self.generation, None)


class TokenImport:
    """The target's side: the draft's buffer, opened once per stream."""

    def __init__(self, desc: common_pb2.IpcBuffer, device: torch.device):
        self.generation = desc.generation
        if desc.process == PROCESS:
            export = _exports.get(desc.generation)
            if export is None:
                raise IpcUnavailable(f"no buffer of generation {desc.generation} in this process")
            self.flat, self.event, self.how = export.flat, export.event, "shared in process"
            return
        if not desc.mem_handle or not desc.event_handle:
            raise IpcUnavailable("the draft's buffer is in host memory of another process")
        if device.type != "cuda":
            raise IpcUnavailable("this target is not on a GPU")
        try:
            # the draft's GPU, or a peer of this target's one: the handle maps either way
            self.flat = rebuild_cuda_tensor(
                torch.Tensor, (desc.shape[0],), (1,), 0, torch.storage.TypedStorage, torch.int32, device.index,
                desc.mem_handle, desc.storage_size, desc.storage_offset, False, desc.ref_counter_handle,
                desc.ref_counter_offset, desc.storage_event_handle, desc.storage_event_sync)
            self.event = torch.cuda.Event.from_ipc_handle(device, desc.event_handle)
        except RuntimeError as e:   # another host or container, no peer access, ...
            raise IpcUnavailable(f"cannot open the draft's CUDA IPC buffer: {e}") from e
        self.how = "CUDA IPC" + ("" if desc.gpu_uuid == gpu_uuid(device) else " from a peer GPU")

    def written(self) -> bool:
        """Whether the draft's last write has landed (its event has completed). Polled from
        the host, never waited on by a stream: a stream waiting on the event of a process that
        died before its record ran waits forever, and with it this process's GPU work
        (scripts/ipc_event_death_probe.py)."""
        return self.event is None or self.event.query()

    def view(self, msg: common_pb2.Tensor) -> torch.Tensor:
        """A round's tokens as a view of the buffer (read them once `written()`)."""
        if msg.ipc.generation != self.generation:
            raise ValueError(f"IpcSlice of generation {msg.ipc.generation}, the stream's buffer is {self.generation}")
        n, g = msg.shape
        return self.flat[:n * g].view(n, g)
