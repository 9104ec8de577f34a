"""sd's draft tokens through the draft's device buffer (pearl_runtime/rpc/ipc.py) with a real
draft service in this process: the buffer is shared in process here (on a GPU between
processes it is CUDA IPC: tests/gpu/test_device_tokens_gpu.py). Greedy output equals the
target-only output on every path: the tokens fed from the buffer, read to the host first (a
round that prefills a prompt), and inline (the target did not ask)."""
import asyncio

from pearl_runtime.pb import common_pb2, target_pb2
from pearl_runtime.config import EngineConfig
from target_service.rounds import GatewayStream, TargetService
from tests.services.procs import reference_greedy
from tests.target_service.drive import draft_server, linked, one_round

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [3, 4], [20, 21, 22]]
MAX_TOKENS = [20, 14, 17, 9]
LATE = 3   # the last request arrives after this many rounds: its prompt's round reads the drafts on the host


async def drive(target_cfg: EngineConfig, draft_address: str, device_tokens: bool, on_round=None, **service_args):
    """An sd TargetService on `target_cfg` linked to the draft at `draft_address`, round by round
    over PROMPTS (the last one arriving late). Returns the outputs, the service (its link is
    down by then) and how the link read the draft's buffer (None: it did not). `on_round(k,
    service, stream)` runs before round k (stream: the requests' GatewayStream)."""
    service = TargetService(target_cfg, mode="sd", draft_address=draft_address, gamma=3, device_tokens=device_tokens,
                            **service_args)
    async with linked(service):
        how = service.link.tokens_in.how if service.link.tokens_in is not None else None
        stream = GatewayStream()

        def submit(i):
            service.submit(stream, target_pb2.Submission(request_id=str(i), prompt_ids=PROMPTS[i],
                           params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True)))

        for i in range(len(PROMPTS) - 1):
            submit(i)
        got, done, rounds = {str(i): [] for i in range(len(PROMPTS))}, 0, 0
        async with asyncio.timeout(120):
            while done < len(PROMPTS):
                if rounds == LATE:
                    submit(len(PROMPTS) - 1)
                if on_round is not None:
                    on_round(rounds, service, stream)
                done += len(await one_round(service, stream, got))
                rounds += 1
    return [got[str(i)] for i in range(len(PROMPTS))], service, how


def check_paths(service, inline) -> None:
    """The device run fed its verifies from the buffer (and read it on the host in the late
    prompt's round); the inline run never touched it; both judged the same tokens."""
    paths = service.token_paths
    assert paths["device"] > 5, paths
    assert paths["device, read on the host (the round feeds a prompt)"] >= 1, paths
    assert "inline" not in paths
    assert set(inline.token_paths) == {"inline"}, inline.token_paths
    # the same tokens drafted and judged either way: the device path fed the verify the draft's
    # real tokens (placeholders, or stale buffer contents, would be rejected)
    assert 0 < service.stats.accepted_tokens < service.stats.drafted_tokens
    assert (service.stats.accepted_tokens, service.stats.drafted_tokens, service.stats.rounds) == \
        (inline.stats.accepted_tokens, inline.stats.drafted_tokens, inline.stats.rounds)


async def _in_process(target_dir, draft_dir, device_tokens: bool, on_round=None, **service_args):
    async with draft_server(draft_dir) as (draft, address):
        got, service, how = await drive(EngineConfig(model=str(target_dir), num_blocks=256), address,
                                        device_tokens, on_round, **service_args)
        return got, service, how, draft


def test_sd_draft_tokens_on_the_device_are_lossless(llama_dir, draft_factory):
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    draft_dir = draft_factory(llama_dir, "perturbed")
    got, service, how, draft = asyncio.run(_in_process(llama_dir, draft_dir, device_tokens=True))
    inline_got, inline, inline_how, inline_draft = asyncio.run(_in_process(llama_dir, draft_dir, device_tokens=False))
    assert got == refs and inline_got == refs
    assert how == "shared in process" and inline_how is None
    check_paths(service, inline)
    paths = service.token_paths
    assert draft.drafter.paths["chained, tokens left on the device"] == paths["device"] + paths[
        "device, read on the host (the round feeds a prompt)"]
    assert "chained, tokens left on the device" not in inline_draft.drafter.paths


