"""Tensors on the wire, as inline bytes. (The protocol also has an `IpcSlice` for a CUDA IPC
fast path; that path is not built, so every tensor travels inline.)"""
import numpy as np
import torch

from pearl_runtime.pb import common_pb2

_NP = {"int32": np.int32, "int64": np.int64, "float32": np.float32}


def encode(t: torch.Tensor) -> common_pb2.Tensor:
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype == "bfloat16":   # numpy has no bf16: ship the raw 16-bit words
        data = t.view(torch.int16).numpy().tobytes()
    else:
        data = t.numpy().tobytes()
    return common_pb2.Tensor(dtype=dtype, shape=list(t.shape), data=data)


def decode(msg: common_pb2.Tensor) -> torch.Tensor:
    if msg.dtype == "bfloat16":
        arr = np.frombuffer(msg.data, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(tuple(msg.shape))
    if msg.dtype not in _NP:
        raise ValueError(f"unsupported tensor dtype {msg.dtype!r}")
    arr = np.frombuffer(msg.data, dtype=_NP[msg.dtype]).copy()
    return torch.from_numpy(arr).reshape(tuple(msg.shape))


# The round's small integer tables (verdicts, draft tokens) are read and written as Python
# lists: going through numpy alone skips a torch tensor and a copy on each side of every round.
def encode_ints(rows: list, dtype: str = "int64", shape: tuple | None = None) -> common_pb2.Tensor:
    """Nested int lists -> Tensor. `shape` for an empty table whose width matters."""
    arr = np.asarray(rows, dtype=_NP[dtype])
    if shape is not None:
        arr = arr.reshape(shape)
    return common_pb2.Tensor(dtype=dtype, shape=arr.shape, data=arr.tobytes())


def decode_ints(msg: common_pb2.Tensor) -> list:
    """An int32/int64 Tensor -> nested Python lists (no copy of the bytes first)."""
    if msg.dtype not in ("int32", "int64"):
        raise ValueError(f"expected an integer tensor, got {msg.dtype!r}")
    return np.frombuffer(msg.data, dtype=_NP[msg.dtype]).reshape(tuple(msg.shape)).tolist()


def is_empty(msg: common_pb2.Tensor) -> bool:
    return not msg.shape
