"""`pearl bench` on CPU with tiny models (ar, sd, pearl end to end) and the round model."""
import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from pearl_runtime.bench import mps, projection, report, roofline
from pearl_runtime.launch import Stack
from pearl_runtime.bench.measure import BenchError

GAMMA = 4
MAX_TOKENS = 8
BATCH_SIZES = (1, 2)
MIN_SEQS = 2   # bs=1 then runs two batches, one prompt after the other


# -- the round model ---------------------------------------------------------------------------
def test_pearl_all_accepted_commits_gamma_a_round():
    for g in (1, 2, 4, 8):
        assert projection.pearl_tokens_per_round(1.0, g) == g
        assert projection.simulate_pearl(1.0, g, rounds=1000)[0] == pytest.approx(g, abs=1e-2)


def test_nothing_accepted_commits_one_token_a_round():
    for g in (1, 4, 8):
        assert projection.pearl_tokens_per_round(0.0, g) == 1.0
        assert projection.sd_tokens_per_round(0.0, g) == 1.0
        assert projection.simulate_pearl(0.0, g, rounds=1000) == (1.0, 0.0)


def test_sd_formula_is_the_expected_accepted_prefix_plus_one():
    for alpha in (0.1, 0.5, 0.8, 0.99):
        for g in (1, 3, 4, 8):
            # P(first rejection after k accepted) = a^k (1-a) for k < g; all g accepted: a^g, +1 bonus
            brute = sum((k + 1) * alpha ** k * (1 - alpha) for k in range(g)) + (g + 1) * alpha ** g
            assert projection.sd_tokens_per_round(alpha, g) == pytest.approx(brute)
    assert projection.sd_tokens_per_round(1.0, 4) == 5.0


@pytest.mark.parametrize("gamma,head_start", [(2, 0), (4, 0), (8, 0), (4, 2), (8, 4), (8, 1)])
def test_markov_matches_monte_carlo(gamma, head_start):
    for alpha in (0.3, 0.7, 0.9):
        tokens, rate = projection.simulate_pearl(alpha, gamma, rounds=200_000, seed=gamma, head_start=head_start)
        assert projection.pearl_tokens_per_round(alpha, gamma, head_start) == pytest.approx(tokens, rel=0.01)
        assert projection.accept_rate(alpha, gamma, "pearl", head_start) == pytest.approx(rate, rel=0.01)


def test_head_start_closed_form_and_gain():
    for alpha in (0.3, 0.8, 0.95):
        for g, w in ((4, 0), (4, 2), (16, 8)):
            closed = (1 - alpha ** g) / ((1 - alpha) * (1 + alpha ** (w + 1) - alpha ** g))
            assert projection.pearl_tokens_per_round(alpha, g, w) == pytest.approx(closed)
        # waiting for w tokens in pre-verify commits more per round than plain PEARL
        assert projection.pearl_tokens_per_round(alpha, 8, 4) > projection.pearl_tokens_per_round(alpha, 8, 0)
    # and costs its draft steps: the projected round grows by pi_P * w * t_d
    plain = projection.project(10.0, 1.0, 10.0, 0.0, 0.8, 8, 0)
    head = projection.project(10.0, 1.0, 10.0, 0.0, 0.8, 8, 4)
    assert head["pearl_round_ms"] > plain["pearl_round_ms"]
    assert projection.head_start_for(8) == 4 and projection.head_start_for(1) == 1
    assert projection.head_start_for(8, 0) == 0


def test_monotonic_in_alpha():
    grid = [i / 50 for i in range(51)]
    for g in (1, 4, 8):
        for f in (projection.pearl_tokens_per_round, projection.sd_tokens_per_round):
            values = [f(a, g) for a in grid]
            assert all(b >= a for a, b in zip(values, values[1:]))
        for mode in ("sd", "pearl"):
            rates = [projection.accept_rate(a, g, mode) for a in grid]
            assert all(b >= a for a, b in zip(rates, rates[1:]))


