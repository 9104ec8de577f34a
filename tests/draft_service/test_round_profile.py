"""PEARL_PROFILE_ROUNDS: the draft service profiles that many rounds after a warm-up and logs
one report; without the variable nothing is profiled."""
from pearl_runtime.pb import common_pb2, draft_pb2
from pearl_runtime.config import EngineConfig


def _rounds(servicer, n):
    from draft_service.drafter import Mirror
    mirror = Mirror()
    for i in range(n):
        rnd = draft_pb2.Round(round_id=i + 1, gamma=3)
        if i == 0:
            rnd.adds.add(seq_id=1, token_ids=[5, 6, 7, 8], params=common_pb2.SamplingParams(max_tokens=100))
        servicer.runner.whole(mirror, rnd)


def test_profiles_the_rounds_after_the_warm_up_once(llama_dir, monkeypatch, caplog):
    from draft_service.round_profile import RoundProfiler
    from draft_service.server import DraftServicer
    monkeypatch.setenv("PEARL_PROFILE_ROUNDS", "2")
    monkeypatch.setattr(RoundProfiler, "WARMUP", 1)
    servicer = DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64))
    _rounds(servicer, 2)
    assert servicer.runner.profiler.report is None          # warm-up + one profiled round so far
    with caplog.at_level("INFO", logger="draft_service.round_profile"):
        _rounds(servicer, 2)
    report = servicer.runner.profiler.report
    assert report.startswith("draft round profile: 2 rounds") and "Self CPU" in report
    assert sum("draft round profile" in r.getMessage() for r in caplog.records) == 1


def test_off_without_the_variable(llama_dir, monkeypatch):
    from draft_service.server import DraftServicer
    monkeypatch.delenv("PEARL_PROFILE_ROUNDS", raising=False)
    assert DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64)).runner.profiler is None


def test_round_times_log_the_phases_every_n_rounds(llama_dir, monkeypatch, caplog):
    """PEARL_ROUND_TIMES=2: every second round logs the mean queue / apply / draft / encode
    times; the round's arrival stamp comes from the stream (here: 5 ms before the round), and
    the collector's ms a round over the same rounds."""
    import gc
    import time

    from draft_service.drafter import Mirror
    from draft_service.round_profile import RoundClock
    from draft_service.server import DraftServicer
    monkeypatch.setenv("PEARL_ROUND_TIMES", "2")
    monkeypatch.delenv("PEARL_PROFILE_ROUNDS", raising=False)
    servicer = DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64))
    mirror = Mirror()
    with caplog.at_level("INFO", logger="draft_service.round_profile"):
        for i in range(3):
            rnd = draft_pb2.Round(round_id=i + 1, gamma=3)
            if i == 0:
                rnd.adds.add(seq_id=1, token_ids=[5, 6, 7, 8], params=common_pb2.SamplingParams(max_tokens=100))
            if i == 1:
                gc.collect()   # lands in the window the report covers
            servicer.runner.whole(mirror, rnd, received=time.monotonic() - 0.005)
    lines = [r.getMessage() for r in caplog.records if "draft round times" in r.getMessage()]
    assert len(lines) == 1 and all(p in lines[0] for p in RoundClock.PHASES + ("gc",))
    last = servicer.runner.clock.last
    assert last["queue"] >= 5.0 and last["draft"] > 0 and min(last.values()) >= 0
    assert last["gc"] > 0 and "(0 collections)" not in lines[0]
    assert servicer.runner.clock.rounds == 1                 # the third round waits for the next report
    monkeypatch.delenv("PEARL_ROUND_TIMES")
    assert DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64)).runner.clock is None
