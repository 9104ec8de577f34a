"""Sampling (temperature > 0) through gateway -> target -> draft: the draft ships its q rows,
the target runs the acceptance / residual rule (its distribution is tested in
tests/target_service/test_speculation.py). Here: the path works across processes, a seeded
request is reproducible, and speculation still accepts tokens."""
import pytest

from pearl_runtime.client import generate
from tests.services.procs import run

PROMPTS = [[5, 17, 33, 101, 7], [250, 3], [9] * 40]
SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=50, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(cluster):
    return cluster.stack("perturbed", "pearl")


def _sample_all(address, seed):
    async def body():
        # one at a time: the same batches in every run, so floating point is identical too
        return [await generate(address, token_ids=p, seed=seed + i, **SAMPLING) for i, p in enumerate(PROMPTS)]
    return run(body())


def test_seeded_sampling_is_reproducible_and_speculates(stack):
    first = _sample_all(stack.gateway.address, seed=11)
    again = _sample_all(stack.gateway.address, seed=11)
    other = _sample_all(stack.gateway.address, seed=1234)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    for c in first + other:
        assert len(c.token_ids) == SAMPLING["max_tokens"] and c.finish_reason == "length"
        assert c.stats.mode == "pearl"
    new = sum(c.stats.new_tokens for c in first + other)
    forwards = sum(c.stats.target_forwards for c in first + other)
    assert new / forwards > 1.0, f"no draft token was ever accepted while sampling ({new}/{forwards})"
