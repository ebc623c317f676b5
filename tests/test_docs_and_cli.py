"""README examples run as written; the command line works on this machine."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "README.md"))))
def test_readme_python_examples_run(index):
    exec(compile(_python_blocks(ROOT / "README.md")[index], f"README.md block {index}", "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    tests_section = readme.split("Run the tests")[1].split("```bash\n")[1].split("```")[0]
    for line in filter(None, tests_section.splitlines()):
        assert line.split("#")[0].strip() in ci, f"README's `{line}` is not in .ci/run"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedres", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_cli_info_names_every_backend():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    for name in ("cuda", "triton", "reference"):
        assert re.search(rf"^\s+{name}\s+(usable|unusable: .+)$", result.stdout, flags=re.M), result.stdout


def test_cli_check_verifies_and_times_resnet50():
    result = _run("check", "--device", "cpu", "--batch", "1", "--size", "64", "--iters", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-> OK" in result.stdout
    assert re.search(r"^eager PyTorch\s+[\d.]+\s+1\.00x$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^fusedres \(auto\)\s+[\d.]+\s+[\d.]+x$", result.stdout, flags=re.M), result.stdout
