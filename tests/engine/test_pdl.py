"""Programmatic dependent launch: on for Hopper-class GPUs unless PEARL_PDL=0, never on CPU,
and the answer is logged once per device (the GPU tests run the kernels both ways)."""
import logging

import torch

from pearl_runtime.layers import pdl


def test_cpu_never_uses_it():
    assert pdl.enabled(torch.device("cpu")) is False


def test_hopper_uses_it_unless_turned_off(monkeypatch, caplog):
    monkeypatch.setattr(pdl, "_hopper", {0: True, 1: False})
    monkeypatch.setattr(pdl, "_logged", set())
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    with caplog.at_level(logging.INFO, logger=pdl.__name__):
        monkeypatch.delenv("PEARL_PDL", raising=False)
        assert pdl.enabled(cuda0) and pdl.enabled(cuda0)
        assert not pdl.enabled(cuda1)            # a GPU before Hopper
        monkeypatch.setenv("PEARL_PDL", "0")
        assert not pdl.enabled(cuda0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["programmatic dependent launch for one-token kernels on cuda:0: on",
                     "programmatic dependent launch for one-token kernels on cuda:1: off (PEARL_PDL=0 or a GPU before Hopper)",
                     "programmatic dependent launch for one-token kernels on cuda:0: off (PEARL_PDL=0 or a GPU before Hopper)"]
