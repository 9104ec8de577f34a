"""The configuration registry (pearl_runtime/envs.py) against the parsers, the stack files and
docs/config.md: every service flag has its variable, every variable's flag reads it, every
variable without a flag has a role, and the generated page is current."""
import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pearl_runtime import envs

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_docs)

# what a parser needs besides its flags to parse at all
POSITIONALS = {"generate": ["hello"], "health": ["127.0.0.1:1"], "models": ["prepare"]}
FLAGGED = [(v, cmd) for v in envs.registry().values() if v.flag for cmd in v.used_by]


@pytest.fixture(scope="module")
def parsers():
    return gen_docs.parsers()


def test_config_md_is_current():
    done = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("service", envs.SERVICES)
def test_every_service_flag_has_its_variable(parsers, service):
    missing = [a.option_strings[0] for a in gen_docs.options(parsers[service])
               if gen_docs.variable_of(service, a) is None]
    assert not missing, f"pearl {service} flags without a PEARL_* variable in envs.py: {missing}"


def _sample(var: envs.Var, action: argparse.Action) -> str:
    """An environment value that differs from the flag's default."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "0" if action.default else "1"
    if action.choices:
        return str(next(c for c in action.choices if c != action.default))
    if var.type is str and action.type is not None:   # a word or a number ("auto" | N): a number
        return "7"
    return {int: "7", float: "0.25", str: "from-the-environment"}[var.type]


@pytest.mark.parametrize("var,command", FLAGGED, ids=[f"{v.name}-{c}" for v, c in FLAGGED])
def test_each_flag_takes_its_variable(monkeypatch, var, command):
    """Setting the variable is the same as passing its flag: the parsed value follows it."""
    for name in [n for n in __import__("os").environ if n.startswith("PEARL_")]:
        monkeypatch.delenv(name)
    action = next((a for a in gen_docs.options(gen_docs.parsers()[command]) if var.flag in a.option_strings), None)
    assert action is not None, f"{var.name} names {var.flag}, which pearl {command} does not have"
    text = _sample(var, action)
    monkeypatch.setenv(var.name, text)
    parsed = gen_docs.parsers()[command].parse_args(POSITIONALS.get(command, []))
    value = getattr(parsed, action.dest)
    want = action.type(var.parse(text)) if var.type is str and action.type is not None else var.parse(text)
    assert value == want, f"pearl {command} {var.flag} = {value!r} with {var.name}={text}"
    assert value != action.default


def test_variables_without_a_flag_are_set_by_the_stack():
    for v in envs.registry().values():
        if v.flag:
            continue
        assert v.role, f"{v.name} has neither a flag nor a role"
        files = [f for f in v.used_by if (ROOT / f).is_file()]
        if files:   # a compose/image variable: the file that reads it names it
            assert any(v.name in (ROOT / f).read_text() for f in files), f"{v.name} not found in {files}"


def test_stack_files_and_docs_name_only_declared_variables():
    texts = [ROOT / "compose.yaml", ROOT / "Dockerfile", ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
             *(ROOT / "deploy").rglob("*.yaml")]
    names = {(p.relative_to(ROOT).as_posix(), m) for p in texts
             for m in re.findall(r"\bPEARL_[A-Z][A-Z0-9_]*\b", p.read_text())}
    unknown = sorted(f"{path}: {name}" for path, name in names if name not in envs.registry())
    assert not unknown, "undeclared PEARL_* names:\n" + "\n".join(unknown)


def test_a_bad_value_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("PEARL_TARGET_PORT", "fifty")
    with pytest.raises(SystemExit) as stop:
        envs.default("PEARL_TARGET_PORT")
    assert stop.value.code == 2
