"""Which PEARL rounds wait for a head start: those where at least the quorum (default three
quarters) of the batch is in pre-verify; the flag is validated where it is read."""
import pytest

from target_service.__main__ import build_parser
from pearl_runtime.config import EngineConfig
from pearl_runtime.spec.round_model import HEAD_START_QUORUM
from target_service.rounds import TargetService


def test_quorum_decides_which_rounds_wait(llama_dir):
    cfg = EngineConfig(model=str(llama_dir), num_blocks=64)
    default = TargetService(cfg, mode="pearl", gamma=6, head_start=3)
    half = TargetService(cfg, mode="pearl", gamma=6, head_start=3, head_start_quorum=0.5)
    assert default.policy.quorum == HEAD_START_QUORUM == 0.75

    def early(service, pre, post, prefills=False):
        return service.policy.early(pre + post, pre, prefills, gamma=6)
    assert early(default, 4, 4) == 0 and early(half, 4, 4) == 3
    assert early(default, 6, 2) == 3 and early(default, 5, 3) == 0
    assert early(default, 1, 0) == 3          # a sequence alone: every pre-verify round
    assert early(default, 8, 0, prefills=True) == 0   # the draft's prefill would run beside the target's
    assert TargetService(cfg, mode="sd", gamma=6, head_start=3).policy.early(4, 4, False, 6) == 0
    with pytest.raises(ValueError, match="head_start_quorum"):
        TargetService(cfg, mode="pearl", head_start_quorum=0.0)


@pytest.mark.parametrize("text", ["0", "1.5", "half", ""])
def test_quorum_flag_names_itself_when_wrong(text, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--head-start-quorum", text])
    assert e.value.code == 2 and "argument --head-start-quorum: wants a share" in capsys.readouterr().err
    assert build_parser().parse_args(["--head-start-quorum", "0.5"]).head_start_quorum == 0.5
    assert build_parser().parse_args([]).head_start_quorum == 0.75
