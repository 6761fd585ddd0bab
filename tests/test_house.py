"""The package's structure, read from its code: no name at the top of dpo_accel/ shadows a module of the standard
library or of an installed distribution (``accelerate launch dpo_accel/train.py`` puts that folder first on
sys.path), no import cycle between its modules (imports inside functions counted), no private name taken across
modules, one module holding backward and the optimizer and scheduler steps, no function over 80 lines."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "dpo_accel")


def modules() -> dict:
    """dotted name -> path of every module of the package (a sub-package by its __init__)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, node, mods: dict) -> list:
    """The package's modules an import statement of module `name` refers to."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = name.split(".") if mods[name].endswith("__init__.py") else name.split(".")[:-1]
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    found = []
    for target in targets:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name and not (mods[name].endswith("__init__.py") and target.startswith(name + ".")):
            found.append(target)
    return found


def import_graph() -> dict:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        graph[name] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in imported(name, node, mods)}
    return graph


def cycle(graph: dict) -> list:
    """One import cycle (its modules), or [] when the graph has none."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                return stack[stack.index(w):]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = "done"
        stack.pop()
        return []

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return []


def test_no_top_level_name_shadows_a_standard_or_installed_module():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(PACKAGE) if not n.startswith(("_", "."))}
    assert names & {"inspect", "io", "types", "logging"} == set()
    assert sorted(names & installed) == []


def test_the_package_has_sub_packages_and_no_import_cycle():
    graph = import_graph()
    subpackages = [n for n, p in modules().items() if p.endswith("__init__.py") and n != "dpo_accel"]
    assert len(subpackages) >= 4, subpackages
    assert cycle(graph) == []
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b"]  # the check finds a cycle where there is one


def test_the_configuration_imports_no_loop_and_no_private_name_crosses_modules():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("dpo_accel.config"):
            assert not [t for t in targets if t.startswith(("dpo_accel.loops", "dpo_accel.train"))], name
    taken = []
    for name, path in modules().items():
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dpo_accel")):
                    taken += [f"{name} takes {a.name}" for a in node.names if re.match(r"_[^_]", a.name)]
    assert taken == []


def test_one_module_steps_the_optimizer_and_no_function_is_over_80_lines():
    sites, longest = [], (0, "")
    for name, path in modules().items():
        with open(path) as f:
            source = f.read()
        if re.search(r"optimizer\.step\(\)|scheduler\.step\(\)|accelerator\.backward\(", source):
            sites.append(name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    assert sites == ["dpo_accel.loops.engine"]
    assert longest[0] <= 80, longest