def test_fit_alpha_inverts_accept_rate():
    for mode, w in (("sd", 0), ("pearl", 0), ("pearl", 2)):
        for alpha in (0.05, 0.5, 0.8, 0.97):
            assert projection.fit_alpha(projection.accept_rate(alpha, GAMMA, mode, w), GAMMA, mode, w) == \
                pytest.approx(alpha, abs=1e-6)


def test_ar_step_ms_times_the_timed_generate_alone(llama_dir, monkeypatch):
    from pearl_runtime.bench.probe import ar_step_ms
    from pearl_runtime.config import EngineConfig
    from pearl_runtime.engine.llm_engine import LLMEngine
    eng = LLMEngine(EngineConfig(model=str(llama_dir), num_blocks=64), load_tok=False)
    calls, clock = [], iter([10.0, 10.5])
    monkeypatch.setattr(eng, "generate", lambda prompts, params: calls.append(params.max_tokens))
    monkeypatch.setattr("pearl_runtime.bench.probe.time.perf_counter", lambda: next(clock))
    assert ar_step_ms(eng, [[1, 2, 3]], tokens=50, warm_tokens=7) == pytest.approx(10.0)   # 0.5 s / 50
    assert calls == [7, 50]


def test_acceptance_by_position():
    acceptance_by_position = projection.acceptance_by_position
    # 10 sequence-rounds judged 3 and took all, 5 took 1 of 3, 5 judged 1 and took none
    prof = acceptance_by_position([[3, 3, 10], [3, 1, 5], [1, 0, 5]])
    assert prof == [(15 / 20, 20), (10 / 15, 15), (10 / 10, 10)]
    assert acceptance_by_position([]) == []
    # independent acceptance reads alpha at every position; a draft that agrees in streaks
    # (here: an easy sequence-round accepts at 0.97, a hard one at 0.5) reads higher further in
    rng = random.Random(0)

    def sample(accept_of_round, n=20000, gamma=8):
        runs = Counter()
        for _ in range(n):
            a = accept_of_round()
            took = next((i for i in range(gamma) if rng.random() >= a), gamma)
            runs[(gamma, took)] += 1
        return acceptance_by_position([[j, k, c] for (j, k), c in runs.items()])
    iid = [a for a, _ in sample(lambda: 0.8)]
    assert all(abs(a - 0.8) < 0.03 for a in iid)
    streaks = [a for a, _ in sample(lambda: 0.97 if rng.random() < 0.6 else 0.5)]
    assert streaks[0] < 0.85 and streaks[-1] > 0.9 and streaks == sorted(streaks)


def test_projection_balanced_rounds():
    # gamma draft steps take exactly one verify: PEARL's round is half of sd's
    p = projection.project(t_ar=10.0, t_d=2.5, t_v=10.0, t_x=0.0, alpha=1.0, gamma=4)
    assert p["sd_round_ms"] == 20.0 and p["pearl_round_ms"] == 10.0
    assert p["sd_speedup"] == pytest.approx(10 * 5 / 20) and p["pearl_speedup"] == pytest.approx(10 * 4 / 10)
    g, best = projection.best_gamma(10.0, 2.5, 10.0, 0.0, 1.0)
    assert g >= 4 and best >= p["pearl_speedup"]


def test_projection_prices_other_gammas_by_the_targets_verify_table():
    """72B TP=2 at batch 32 (session 5): sd's verify at gamma 7 took 41.8 ms; the target's table
    says 16 tokens a sequence cost 1.7x 8 tokens and 32 cost 3.1x. Priced flat, the best gamma
    is the largest; priced by the table, gamma + 1 stays at or under 16."""
    table = [[32, q, ms] for q, ms in ((2, 25.8), (4, 30.1), (8, 44.6), (16, 74.6), (32, 137.0))]
    ar = {"mode": "ar", "batch_size": 32, "round_ms": 25.1}
    sd = {"mode": "sd", "batch_size": 32, "gamma": 7, "draft_ms": 7 * 1.8, "target_ms": 41.8, "round_ms": 56.5,
          "accept_rate": 0.72, "speedup_vs_ar": 1.89, "host_ms": 0.9, "metrics_diff": {"verify_times": table}}
    [p] = report.project([ar, sd], same_gpu=False)
    assert 7 <= p["best_gamma"] <= 15
    [flat] = report.project([ar, {**sd, "metrics_diff": {}}], same_gpu=False)
    assert flat["best_gamma"] == 16 and flat["pearl_speedup_best_gamma"] > p["pearl_speedup_best_gamma"]


