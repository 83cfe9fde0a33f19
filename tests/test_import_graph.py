"""The import graph of the package, read from the source with ``ast``: no cycles, the lower floors stay free of
Lightning and of the upper floors (epg.lightning, epg.eval), and the library never imports the command lines
(epg.commands).

Every ``import``/``from … import`` of an ``epg`` module counts, at module level or inside a function (a deferred
import still ties the two modules together); imports under ``if TYPE_CHECKING:`` never run and are left out of the
checks (the script lists the cycles they would close).
``from epg.x import y`` is an edge to ``epg.x.y`` when that is a module, else to ``epg.x``. The parent packages that
Python initialises on the way (``epg/__init__.py`` …) are not edges: the package layer is what
:func:`package_graph` shows.

Print the subpackage-level graph (for notes): ``python -m tests.test_import_graph``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "epg"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")  # top-level distributions of Lightning
LOWER_FLOORS = ("epg.nn", "epg.method", "epg.sampling")  # no Lightning, no epg.lightning, no epg.eval
COMMANDS = "epg.commands"  # the command front ends: only they and the dispatcher reach them
DISPATCHER = "epg.cli"  # `epg <command>`: runs the tools by name, the LightningCLI front end by import


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "epg.checkpoint"
    target: str  # imported module: "epg.io", or the top name of a third-party one ("lightning")
    line: int
    deferred: bool  # inside a function or class body, not at module level
    type_checking: bool = False  # under ``if TYPE_CHECKING:``: never runs

    def where(self) -> str:
        return f"{module_file(self.source)}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> str:
    path = ROOT.joinpath(*name.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT))


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, deferred: bool = False, type_checking: bool = False):
    """(import node, deferred, type_checking) triples below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, deferred, type_checking
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), deferred, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), deferred, type_checking)
        else:
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            yield from _walk(child, inner, type_checking)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in module ``name``: epg modules by full name, others by their top-level name."""
    is_package = path.name == "__init__.py"
    found = []
    for node, deferred, type_checking in _walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        for target in targets:
            if target.split(".")[0] != "epg":
                target = target.split(".")[0]
            else:  # the longest existing module prefix (``import epg.nn.network`` → epg.nn.network)
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
            found.append(Import(name, target, node.lineno, deferred, type_checking))
    return found


def import_graph() -> dict[str, list[Import]]:
    """Module → its imports (epg modules and third-party top names), for every module under epg/."""
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def epg_edges(graph: dict[str, list[Import]], type_checking: bool = False) -> dict[str, dict[str, Import]]:
    """Module → {imported epg module: its first import}, without self-imports; ``type_checking`` adds the imports
    under ``if TYPE_CHECKING:``."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in graph}
    for name, found in graph.items():
        for imp in found:
            if imp.target.startswith("epg") and imp.target != name and (type_checking or not imp.type_checking):
                edges[name].setdefault(imp.target, imp)
    return edges


def cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(component: list[str], edges: dict[str, dict[str, Import]]) -> str:
    """The imports inside one cycle, one per line: ``a -> b (epg/a.py:12, deferred)``."""
    members = set(component)
    lines = []
    for source in component:
        for target, imp in sorted(edges[source].items()):
            if target in members:
                kind = "TYPE_CHECKING" if imp.type_checking else "deferred" if imp.deferred else "module level"
                lines.append(f"  {source} -> {target} ({imp.where()}, {kind})")
    return "\n".join(lines)


def cycle_report(edges: dict[str, dict[str, Import]]) -> str:
    return "\n".join(f"cycle {' <-> '.join(c)}:\n{describe_cycle(c, edges)}" for c in cycles(edges))


def reachable(start: str, edges: dict[str, dict[str, Import]]) -> dict[str, list[str]]:
    """Every epg module ``start`` imports, directly or not, with one import chain leading to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in sorted(edges[v]):
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    return paths


def floor(name: str) -> str:
    """A module's subpackage (``epg.nn.layers`` → ``epg.nn``); a top-level module is its own (``epg.checkpoint``)."""
    return ".".join(name.split(".")[:2])


