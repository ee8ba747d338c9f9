"""The import rules of docs/ARCHITECTURE.md, checked on the source of every module.

Layers, lowest first: core (``tuneloop/*.py``) <- ``monitoring`` <- ``server`` /
``feedback`` / ``trainer`` <- ``deploy``. A module imports only from lower layers
and its own area; the three middle areas never import each other. vLLM is
imported only by the engine wrappers (online serving, offline evaluation); trl and peft never reach the server, even
through a chain of our own modules; litestar never reaches the trainer. No two of
our modules import each other, directly or in a ring, counting imports inside
functions and under ``TYPE_CHECKING`` too.

Every ``import`` statement counts wherever it stands, so a lazy import inside a
function cannot hide a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AREAS = ("monitoring", "server", "feedback", "trainer", "deploy")
LAYER = {"core": 0, "monitoring": 1, "server": 2, "feedback": 2, "trainer": 2, "deploy": 3}
ENGINE_WRAPPERS = (
    "tuneloop.server.engine",  # online serving
    "tuneloop.server.engine_tools",  # vLLM's tool parsers and tool-call schemas
    "tuneloop.server.offline_engine",  # offline eval
)


def _source_modules() -> dict[str, Path]:
    """Every module of the ``tuneloop`` package, by its dotted name, from its real file."""
    mods: dict[str, Path] = {}
    for f in sorted((ROOT / "tuneloop").glob("*.py")):
        mods["tuneloop" if f.stem == "__init__" else f"tuneloop.{f.stem}"] = f
    for area in AREAS:
        for f in sorted((ROOT / area).rglob("*.py")):
            rel = f.relative_to(ROOT / area).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join(["tuneloop", area, *parts])] = f
    return mods


MODULES = _source_modules()


def area_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in AREAS else "core"


def imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) for every import statement in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for a in node.names:  # `from tuneloop.server import engine` imports a module
                if f"{target}.{a.name}" in MODULES:
                    yield f"{target}.{a.name}", node.lineno


def ours(name: str) -> str | None:
    """The module of ours that an imported name refers to (``tuneloop.db.Database`` -> ``tuneloop.db``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


IMPORTS: dict[str, list[tuple[str, int]]] = {m: list(imported_names(m, p)) for m, p in MODULES.items()}
GRAPH: dict[str, set[str]] = {
    m: {o for name, _ in names if (o := ours(name)) is not None and o != m} for m, names in IMPORTS.items()
}


def reachable(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def third_party_roots(module: str) -> set[str]:
    return {name.split(".")[0] for name, _ in IMPORTS[module] if not name.startswith("tuneloop")}


def test_the_scan_sees_every_area_and_the_engine_wrapper() -> None:
    assert {area_of(m) for m in MODULES} == {"core", *AREAS}
    assert all(w in MODULES for w in ENGINE_WRAPPERS) and "tuneloop.server.app" in MODULES and "tuneloop.db" in MODULES
    assert len(MODULES) > 60


def test_each_layer_imports_only_lower_layers_and_its_own_area() -> None:
    bad = []
    for m, names in IMPORTS.items():
        a = area_of(m)
        for name, line in names:
            target = ours(name)
            if target is None or target == "tuneloop":
                continue
            b = area_of(target)
            if b != a and LAYER[b] >= LAYER[a]:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} ({a}) imports {target} ({b})")
    assert not bad, (
        "imports against the layering core <- monitoring <- server/feedback/trainer <- deploy:\n" + "\n".join(bad)
    )


def test_vllm_is_imported_only_by_the_engine_wrappers() -> None:
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line}"
        for m, names in IMPORTS.items()
        for name, line in names
        if name.split(".")[0] == "vllm" and m not in ENGINE_WRAPPERS
    ]
    assert not bad, "vllm imported outside the engine wrappers: " + ", ".join(bad)
    assert all("vllm" in third_party_roots(w) for w in ENGINE_WRAPPERS)


@pytest.mark.parametrize(
    "area, banned",
    [("server", {"trl", "peft"}), ("trainer", {"litestar"}), ("monitoring", {"trl", "peft", "litestar", "vllm"})],
)
def test_banned_libraries_never_reach_an_area_through_our_modules(area: str, banned: set[str]) -> None:
    bad = []
    for m in (m for m in MODULES if area_of(m) == area):
        for dep in reachable(m):
            hit = third_party_roots(dep) & banned
            if hit:
                bad.append(f"{m} reaches {sorted(hit)} through {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_among_our_modules() -> None:
    # tuneloop.cli loads the areas' command modules by name (importlib), which is not an import edge
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in GRAPH:
        if v not in index:
            strongconnect(v)
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_importing_the_server_app_loads_neither_trl_nor_peft() -> None:
    code = (
        "import sys, tuneloop.server.app, tuneloop.server.cli;"
        "bad = sorted(m for m in ('trl', 'peft', 'vllm') if m in sys.modules);"
        "print(','.join(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing the server app loaded {r.stdout.strip()}"


def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    """The checker itself: a server module importing the trainer is reported."""
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from tuneloop.trainer.train import train\n")
    names = list(imported_names("tuneloop.server.bad", f))
    assert ("tuneloop.trainer.train", 2) in names
    assert ours("tuneloop.trainer.train.train") == "tuneloop.trainer.train"
    assert LAYER[area_of("tuneloop.trainer.train")] >= LAYER[area_of("tuneloop.server.bad")]
