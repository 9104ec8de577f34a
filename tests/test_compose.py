"""compose.yaml stays in step with the CLI: every service's command parses, and the wiring
between services (ports, the draft and target addresses) is consistent."""
from pathlib import Path

import pytest
import yaml

from pearl_runtime.launch import MODULES

COMPOSE = yaml.safe_load((Path(__file__).parent.parent / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def parse(command: list[str]):
    """A compose command (`draft --port ...`) through the service's own parser."""
    import importlib
    if command[0] not in MODULES:   # a `pearl` verb (models prepare)
        from pearl_runtime.cli import build_parser
        return build_parser().parse_args(command)
    args = importlib.import_module(f"{MODULES[command[0]]}.__main__").build_parser().parse_args(command[1:])
    args.cmd = command[0]
    return args


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_command_parses(name):
    args = parse(SERVICES[name]["command"])
    assert args.cmd == SERVICES[name]["command"][0]


def test_wiring():
    draft, target, gateway = (parse(SERVICES[n]["command"]) for n in ("draft", "target", "gateway"))
    assert target.draft == f"draft:{draft.port}"
    assert gateway.targets == f"target:{target.port}"
    assert SERVICES["gateway"]["ports"][0].endswith(f":{gateway.port}")
    assert all(SERVICES[n]["environment"]["PEARL_HOST"] == "0.0.0.0" for n in ("draft", "target", "gateway"))
