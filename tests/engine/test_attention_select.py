"""Backend choice is explicit: auto means the reference path on CPU; unknown names fail loudly."""
import pytest
import torch

from pearl_runtime.attention import select_backend


def test_auto_on_cpu_is_reference():
    assert select_backend("auto", torch.device("cpu"), 16).name == "reference"


def test_gpu_backend_on_cpu_is_refused():
    with pytest.raises(ValueError, match="not available here"):
        select_backend("triton", torch.device("cpu"), 16)
