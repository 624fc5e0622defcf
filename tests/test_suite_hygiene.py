"""The test suite holds itself to the rule it is easy to forget: a loop that asserts is seen to run.

A ``for`` loop whose body asserts checks nothing when its iterable is empty, and passes. So each
such loop in tests/ either walks what cannot be empty (a non-empty literal, ``range`` of a
positive constant, a name bound to one of those, or enumerate/zip/sorted/``.items()`` of one), or
an ``assert`` before it in the same function pins the collection down (``assert rows``,
``assert len(rows) == 4``, ``assert sorted(rows) == [...]``), or the ``for`` line says
``# may not run: <why>`` where nothing to check is a pass. Checked on the source (``ast``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
WRAPPERS = {"enumerate", "sorted", "reversed", "list", "tuple", "set", "iter"}
VIEWS = {"items", "keys", "values"}
MEASURES = {"len", "any"}
EXEMPT = "# may not run:"  # on the `for` line, then why: an empty collection is a pass
Scope = ast.FunctionDef | ast.AsyncFunctionDef | ast.Module
NESTED = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """``ast.walk`` that does not enter nested functions, lambdas or classes."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(
            child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
        ):
            yield from _walk(child)


def _literals(scope: ast.AST) -> dict[str, ast.expr]:
    """Names bound exactly once in ``scope`` (not in nested functions), to what they are bound."""
    bound: dict[str, list[ast.expr]] = {}
    for node in _walk(scope):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign | ast.AugAssign | ast.For):
            targets = [node.target]
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    value = node.value if isinstance(node, ast.Assign) else None
                    bound.setdefault(name.id, []).append(value)
    return {k: v[0] for k, v in bound.items() if len(v) == 1 and v[0] is not None}


def _non_empty(expr: ast.expr, names: dict[str, ast.expr], depth: int = 0) -> bool:
    """Whether ``expr`` cannot be empty, by its construction alone."""
    if depth > 5:
        return False
    again = lambda e: _non_empty(e, names, depth + 1)  # noqa: E731
    if isinstance(expr, ast.Tuple | ast.List | ast.Set):
        return any(not isinstance(e, ast.Starred) for e in expr.elts)
    if isinstance(expr, ast.Dict):
        return any(k is not None for k in expr.keys)
    if isinstance(expr, ast.Constant):
        return isinstance(expr.value, str | bytes) and len(expr.value) > 0
    if isinstance(expr, ast.Name):
        return expr.id in names and again(names[expr.id])
    if isinstance(expr, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
        return all(not g.ifs and again(g.iter) for g in expr.generators)
    if not isinstance(expr, ast.Call):
        return False
    func, args = expr.func, expr.args
    if isinstance(func, ast.Name) and func.id == "range":
        args = [names.get(a.id, a) if isinstance(a, ast.Name) else a for a in args]
        bounds = [a.value for a in args if isinstance(a, ast.Constant)]
        if len(bounds) != len(args) or not all(isinstance(b, int) for b in bounds):
            return False
        return len(range(*bounds)) > 0
    if isinstance(func, ast.Name) and func.id in WRAPPERS and args:
        return again(args[0])
    if isinstance(func, ast.Name) and func.id == "zip" and args:
        return all(again(a) for a in args)
    if isinstance(func, ast.Attribute) and func.attr in VIEWS and not args:
        return again(func.value)
    return False


def _collections(expr: ast.expr) -> list[ast.expr]:
    """What an assert may pin down for a loop over ``expr``: it, or what it wraps (any side of
    a ``zip(..., strict=True)``, which raises rather than stop short; ``X`` of
    ``range(len(X))``)."""
    found = [expr]
    if not isinstance(expr, ast.Call):
        return found
    func, args = expr.func, expr.args
    strict = any(k.arg == "strict" and getattr(k.value, "value", None) for k in expr.keywords)
    if isinstance(func, ast.Name) and (func.id in WRAPPERS or (func.id == "zip" and strict)):
        for arg in args:
            found += _collections(arg)
    elif isinstance(func, ast.Name) and func.id == "range" and len(args) == 1:
        if isinstance(args[0], ast.Call) and getattr(args[0].func, "id", None) == "len":
            found += _collections(args[0].args[0])
    elif isinstance(func, ast.Attribute) and func.attr in VIEWS:
        found += _collections(func.value)
    return found


def _pins(test: ast.expr, target: ast.expr) -> bool:
    """Whether ``assert <test>`` can only pass when ``target`` is non-empty: ``target`` is the
    test (or one of its ``and`` terms; not a call, which may return a truthy iterator), is
    measured by ``len`` or ``any``, or is compared (not
    with ``is``, and not inside ``all(...)``, which is True for nothing)."""
    want = ast.dump(target)
    terms = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
    for term in terms:
        if ast.dump(term) == want and not isinstance(target, ast.Call):  # an iterator is truthy
            return True
        for node in _outside_all(term, itself=True):
            measured = isinstance(node, ast.Call) and getattr(node.func, "id", None) in MEASURES
            if measured and any(ast.dump(a) == want for a in node.args):
                return True
            if isinstance(node, ast.Compare) and not any(
                isinstance(op, ast.Is | ast.IsNot) for op in node.ops
            ):
                for side in (node.left, *node.comparators):
                    if any(ast.dump(n) == want for n in _outside_all(side, itself=True)):
                        return True
    return False


def _outside_all(node: ast.AST, itself: bool = False) -> Iterator[ast.AST]:
    """``node``'s subtree (with ``node`` when ``itself``), not entering ``all(...)`` calls."""
    if itself:
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Call) and getattr(child.func, "id", None) == "all":
            continue
        yield child
        yield from _outside_all(child)


