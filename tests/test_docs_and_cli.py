"""README examples run as written; the commands README gives parse; the command line works on
this machine with its defaults (small inputs where a flag allows) and says what it runs."""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from fusedres import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(path: pathlib.Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def _commands(prefix: str) -> list[list[str]]:
    """The argv (after ``prefix``) of every README bash line that starts with ``prefix``."""
    lines = [line.split("  #")[0].strip() for block in _blocks(README, "bash") for line in block.splitlines()]
    return [shlex.split(line)[len(shlex.split(prefix)):] for line in lines if line.startswith(prefix)]


@pytest.mark.parametrize("index", range(len(_blocks(README, "python"))))
def test_readme_python_examples_run(index):
    exec(compile(_blocks(README, "python")[index], f"README.md block {index}", "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    tests_section = readme.split("Run the tests")[1].split("```bash\n")[1].split("```")[0]
    for line in filter(None, tests_section.splitlines()):
        assert line.split("#")[0].strip() in ci, f"README's `{line}` is not in .ci/run"


def test_readme_installs_keep_the_editable_build():
    """Every pip install of fusedres in the README builds against the installed torch and in the clone."""
    installs = [line for block in _blocks(README, "bash") for line in block.splitlines()
                if re.match(r"pip install .*(\.\s*$|\.\[|\"\.)", line.split("  #")[0].strip())]
    assert installs
    for line in installs:
        assert "--no-build-isolation -e " in line, line
    assert "DESIGN.md" not in README.read_text()  # the design notes are not shipped


@pytest.mark.parametrize("argv", _commands("python -m fusedres"), ids=lambda a: " ".join(a[:3]) or "check")
def test_readme_cli_commands_parse(argv):
    cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", _commands("python examples/train_cifar.py"), ids=lambda a: " ".join(a[:2]))
def test_readme_example_commands_parse(argv):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_cifar
    finally:
        sys.path.remove(str(ROOT / "examples"))
    train_cifar.parse_args(argv)


@pytest.mark.parametrize("command", [None, "check", "info", "responses", "lesion"])
def test_cli_help_has_no_raw_markup(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(([command] if command else []) + ["--help"])
    assert exc.value.code == 0
    assert "``" not in capsys.readouterr().out


def _run(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedres", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def test_cli_info_names_every_backend_and_what_it_runs():
    result = _run("info")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^fusedres\._C: loaded from .+; built: C\+\+ CPU kernels, ", result.stdout, flags=re.M)
    for name in ("native", "triton", "reference"):
        assert re.search(rf"^\s+{name}\s+(usable: .+|unusable: .+)$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^\s+native\s+usable: fusedres\._C C\+\+ CPU kernels$", result.stdout, flags=re.M)
    assert re.search(r"^\s+auto\s+times native \(fusedres\._C C\+\+ CPU kernels\)", result.stdout, flags=re.M)


def test_cli_info_fails_and_says_why_when_the_extension_is_missing(tmp_path):
    """A checkout with no _C built, run from the checkout (where `pip install .` leaves the user)."""
    shutil.copytree(ROOT / "fusedres", tmp_path / "fusedres", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    (tmp_path / "setup.py").write_text("")
    result = _run("info", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "circular import" not in output and "partially initialized" not in output
    assert "fusedres._C: NOT LOADED: " in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout
    assert "To fix: build it from the clone" in result.stdout or "is shadowed" in result.stdout
    assert _run("info", "--allow-missing", cwd=tmp_path).returncode == 0


def test_cli_check_says_what_runs_verifies_and_times_resnet50():
    result = _run("check", "--device", "cpu", "--batch", "1", "--size", "64", "--iters", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fusedres._C: loaded from " in result.stdout
    what_runs = re.search(r"^fusedres \(auto\) on cpu, fp32: (.+)$", result.stdout, flags=re.M)
    assert what_runs, result.stdout
    assert (what_runs[1].startswith("auto times native (fusedres._C C++ CPU kernels)")
            or what_runs[1].startswith("eval convs run on onednn")), what_runs[1]
    assert "-> OK" in result.stdout
    assert re.search(r"^eager PyTorch\s+[\d.]+\s+1\.00x$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^fusedres \(auto\)\s+[\d.]+\s+[\d.]+x$", result.stdout, flags=re.M), result.stdout
    assert "NOTE: fusedres._C is not loaded" not in result.stdout


@pytest.mark.parametrize("command", [["responses"], ["lesion"]])
def test_cli_analyses_run_with_their_defaults(command, tmp_path):
    """Every default but the number of images (256 by default: minutes on a loaded CPU)."""
    result = _run(*command, "--samples", "8", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the weights are untrained" in result.stdout
    assert "Traceback" not in result.stderr


def _row(case: str, competitor: str, samples_ms: list[float]) -> dict:
    from bench import _harness

    q1, median, q3 = _harness.quartiles(samples_ms)
    info = {"suite": "ops", "mode": "eval", "dtype": "fp32", "case": case, "competitor": competitor,
            "median_ms": median, "q1_ms": q1, "q3_ms": q3, "spread": (q3 - q1) / median, "tflops": 1e-3,
            "gbps": 1.0, "images_per_s": None, "roofline_fraction": None, "peak_mem_mb": None}
    return {"group": f"ops | eval | fp32 | {case}", "name": f"{case}-{competitor}", "extra_info": info}


def test_bench_report_marks_ratios_the_spread_does_not_support():
    """The bench's closing summary (bench/report.py): a clear 2x, a noisy 1.25x, a clear 0.5x."""
    from bench import report

    rows = [_row("a", "eager", [10, 10.1, 9.9, 10, 10.2]), _row("a", "fusedres-native", [5, 5.1, 4.9, 5, 5]),
            _row("b", "eager", [10, 4, 16, 9, 11]), _row("b", "fusedres-native", [8, 3, 14, 9, 7]),
            _row("c", "eager", [5, 5, 5.1, 4.9, 5]), _row("c", "fusedres-native", [10, 10, 10.1, 9.9, 10])]
    verdicts = [report.versus(rows[i + 1]["extra_info"], rows[i]["extra_info"]) for i in (0, 2, 4)]
    assert [round(r, 2) for r, _ in verdicts] == [2.0, 1.25, 0.5]
    assert [ok for _, ok in verdicts] == [True, False, True]
    summary = report.render_summary(rows)
    assert re.search(r"\| ops · eval · fp32 +\| +3 \| +\d+% \| +1\.08x 1\+ 1- 1\? \|", summary), summary
    tables = report.render_tables(rows)
    assert "1.25x ?" in tables and "2.00x" in tables and "IQR/median" in tables
    assert "roofline" not in tables and "peak MB" not in tables  # no figures on a CPU: columns left out
