"""The distribution installs one import package, ``tuneloop``, and ships no ops files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from wheel_check import wheel_problems

ROOT = Path(__file__).resolve().parent.parent


def test_the_built_wheel_holds_only_the_tuneloop_package_and_named_data(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = tmp_path.glob("tuneloop-*.whl")
    assert wheel_problems(str(wheel)) == []
    names = zipfile.ZipFile(wheel).namelist()
    assert "tuneloop/server/engine.py" in names and "tuneloop/deploy/gate.py" in names
    assert not any(n.startswith(("server/", "deploy/", "trainer/")) for n in names)


def test_the_wheel_check_reports_a_foreign_top_level_package_and_ops_files(tmp_path: Path) -> None:
    bad = tmp_path / "tuneloop-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("tuneloop/__init__.py", "")
        z.writestr("server/__init__.py", "")
        z.writestr("tuneloop/deploy/k8s/deployment.yaml", "kind: Deployment\n")
        z.writestr("tuneloop-0.0.0.dist-info/METADATA", "Metadata-Version: 2.4\nName: tuneloop\n")
    problems = wheel_problems(str(bad))
    assert any("top-level entries ['server', 'tuneloop']" in p for p in problems)
    assert any("ops file shipped: tuneloop/deploy/k8s/deployment.yaml" in p for p in problems)
    assert any("Requires-Dist lacks litestar" in p for p in problems)


def test_the_source_tree_imports_each_area_under_the_tuneloop_package() -> None:
    code = (
        "import tuneloop.trainer.config, tuneloop.server.protocol, tuneloop.monitoring.drift, "
        "tuneloop.feedback.cli, tuneloop.deploy.gate, sys; "
        "print(sorted(m for m in ('trainer', 'server', 'monitoring', 'feedback', 'deploy') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_command_that_needs_the_ml_stack_names_the_extra_when_it_is_missing(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'vllm', 'transformers', 'trl', 'peft', 'datasets', 'accelerate'):\n"
        "    sys.modules[m] = None  # as in an install without the cpu/gpu extra\n"
        "from tuneloop.cli import main\n"
        "sys.exit(main(['--home', sys.argv[1], 'merge', 'some-version']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: `tuneloop merge` needs the ML stack")
    assert 'pip install "tuneloop[cpu]"' in r.stderr and "Traceback" not in r.stderr
