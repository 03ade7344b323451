"""The package's import graph, read with `ast`: no cycle, and no import from a lower layer to a
higher one. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "research"

# Bottom to top; a module may import its own layer and the layers below it. The pure Hugging
# Face mapping sits below train/ (a run may start from HF weights), its commands above it; so do
# the downstream evaluator (the loop calls it) and its commands and harness adapter (which
# decodes with research.generate).
LAYERS = (
    ("research.flags", "research.format", "research.config"),
    ("research.models", "research.parallel"),
    ("research.data", "research.interop.hf"),
    ("research.train", "research.evaluation.tasks", "research.evaluation.scoring",
     "research.evaluation.evaluator"),
    ("research.generate", "research.interop.cli", "research.evaluation.cli",
     "research.evaluation.harness"),
    ("research.sweep",),
    ("research.analysis",),
    ("research.cli", "research.launch", "research.__main__"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports (anywhere in the file)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import module` depends on the module; `from module import name` on it
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "research":
                found.add(target)
    return found


def _layer(name: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()
            if name != "research"}


def test_no_import_climbs_a_layer():
    climbs = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in sorted(targets)
              if _layer(b) > _layer(a)]
    assert not climbs, "\n".join(climbs)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target])
                              if target in path else f"{node} -> {target}")
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_run_directory_file_names_are_spelled_in_one_module():
    names = re.compile(r"""["'](config\.yaml|summary\.json|metrics\.jsonl|trial\.json|"""
                       r"""trial\.log|checkpoints)["']""")
    spelled = sorted(str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
                     if names.search(path.read_text()))
    assert spelled == ["research/train/rundir.py"]


def test_the_checks_see_a_climbing_import(tmp_path):
    """The layer check is not vacuous: a model importing the loop is caught."""
    fake = {"research.models.x": tmp_path / "x.py", "research.train.loop": tmp_path / "loop.py"}
    fake["research.models.x"].write_text("def f():\n    from research.train.loop import train\n")
    assert _imports("research.models.x", fake["research.models.x"], fake) == {"research.train.loop"}
    assert _layer("research.train.loop") > _layer("research.models.x")


def test_one_registry_of_mixers_and_feed_forwards():
    """The schema's names (config.MIXERS/FFNS, validated in model.layer_pattern) are exactly the
    decoder's constructors ("none" is no module), so a new sublayer is added in one place."""
    from research import config
    from research.models import decoder

    assert tuple(decoder.MIXERS) == config.MIXERS
    assert (*decoder.FFNS, "none") == config.FFNS