def test_a_pearl_run_prices_its_verify_at_the_query_it_fed():
    """72B TP=2 at batch 32 (session 9, call 1): a pearl run at gamma 11 measured a 37.97 ms
    verify while its sequences fed 6.6 tokens on average (pre-verify ones 1, post-verify ones
    gamma). Other queries are priced from that one, not from gamma + 1: priced from gamma + 1,
    the batch simulation made the run's own gamma 25% cheaper than measured (4.51x against the
    closed form's 3.11x). The same rows with a measured query of 12 price every other query
    lower, so they project more."""
    table = [[32, q, ms] for q, ms in ((2, 26.5), (4, 30.8), (8, 40.2), (12, 48.0), (16, 56.0))]
    ar = {"mode": "ar", "batch_size": 32, "round_ms": 25.48}
    runs = [[1, 0, 25], [1, 1, 337], [10, 10, 193], [10, 3, 263], [13, 13, 40], [15, 15, 41]]
    pearl = {"mode": "pearl", "batch_size": 32, "gamma": 11, "draft_ms": 11 * 2.09, "target_ms": 37.97,
             "round_ms": 39.5, "accept_rate": 0.66, "host_ms": 1.07, "mat": 4.56,
             "metrics_diff": {"verify_times": table, "judged_runs": runs, "head_start_rounds": 0,
                              "speculative_rounds": 36}}
    assert projection.mean_judged(runs) == pytest.approx((362 + 4560 + 520 + 615) / 899)
    assert projection.mean_judged([]) is None
    [p] = report.project([ar, pearl], same_gpu=False)
    # the simulation and the closed form now tell the same story at the run's gamma
    assert p["pearl_speedup_batch_sim"] == pytest.approx(p["pearl_speedup"], rel=0.1)
    assert p["pearl_speedup_best_gamma"] >= 0.97 * p["pearl_speedup"]
    long = {**pearl, "metrics_diff": {**pearl["metrics_diff"], "judged_runs": [[11, 11, 100]]}}
    [q] = report.project([ar, long], same_gpu=False)
    assert q["pearl_speedup_batch_sim"] > 1.1 * p["pearl_speedup_batch_sim"]


def test_divergence_reports_where_outputs_part():
    ar = [{"mode": "ar", "batch_size": 2, "wall_s": 1.0, "outputs_sha256": "a", "_outputs": [[1, 2, 3], [4, 5, 6]]}]
    sd = {"mode": "sd", "batch_size": 2, "wall_s": 0.5, "outputs_sha256": "b", "_outputs": [[1, 2, 3], [4, 9, 6]]}
    rows = ar + [sd]
    report.add_speedups(rows)
    assert sd["outputs_match_ar"] is False and sd["speedup_vs_ar"] == 2.0
    assert sd["divergence"] == {"requests": 2, "differing": 1, "first_index": [1],
                                "firsts": [{"request": 1, "index": 1, "ar_token": 5, "token": 9}]}
    assert "NO 1/2@1" in report.table([{**r, "mat": None, "accept_rate": None, "round_ms": 0, "draft_ms": 0,
                                       "target_ms": 0, "wait_ms": 0, "host_ms": 0, "xfer_ms": None,
                                       "ttft_ms": {"mean": 0}, "tokens_per_s": 1} for r in rows])
    assert all("_outputs" not in r for r in report.public(rows))


