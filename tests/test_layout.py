"""The module layers of docs/layout.md hold: every import, at any depth of the code, goes to
a module of a lower layer (so there is no import cycle and no import of a script), and
every module is in the table."""
import ast
import glob
import os
import re

from helpers import ROOT

LAYOUT = os.path.join(ROOT, "docs", "layout.md")


def documented_layers() -> dict[str, int]:
    with open(LAYOUT, encoding="utf-8") as f:
        text = f.read().split("## Layers", 1)[1]
    layers = {}
    for number, names in re.findall(r"^\| (\d+) \| ([^|]+) \|$", text, re.M):
        for name in names.split(","):
            layers[name.strip()] = int(number)
    return layers


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (top level or inside functions)."""
    modules = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for name in modules:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & modules - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [node, dep] if dep in path else [node, dep]
            if dep not in state:
                cycle = visit(dep, path + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_every_module_is_in_the_documented_layers():
    layers, graph = documented_layers(), project_imports()
    assert set(graph) - set(layers) == set(), "add these modules to the table in docs/layout.md"
    assert set(layers) - set(graph) == set(), "docs/layout.md lists modules that do not exist"


def test_imports_only_go_down_the_layers():
    layers, graph = documented_layers(), project_imports()
    upward = sorted(f"{m} (layer {layers[m]}) imports {d} (layer {layers[d]})"
                    for m, deps in graph.items() for d in deps
                    if m in layers and d in layers and layers[d] >= layers[m])
    assert upward == [], "imports against docs/layout.md's layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    assert find_cycle(project_imports()) is None


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) is not None
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert documented_layers()["errors"] < documented_layers()["train_search"]


def test_test_modules_import_only_from_helpers():
    """What tests share lives in tests/helpers.py (fixtures in conftest.py): no test
    module imports another test module or conftest."""
    tests = os.path.join(ROOT, "tests")
    local = {os.path.splitext(n)[0] for n in os.listdir(tests) if n.endswith(".py")} - {"helpers"}
    wrong = []
    for name in sorted(local - {"conftest"}):
        with open(os.path.join(tests, f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            wrong += [f"{name} imports {n}" for n in names if n.split(".")[0] in local]
    assert wrong == []
