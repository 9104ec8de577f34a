"""Programmatic dependent launch (Hopper and later) for the one-token kernels.

A kernel launched with it may start while the kernel before it is still running: it issues
the loads that do not depend on that kernel (its weights), then waits (gdc_wait) before it
reads the previous kernel's output or writes anything. The kernel before lets it start by
calling gdc_launch_dependents once all its own programs are resident. A one-token linear of a
0.5B draft takes 2-8 us, so the launch gap and the weight latency hidden this way are a large
part of it. PEARL_PDL=0 turns it off (the kernels then run one after another, as before).
"""

import torch
from pearl_runtime import envs
from pearl_runtime.log import get_logger

log = get_logger(__name__)
_logged: set[tuple[int, bool]] = set()
_hopper: dict[int, bool] = {}   # device index -> compute capability >= 9.0 (asked once: eager launches ask each time)


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` use it: a CUDA device of compute capability 9.0 or more,
    unless PEARL_PDL=0. Logged once per device and answer."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _hopper:
        _hopper[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    on = envs.get("PEARL_PDL") and _hopper[index]
    if (index, on) not in _logged:
        _logged.add((index, on))
        log.info("programmatic dependent launch for one-token kernels on cuda:%d: %s", index,
                 "on" if on else "off (PEARL_PDL=0 or a GPU before Hopper)")
    return on
