"""The import rules of the layout (docs: README "Layout"): the runtime imports no service, the
services never import each other, and the hand-written modules have no import circle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "target_service", "draft_service")
PACKAGES = ("pearl_runtime",) + SERVICES


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            if "pb" in rel.parts[:2] and rel.parts[0] == "pearl_runtime":
                continue   # generated stubs
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """The hand-written modules `path` imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_runtime_imports_no_service():
    bad = sorted((m, d) for m, deps in _graph().items() if _top(m) == "pearl_runtime"
                 for d in deps if _top(d) in SERVICES)
    assert not bad, f"pearl_runtime imports services: {bad}"


def test_no_service_imports_another():
    bad = sorted((m, d) for m, deps in _graph().items() if _top(m) in SERVICES
                 for d in deps if _top(d) in SERVICES and _top(d) != _top(m))
    assert not bad, f"services import each other: {bad}"


def test_the_engine_never_imports_the_bench():
    bad = sorted((m, d) for m, deps in _graph().items() if m.startswith("pearl_runtime.engine")
                 for d in deps if d.startswith("pearl_runtime.bench"))
    assert not bad, f"engine imports bench: {bad}"


def test_the_speculative_policy_is_pure():
    bad = set()
    for path in (ROOT / "pearl_runtime" / "spec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad |= {(path.name, m) for m in mods if m.split(".")[0] in ("grpc", "google", "asyncio")}
    assert not bad, f"spec/ imports grpc, protobuf or asyncio: {sorted(bad)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the package modules (a package's __init__ importing its own
    submodules is not one: it is how a package re-exports)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):   # a package importing its own submodule
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ that re-exports a submodule makes `pkg -> pkg.sub`; the submodule
    # importing `pkg.x` through the package then reads as `pkg.sub -> pkg`; count real modules only
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_a_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_pearl_variable_is_read_outside_the_registry():
    """os.environ / os.getenv reads of PEARL_* names live only in pearl_runtime/envs.py."""
    bad = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path == ROOT / "pearl_runtime" / "envs.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if ("os.environ" in line or "getenv" in line) and "PEARL_" in line:
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