def test_device_tokens_of_a_draft_that_went_away_are_given_up():
    """A draft killed mid-round never records its event: the link polls it from the host (a
    stream waiting on it would wait forever), gives up when the stream has ended, marks itself
    down and the round goes on without drafts."""
    from types import SimpleNamespace

    from pearl_runtime.pb import common_pb2, draft_pb2
    from target_service.draft_link import DraftLink

    class NeverWritten:
        def written(self):
            return False


    async def main():
        link = DraftLink("127.0.0.1:1", draft_pb2.Hello(device_tokens=True))
        ended = SimpleNamespace(done=lambda: ended.finished, cancel=lambda: None, finished=False)
        link.call, link.connected, link.tokens_in = ended, True, NeverWritten()
        asyncio.get_running_loop().call_later(0.05, setattr, ended, "finished", True)
        start = asyncio.get_running_loop().time()
        got = await link.tokens_written()
        return got, link, asyncio.get_running_loop().time() - start

    got, link, waited = asyncio.run(main())
    assert got is False and not link.connected and link.tokens_in is None and link.call is None
    assert 0.04 < waited < 5


def test_two_targets_on_one_draft_each_get_their_own_buffer(llama_dir, draft_factory):
    """Two sd targets share one draft, their rounds interleaving: each stream has its own device
    buffer, and a round left on the device for one target is taken into its mirror before the
    other target's round drafts."""
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)

    async def main():
        async with draft_server(draft_factory(llama_dir, "perturbed"), num_blocks=512) as (draft, address):
            cfg = EngineConfig(model=str(llama_dir), num_blocks=256)
            return await asyncio.gather(drive(cfg, address, True), drive(cfg, address, True)), draft

    (a, b), draft = asyncio.run(main())
    for got, service, how in (a, b):
        assert got == refs and how == "shared in process"
        assert service.token_paths["device"] > 5, service.token_paths
    assert a[1].link.generation == b[1].link.generation == 1
    # the same work judged the same drafts: neither mirror took the other's tokens
    assert (a[1].stats.accepted_tokens, a[1].stats.drafted_tokens, a[1].stats.rounds) == \
        (b[1].stats.accepted_tokens, b[1].stats.drafted_tokens, b[1].stats.rounds)
    assert draft.drafter.paths["chained, tokens left on the device"] == sum(
        s.token_paths["device"] + s.token_paths["device, read on the host (the round feeds a prompt)"] for _, s, _ in (a, b))


def test_a_buffer_of_another_process_is_opened_not_looked_up(monkeypatch):
    """Only a buffer of this very process is taken as it is: another process's (even one with
    the same pid, as in another container) must be opened, and a host-memory one cannot be."""
    import torch

    from pearl_runtime.rpc import ipc
    export = ipc.TokenExport(torch.device("cpu"), rows=2, cols=4)
    try:
        desc = export.describe()
        assert ipc.TokenImport(desc, torch.device("cpu")).how == "shared in process"
        monkeypatch.setattr(ipc, "PROCESS", "another process, same pid")
        try:
            ipc.TokenImport(desc, torch.device("cpu"))
        except ipc.IpcUnavailable as e:
            assert "host memory of another process" in str(e)
        else:
            raise AssertionError("a host buffer of another process was taken as it is")
    finally:
        export.close()


def test_the_verify_is_staged_before_the_drafts_are_written(llama_dir, draft_factory):
    """The target prepares its verify (inputs packed and queued) before it polls the draft's
    event, so only the launch waits for the draft; a draft gone before writing leaves the
    staged verify unused and the placeholders taken back out: the round verifies without
    drafts, and the output is still the target-only one."""
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    order = []

    def watch(k, service, stream):
        if k == 0:
            stage, written = service.core.stage_verify, service.link.tokens_written

            def staged(reqs):
                order.append("staged")
                return stage(reqs)

            async def polled():
                gone = len(order) > 12 and "gone" not in order   # once, mid-run
                order.append("gone" if gone else "written")
                if gone:
                    await service.link.mark_down()
                    return False
                return await written()

            service.core.stage_verify, service.link.tokens_written = staged, polled

    got, service, how, draft = asyncio.run(_in_process(llama_dir, draft_factory(llama_dir, "perturbed"), True, watch))
    assert got == refs
    assert "gone" in order and service.token_paths["device"] > 3, (order, service.token_paths)
    assert order[order.index("gone") - 1] == "staged", order   # the draft went with a verify staged
    # every device round staged its verify, then polled (the late prompt's round polls alone)
    pairs = [(a, b) for a, b in zip(order, order[1:]) if a == "staged"]
    assert pairs and all(b in ("written", "gone") for _, b in pairs), order
    assert order.count("staged") >= service.token_paths["device"] + 1   # + the round whose draft went
