"""The error tree in ``rexecd/errors.py`` is the wire contract: one class per code,
drawn in the module docstring, and no raise site that picks its own code."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
from aiohttp import web

import rexecd
from rexecd import errors
from rexecd.api.errors import render_http_exception
from rexecd.errors import HttpError, RexecError
from tests.unit.fakes.service import harness

PACKAGE = Path(rexecd.__file__).parent
_TREE_LINE_RE = re.compile(r"(?P<name>[A-Z]\w+) \((?P<status>[\dx/]+), (?P<code>[a-z_]+)\)")


def _classes() -> list[type[RexecError]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, RexecError) and c.__module__ == errors.__name__
    ]


def test_each_code_is_defined_by_exactly_one_class() -> None:
    owners: dict[str, list[str]] = {}
    for cls in _classes():
        if "code" in vars(cls):
            owners.setdefault(cls.code, []).append(cls.__name__)
    assert {code: names for code, names in owners.items() if len(names) > 1} == {}
    # A class that does not define its own code keeps its parent's and must differ
    # from it in status only (TerminalNotRunning).
    for cls in _classes():
        if "code" not in vars(cls):
            parent = cls.__mro__[1]
            assert "status" in vars(cls) and cls.status != parent.status, cls.__name__


def test_the_docstring_tree_draws_every_class_with_its_status_and_code() -> None:
    assert errors.__doc__ is not None
    drawn = {m["name"]: (m["status"], m["code"]) for m in _TREE_LINE_RE.finditer(errors.__doc__)}
    classes = {c.__name__: c for c in _classes()}
    assert set(drawn) == set(classes)
    for name, (status, code) in drawn.items():
        cls = classes[name]
        assert code == cls.code, name
        if cls is not HttpError:
            assert status == str(cls.status), name
    # Each class is drawn under its parent: the indentation follows the hierarchy.
    depth = {}
    for line in errors.__doc__.splitlines():
        m = _TREE_LINE_RE.search(line)
        if m:
            depth[m["name"]] = m.start() // 4
    for name, cls in classes.items():
        if cls is not RexecError:
            parent = next(b for b in cls.__mro__[1:] if issubclass(b, RexecError))
            assert depth[name] == depth[parent.__name__] + 1, name


def _error_names() -> set[str]:
    return {c.__name__ for c in _classes()}


def _code_overrides(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines where an error class is called with ``code=``, or where a dict literal with
    both an ``error`` and a ``code`` key hand-builds an error body (``to_json`` in
    errors.py is the one that may)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called in names and any(k.arg == "code" for k in node.keywords):
                found.append(node.lineno)
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if {"error", "code"} <= keys:
                found.append(node.lineno)
    return found


def test_no_raise_site_overrides_a_code() -> None:
    names = _error_names()
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "errors.py":
            continue
        lines = _code_overrides(ast.parse(path.read_text(), str(path)), names)
        if lines:
            offenders[str(path.relative_to(PACKAGE))] = lines
    assert offenders == {}


@pytest.mark.parametrize(
    "source",
    [
        'raise NotFound("container not found", code="container_not_found")',
        'raise errors.Conflict("busy", status="x", code="container_stopped")',
        'respond_json({"error": "gone", "code": "container_not_found"}, 404)',
    ],
)
def test_the_override_check_finds_what_it_forbids(source: str) -> None:
    assert _code_overrides(ast.parse(source), _error_names()) == [1]


def test_config_error_is_in_the_tree_and_still_a_value_error() -> None:
    from rexecd.config import ConfigError

    exc = ConfigError("listen: bad")
    assert isinstance(exc, RexecError) and isinstance(exc, ValueError)
    assert exc.to_json() == {"error": "listen: bad", "code": "config_invalid"}


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (web.HTTPNotFound(), 404, "not_found"),
        (web.HTTPMethodNotAllowed("PUT", ["GET"]), 405, "method_not_allowed"),
        (web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2), 413, "payload_too_large"),
        (web.HTTPBadRequest(), 400, "invalid_request"),
        (web.HTTPUnsupportedMediaType(), 415, "http_error"),
    ],
)
def test_aiohttp_errors_leave_with_a_code(exc: web.HTTPException, status: int, code: str) -> None:
    resp = render_http_exception(exc)
    assert resp.status == status
    assert resp.body is not None
    body = json.loads(bytes(resp.body))
    assert body == {"error": (exc.reason or "").lower(), "code": code}
    if status == 405:
        assert resp.headers["Allow"] == "GET"


async def test_a_timeout_and_an_unexpected_error_leave_with_a_code(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.service.boom = TimeoutError()
        resp = await h.client.get("/api/containers", headers=h.headers())
        assert resp.status == 504
        assert await resp.json() == {"error": "operation timed out", "code": "timeout"}
        h.service.boom = KeyError("x")
        resp = await h.client.get("/api/containers", headers=h.headers())
        assert resp.status == 500
        assert await resp.json() == {"error": "internal server error", "code": "internal_error"}
