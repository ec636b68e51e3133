"""The package's shape, checked from its source: the layers of docs/internals.md, no import
cycles, no stage importing another stage, no private name imported across modules, and no
module over the size a reader can hold in mind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "llm_sae"
MAX_LINES = 350

# Lowest first. A module may import its own package and any package of a lower layer;
# within one layer, only the packages listed together in SAME_LAYER_OK.
LAYERS = [
    {"common", "errors", "config", "__init__"},
    {"lm", "kernels"},
    {"sae", "store"},
    {"sources", "distributed"},
    {"harvest", "train", "analyze", "dashboard", "serve", "evaluate", "interop", "explain", "steer"},
    {"cli", "demo", "bench"},  # orchestrators: they run the stages
]
STAGES = LAYERS[4]
SAME_LAYER_OK = {("config", "errors"), ("common", "errors"), ("common", "config"), ("sources", "distributed")}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported llm_sae module, names imported from it) for every import outside
    ``if TYPE_CHECKING:`` blocks, at any depth (function-level imports count too)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("llm_sae")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if not mod.startswith("llm_sae"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            out += [(s, []) for s in subs] + [(mod, [n for n in names if f"{mod}.{n}" not in modules])]
    return out


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(top: str) -> int:
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"llm_sae.{top} is in no layer: add it to LAYERS in tests/test_layout.py")


MODULES = _modules()
GRAPH = {name: _imports(path, name, MODULES) for name, path in MODULES.items()}


def test_every_import_goes_down_the_layers():
    bad = []
    for name, imports in GRAPH.items():
        me = _top(name)
        for mod, _ in imports:
            other = _top(mod)
            if other == me or mod == "llm_sae":
                continue
            if me in STAGES and other in STAGES:
                bad.append(f"{name} -> {mod} (a stage imports another stage)")
            elif _layer(other) > _layer(me) or (
                _layer(other) == _layer(me) and (me, other) not in SAME_LAYER_OK
            ):
                bad.append(f"{name} -> {mod} (layer {_layer(me)} imports layer {_layer(other)})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {n: {m for m, _ in imps if m in MODULES and m != n} for n, imps in GRAPH.items()}
    # A package's __init__ runs before its submodules: a submodule importing its own
    # package's __init__ is not a cycle worth reporting; everything else is.
    for n in edges:
        edges[n] = {m for m in edges[n] if not n.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_across_modules():
    bad = [f"{name}: from {mod} import {n}" for name, imps in GRAPH.items() for mod, names in imps
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines (limit {MAX_LINES}): split it at its seams"


def test_importing_the_library_changes_nothing_process_wide():
    """No allocator, thread-count, warning-filter or mimetype changes at import."""
    import subprocess
    import sys

    code = (
        "import mimetypes, warnings, torch\n"
        "before = (torch.get_num_threads(), len(warnings.filters), dict(mimetypes.types_map))\n"
        "import llm_sae.train, llm_sae.harvest, llm_sae.analyze, llm_sae.evaluate, llm_sae.serve,"
        " llm_sae.dashboard, llm_sae.interop, llm_sae.store, llm_sae.kernels\n"
        "after = (torch.get_num_threads(), len(warnings.filters), dict(mimetypes.types_map))\n"
        "assert before == after, (before[:2], after[:2])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
