"""The package's layers: every module of part/ parsed with `ast` (module-level, function-level and TYPE_CHECKING
imports all count), its imports of other part modules as a graph, and the rules that graph must keep.

From the bottom up (a module imports its own component and lower layers only; components of one layer not each
other):

  leaves        part, part.exit_codes, part.features, part.batch, part.prompts, part.embeddings: import only
                other leaves
  packing       part.packing: how a batch's sequences are laid out for the LLM (the collator and the model use it)
  config        part.config, then part.curriculum (the pure stage schedule)
  objectives    the auxiliary objectives the model calls (part.objectives), which see it through Protocols
  data | model  the data pipeline and the model, which share only leaves and the config
  inference | evaluation | convert | hf_export
  train
  cli           the commands (part.cli.*), then `python -m part` (part.__main__), which runs them
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PART = Path(__file__).resolve().parents[2] / "part"

LEAVES = ("part", "part.exit_codes", "part.features", "part.batch", "part.prompts", "part.embeddings")
LAYERS: tuple[tuple[str, ...], ...] = (
    LEAVES,
    ("part.packing",),
    ("part.config",),
    ("part.curriculum",),
    ("part.objectives",),  # the plug-ins the model calls: they see it through Protocols (part/objectives/base.py)
    ("part.data", "part.model"),
    ("part.inference", "part.evaluation", "part.convert", "part.hf_export"),
    ("part.train",),
    ("part.cli",),
    ("part.__main__",),
)
# Imports the layering does not allow: none.
TOLERATED: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = path.relative_to(PART.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PART.rglob("*.py")) if "__pycache__" not in p.parts}
TREES: dict[str, ast.Module] = {name: ast.parse(path.read_text(encoding="utf-8"), str(path))
                                for name, path in MODULES.items()}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def deepest_module(dotted: str) -> str | None:
    """The module `dotted` names, or the deepest package or module above it that exists (an imported name)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(name: str) -> set[str]:
    """The part modules `name` imports, wherever in the file the import is."""
    is_package = MODULES[name].name == "__init__.py"
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in map(deepest_module, targets) if t and within(t, "part") and t != name)
    return found


GRAPH: dict[str, set[str]] = {name: imports_of(name) for name in MODULES}
EDGES = sorted((a, b) for a, targets in GRAPH.items() for b in targets)


def component(name: str) -> str:
    """The longest entry of LAYERS that holds `name`."""
    matches = [c for layer in LAYERS for c in layer if within(name, c) and (c != "part" or name == "part")]
    assert matches, f"{name}: in no layer of tests/unit/test_layers.py (add its package to LAYERS)"
    return max(matches, key=len)


def layer(name: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if component(name) in members)


def tolerated(importer: str, imported: str) -> bool:
    return any(within(importer, a) and within(imported, b) for a, b in TOLERATED)


def edges_between(importer_prefix: str, imported_prefix: str) -> list[tuple[str, str]]:
    return [(a, b) for a, b in EDGES
            if within(a, importer_prefix) and within(b, imported_prefix) and not tolerated(a, b)]


def test_the_graph_is_read():
    """The parse sees what is there: the known imports of a few modules, function-level and TYPE_CHECKING ones
    included, so a rule below cannot pass on an empty graph."""
    assert {"part.cli.train", "part.data.batching", "part.model.speech_llm", "part.features"} <= set(MODULES)
    assert {"part.batch", "part.features", "part.config"} <= GRAPH["part.data.batching"]
    assert "part.batch" in GRAPH["part.model.speech_llm"]  # under TYPE_CHECKING
    assert "part.train.preflight" in GRAPH["part.cli.train"]  # inside main()
    assert "part.cli" in GRAPH["part.__main__"]
    assert len(EDGES) > 100


def test_no_import_cycle():
    """Tarjan's strongly connected components: any component of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(("importer", "imported"), [
    ("part.data", "part.model"),
    ("part.model", "part.data"),
    ("part.evaluation", "part.train"),
    ("part.model", "part.train"),
    ("part.model", "part.evaluation"),
    ("part.model", "part.cli"),
    ("part.config", "part.model"),
    ("part.config", "part.data"),
])
def test_forbidden_dependencies(importer, imported):
    assert not edges_between(importer, imported), f"{importer} must not import {imported}"


def test_only_the_dispatcher_imports_the_commands():
    outside = [(a, b) for a, b in EDGES
               if within(b, "part.cli") and not (within(a, "part.cli") or a == "part.__main__")]
    assert not outside, f"the commands are imported by the library: {outside}"


def test_layers_import_only_downward():
    wrong = [f"{a} ({component(a)}) imports {b} ({component(b)})" for a, b in EDGES
             if not tolerated(a, b) and component(a) != component(b) and layer(b) >= layer(a)]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_leaves_import_only_leaves():
    wrong = [(a, b) for a, b in EDGES if a in LEAVES and b not in LEAVES]
    assert not wrong, f"leaf modules import non-leaves: {wrong}"


def is_command(tree: ast.Module) -> bool:
    """A `__main__` guard or a command-line parser built (`argparse.ArgumentParser(...)`) anywhere in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            values = {n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)}
            if "__name__" in names and "__main__" in values:
                return True
        if isinstance(node, ast.Call):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == "ArgumentParser":
                return True
    return False


def test_commands_live_in_cli():
    commands = {name for name, tree in TREES.items() if is_command(tree)}
    assert not {n for n in commands if not (within(n, "part.cli") or n == "part.__main__")}, \
        f"command modules outside part/cli/: {sorted(commands)}"
    from part.cli import COMMANDS

    cli_modules = {n.rpartition(".")[2] for n in MODULES if n.startswith("part.cli.")}
    assert cli_modules == set(COMMANDS), "part/cli/ holds exactly the commands the dispatcher lists"
    assert {f"part.cli.{c}" for c in COMMANDS} <= commands  # each parses its own arguments
