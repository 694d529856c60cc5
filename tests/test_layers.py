"""The import rules of docs/ARCHITECTURE.md, read from the source with ``ast`` (every import, also those inside
functions): each module imports only its own layer or lower ones, no module imports another's private names, and
there are no import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject.toml [tool.setuptools] package-dir)
PACKAGE_DIRS = {"robot_rl": "robot_rl", "sim": "robot_rl.sim", "datasets": "robot_rl.datasets",
                "hw_drivers": "robot_rl.hw_drivers"}
# lowest first; a module may import from its own layer and the layers listed before it (docs/ARCHITECTURE.md)
LAYERS = [
    ("robot_rl", "robot_rl.errors", "robot_rl.progress", "robot_rl.provenance"),
    ("robot_rl.robot",),
    ("robot_rl.sim",),
    ("robot_rl.envs",),
    ("robot_rl.datasets",),
    ("robot_rl.policies",),
    ("robot_rl.rl",),
    ("robot_rl.stages",),
    ("robot_rl.serve",),
    ("robot_rl.ros",),
    ("robot_rl.hw_drivers",),
    ("robot_rl.config",),
    ("robot_rl.pipeline",),
    ("robot_rl.cli",),
]
TOP_LEVEL_MODULES = {"__init__", "cli", "pipeline", "errors", "config", "progress", "provenance"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, idx = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, idx = len(n), i
    assert idx is not None, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return idx


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every robot_rl import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("robot_rl")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("robot_rl"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def _resolve(target: str) -> str | None:
    """The module a dotted import target names (a package's __init__ counts as the package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_every_module_has_a_layer_and_the_top_level_is_small():
    for m in MODULES:
        layer_of(m)
    top = {p.stem for p in (ROOT / "robot_rl").glob("*.py")}
    assert top <= TOP_LEVEL_MODULES, f"new top-level modules {sorted(top - TOP_LEVEL_MODULES)}: put them in a package"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers_and_stay_public(module):
    bad = []
    for target, name, line in _imports(module, MODULES[module]):
        dst = _resolve(target)
        if dst is None:
            bad.append(f"line {line}: {target} does not exist")
            continue
        if layer_of(dst) > layer_of(module):
            bad.append(f"line {line}: imports {dst} from a higher layer")
        if name is not None and name.startswith("_") and dst != module:
            bad.append(f"line {line}: imports private {dst}.{name}")
    assert not bad, f"{module}: " + "; ".join(bad)


def test_no_import_cycles():
    graph = {m: {d for t, _, _ in _imports(m, p) if (d := _resolve(t)) and d != m} for m, p in MODULES.items()}
    # a package's __init__ importing its own submodule is the package's face, not a cycle
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
