"""Check a built wheel: one top-level package, no ops folders, only named data files.

Usage: ``python tests/wheel_check.py dist/tuneloop-X-py3-none-any.whl`` (CI runs it after
``python -m build``; ``tests/test_packaging.py`` runs the same check on a fresh build).
Prints each problem and exits 1 if there is any.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

SUBPACKAGES = ("trainer", "server", "monitoring", "feedback", "deploy")
OPS_FOLDERS = ("docker", "k8s", "grafana", "prometheus", "accelerate")
# Files other than Python modules that the package needs at run time, each named: the PEP 561 marker and the web
# console's templates and static files (every file of those folders in the source tree).
_SERVER = Path(__file__).resolve().parents[1] / "server"
PACKAGE_DATA = {"tuneloop/py.typed"} | {
    f"tuneloop/server/{p.relative_to(_SERVER).as_posix()}"
    for p in [
        *(_SERVER / "templates" / "console").glob("*.html"),
        _SERVER / "static" / "console.css",
        _SERVER / "static" / "console.js",
    ]
}
RUNTIME_REQUIREMENTS = (
    "duckdb", "msgspec", "pyyaml", "numpy", "scipy", "pyarrow", "litestar", "prometheus-client", "altair", "vl-convert-python",
)  # fmt: skip


def wheel_problems(path: str) -> list[str]:
    problems: list[str] = []
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        tops = {n.split("/")[0] for n in names} - dist_info
        if tops != {"tuneloop"}:
            problems.append(f"top-level entries {sorted(tops)}, expected only ['tuneloop']")
        if len(dist_info) != 1:
            return [*problems, f"dist-info folders: {sorted(dist_info)}"]
        (di,) = dist_info
        top_level = z.read(f"{di}/top_level.txt").decode().split() if f"{di}/top_level.txt" in names else ["tuneloop"]
        if top_level != ["tuneloop"]:
            problems.append(f"top_level.txt lists {top_level}")
        for sub in SUBPACKAGES:
            if f"tuneloop/{sub}/__init__.py" not in names:
                problems.append(f"tuneloop/{sub}/__init__.py missing")
        for n in names:
            parts = PurePosixPath(n).parts
            if parts[0] != "tuneloop":
                continue
            if any(p in OPS_FOLDERS for p in parts[1:-1]):
                problems.append(f"ops file shipped: {n}")
            elif not n.endswith(".py") and n not in PACKAGE_DATA:
                problems.append(f"unlisted data file shipped: {n}")
        for n in PACKAGE_DATA:
            if n not in names:
                problems.append(f"package data missing: {n}")
        meta = Parser().parsestr(z.read(f"{di}/METADATA").decode())
        requires = [r.split(";")[0].strip().lower() for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
        for req in RUNTIME_REQUIREMENTS:
            if not any(r.replace("_", "-").startswith(req) for r in requires):
                problems.append(f"Requires-Dist lacks {req}")
        extras = set(meta.get_all("Provides-Extra") or [])
        if not {"cpu", "gpu"} <= extras:
            problems.append(f"extras {sorted(extras)} lack cpu/gpu")
        eps = z.read(f"{di}/entry_points.txt").decode() if f"{di}/entry_points.txt" in names else ""
        if "tuneloop = tuneloop.cli:main" not in eps:
            problems.append("console script `tuneloop = tuneloop.cli:main` missing")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: wheel_check.py WHEEL", file=sys.stderr)
        return 2
    problems = wheel_problems(argv[0])
    for p in problems:
        print(f"wheel: {p}")
    if not problems:
        print(f"wheel: {argv[0]} ok (one top-level package `tuneloop`, no ops folders)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
