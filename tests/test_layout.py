"""The size rules docs/developing.md states, checked on the source: no module over 500 lines, no function over 80
lines or with more than 10 parameters, in fastmveb/ and dataset_prep/ (scripts/ is exempt)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE, MAX_FUNCTION, MAX_PARAMS = 500, 80, 10


def _sources():
    for package in ("fastmveb", "dataset_prep"):
        yield from sorted((ROOT / package).rglob("*.py"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
            params = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
            yield node, node.end_lineno - node.lineno + 1, params


def test_the_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"fastmveb/train.py", "fastmveb/step.py", "dataset_prep/writer.py"} <= names


def test_no_module_function_or_parameter_list_over_its_limit():
    over = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        if len(text.splitlines()) > MAX_MODULE:
            over.append(f"{rel}: {len(text.splitlines())} lines (module limit {MAX_MODULE})")
        for node, lines, params in _functions(ast.parse(text)):
            if lines > MAX_FUNCTION:
                over.append(f"{rel}:{node.lineno} {node.name}: {lines} lines (limit {MAX_FUNCTION})")
            if params > MAX_PARAMS:
                over.append(f"{rel}:{node.lineno} {node.name}: {params} parameters (limit {MAX_PARAMS}; pass an "
                            f"options object)")
    assert not over, "\n".join(over)


def test_the_check_sees_a_long_function_and_a_long_parameter_list():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    src = f"def long(a, b, c, d, e, f, g, h, i, j, k):\n{body}\n\nclass C:\n    def m(self, a):\n        return a\n"
    got = {node.name: (lines, params) for node, lines, params in _functions(ast.parse(src))}
    assert got["long"] == (MAX_FUNCTION + 1, 11) and got["m"] == (2, 1)
