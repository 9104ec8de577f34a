"""--mode auto in the round loop: a chooser forced to switch every few rounds (ar, sd and pearl
in turn, every transition between them, mid-request) leaves greedy output equal to the
target's own; Info, the metrics and the logs say what was chosen."""
import asyncio
from itertools import cycle

from prometheus_client import CollectorRegistry

from pearl_runtime.config import EngineConfig
from pearl_runtime.pb import common_pb2, target_pb2
from target_service.rounds import GatewayStream, TargetService
from target_service.server import TargetServicer
from target_service.stats import TargetCollector
from tests.services.procs import reference_greedy
from tests.target_service.drive import draft_server, linked, one_round

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [3, 4], [20, 21, 22]]
MAX_TOKENS = [40, 31, 36, 25]
# each mode held a few rounds; the order meets every transition (pearl -> sd, sd -> ar, ...)
SCHEDULE = ["sd"] * 3 + ["pearl"] * 3 + ["ar"] * 2 + ["pearl"] * 2 + ["sd"] * 2 + ["ar"] * 3 + ["sd"] * 2 + \
    ["pearl"] * 2 + ["ar"] * 2


class FlippingChooser:
    """A chooser whose pick moves on with every round it is told of."""

    def __init__(self):
        self.order, self.mode, self.seen = cycle(SCHEDULE), "sd", []
        self.draft_ms, self.shared_gpu, self.buckets = {}, True, {}

    def mode_for(self, batch: int) -> str:
        return self.mode

    def observe(self, mode, batch, tokens, round_ms, alpha=0.8, fixed_ms=0.0):
        self.seen.append(mode)
        self.mode = next(self.order)
        return self.mode

    @property
    def picks(self) -> dict[int, str]:
        return {1: self.mode}


async def _run(target_dir, draft_dir):
    async with draft_server(draft_dir) as (_, address):
        service = TargetService(EngineConfig(model=str(target_dir), num_blocks=256), mode="auto",
                                draft_address=address, gamma=3)
        service.policy.chooser = chooser = FlippingChooser()
        service.collector = TargetCollector(service, CollectorRegistry(), "tiny")
        infos = []
        async with linked(service):
            stream = GatewayStream()
            for i, p in enumerate(PROMPTS):
                service.submit(stream, target_pb2.Submission(
                    request_id=str(i), prompt_ids=p,
                    params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True)))
            got, done = {str(i): [] for i in range(len(PROMPTS))}, 0
            async with asyncio.timeout(120):
                while done < len(PROMPTS):
                    done += len(await one_round(service, stream, got))
                    infos.append((await TargetServicer(service, "tiny").Info(None, None)).mode)
        gauges = {tuple(s.labels.values()): s.value for m in service.collector.collect()
                  if m.name == "pearl:mode_chosen" for s in m.samples}
        return [got[str(i)] for i in range(len(PROMPTS))], service, chooser, infos, gauges


def test_forced_switches_mid_request_leave_greedy_output_unchanged(llama_dir, draft_factory):
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    got, service, chooser, infos, gauges = asyncio.run(_run(llama_dir, draft_factory(llama_dir, "perturbed")))
    assert got == refs
    ran = chooser.seen
    assert {"ar", "sd", "pearl"} <= set(ran), ran
    transitions = {(a, b) for a, b in zip(ran, ran[1:]) if a != b}
    assert {("sd", "pearl"), ("pearl", "ar"), ("ar", "pearl"), ("pearl", "sd"), ("sd", "ar"), ("ar", "sd")} \
        <= transitions, ran
    assert service.stats.speculative_rounds > 0 and service.stats.rounds_without_draft == 0
    assert all(m.startswith("auto:") for m in infos) and {"auto:ar", "auto:sd", "auto:pearl"} <= set(infos)
    assert gauges == {("tiny", "1", chooser.mode): 1.0}


def test_auto_serves_ar_while_the_draft_is_away(llama_dir):
    from tests.target_service.drive import generate
    service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode="auto", gamma=3)
    out = asyncio.run(generate(service, [5, 6, 7, 8], 12))
    assert out == reference_greedy(llama_dir, [[5, 6, 7, 8]], [12])[0]
    assert service.last_path == "ar" and service.policy.shown_mode(service.last_path) == "auto:ar"
