"""nnlab's import graph: no cycles, arrows only point down the layers of ARCHITECTURE.md, imports at the top.

Every module of ``nnlab`` is parsed with ``ast``; imports at the top of a
module and inside functions count alike (relative imports resolved).  An
import that points up is allowed only inside a deprecated alias: a function
that calls :func:`nnlab.base.warn_moved`.  An import inside a function
must say why it is there, in a comment containing :data:`LAZY_MARKER`.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nnlab"

#: The layers, lowest first: a module may import its own layer and the layers below it.
#: A module's layer is that of its longest listed prefix ("nna.costs" would come before "nna").
LAYERS = [
    {"base", "_files", "_args", "_catalogue", "_deprecated", "config", "claims", "sweep"},
    {"data", "models", "graph", "distributed"},
    {"train"},
    {"prune", "regularise", "regularize"},
    {"distill"},
    {"quant"},
    {"nna"},
    {"picker", "cache", "_preflight", "export", "checks"},
    {"recipes"},
    {"pipeline"},
    {"cli", "widgets", "plots", "__init__"},
]
#: The techniques: they must never import the cache, the recipes or anything above them.
TECHNIQUES = ("prune", "regularise", "regularize", "distill", "quant", "nna")

#: Arrows allowed to point the wrong way, each with why (none today); the test fails when one disappears, so the
#: list only shrinks.  (importer, imported)
KNOWN_EXCEPTIONS: set = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _alias_functions(tree) -> set:
    """ids of the import nodes inside functions that call ``warn_moved`` (deprecated aliases)."""
    inside = set()
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "warn_moved"
                        for n in ast.walk(f))
            if calls:
                inside.update(id(n) for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def import_graph(sources: dict) -> dict:
    """``{module: {imported module: "alias" or "import"}}`` from ``{module: (source text, is_package)}``.

    ``from .x import y`` counts as an import of ``x.y`` when that is a module, else of ``x``.
    """
    graph = {}
    for name, (text, is_package) in sources.items():
        tree = ast.parse(text)
        aliases = _alias_functions(tree)
        package = name if is_package else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in sources]
                if len(found) < len(node.names):
                    found.append(target)
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            for t in found:
                if t in sources and t != name and not name.startswith(t + "."):  # a package's own parent: not an arrow
                    kind = "alias" if id(node) in aliases else "import"
                    if edges.get(t) != "import":
                        edges[t] = kind
    return graph


def nnlab_graph() -> dict:
    sources = {module_name(p, ROOT): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in ROOT.rglob("*.py")}
    return import_graph(sources)


def short(module: str) -> str:
    return module.partition(".")[2] or "__init__"


def layer(module: str) -> int:
    name = short(module)
    best, where = -1, None
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and len(m) > best:
                best, where = len(m), i
    if where is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_architecture.py: add it to LAYERS "
                             f"and to ARCHITECTURE.md")
    return where


def group(module: str) -> str:
    """The layer entry a module belongs to (``nnlab.nna.engine`` -> ``nna``)."""
    name = short(module)
    return max((m for members in LAYERS for m in members if name == m or name.startswith(m + ".")), key=len)


def upward_arrows(graph: dict) -> list:
    """``(importer, imported)`` for each import (outside deprecated aliases) that points to a higher layer,
    or from a technique to the cache or the recipes."""
    bad = []
    for src, targets in graph.items():
        for dst, kind in targets.items():
            if kind == "alias":
                continue
            forbidden = layer(dst) > layer(src)
            if group(src).partition(".")[0] in TECHNIQUES and group(dst) in ("cache", "recipes", "_preflight"):
                forbidden = True
            if forbidden and (group(src), group(dst)) not in KNOWN_EXCEPTIONS:
                bad.append((src, dst))
    return sorted(bad)


def cycles(graph: dict) -> list:
    """One cycle per strongly connected group of layer entries (imports outside deprecated aliases)."""
    edges = {}
    for src, targets in graph.items():
        for dst, kind in targets.items():
            a, b = group(src), group(dst)
            if kind == "import" and a != b and (a, b) not in KNOWN_EXCEPTIONS:
                edges.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


#: The word a comment must contain on an import made inside a function, or just above it, saying why it is not at
#: the top of the module (start-up time, an optional extra, a deprecated alias).
LAZY_MARKER = "lazy"


def unexplained_imports(text: str) -> list:
    """``(line, function)`` of each import inside a function with no comment containing :data:`LAZY_MARKER`.

    The comment may sit on the import's own lines, or above it in the run of imports, comments and blank lines
    that leads to it within the same function (one comment can explain a block of lazy imports).
    """
    tree = ast.parse(text)
    lines = text.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                if tok.type == tokenize.COMMENT}
    inside = {}  # import node -> the innermost function holding it (ast.walk visits outer functions first)
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update({n: f for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))})
    import_lines = {line for n in inside for line in range(n.lineno, n.end_lineno + 1)}
    bad = []
    for node, function in inside.items():
        explained = any(LAZY_MARKER in comments.get(line, "") for line in range(node.lineno, node.end_lineno + 1))
        line = node.lineno - 1
        while not explained and line > function.lineno:
            above = lines[line - 1].strip()
            if above and not above.startswith("#") and line not in import_lines:
                break
            explained = LAZY_MARKER in comments.get(line, "")
            line -= 1
        if not explained:
            bad.append((node.lineno, function.name))
    return sorted(bad)


def test_every_import_inside_a_function_says_why():
    bad = [f"{p.relative_to(ROOT.parent)}:{line} (in {name})" for p in sorted(ROOT.rglob("*.py"))
           for line, name in unexplained_imports(p.read_text(encoding="utf-8"))]
    assert not bad, (f"imports inside functions with no '# {LAZY_MARKER}: why' comment (move them to the top of the "
                     f"module, or say why they must wait: start-up time, an optional extra, a deprecated alias): "
                     + ", ".join(bad))


def test_the_checker_catches_an_unexplained_import():
    source = ("import os\n\n"
              "def plain():\n    import json\n    return json\n\n"
              "def commented():\n    # lazy: json is slow (for the test)\n    import json\n\n    import csv\n"
              "    return json, csv\n\n"
              "def same_line():\n    import json  # lazy: optional\n    return json\n\n"
              "def after_code():\n    # lazy: explains nothing below the code\n    x = 1\n    import json\n"
              "    return x, json\n\n"
              "def other_word():\n    # needed here\n    import json\n    return json\n\n"
              "def outer():\n    # lazy: outer's comment does not explain inner's import\n    def inner():\n"
              "        import json\n        return json\n    return inner\n")
    assert unexplained_imports(source) == [(4, "plain"), (21, "after_code"), (26, "other_word"), (32, "inner")]
    assert unexplained_imports("import json\n") == []


def test_every_module_has_a_layer():
    for module in nnlab_graph():
        layer(module)


def test_no_import_cycle():
    found = cycles(nnlab_graph())
    assert not found, "import cycles among nnlab's modules: " + "; ".join(" -> ".join(c) for c in found)


def test_arrows_point_down():
    bad = upward_arrows(nnlab_graph())
    assert not bad, ("imports that point up the layers of ARCHITECTURE.md (move the code, or import it the other "
                     "way): " + ", ".join(f"{a} -> {b}" for a, b in bad))


def test_known_exceptions_still_exist():
    graph = nnlab_graph()
    present = {(group(a), group(b)) for a, t in graph.items() for b, kind in t.items() if kind == "import"}
    gone = KNOWN_EXCEPTIONS - present
    assert not gone, f"these exceptions are fixed: remove them from KNOWN_EXCEPTIONS and ARCHITECTURE.md: {gone}"


def test_deprecated_aliases_point_to_where_the_names_went():
    graph = nnlab_graph()
    aliases = {(short(a), short(b)) for a, t in graph.items() for b, kind in t.items() if kind == "alias"}
    assert ("distill", "recipes") in aliases and ("quant.retraining", "recipes") in aliases


def _synthetic(**modules) -> dict:
    return import_graph({f"nnlab.{k}": (v, False) for k, v in modules.items()})


def test_the_checker_catches_an_upward_arrow():
    graph = _synthetic(prune="from .train import fit\ndef f():\n    from .cache import pretrained\n",
                       train="import torch\n", cache="from .train import fit\n")
    assert upward_arrows(graph) == [("nnlab.prune", "nnlab.cache")]
    assert _synthetic(train="from . import pipeline\n", pipeline="")["nnlab.train"] == {"nnlab.pipeline": "import"}
    assert upward_arrows(_synthetic(train="from . import pipeline\n", pipeline="")) == [("nnlab.train",
                                                                                         "nnlab.pipeline")]


def test_the_checker_lets_a_deprecated_alias_point_up_and_nothing_else():
    alias = ("from .base import warn_moved\n"
             "def old(*a):\n    from .recipes import new  # deprecated alias\n"
             "    warn_moved('nnlab.distill.old', 'nnlab.recipes.new')\n    return new(*a)\n")
    plain = "def old(*a):\n    from .recipes import new\n    return new(*a)\n"
    assert upward_arrows(_synthetic(distill=alias, recipes="", base="")) == []
    assert upward_arrows(_synthetic(distill=plain, recipes="", base="")) == [("nnlab.distill", "nnlab.recipes")]


def test_the_checker_finds_a_cycle():
    graph = _synthetic(train="def f():\n    from .data import x\n", data="from . import train\n")
    assert cycles(graph) == [["data", "train", "data"]] or cycles(graph) == [["train", "data", "train"]]
    assert cycles(_synthetic(train="from .data import x\n", data="")) == []


@pytest.mark.parametrize("old, new", [("distill", "pretrained_sparse"), ("quant", "pretrained_quantised")])
def test_old_names_warn_and_call_the_recipe(monkeypatch, old, new):
    import importlib

    from nnlab import base, recipes

    called = []
    monkeypatch.setattr(recipes, new, lambda *a, **k: called.append((a, k)) or "model")
    monkeypatch.setattr(base, "_WARNED", set())
    module = importlib.import_module(f"nnlab.{old}")
    with pytest.warns(DeprecationWarning, match=f"moved to nnlab.recipes.{new}"):
        assert getattr(module, new)("lenet5", sparsity=0.5) == "model"
    assert called == [(("lenet5",), {"sparsity": 0.5})]
