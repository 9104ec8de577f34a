"""Engine flags of `pearl target` / `pearl draft` reach the EngineConfig."""
from pearl_runtime.cli import _engine_config, build_parser


def test_prefix_cache_is_on_unless_turned_off():
    p = build_parser()
    on = p.parse_args(["target", "--model", "m"])
    off = p.parse_args(["draft", "--model", "m", "--no-prefix-cache"])
    assert _engine_config(on, "m").enable_prefix_cache is True
    assert _engine_config(off, "m").enable_prefix_cache is False


def test_the_drafts_graphs_reach_a_block(monkeypatch):
    """A new request's first draft round feeds its prompt's tail past the prefix-cached
    blocks, up to a block: the draft's graph query buckets reach that far (on a GPU it ran
    eagerly before, ~28 ms a request), besides 1 (decode) and 2 (the catch-up after a fully
    accepted round)."""
    import draft_service.server
    import pearl_runtime.log
    from pearl_runtime import cli
    seen = []

    async def fake_serve(cfg, host, port):
        seen.append(cfg)
    monkeypatch.setattr(draft_service.server, "serve", fake_serve)
    monkeypatch.setattr(cli, "_until_signal", lambda coro: coro)
    monkeypatch.setattr(pearl_runtime.log, "setup", lambda *a, **k: None)   # the test's logging stays
    for block in (16, 32):
        cli.cmd_draft(build_parser().parse_args(["draft", "--model", "m", "--block-size", str(block)]))
    assert [c.graph_query_lens for c in seen] == [(1, 2, 16), (1, 2, 32)]
