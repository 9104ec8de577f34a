"""ar rounds that chain several greedy decode steps on the device commit exactly what
one-step rounds commit: same tokens, same finish reasons, cut at stop tokens, max_tokens
and the window; sampled requests and rounds with pending drafts take one step."""
import random

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.sampling import SamplingParams
from target_service.verifier import Request, Verifier


def serve(model_dir, jobs, ar_steps, max_model_len=0):
    core = Verifier(EngineConfig(model=str(model_dir), block_size=4, num_blocks=800, max_model_len=max_model_len))
    reqs = [Request(f"r{i}", Sequence(p, params)) for i, (p, params) in enumerate(jobs)]
    for r in reqs:
        core.add(r)
    chained = 0
    while core.has_work():
        running = core.schedule()
        steps = core.chain_length(running, ar_steps)
        if steps > 1:
            chained += 1
            core.chain_round(running, steps)
        else:
            core.finish_round(running, core.forward(running), {})
    return [(r.seq.completion_ids, r.seq.finish_reason, r.forwards) for r in reqs], chained


def test_chained_equals_single_steps(tiny_model_factory):
    model = tiny_model_factory("qwen2")
    rng = random.Random(5)
    prompts = [[rng.randrange(400) for _ in range(n)] for n in (1, 4, 9, 30, 61, 7)]
    plain, _ = serve(model, [(p, SamplingParams(max_tokens=m, ignore_eos=True))
                             for p, m in zip(prompts, (1, 2, 7, 13, 20, 33))], 1)
    # stop at a token each request really produces, mid-burst
    jobs = []
    for p, (toks, _, _), m in zip(prompts, plain, (1, 2, 7, 13, 20, 33)):
        stop = (toks[len(toks) // 2],) if len(toks) > 2 else ()
        jobs.append((p, SamplingParams(max_tokens=m, ignore_eos=True, stop_token_ids=stop)))
    one, chained_one = serve(model, jobs, 1)
    many, chained_many = serve(model, jobs, 4)
    assert chained_one == 0 and chained_many > 0
    assert many == one
    assert any(reason == "stop" for _, reason, _ in one)
    for toks, reason, forwards in many:
        assert forwards == len(toks)


def test_window_end_and_sampling(tiny_model_factory):
    model = tiny_model_factory("llama")
    greedy = [([3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True))]
    one, _ = serve(model, greedy, 1, max_model_len=14)
    many, chained = serve(model, greedy, 4, max_model_len=14)
    assert many == one and one[0][1] == "length" and len(one[0][0]) == 11 and chained > 0
    sampled = [([3, 4, 5], SamplingParams(max_tokens=9, temperature=0.7, seed=3))]
    _, chained = serve(model, sampled, 4)
    assert chained == 0