def test_slow_starts_are_called_out():
    """The 72B run's sd bs=8 row: first tokens after 657 ms against ar's 34 ms."""
    rows = [{"mode": "ar", "batch_size": 8, "ttft_ms": {"mean": 34.2}},
            {"mode": "sd", "batch_size": 8, "ttft_ms": {"mean": 656.8}},
            {"mode": "pearl", "batch_size": 8, "ttft_ms": {"mean": 90.0}},     # under 4x ar: fine
            {"mode": "ar", "batch_size": 1, "ttft_ms": {"mean": 20.0}},
            {"mode": "sd", "batch_size": 1, "ttft_ms": {"mean": 95.0}}]       # 4.75x but under 100 ms
    notes = report.start_notes(rows)
    assert len(notes) == 1 and notes[0].startswith("slow start: sd bs=8 first tokens after 657 ms")


def test_mps_helpers():
    assert mps.parse_shares("80,20") == (80, 20)
    with pytest.raises(ValueError):
        mps.parse_shares("80")
    assert mps.same_gpu("cuda", "cuda:0") and not mps.same_gpu("cuda:0", "cuda:1") and not mps.same_gpu("cpu", "cpu")
    assert "WITHOUT MPS" in mps.sharing_warning(["ar", "pearl"], "cuda", "cuda:0", mps=False)
    assert mps.sharing_warning(["pearl"], "cuda:0", "cuda:0", mps=True) is None
    assert mps.sharing_warning(["pearl"], "cuda:0", "cuda:1", mps=False) is None
    assert mps.sharing_warning(["ar"], "cuda:0", "cuda:0", mps=False) is None


def test_weight_bytes_count_every_parameter_but_the_embedding_table(llama_dir, qwen2_dir, hf_model):
    for d in (llama_dir, qwen2_dir):
        model = hf_model(d)
        total = sum(p.numel() for p in model.parameters())
        emb = model.model.embed_tokens.weight
        w = roofline.weight_bytes_per_step(d, "bfloat16")
        assert w["params_read"] == total - emb.numel() + emb.shape[1]
        assert w["bytes"] == 2 * w["params_read"]


def test_synthetic_pair_resolves_through_prepare_synthetic_pair(monkeypatch, llama_dir, draft_factory):
    import argparse

    from pearl_runtime.bench.run import resolve_models
    from pearl_runtime.models import synthetic
    calls = []

    def fake(target, draft, accept, seed=0):
        calls.append((target, draft, accept, seed))
        return llama_dir, draft_factory(llama_dir, "copy")
    monkeypatch.setattr(synthetic, "prepare_synthetic_pair", fake)
    args = argparse.Namespace(synthetic="qwen2.5-7b/qwen2.5-0.5b", accept=0.7, seed=3, model=None, draft_model=None)
    t, d, pair, spec = resolve_models(args)
    assert calls == [("qwen2.5-7b", "qwen2.5-0.5b", 0.7, 3)] and t == str(llama_dir)
    assert pair == "qwen2.5-7b_qwen2.5-0.5b" and spec["accept"] == 0.7


def test_hf_baseline_builds_random_weights_when_the_directory_has_none(tmp_path, llama_dir):
    import shutil

    from pearl_runtime.bench.probe import hf_baseline
    for f in llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    b = hf_baseline(str(tmp_path), "cpu", "float32", [1, 2, 3], 4)
    assert b["weights"].startswith("random") and b["tokens"] == 4 and b["tokens_per_s"] > 0


# -- end to end ----------------------------------------------------------------------------------
def _bench(tmp_path, target, draft, *extra):
    from pearl_runtime.cli import main
    out = tmp_path / "result.json"
    main(["bench", "--model", str(target), "--draft-model", str(draft), "--device", "cpu",
          "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--max-tokens", str(MAX_TOKENS), "--prompt-len", "24",
          "--gamma", str(GAMMA), "--warmup-tokens", "4", "--out", str(out), "--kv-cache-gb", "0.05", *extra])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def bench_run(llama_dir, draft_factory, tmp_path_factory):
    """One bench run for the module: (the JSON, what it printed)."""
    import contextlib
    import io
    tmp = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = _bench(tmp, llama_dir, draft_factory(llama_dir, "copy"), "--hf-baseline", "--label", "ci",
                        "--min-seqs", str(MIN_SEQS))
    return result, printed.getvalue()