def package_graph(graph: dict[str, list[Import]] | None = None) -> dict[str, dict[str, bool]]:
    """Subpackage → {imported subpackage or third-party name of interest: True if only deferred imports}."""
    graph = import_graph() if graph is None else graph
    out: dict[str, dict[str, bool]] = {}
    for name, found in graph.items():
        row = out.setdefault(floor(name), {})
        for imp in found:
            if imp.type_checking:
                continue
            if imp.target.startswith("epg"):
                target = floor(imp.target)
            elif imp.target in LIGHTNING:
                target = "lightning"
            else:
                continue
            if target != floor(name):
                row[target] = row.get(target, True) and imp.deferred
    return out


def format_package_graph(graph: dict[str, dict[str, bool]]) -> str:
    """One line per subpackage: ``epg.sampling -> epg.io, epg.method, epg.nn``; ``(deferred)`` marks edges made only
    by imports inside functions."""
    width = max(map(len, graph))
    lines = []
    for source in sorted(graph):
        targets = [f"{t} (deferred)" if graph[source][t] else t for t in sorted(graph[source])]
        lines.append(f"{source:<{width}} -> {', '.join(targets) or '(nothing)'}")
    return "\n".join(lines)


# ---- tests ----------------------------------------------------------------------------------------------------------
GRAPH = import_graph()
EDGES = epg_edges(GRAPH)


def test_the_parser_sees_known_imports():
    assert "epg.io" in EDGES["epg.checkpoint"] and "epg.nn.network" in EDGES["epg.checkpoint"]
    assert any(imp.target == "lightning" for imp in GRAPH["epg.data.datamodule"])
    # a deferred import is found too (epg.checkpoint builds the representation inside a function)
    assert any(imp.deferred and imp.target == "epg.nn.official" for imp in GRAPH["epg.checkpoint"])


def test_the_parser_marks_deferred_relative_and_type_checking_imports(tmp_path):
    source = tmp_path / "toy.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import lightning.pytorch as pl\n"
        "from . import io\n"
        "if TYPE_CHECKING:\n"
        "    from epg.nn.presets import EPGConfig\n"
        "def f():\n"
        "    import epg.nn.network\n"
    )
    modules = {name: Path() for name in ("epg", "epg.io", "epg.nn", "epg.nn.presets", "epg.nn.network")}
    found = {(i.target, i.deferred, i.type_checking) for i in imports_of("epg.toy", source, modules)}
    assert found == {
        ("typing", False, False),
        ("lightning", False, False),
        ("epg.io", False, False),
        ("epg.nn.presets", False, True),
        ("epg.nn.network", True, False),
    }


def test_cycle_finder_reports_each_cycle():
    toy = {"a": {"b": None}, "b": {"c": None}, "c": {"a": None}, "d": {"a": None}, "e": {"e": None}}
    assert cycles(toy) == [["a", "b", "c"]]


# Cycles in files other workers own, known when this test was written; each entry must still be a cycle (strict).
KNOWN_CYCLES: list[list[str]] = []


