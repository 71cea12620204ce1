"""The import direction of the library, read from the source (every import, those inside functions too):
no module imports one that imports it back, and the training loop imports nothing from the wiring
(:mod:`mimsparse.train.build` builds a run and hands it to :mod:`mimsparse.train.engine`, as MAE's
main_pretrain.py and engine_pretrain.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import mimsparse

ROOT = Path(mimsparse.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the mimsparse modules it imports anywhere in its source (``from pkg import mod`` names
    the module ``pkg.mod`` when there is one, else ``pkg``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_graph_sees_imports_inside_functions():
    graph = import_graph()
    # build.start_from_dense imports convert.dense_init inside the function
    assert "mimsparse.convert.dense_init" in graph["mimsparse.train.build"]
    assert "mimsparse.train.engine" in graph["mimsparse.train.build"]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    both_ways = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph[b]})
    assert both_ways == []
    # nor through other modules
    assert sorted(m for m in graph if m in _reachable(graph, m)) == []


def test_graph_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [m for m in graph if m in _reachable(graph, m)] == ["a", "b", "c"]


def test_the_loop_imports_nothing_from_the_wiring():
    graph = import_graph()
    for loop_module in ("mimsparse.train.engine", "mimsparse.train.run_state", "mimsparse.train.run_checkpoints"):
        assert "mimsparse.train.build" not in _reachable(graph, loop_module), loop_module