def test_bench_end_to_end(bench_run):
    r = bench_run[0]
    assert r["schema"] == "pearl-bench/1" and r["label"] == "ci" and r["complete"] is True
    for key in ("machine", "copy_bandwidth", "config", "prompts", "runs", "hbm", "projection", "git_commit"):
        assert key in r
    assert r["machine"]["torch"] and r["copy_bandwidth"]["gbps"] > 0
    runs = {(x["mode"], x["batch_size"]): x for x in r["runs"]}
    assert set(runs) == {(m, bs) for m in ("ar", "sd", "pearl") for bs in BATCH_SIZES}
    for (mode, bs), x in runs.items():
        assert not any(k.startswith("_") for k in x), "raw outputs stay out of the JSON"
        # an identical token budget in every mode, over at least MIN_SEQS sequences
        assert x["batches"] == max(1, MIN_SEQS // bs)
        assert x["tokens"] == x["batches"] * bs * MAX_TOKENS == x["metrics_diff"]["committed_tokens"]
        assert x["outputs_match_ar"] is True, (mode, bs)       # greedy is lossless
        assert x["path"] == mode
        for key in ("tokens_per_s", "speedup_vs_ar", "mat", "round_ms", "draft_ms", "target_ms", "wait_ms",
                    "host_ms", "xfer_ms", "accept_rate", "ttft_ms", "gamma", "decode_tokens_per_s",
                    "decode_speedup_vs_ar", "full_batch_tokens_per_s", "full_batch_speedup_vs_ar"):
            assert key in x
        # a lone request decodes over several deltas, so it always has a window; in a batch the
        # requests can join rounds apart, and with 8 tokens one may finish before another's first
        # token (no window: None, as test_full_batch_rate_... checks with arrivals of that shape)
        full = x["full_batch_tokens_per_s"]
        assert full > 0 if bs == 1 else (full is None or full > 0), (mode, bs, full)
        # decoding alone: the tokens after the first over the time after the last first token
        # (of each batch: checked here where there is one)
        if x["batches"] == 1:
            assert x["decode_tokens_per_s"] == pytest.approx(
                (x["tokens"] - bs) / (x["wall_s"] - x["ttft_ms"]["max"] / 1e3))
        assert 0 < x["decode_tokens_per_s"]
        if mode == "ar":
            assert x["mat"] == 1.0 and x["accept_rate"] is None and x["draft_ms"] == 0.0
            assert x["decode_speedup_vs_ar"] == 1.0
        else:
            assert x["metrics_diff"]["speculative_rounds"] == x["metrics_diff"]["rounds"]
            # every round drafted the fixed gamma (a head start's early part not counted)
            assert x["gamma_mean"] == GAMMA and x["gamma"] == GAMMA and x["gamma_by_batch"] == {}
            assert x["accept_rate"] == 1.0 and x["mat"] > 1.0 and x["draft_ms"] > 0   # the draft is a copy
            # the exchange wraps the draft's own round, in pearl too (there beside the forward)
            m = x["metrics_diff"]
            assert m["exchange_ms"] >= m["draft_ms"] > 0
            assert x["xfer_ms"] == pytest.approx((m["exchange_ms"] - m["draft_ms"]) / m["rounds"])
            assert 0 <= x["xfer_share"] < 1
            # the two hops, from the draft's stamps (same machine): every round counted
            assert m["xfer_rounds"] == m["speculative_rounds"] and x["xfer_out_ms"] > 0 and x["xfer_back_ms"] > 0
            if mode == "sd":   # both hops lie inside the exchange, outside the draft's own time
                assert x["xfer_out_ms"] + x["xfer_back_ms"] <= x["xfer_ms"] + 0.05
            # sequence-rounds by (judged, accepted): they add up to the token counters; a copy
            # draft has every judged token accepted, at every position
            runs = m["judged_runs"]
            assert sum(j * c for j, _, c in runs) == m["drafted_tokens"] > 0
            assert sum(a * c for _, a, c in runs) == m["accepted_tokens"]
            assert all(j == a for j, a, _ in runs)
            assert [a for a, n in x["accept_by_position"] if n] == [1.0] * sum(1 for _, n in x["accept_by_position"] if n)
    h = r["hbm"]
    assert h["achieved_gbps"] > 0 and h["copy_gbps"] > 0 and h["hf_baseline"]["tokens_per_s"] > 0
    assert [p["batch_size"] for p in r["projection"]] == list(BATCH_SIZES)
    assert all(p["source"] == "sd" and p["alpha"] == 1.0 for p in r["projection"])
    # every draft token accepted: nothing waits for a head start, so the batch simulation and
    # the closed form agree (gamma tokens a round either way)
    for p in r["projection"]:
        assert p["pearl_speedup_batch_sim"] == pytest.approx(p["pearl_speedup"], rel=0.02), p


def test_bench_prints_the_tables(bench_run):
    lines = bench_run[1].splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["mode", "bs", "tok/s", "speedup"])
    rows = [line.split()[:2] for line in lines[header + 2:header + 2 + 6]]
    assert rows == [[m, str(bs)] for bs in BATCH_SIZES for m in ("ar", "sd", "pearl")]
    assert "HBM at ar bs=1" in bench_run[1] and "HF generate" in bench_run[1]
    assert "PROJECTED PEARL speedup" in bench_run[1]
    assert "acceptance by draft position" in bench_run[1]
    assert "xfer by hop" in bench_run[1]


