"""The package is layered: a file of ``trb_nemo`` may import from its own layer or a lower one,
never from a higher one, and the import graph of its files has no cycle. Every import counts:
top-level, lazy (inside a function), under ``if TYPE_CHECKING:``, inside try/except, relative.

Layers, bottom to top (``LAYERS`` below; a package's ``__init__.py`` is in its package's layer,
and ``trb_nemo/__init__.py`` is in layer 0, since importing any module of the package runs it):

    0  ops/, logs.py, seeds.py   foundations: they import nothing from the layers above
    1  methods/
    2  config/
    3  data/, parallel/
    4  models/
    5  rollout/, scoring/, plan/
    6  eval/
    7  train/
    8  commands/
    9  cli.py

Why: an upward or circular import couples a low piece to everything above it, so it can no longer
be read, tested or reused alone, and a circle breaks at import time in whichever order the files
happen to load first. Every top-level module or package must have a layer here, so a new one is a
decision, not an accident. Pure ``ast``: nothing of ``trb_nemo`` is imported."""

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trb_nemo"

LAYERS = [
    ("ops", "logs", "seeds"),
    ("methods",),
    ("config",),
    ("data", "parallel"),
    ("models",),
    ("rollout", "scoring", "plan"),
    ("eval",),
    ("train",),
    ("commands",),
    ("cli",),
]
LAYER_OF = {name: n for n, names in enumerate(LAYERS) for name in names}
LAYER_OF["__init__"] = 0  # the package root: it runs before any module of the package


