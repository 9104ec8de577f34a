"""Hypothesis strategies for pearl.v1 GenerateRequest: every public field, half the requests
plausible (so they reach the target and run) and half wild (edge floats, int32 extremes,
bad ids, odd strings, oversized fields)."""
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pearl_runtime.client import ChatMessage, Request

INT32 = st.integers(-2**31, 2**31 - 1)
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-45, 1.4e-45, 1e-38, 1.17e-38, -1e-45, -1.0, 1e30, 3.4e38,
                               float("inf"), float("-inf"), float("nan"), 2.0, 1.0 + 1e-7, 1e-7])
ANY_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
BIG = st.sampled_from(["x" * 70_000, "é" * 20_000, "\x00" * 5_000, "<|im_end|>" * 500])


def _maybe(s):
    return st.one_of(st.none(), s)


def _chat(content, roles):
    return st.lists(st.builds(ChatMessage, role=roles, content=content), max_size=4).map(tuple)


def plausible(vocab: int, model: str):
    """Requests a client would send: valid ranges, small outputs, some stop conditions."""
    ids = st.integers(0, vocab - 1)
    prompt = st.one_of(
        st.fixed_dictionaries({"text": st.text(min_size=1, max_size=200)}),
        st.fixed_dictionaries({"chat": _chat(st.text(max_size=100), st.sampled_from(["system", "user", "assistant"]))
                               .filter(bool)}),
        st.fixed_dictionaries({"token_ids": st.lists(ids, min_size=1, max_size=64).map(tuple)}))
    return st.builds(
        lambda p, **kw: Request(**p, **kw), prompt,
        temperature=_maybe(st.floats(0.0, 2.0, width=32)), top_p=_maybe(st.floats(0.0625, 1.0, width=32)),
        top_k=_maybe(st.integers(0, 100)), max_tokens=_maybe(st.integers(1, 16)),
        seed=_maybe(st.integers(0, 2**64 - 1)), ignore_eos=st.booleans(),
        stop=st.lists(st.text(min_size=1, max_size=8), max_size=3).map(tuple),
        stop_token_ids=st.lists(ids, max_size=3).map(tuple),
        model=st.sampled_from(["", model]), request_id=st.one_of(st.just(""), st.text(max_size=40)))


def wild(vocab: int, model: str):
    """Edge and out-of-range values in every field; the prompt may be missing or empty."""
    ids = st.one_of(INT32, st.sampled_from([-1, vocab, vocab - 1, 0, 2**31 - 1, -2**31]))
    prompt = st.one_of(
        st.just({}),
        st.fixed_dictionaries({"text": st.one_of(st.text(max_size=300), BIG)}),
        st.fixed_dictionaries({"chat": _chat(st.one_of(st.text(max_size=100), BIG), st.text(max_size=12))}),
        st.fixed_dictionaries({"token_ids": st.lists(ids, max_size=80).map(tuple)}))
    floats = _maybe(st.one_of(EDGE_FLOATS, ANY_FLOAT32))
    return st.builds(
        lambda p, **kw: Request(**p, **kw), prompt,
        temperature=floats, top_p=floats, top_k=_maybe(INT32),
        max_tokens=_maybe(st.one_of(INT32, st.sampled_from([0, 1, 2**31 - 1, -1]))),
        seed=_maybe(st.integers(0, 2**64 - 1)), ignore_eos=st.booleans(),
        stop=st.lists(st.one_of(st.text(max_size=30), BIG), max_size=6).map(tuple),
        stop_token_ids=st.lists(ids, max_size=6).map(tuple),
        model=st.one_of(st.just(model), st.text(max_size=60), BIG),
        request_id=st.one_of(st.text(max_size=60), BIG))


def requests(n: int, seed: int, vocab: int, model: str) -> list[Request]:
    """n requests drawn by hypothesis under `seed` (the same seed, the same requests)."""
    out: list[Request] = []
    strategy = st.one_of(plausible(vocab, model), wild(vocab, model))
    while len(out) < n:    # hypothesis may skip duplicates: draw the rest under the next seed
        _draw(strategy, n - len(out), seed, out)
        seed += 1
    return out[:n]


def _draw(strategy, n: int, seed: int, out: list) -> None:
    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(req):
        out.append(req)
    collect()