def test_bench_fails_loudly_when_the_draft_never_connects(tmp_path, llama_dir, tiny_model_factory):
    other_vocab = tiny_model_factory("llama", vocab=576)      # the target refuses its handshake
    with pytest.raises(BenchError, match="never used the draft"):
        _bench(tmp_path, llama_dir, other_vocab, "--modes", "sd", "--batch-sizes", "1", "--draft-timeout", "3")


def test_bench_mps_plumbing_with_a_stand_in_control_daemon(tmp_path, llama_dir, monkeypatch):
    """No GPU here: a stand-in `nvidia-cuda-mps-control` records how the bench drives it."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / mps.CONTROL
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {calls}; exit 0; fi
read cmd; echo "$cmd" >> {calls}
[ "$cmd" = "get_server_list" ] && echo 4242
exit 0
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    r = _bench(tmp_path, llama_dir, llama_dir, "--modes", "ar", "--batch-sizes", "1", "--mps",
               "--mps-shares", "70,30")
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("start ") and lines[1:] == ["get_server_list", "quit"]
    m = r["config"]["mps"]
    assert m["on"] and m["shares"] == {"target": 70, "draft": 30} and m["servers"] == {"ar": ["4242"]}
    assert lines[0].split()[1] == m["pipe"]


def test_mps_clients_drop_cuda_visible_devices(tmp_path, monkeypatch):
    """An MPS server renumbers the GPUs its daemon sees: with CUDA_VISIBLE_DEVICES=3 kept, the
    services found no GPU at all (4x H200, session 5). They now run without the variable."""
    fake = tmp_path / "bin" / mps.CONTROL
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with mps.mps_daemon((100, 50)) as env:
        assert env["target"]["CUDA_VISIBLE_DEVICES"] is None and env["draft"]["CUDA_VISIBLE_DEVICES"] is None
        assert env["draft"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
        child = Stack(SimpleNamespace(), env=env).child_env("draft")
        assert "CUDA_VISIBLE_DEVICES" not in child and child["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with mps.mps_daemon((100, 50)) as env:
        assert "CUDA_VISIBLE_DEVICES" not in env["target"]


def test_full_batch_rate_counts_only_while_every_request_decodes():
    """Two requests: A's tokens arrive at 1, 2, ..., 10 s, B's (two a delta) at 2, 3, 4 s. The
    window runs from the last first token (2 s) to the first last one (4 s): A's tokens at 3
    and 4 s and B's at 3 and 4 s, 6 tokens in 2 s. A second batch adds its own window."""
    from pearl_runtime.bench.measure import full_batch_rate
    a = [(float(t), 1) for t in range(1, 11)]
    b = [(2.0, 1), (3.0, 2), (4.0, 2)]
    assert full_batch_rate([([], 10.0, [a, b])]) == pytest.approx(3.0)
    assert full_batch_rate([([], 10.0, [a, b]), ([], 5.0, [[(0.5, 1), (1.5, 4)]])]) == pytest.approx(10 / 3)
    assert full_batch_rate([([], 1.0, [[(1.0, 1)]])]) is None   # a one-token request has no window


