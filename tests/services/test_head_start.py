"""PEARL's head start: when most sequences are in pre-verify (alone, after a rejection) the
target waits for the draft's first gamma // 2 tokens and verifies them with the first fresh
one. Greedy output stays equal to target-only output, the rounds happen (counted by the
target), and a sequence alone commits more tokens per target forward than plain PEARL."""
import random

from pearl_runtime.client import generate
from tests.services.procs import reference_greedy, run, target_metrics
from tests.tiny_models import assert_same_tokens

PROMPT_LENS = [5, 40, 120]
MAX_TOKENS = 40


def test_head_start_is_lossless_and_commits_more_alone(cluster, service_models):
    target, _ = service_models
    rng = random.Random(11)
    prompts = [[rng.randrange(448) for _ in range(n)] for n in PROMPT_LENS]
    refs = reference_greedy(target, prompts, [MAX_TOKENS] * len(prompts))
    # own stacks: the head-start one's target is stopped at the end
    auto, plain = cluster.stacks(("perturbed", "pearl:head2"), ("perturbed", "pearl:head0"))
    mat = {}
    for name, stack in (("auto", auto), ("plain", plain)):
        before = target_metrics(stack.target)
        tokens = forwards = 0
        for i, p in enumerate(prompts):   # one at a time: the batch is a single sequence
            c = run(generate(stack.gateway.address, token_ids=p, max_tokens=MAX_TOKENS, ignore_eos=True,
                             request_id=f"{name}-{i}", timeout_s=120))
            assert_same_tokens(c.token_ids, refs[i], label=f"pearl head start {name}, request {i}: ")
            tokens += c.stats.new_tokens
            forwards += c.stats.target_forwards
        after = target_metrics(stack.target)
        head_rounds = after.head_start_rounds - before.head_start_rounds
        assert (head_rounds > 0) if name == "auto" else (head_rounds == 0), (name, head_rounds)
        mat[name] = tokens / forwards
    print(f"\n[pearl/perturbed alone] tokens per target forward: head start {mat['auto']:.2f}, "
          f"plain {mat['plain']:.2f}")
    assert mat["auto"] > mat["plain"]

    # the draft outlives a killed target that used head starts and releases its mirror
    # (the release once sat behind an await that the stream's cancellation cancelled too)
    gone = auto.draft.count("target disconnected")
    auto.target.kill()
    auto.draft.wait_log("target disconnected", n=gone + 1, timeout_s=30)
    assert "Unexpected" not in auto.draft.log() and auto.draft.alive()