def test_no_import_cycles():
    found = [c for c in cycles(EDGES) if c not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + cycle_report(EDGES)


def test_no_cycles_between_subpackages():
    """The floors are layered: no two subpackages (or top-level modules) import each other, even through others
    (e.g. the post-hoc EMA snapshot format lives in epg.posthoc, which epg.lightning and epg.eval both read)."""
    floors = package_graph(GRAPH)
    edges = {source: {t: None for t in targets if t.startswith("epg")} for source, targets in floors.items()}
    assert "epg.posthoc" in edges["epg.lightning"] and "epg.posthoc" in edges["epg.eval"]
    assert not cycles(edges), format_package_graph(floors)


@pytest.mark.parametrize("prefix", LOWER_FLOORS)
def test_lower_floors_import_neither_lightning_nor_the_upper_floors(prefix):
    bad = []
    for name, found in GRAPH.items():
        if name == prefix or name.startswith(prefix + "."):
            for imp in found:
                if imp.type_checking:
                    continue
                if imp.target in LIGHTNING or imp.target.startswith(("epg.lightning", "epg.eval")):
                    bad.append(f"{imp.where()}: {name} imports {imp.target}")
            for target, chain in reachable(name, EDGES).items():  # nor through another epg module
                if target.startswith(("epg.lightning", "epg.eval")):
                    bad.append(f"{name} reaches {target}: {' -> '.join(chain)}")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_commands():
    """Only epg.commands and the dispatcher epg.cli (which runs the tools by name and calls the LightningCLI front
    end) import epg.commands; the library takes typed arguments."""
    assert {"epg.commands.sample", "epg.commands.fid", "epg.commands.demo", "epg.commands.train"} <= set(GRAPH)
    assert "epg.sampling.run" in EDGES["epg.commands.sample"]  # the parser sees the commands' imports
    assert "epg.commands.train" in EDGES["epg.cli"]
    bad = [
        f"{imp.where()}: {name} imports {imp.target}"
        for name, found in GRAPH.items()
        if not (name in (COMMANDS, DISPATCHER) or name.startswith(COMMANDS + "."))
        for imp in found
        if imp.target == COMMANDS or imp.target.startswith(COMMANDS + ".")
    ]
    assert not bad, "\n".join(bad)


def test_the_lightning_cli_is_a_command_front_end():
    """Lightning's CLI module (the front end of `epg fit|validate|predict`) is imported under epg.commands only."""
    assert "lightning.pytorch.cli" in (PACKAGE / "commands" / "train.py").read_text(encoding="utf-8")
    bad = [
        f"{module_file(name)}: {name} imports Lightning's CLI"
        for name, path in all_modules().items()
        if not name.startswith(COMMANDS + ".") and "lightning.pytorch.cli" in path.read_text(encoding="utf-8")
    ]
    assert not bad, "\n".join(bad)


def test_every_tool_is_a_command_module_with_a_main():
    from epg.cli import TOOLS

    for name in TOOLS:
        assert f"{COMMANDS}.{name}" in GRAPH, f"epg {name}: no module {COMMANDS}.{name}"
        tree = ast.parse((PACKAGE / "commands" / f"{name}.py").read_text(encoding="utf-8"))
        assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), name


def test_only_the_datamodule_imports_lightning_under_epg_data():
    bad = [
        f"{imp.where()}: {name} imports {imp.target}"
        for name, found in GRAPH.items()
        if name.startswith("epg.data") and name != "epg.data.datamodule"
        for imp in found
        if not imp.type_checking and (imp.target in LIGHTNING or imp.target.startswith(("epg.lightning", "epg.eval")))
    ]
    assert not bad, "\n".join(bad)


def test_checkpoint_and_lower_floors_load_without_lightning():
    """In a fresh interpreter, importing these (and using load_denoiser's module) loads no Lightning module; nor do
    the sample-folder library that `epg sample` runs and the post-hoc EMA reconstruction of `epg ema`."""
    code = (
        "import sys\n"
        "import epg.checkpoint, epg.sampling, epg.sampling.run, epg.nn, epg.method, epg.io, epg.posthoc\n"
        "assert callable(epg.checkpoint.load_denoiser) and callable(epg.checkpoint.read_checkpoint)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r} or m.startswith(('epg.lightning', "
        "'epg.eval')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_read_checkpoint_recovers_a_swap_without_lightning(tmp_path):
    """read_checkpoint's swap recovery (epg.io) runs in a process that never imports Lightning."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from epg.checkpoint import read_checkpoint\n"
        "from epg.io import swap_names\n"
        f"path = Path({str(tmp_path / 'last.ckpt')!r})\n"
        "torch.save({'global_step': 3}, swap_names(path)[1])\n"
        "assert read_checkpoint(path)['global_step'] == 3 and path.is_file()\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


if __name__ == "__main__":
    print(format_package_graph(package_graph(GRAPH)))
    report = cycle_report(EDGES)
    print("\n" + (report or "no import cycles between modules (imports that run: module level and deferred)"))
    typed_edges = epg_edges(GRAPH, type_checking=True)
    for component in [c for c in cycles(typed_edges) if c not in cycles(EDGES)]:
        print(f"closed only by `if TYPE_CHECKING:` imports (never run): {' <-> '.join(component)}")
        print(describe_cycle(component, typed_edges))