def test_batches_cover_min_seqs_with_distinct_prompts():
    from pearl_runtime.bench import prompts as bench_prompts
    p = [[i] for i in range(10)]
    assert bench_prompts.batches(p, 1, 3) == [[[0]], [[1]], [[2]]]
    assert bench_prompts.batches(p, 4, 8) == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]
    assert bench_prompts.batches(p, 32, 8) == [bench_prompts.take(p, 32)]   # one batch, prompts cycled
    assert bench_prompts.batches(p, 3, 1) == [[[0], [1], [2]]]


def test_hbm_step_time_counts_every_batch_of_the_row(monkeypatch):
    """A bs=1 row of 8 batches: its wall covers 8 x max_tokens steps, not max_tokens."""
    from pearl_runtime.bench import report, roofline
    monkeypatch.setattr(roofline, "decode_step_bytes",
                        lambda *a, **k: {"weight_bytes": 4e9, "kv_bytes": 0.0, "total_bytes": 4e9})
    row = {"mode": "ar", "batch_size": 1, "batches": 8, "max_tokens": 100, "wall_s": 4.0, "target_ms": 4.5}
    h = report.hbm([row], "unused", "bfloat16", 256, {"copy": {"gbps": 2000.0}})
    assert h["step_ms"] == 5.0
    assert h["achieved_gbps"] == 800.0 and h["fraction_of_copy"] == 0.4


def test_projection_uses_the_measured_head_start_share():
    """A pearl run whose rounds rarely waited for a head start (large batch: the target grants
    it only when half the batch is in pre-verify) is modelled as plain PEARL; one that waited in
    every pre-verify round as the head-start chain; None keeps the design's assumption."""
    a, g, w = 0.93, 8, 4
    design = projection.project(25.0, 2.0, 44.0, 1.0, a, g, w)
    none = projection.project(25.0, 2.0, 44.0, 1.0, a, g, w, head_start_share=0.0)
    every = projection.project(25.0, 2.0, 44.0, 1.0, a, g, w,
                               head_start_share=projection._pre_verify_share(a, g, w))
    plain = projection.project(25.0, 2.0, 44.0, 1.0, a, g, 0)
    assert none["pearl_tokens_per_round"] == pytest.approx(plain["pearl_tokens_per_round"])
    assert none["pearl_round_ms"] == pytest.approx(plain["pearl_round_ms"])
    assert every["pearl_tokens_per_round"] == pytest.approx(design["pearl_tokens_per_round"])
    assert every["pearl_round_ms"] == pytest.approx(design["pearl_round_ms"])
    assert none["pearl_tokens_per_round"] < design["pearl_tokens_per_round"]


def test_batch_head_start_waits_only_for_a_large_quorum():
    """The batch simulation behind the target's HEAD_START_QUORUM, at the 72B + 1.5B inputs
    measured at batch 8 (H200, session 8): the whole batch waits for a head start, so granting
    it when half the batch is in pre-verify loses to granting it at three quarters; at batch 1
    the quorum does not matter and the head start pays."""
    from pearl_runtime.spec.round_model import HEAD_START_QUORUM
    inputs = dict(alpha=0.919, gamma=13, t_d=1.81, t_v=lambda q: 22.74 + 0.266 * q, t_x=1.2, rounds=4000)
    half = projection.simulate_pearl_batch(head_start=6, batch=8, quorum=0.5, **inputs)
    chosen = projection.simulate_pearl_batch(head_start=6, batch=8, quorum=HEAD_START_QUORUM, **inputs)
    assert chosen > 1.03 * half
    one = dict(inputs, t_d=1.41, t_v=lambda q: 22.2 + 0.02 * q, gamma=16, alpha=0.93)
    assert projection.simulate_pearl_batch(head_start=6, batch=1, quorum=0.5, **one) == \
        projection.simulate_pearl_batch(head_start=6, batch=1, quorum=HEAD_START_QUORUM, **one)
    assert projection.simulate_pearl_batch(head_start=6, batch=1, **one) > \
        1.03 * projection.simulate_pearl_batch(head_start=0, batch=1, **one)


