"""Engine flags of `pearl target` / `pearl draft` reach the EngineConfig."""
import draft_service.__main__ as draft_main
import target_service.__main__ as target_main
from pearl_runtime.config import engine_config_from_args


def test_prefix_cache_is_on_unless_turned_off():
    on = target_main.build_parser().parse_args(["--model", "m"])
    off = draft_main.build_parser().parse_args(["--model", "m", "--no-prefix-cache"])
    assert engine_config_from_args(on, "m").enable_prefix_cache is True
    assert engine_config_from_args(off, "m").enable_prefix_cache is False


def test_the_drafts_graphs_reach_a_block(monkeypatch):
    """A new request's first draft round feeds its prompt's tail past the prefix-cached
    blocks, up to a block: the draft's graph query buckets reach that far (else it runs
    eagerly once a request), besides 1 (decode) and 2 (the catch-up after a fully accepted
    round)."""
    import draft_service.server
    seen = []

    async def fake_serve(cfg, host, port, **_):
        seen.append(cfg)
    monkeypatch.setattr(draft_service.server, "serve", fake_serve)
    monkeypatch.setattr(draft_main, "serve_until_signal", lambda coro: coro)
    monkeypatch.setattr(draft_main, "check_model_dir", lambda _dir: None)   # "m" is no model: only the flags matter here
    monkeypatch.setattr(draft_main, "setup_logging", lambda *a, **k: None)   # the test's logging stays
    monkeypatch.setattr(draft_main, "run_async", lambda coro: __import__("asyncio").run(coro))
    for block in (16, 32):
        draft_main.run(draft_main.build_parser().parse_args(["--model", "m", "--block-size", str(block)]))
    assert [c.graph_query_lens for c in seen] == [(1, 2, 16), (1, 2, 32)]