def source_files(root: Path) -> list[Path]:
    """Every ``.py`` file of the package at ``root``, sorted."""
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def module_of(root: Path, path: Path) -> list[str]:
    """Dotted name of ``path``, as parts: ``root/x/y.py`` -> [pkg, x, y], ``x/__init__.py`` ->
    [pkg, x]."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def file_of(root: Path, module: list[str]) -> Path | None:
    """The file of module ``module`` (parts, starting with the package's name), if there is one."""
    base = root.joinpath(*module[1:])
    candidates = [base / "__init__.py"]
    if module[1:]:
        candidates.insert(0, base.with_suffix(".py"))
    return next((c for c in candidates if c.is_file()), None)


def imports(root: Path, path: Path) -> list[tuple[int, list[str]]]:
    """(line, module parts) of every import of the package in ``path``, wherever it is written. A
    ``from m import n`` names ``m.n`` when ``n`` is a submodule of ``m``, else ``m``."""
    found = []
    here = module_of(root, path)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(package):
                    continue  # above the package: Python refuses it anyway
                base = package[: len(package) - node.level + 1]
            else:
                base = []
            module = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                sub = module + [alias.name]
                found.append((node.lineno, sub if file_of(root, sub) else module))
    return [(line, m) for line, m in found if m and m[0] == root.name]


def unit(module: list[str]) -> str:
    """The top-level module or package of ``module``, which gives its layer."""
    return module[1] if len(module) > 1 else "__init__"


def unlayered(root: Path) -> list[str]:
    """Top-level modules and packages of ``root`` with no layer in ``LAYERS``."""
    units = sorted({unit(module_of(root, p)) for p in source_files(root)})
    return [f"{root.name}/{u}: top-level module or package with no layer: give it a layer in "
            f"the LAYERS table of tests/unit/test_layers.py" for u in units if u not in LAYER_OF]


def layer_violations(root: Path) -> list[str]:
    """Unlayered top-level modules, imports of unlayered modules and upward imports, one line
    each, as ``path:line: ...``."""
    found = unlayered(root)
    for path in source_files(root):
        importer = unit(module_of(root, path))
        if importer not in LAYER_OF:
            continue  # reported by unlayered
        where = path.relative_to(root.parent).as_posix()
        for line, module in imports(root, path):
            name, imported = ".".join(module), unit(module)
            if imported not in LAYER_OF:
                found.append(f"{where}:{line}: imports {name}, which has no layer: give "
                             f"{root.name}/{imported} a layer in the LAYERS table")
            elif LAYER_OF[imported] > LAYER_OF[importer]:
                found.append(f"{where}:{line}: {importer} (layer {LAYER_OF[importer]}) imports "
                             f"{name} (layer {LAYER_OF[imported]}): upward")
    return found


def import_graph(root: Path) -> dict[Path, dict[Path, int]]:
    """For each file, the files it imports, each with the first line that imports it."""
    graph: dict[Path, dict[Path, int]] = {}
    for path in source_files(root):
        edges = graph.setdefault(path, {})
        for line, module in imports(root, path):
            target = file_of(root, module)
            if target is not None and target != path:
                edges[target] = min(line, edges.get(target, line))
    return graph


def strongly_connected(graph: dict[Path, dict[Path, int]]) -> list[list[Path]]:
    """Groups of files that reach one another (Tarjan), only those with more than one file."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    groups = []

    def visit(v: Path) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def shortest_cycle(graph: dict[Path, dict[Path, int]], group: list[Path]) -> list[Path]:
    """A shortest circle through the first file of ``group``, staying inside ``group``."""
    start, inside = group[0], set(group)
    came_from: dict[Path, Path] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                if w in inside and w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected group has a circle through each of its files")


def import_cycles(root: Path) -> list[str]:
    """One line per circle of imports: each file with the line that imports the next one."""
    graph = import_graph(root)
    found = []
    for group in strongly_connected(graph):
        cycle = shortest_cycle(graph, group)
        rel = {p: p.relative_to(root.parent).as_posix() for p in group}
        steps = [f"{rel[a]}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
        text = "import cycle: " + " -> ".join(steps + [rel[cycle[0]]])
        rest = [rel[p] for p in group if p not in cycle]
        if rest:
            text += f" (the circle also takes in {', '.join(rest)})"
        found.append(text)
    return found


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake package ``trb_nemo`` in ``tmp_path`` holding ``files`` (path -> source)."""
    root = tmp_path / "trb_nemo"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_the_package_is_layered():
    found = layer_violations(PACKAGE)
    assert not found, ("a file imports from a higher layer (see the docstring of "
                       "tests/unit/test_layers.py): move the code it needs down to its layer or "
                       "below, or move the importing code up; do not hide the import in a function "
                       "or under TYPE_CHECKING:\n" + "\n".join(found))


def test_the_package_has_no_import_cycle():
    found = import_cycles(PACKAGE)
    assert not found, ("files import one another in a circle (lazy imports count): move what they "
                       "share into one file that both import, or merge them:\n" + "\n".join(found))


def test_a_lazy_upward_import_is_caught(tmp_path):
    root = plant(tmp_path, {
        "ops/a.py": '"""A."""\n\ndef f():\n    import trb_nemo.train.b\n    return trb_nemo\n',
        "train/b.py": "from trb_nemo.ops import a\n",
    })
    assert layer_violations(root) == [
        "trb_nemo/ops/a.py:4: ops (layer 0) imports trb_nemo.train.b (layer 7): upward"]
    assert import_cycles(root) == [
        "import cycle: trb_nemo/ops/a.py:4 -> trb_nemo/train/b.py:1 -> trb_nemo/ops/a.py"]


def test_an_upward_import_under_type_checking_is_caught(tmp_path):
    root = plant(tmp_path, {
        "config/c.py": """\
            from typing import TYPE_CHECKING
            try:
                from trb_nemo.methods import table
            except ImportError:
                table = None
            if TYPE_CHECKING:
                from trb_nemo.models.gpt import GPT
            """,
        "methods/table.py": "from trb_nemo import logs\n",
        "logs.py": "",
        "models/gpt.py": "import trb_nemo.config.c as c\n",
    })
    assert layer_violations(root) == [
        "trb_nemo/config/c.py:7: config (layer 2) imports trb_nemo.models.gpt (layer 4): upward"]


def test_a_circle_inside_one_layer_is_caught(tmp_path):
    root = plant(tmp_path, {
        "rollout/x.py": "from trb_nemo.rollout.y import Y\n",
        "rollout/y.py": "\n\ndef make():\n    from trb_nemo.rollout import x\n    return x\n",
        "scoring/z.py": "from trb_nemo.rollout import x\n",
    })
    assert layer_violations(root) == []
    assert import_cycles(root) == [
        "import cycle: trb_nemo/rollout/x.py:1 -> trb_nemo/rollout/y.py:4 -> trb_nemo/rollout/x.py"]


def test_a_relative_upward_import_is_caught(tmp_path):
    root = plant(tmp_path, {
        "ops/__init__.py": "from . import a\nfrom .a import helper\n",
        "ops/a.py": "from ..train import b\nfrom .. import logs\n\n\ndef helper():\n    pass\n",
        "logs.py": "",
        "train/__init__.py": "",
        "train/b.py": "",
    })
    assert layer_violations(root) == [
        "trb_nemo/ops/a.py:1: ops (layer 0) imports trb_nemo.train.b (layer 7): upward"]
    assert import_cycles(root) == []


def test_a_name_imported_from_a_package_is_its_init(tmp_path):
    root = plant(tmp_path, {
        "train/__init__.py": "from trb_nemo.train.step import run\n",
        "train/step.py": "from trb_nemo.train import helpers, NAME\n",
        "train/helpers.py": "",
    })
    assert [m for _, m in imports(root, root / "train/step.py")] == [
        ["trb_nemo", "train", "helpers"], ["trb_nemo", "train"]]
    assert import_cycles(root) == [
        "import cycle: trb_nemo/train/__init__.py:1 -> trb_nemo/train/step.py:1 -> "
        "trb_nemo/train/__init__.py"]


def test_an_unknown_top_level_package_is_caught(tmp_path):
    root = plant(tmp_path, {
        "newthing/__init__.py": "from trb_nemo.ops import a\n",
        "ops/a.py": "",
        "cli.py": "import trb_nemo.newthing\n",
    })
    found = layer_violations(root)
    assert len(found) == 2, found
    assert found[0].startswith("trb_nemo/newthing: ") and "give it a layer" in found[0]
    assert found[1].startswith("trb_nemo/cli.py:1: imports trb_nemo.newthing, which has no layer")