def test_projection_reads_the_policy_the_target_reports():
    """The bench takes head start and quorum from the pearl target's TargetMetrics, not its flags."""
    from pearl_runtime.bench.run import _pearl_policy
    assert _pearl_policy([]) == {"head_start": -1, "quorum": projection.HEAD_START_QUORUM}
    rows = [{"mode": "sd", "metrics_diff": {"policy": {"head_start": 9, "head_start_quorum": 0.1}}},
            {"mode": "pearl", "metrics_diff": {"policy": {"head_start": 3, "head_start_quorum": 0.5}}}]
    assert _pearl_policy(rows) == {"head_start": 3, "quorum": 0.5}


def test_bench_records_each_services_keep_awake(monkeypatch):
    from types import SimpleNamespace

    from pearl_runtime.bench.run import _keep_awake_setting
    monkeypatch.delenv("PEARL_KEEP_AWAKE", raising=False)
    plain = SimpleNamespace(target_args="", draft_args="")
    assert _keep_awake_setting(plain, "cuda:0", "cuda:0") == {"target": True, "draft": True}
    assert _keep_awake_setting(plain, "cpu", "cpu") == {"target": False, "draft": False}
    off = SimpleNamespace(target_args="--keep-awake off", draft_args="--keep-awake=off")
    assert _keep_awake_setting(off, "cuda:0", "cuda:1") == {"target": False, "draft": False}
    monkeypatch.setenv("PEARL_KEEP_AWAKE", "on")
    assert _keep_awake_setting(plain, "cpu", "cpu") == {"target": True, "draft": True}


def test_sd_row_with_device_tokens_splits_the_round_by_its_hops():
    """sd rounds whose drafts stayed on the device report device times for the draft and the
    verify: the row's transport is then the two hops and host the rest of the round; rows
    without such rounds keep exchange - draft."""
    from types import SimpleNamespace

    from pearl_runtime.bench.measure import COUNTERS, row
    stats = SimpleNamespace(time_to_first_token_ms=10.0, target_forwards=30, new_tokens=128)
    runs = [([SimpleNamespace(stats=stats, token_ids=[1] * 128)], 1.0, [[(0.01, 1), (1.0, 127)]])]   # (time, tokens) arrivals
    m = {k: 0 for k in COUNTERS} | {"rounds": 30, "speculative_rounds": 30, "draft_ms": 30 * 4.0,
                                    "target_ms": 30 * 6.0, "wait_ms": 30 * 1.0, "exchange_ms": 30 * 1.0,
                                    "round_ms": 30 * 11.0, "xfer_out_ms": 30 * 0.3, "xfer_back_ms": 30 * 0.2,
                                    "xfer_rounds": 30, "device_token_rounds": 29, "committed_tokens": 128,
                                    "gamma_sum": 150, "gamma_by_batch": {}, "path": "sd", "judged_runs": [],
                                    "gamma": 5}
    x = row("sd", 1, 128, runs, m)
    assert x["xfer_ms"] == pytest.approx(0.5)
    assert x["host_ms"] == pytest.approx(11.0 - 4.0 - 6.0 - 0.5)
    inline = row("sd", 1, 128, runs, m | {"device_token_rounds": 0, "exchange_ms": 30 * 4.6, "wait_ms": 30 * 4.6})
    assert inline["xfer_ms"] == pytest.approx(0.6) and inline["host_ms"] == pytest.approx(11.0 - 6.0 - 4.6)
