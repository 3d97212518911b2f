"""The package's layering (docs/ARCHITECTURE.md), checked on the source with ``ast``: nothing is imported.

Every module of ``volfm`` lives in one room, one per stage of the data flow, and the rooms have a rank. A module may
import (at module level or inside a function) only from its own room or from rooms of a lower rank. Also refused:
importing an underscore name from another volfm module, and import cycles among volfm modules at module level
(imports inside functions run later and cannot make a cycle at import time; a package ``__init__`` importing its
own submodules is no cycle unless a submodule imports the package back).

:func:`check_package` takes the package's folder, so the tests below prove on a small fake tree that each rule
catches what it should before the real tree is checked.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "volfm"

# Room -> rank, in the order of the data flow. Root modules (``volfm/__init__.py``, ``utils.py``, ``testing.py``)
# form the room "" of rank 0. Keep in step with the table in docs/ARCHITECTURE.md (a test below checks it).
ROOT_MODULES = ("utils", "testing")
ROOMS: dict[str, int] = {
    "": 0,
    "configs": 1,
    "kernels": 1,
    "io": 2,
    "preprocess": 3,
    "store": 4,
    "synth": 5,
    "targets": 6,
    "data": 7,
    "inference": 8,
    "metrics": 9,
    "models": 10,
    "losses": 11,
    "tasks": 12,
    "evaluate": 13,
    "bench": 14,
    "cli": 15,
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from ``module`` (``file:line``)."""

    module: str  # the importing module, e.g. volfm.data.samplers
    target: str  # the imported volfm module, e.g. volfm.store.layout
    names: tuple[str, ...]  # names taken with ``from target import ...`` (empty for ``import target``)
    file: str
    line: int
    top_level: bool  # runs when the module is imported (not inside a function, not under TYPE_CHECKING)


@dataclass
class Report:
    """What :func:`check_package` found; every entry is one line naming ``file:line``."""

    upward: list[str] = field(default_factory=list)
    private: list[str] = field(default_factory=list)
    cycles: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return self.unplaced + self.upward + self.private + self.cycles


def room_of(module: str) -> str | None:
    """``volfm.store.layout`` -> ``"store"``; root modules -> ``""``; a module in no room -> None."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ROOT_MODULES:
        return ""
    return parts[1] if parts[1] in ROOMS else None


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, top_level: bool):
    """Yield (import node, top_level) for every import under ``node``; function bodies are not top level."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, top_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), top_level)
        else:
            yield from _walk(child, top_level)