def _scopes(tree: ast.Module) -> Iterator[Scope]:
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _asserting_loops(scope: Scope) -> Iterator[ast.For]:
    for node in _walk(scope):
        if isinstance(node, ast.For) and any(
            isinstance(n, ast.Assert) for stmt in node.body for n in [stmt, *_walk(stmt)]
        ):
            yield node


def unproven_loops(path: Path, root: Path = TESTS.parent) -> list[str]:
    """``file:line: for ... in ...`` for each asserting loop in ``path`` that may never run."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    module_names = _literals(tree)
    found = []
    for scope in _scopes(tree):
        names = {**module_names, **_literals(scope)} if scope is not tree else module_names
        asserts = [n for n in _walk(scope) if isinstance(n, ast.Assert)]
        for loop in _asserting_loops(scope):
            if _non_empty(loop.iter, names) or EXEMPT in lines[loop.lineno - 1]:
                continue
            before = [a.test for a in asserts if a.lineno < loop.lineno]
            if any(_pins(t, c) for t in before for c in _collections(loop.iter)):
                continue
            rel = path.relative_to(root)
            found.append(f"{rel}:{loop.lineno}: for ... in {ast.unparse(loop.iter)}")
    return found


def test_every_loop_that_asserts_is_seen_to_run():
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50
    unproven = [line for path in files for line in unproven_loops(path)]
    assert unproven == [], (
        "these loops assert, but nothing shows they run; assert the collection first "
        "(assert rows / assert len(rows) == n):\n" + "\n".join(unproven)
    )


def test_the_rule_tells_a_loop_that_may_not_run_from_one_that_must(tmp_path):
    path = tmp_path / "t.py"
    path.write_text(
        "CASES = ('a', 'b')\n"
        "def test_empty_passes_silently(rows):\n"
        "    for r in rows:\n"
        "        assert r\n"
        "def test_all_is_true_for_nothing(rows):\n"
        "    assert all(r for r in rows)\n"
        "    for r in rows:\n"
        "        assert r\n"
        "def test_literal():\n"
        "    for c in CASES:\n"
        "        assert c\n"
        "    for i, c in enumerate(sorted({'x': 1}.items())):\n"
        "        assert c\n"
        "    for c in [c.upper() for c in CASES]:\n"
        "        assert c\n"
        "    for c in [c for c in CASES if c > 'a']:\n"
        "        assert c\n"
        "def test_pinned(rows):\n"
        "    assert len(rows) == 2\n"
        "    for r in rows:\n"
        "        assert r\n"
        "def test_pinned_by_name(m):\n"
        "    assert m['shards']\n"
        "    for s in m['shards']:\n"
        "        assert s\n"
        "def test_a_call_is_truthy_even_when_it_yields_nothing(rows):\n"
        "    assert iter(rows)\n"
        "    for r in iter(rows):\n"
        "        assert r\n"
        "def test_strict_zip(a, b):\n"
        "    assert len(a) == 3\n"
        "    for x, y in zip(a, b, strict=True):\n"
        "        assert x == y\n"
        "def test_exempt(problems):\n"
        "    for p in problems:  # may not run: a valid document has none\n"
        "        assert p\n"
    )
    found = [line.split(": ", 1)[1] for line in unproven_loops(path, tmp_path)]
    assert found == [
        "for ... in rows",
        "for ... in rows",
        "for ... in [c for c in CASES if c > 'a']",
        "for ... in iter(rows)",
    ]
