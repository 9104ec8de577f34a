"""Engine flags of `pearl target` / `pearl draft` reach the EngineConfig."""
from pearl_runtime.cli import _engine_config, build_parser


def test_prefix_cache_is_on_unless_turned_off():
    p = build_parser()
    on = p.parse_args(["target", "--model", "m"])
    off = p.parse_args(["draft", "--model", "m", "--no-prefix-cache"])
    assert _engine_config(on, "m").enable_prefix_cache is True
    assert _engine_config(off, "m").enable_prefix_cache is False
