"""sd's draft tokens through CUDA IPC between two processes on one GPU: a draft service in a
child process, the target here. fp32: the output equals the target-only greedy output, and the
verifies judged the same tokens as with the tokens inline (tests/target_service/
test_device_tokens.py runs the same rounds with both services in one process, on CPU)."""
import asyncio
import time

import pytest

from pearl_runtime.config import EngineConfig
from tests.services.procs import Service, reference_greedy
from tests.target_service.test_device_tokens import MAX_TOKENS, PROMPTS, check_paths, drive

pytestmark = pytest.mark.gpu


def test_sd_device_tokens_over_cuda_ipc_between_processes(llama_dir, draft_factory, tmp_path):
    draft = Service("draft", ["--model", str(draft_factory(llama_dir, "perturbed")), "--device", "cuda",
                              "--dtype", "float32", "--keep-awake", "off"], tmp_path, "draft", log_level="info")
    draft.start()
    try:
        draft.wait_ready(time.time() + 300)
        cfg = EngineConfig(model=str(llama_dir), device="cuda", dtype="float32", num_blocks=256)
        got, service, how = asyncio.run(drive(cfg, draft.address, device_tokens=True))
        inline_got, inline, inline_how = asyncio.run(drive(cfg, draft.address, device_tokens=False))
    finally:
        draft.kill()
    assert how == "CUDA IPC", how
    assert inline_how is None
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    assert got == refs and inline_got == refs
    check_paths(service, inline)
    assert "tokens left on the device" in draft.log()


def test_a_draft_killed_mid_run_leaves_the_target_serving(llama_dir, draft_factory, tmp_path):
    """SIGKILL the draft between rounds, with its last round's tokens possibly still pending on
    the GPU: the target gives the tokens up (it polls their event; a stream wait on it would
    hang), serves on without a draft, and its output stays the target-only one."""
    import os
    import signal
    draft = Service("draft", ["--model", str(draft_factory(llama_dir, "perturbed")), "--device", "cuda",
                              "--dtype", "float32", "--keep-awake", "off"], tmp_path, "draft", log_level="info")
    draft.start()
    killed = []

    def kill_at(k, *_):
        if k == 6 and not killed:   # the signal lands while the next round's exchange is under way
            os.killpg(draft.proc.pid, signal.SIGKILL)
            killed.append(k)

    try:
        draft.wait_ready(time.time() + 300)
        cfg = EngineConfig(model=str(llama_dir), device="cuda", dtype="float32", num_blocks=256)
        start = time.time()
        got, service, how = asyncio.run(drive(cfg, draft.address, device_tokens=True, on_round=kill_at))
    finally:
        draft.kill()
    assert how == "CUDA IPC" and killed == [6]
    assert time.time() - start < 120
    assert got == reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    assert service.stats.speculative_rounds < service.stats.rounds   # rounds after the kill ran without drafts
