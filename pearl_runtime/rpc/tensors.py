"""Tensors on the wire, as inline bytes. (The protocol also has an `IpcSlice` for a CUDA IPC
fast path; that path is not built, so every tensor travels inline.)"""
import numpy as np
import torch

from pearl.v1 import common_pb2

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


def is_empty(msg: common_pb2.Tensor) -> bool:
    return not msg.shape