def collect_imports(package_dir: Path) -> tuple[list[Import], set[str]]:
    """Every import of a module of the package under ``package_dir``, and the package's module names."""
    package_dir = Path(package_dir)
    package = package_dir.name
    files = sorted(package_dir.rglob("*.py"))
    modules = {_module_name(f, package_dir) for f in files}
    imports: list[Import] = []
    for f in files:
        module = _module_name(f, package_dir)
        is_pkg = f.name == "__init__.py"
        rel = f.relative_to(package_dir.parent).as_posix()
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node, top in _walk(tree, True):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        imports.append(Import(module, alias.name, (), rel, node.lineno, top))
                continue
            if node.level:  # relative: resolve against the importing module's package
                base_parts = module.split(".") if is_pkg else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == package or base.startswith(package + ".")):
                continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # ``from pkg import submodule``: an import of the submodule
                    imports.append(Import(module, sub, (), rel, node.lineno, top))
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                imports.append(Import(module, base, tuple(plain), rel, node.lineno, top))
    return imports, modules


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph found by depth-first search: one per back edge, each as a list of nodes."""
    seen: set[tuple[str, ...]] = set()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges.get(start, ())))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop(0)
            if state.get(nxt) == 1:  # back edge: the stack from nxt to node is a cycle
                cyc = path[path.index(nxt):]
                k = cyc.index(min(cyc))
                key = tuple(cyc[k:] + cyc[:k])
                if key not in seen:
                    seen.add(key)
                    cycles.append(list(key))
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(edges.get(nxt, ()))))
    return cycles


def check_package(package_dir: Path) -> Report:
    """Check the layering rules on the package folder ``package_dir`` (e.g. ``REPO / "volfm"``)."""
    imports, modules = collect_imports(package_dir)
    report = Report()
    for m in sorted(modules):
        if room_of(m) is None:
            report.unplaced.append(f"{m}: in no room (add its room to ROOMS here and to docs/ARCHITECTURE.md)")
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for imp in imports:
        src, dst = room_of(imp.module), room_of(imp.target)
        loc = f"{imp.file}:{imp.line}"
        if src is not None and dst is not None and src != dst:
            if ROOMS[dst] > ROOMS[src]:
                report.upward.append(f"{loc}: {imp.module} ({src or 'root'}, rank {ROOMS[src]}) imports "
                                     f"{imp.target} ({dst or 'root'}, rank {ROOMS[dst]}): upward")
            elif ROOMS[dst] == ROOMS[src]:
                report.upward.append(f"{loc}: {imp.module} ({src}) imports {imp.target} ({dst}): "
                                     f"rooms of the same rank {ROOMS[src]} must not import each other")
        private = [n for n in imp.names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
        if private and imp.target != imp.module:
            report.private.append(f"{loc}: {imp.module} imports private {', '.join(private)} from {imp.target}")
        parent, _, last = imp.target.rpartition(".")
        if last.startswith("_") and not last.startswith("__") and parent not in (imp.module, imp.module.rpartition(".")[0]):
            report.private.append(f"{loc}: {imp.module} imports private module {imp.target} from outside its package")
        if imp.top_level and imp.target != imp.module:
            edges.setdefault(imp.module, set()).add(imp.target)
            where.setdefault((imp.module, imp.target), loc)
    for cyc in _cycles(edges):
        steps = " -> ".join(f"{a} ({where[(a, b)]})" for a, b in zip(cyc, cyc[1:] + cyc[:1]))
        report.cycles.append(f"import cycle at module level: {steps} -> {cyc[0]}")
    return report


# --- the checker catches what it should, on a fake package tree ---------------------------------------------


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "volfm"


@pytest.fixture()
def clean_tree(tmp_path: Path) -> dict[str, str]:
    return {
        "volfm/__init__.py": "class VolfmError(ValueError):\n    pass\n",
        "volfm/utils.py": "from volfm import VolfmError\n",
        "volfm/io/__init__.py": "from volfm.io.readers import read_volume\n",
        "volfm/io/readers.py": "import volfm.utils\n\ndef read_volume():\n    pass\n",
        "volfm/metrics/__init__.py": "",
        "volfm/metrics/classification.py": "from volfm import VolfmError, utils\nfrom volfm.io import read_volume\n",
        "volfm/tasks/__init__.py": "from volfm.tasks import base\n",
        "volfm/tasks/base.py": "from volfm.metrics.classification import VolfmError\n",
    }


def test_checker_passes_a_clean_tree(tmp_path, clean_tree):
    assert check_package(_write_tree(tmp_path, clean_tree)).problems() == []


@pytest.mark.parametrize("line", [
    "from volfm.tasks.base import VolfmError",  # from-import of a module of a later room
    "import volfm.tasks.base",
    "from volfm import tasks",  # from the root package: a subpackage of a later room
    "from volfm.tasks import base",  # a submodule of a later room
])
def test_checker_fails_on_an_upward_import(tmp_path, clean_tree, line):
    clean_tree["volfm/metrics/classification.py"] += line + "\n"
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert len(report.upward) == 1, report.problems()
    assert report.upward[0].startswith("volfm/metrics/classification.py:3: volfm.metrics.classification (metrics")
    assert "upward" in report.upward[0]


def test_checker_fails_on_an_upward_import_inside_a_function(tmp_path, clean_tree):
    clean_tree["volfm/io/readers.py"] += "\ndef f():\n    from volfm.metrics import classification\n"
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert [p.split(": ")[0] for p in report.upward] == ["volfm/io/readers.py:7"]
    assert report.cycles == []  # function-local: not part of the module-level graph


def test_checker_fails_between_rooms_of_the_same_rank(tmp_path, clean_tree):
    clean_tree["volfm/configs/__init__.py"] = "from volfm.kernels import patch_embed\n"
    clean_tree["volfm/kernels/__init__.py"] = ""
    clean_tree["volfm/kernels/patch_embed.py"] = ""
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert len(report.upward) == 1 and "same rank 1" in report.upward[0], report.problems()


def test_checker_fails_on_a_module_in_no_room(tmp_path, clean_tree):
    clean_tree["volfm/misc/__init__.py"] = ""
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert report.unplaced == ["volfm.misc: in no room (add its room to ROOMS here and to docs/ARCHITECTURE.md)"]


@pytest.mark.parametrize("line", [
    "from volfm.io.readers import _private",
    "from volfm.io.readers import read_volume, _private",
    "def g():\n    from volfm.utils import _helper",
])
def test_checker_fails_on_a_private_name(tmp_path, clean_tree, line):
    clean_tree["volfm/tasks/base.py"] += line + "\n"
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert len(report.private) == 1 and report.private[0].startswith("volfm/tasks/base.py:"), report.problems()
    assert "_private" in report.private[0] or "_helper" in report.private[0]


def test_checker_allows_dunder_and_own_private_names(tmp_path, clean_tree):
    clean_tree["volfm/tasks/base.py"] += "from volfm import __version__\nfrom volfm.tasks.base import _own\n"
    assert check_package(_write_tree(tmp_path, clean_tree)).problems() == []


def test_checker_fails_on_a_module_level_cycle(tmp_path, clean_tree):
    clean_tree["volfm/io/readers.py"] += "from volfm.io import affine\n"
    clean_tree["volfm/io/affine.py"] = "import volfm\nfrom volfm.io.readers import read_volume\n"
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert len(report.cycles) == 1, report.problems()
    assert report.cycles[0] == ("import cycle at module level: volfm.io.affine (volfm/io/affine.py:2) -> "
                                "volfm.io.readers (volfm/io/readers.py:5) -> volfm.io.affine")
    assert report.upward == [] and report.private == []


def test_checker_fails_on_a_submodule_importing_its_package_back(tmp_path, clean_tree):
    clean_tree["volfm/tasks/base.py"] += "from volfm.tasks import VolfmError\n"
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert len(report.cycles) == 1 and "volfm.tasks.base" in report.cycles[0], report.problems()


def test_checker_ignores_function_local_and_type_checking_cycles(tmp_path, clean_tree):
    clean_tree["volfm/io/affine.py"] = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from volfm.io.readers import read_volume\n")
    clean_tree["volfm/io/readers.py"] += "import volfm.io.affine\n"
    clean_tree["volfm/io/__init__.py"] += "\ndef f():\n    import volfm.io.readers\n"
    assert check_package(_write_tree(tmp_path, clean_tree)).problems() == []


def test_checker_resolves_relative_imports(tmp_path, clean_tree):
    clean_tree["volfm/metrics/classification.py"] += "from ..tasks import base\nfrom . import _x\n"
    clean_tree["volfm/metrics/_x.py"] = ""
    report = check_package(_write_tree(tmp_path, clean_tree))
    assert len(report.upward) == 1 and "imports volfm.tasks.base" in report.upward[0], report.problems()
    assert report.private == []  # a private module of its own package


# --- the real tree --------------------------------------------------------------------------------------------


def test_every_room_is_in_the_architecture_doc():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [room for room in ROOMS if room and f"`volfm.{room}`" not in doc]
    assert missing == [], f"rooms missing from docs/ARCHITECTURE.md: {missing}"


def test_volfm_layering():
    report = check_package(REPO / PACKAGE)
    problems = report.problems()
    assert problems == [], f"{len(problems)} layering problem(s) (docs/ARCHITECTURE.md):\n" + "\n".join(problems)
