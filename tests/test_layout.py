"""The library's shape: what the gunicorn master imports stays light, package faces import only the
standard library, no import circle is wider than three modules, and `errors` stands below `upstream`.

These are structural promises other code relies on: the master forks the workers before they
monkey-patch, so nothing it imports may load ssl-using libraries; a host app imports the faces to
pick a backend without paying for the others.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "openai_proxy"
HEAVY = ("ssl", "_ssl", "flask", "werkzeug", "openai", "httpx2", "redis", "psycopg", "geventhttpclient")


def _fresh(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter at the repo root; it prints a JSON object as its last line."""
    env = {"PATH": "/usr/bin:/bin", "OPENAI_PROXY_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = "import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"


def test_the_gunicorn_config_loads_no_ssl_and_no_app_libraries(tmp_path):
    # Everything gunicorn.conf.py imports (settings, clients file, prices, key state, runtime dir).
    loaded = _fresh(f"import runpy; runpy.run_path('gunicorn.conf.py'); {LOADED}", tmp_path)
    assert [name for name in HEAVY if name in loaded] == []


def test_the_worker_class_module_loads_no_app_libraries(tmp_path):
    # gunicorn itself imports ssl in its master (gunicorn.sock); the worker module adds nothing heavier.
    loaded = _fresh(f"import openai_proxy.worker; {LOADED}", tmp_path)
    assert [name for name in HEAVY if name in loaded and name not in ("ssl", "_ssl")] == []


@pytest.mark.parametrize(
    "face", ["clients", "limits", "gate", "keys", "log", "objects", "observe", "pages", "stream"]
)
def test_a_package_face_imports_only_the_standard_library(face, tmp_path):
    loaded = _fresh(
        "import sys; before = set(sys.modules); import openai_proxy." + face + "; import json; "
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before}"
        " - set(sys.stdlib_module_names) - {'openai_proxy'})))",
        tmp_path,
    )
    assert loaded == []


# The per-call resources and the stores with a backend behind their face, and the face's opener.
BACKEND_FACES = {
    "gate": "open_gate",
    "limits": "open_limit_store",
    "keys": "open_key_pool",
    "log": "open_log_store",
    "objects": "open_object_book",
}


@pytest.mark.parametrize(("face", "opener"), BACKEND_FACES.items())
def test_a_backend_face_has_a_protocol_and_an_opener(face, opener):
    tree = ast.parse((PACKAGE / face / "__init__.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    protocols = [
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "Protocol" for b in node.bases)
    ]
    assert opener in functions and protocols


def test_the_extension_opens_backends_only_through_their_faces():
    backends = {"gate.local", "gate.shared", "limits.local", "limits.shared", "keys.pool", "log.store",
                "objects.book"}  # fmt: skip
    assert _imports()["openai_proxy.extension"] & {f"openai_proxy.{b}" for b in backends} == set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the library modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import module` ties to the module; `from pkg import name`, to the package.
                submodules = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in submodules if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_circle_is_wider_than_three_modules():
    assert [c for c in _circles(_imports()) if len(c) > 3] == []


def test_errors_import_nothing_from_upstream():
    assert not any(m.startswith("openai_proxy.upstream") for m in _imports()["openai_proxy.errors"])


def test_at_most_fourteen_modules_at_the_top_of_the_library():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top
