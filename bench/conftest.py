"""Options, ordering, time budget, the round-robin timing of each case after its last competitor
(see bench/_harness.py), run metadata and the closing summary of ``pytest bench/``."""

from __future__ import annotations

import time

import pytest
import torch

from bench import _harness, report

_SESSION_START = pytest.StashKey[float]()
_DTYPE_ORDER = ("bf16", "fp16", "fp32")
_SUITE_ORDER = ("bench_models", "bench_ops", "bench_blocks", "bench_train_ops")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedres bench")
    group.addoption("--quick", action="store_true",
                    help=f"tiny shapes (batch 2, 56x56 images), a few cases, few rounds; also ${_harness.QUICK_ENV}=1")
    group.addoption("--bench-batch", type=int, default=None, metavar="N",
                    help="batch size of every case (default: 128 on a GPU, 2 on the CPU and with --quick)")
    group.addoption("--bench-max-autotune", action="store_true",
                    help="add torch.compile(mode='max-autotune') as a competitor (compiles for minutes)")
    group.addoption("--bench-time-budget", type=float, default=None, metavar="SECONDS",
                    help="skip the benchmarks that would start later than SECONDS into the run")
    group.addoption("--bench-tables", action="store_true",
                    help="also print every case's row, above the closing summary "
                         "(or: bench/report.py on --benchmark-json)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark's own table (one row per test, ~300 lines) only when asked for: the
    # closing summary has the comparisons, --bench-tables every row.
    if not config.getoption("benchmark_verbose", False) and config.getoption("benchmark_columns", None) is None:
        config.option.benchmark_quiet = True
    # Eager PyTorch at its best on fixed shapes: cuDNN picks its algorithms by timing them.
    torch.backends.cudnn.benchmark = True
    # On x86 CPUs denormal floats (the random-weight training steps make some) cost ~50x:
    # flushed for every competitor alike. No effect on the GPU.
    torch.set_flush_denormal(True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    meta = _harness.run_metadata(_harness.settings(config))
    return [
        f"fusedres bench: {meta['gpu'] or 'CPU'} ({meta['clock']}), torch {meta['torch']}, CUDA {meta['cuda']}, "
        f"triton {meta['triton']}, fusedres._C {meta['fusedres_extension']}",
        f"fusedres bench: {'quick, ' if meta['quick'] else ''}batch {meta['batch']}, {meta['image_size']}x"
        f"{meta['image_size']} images, dtypes {', '.join(meta['dtypes'])}, commit {meta['git_commit']}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Most-used first, so a time budget cuts the rest: by dtype (bf16, fp16, fp32), then whole
    models, single ops, blocks. The sort is stable: the competitors of a case stay together."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        callspec = getattr(item, "callspec", None)
        dtype = callspec.params.get("dtype_name") if callspec else None
        suite = item.module.__name__.rpartition(".")[2] if item.module else None
        return (_DTYPE_ORDER.index(dtype) if dtype in _DTYPE_ORDER else 0,
                _SUITE_ORDER.index(suite) if suite in _SUITE_ORDER else len(_SUITE_ORDER))

    items.sort(key=rank)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION_START] = time.monotonic()


@pytest.fixture(autouse=True)
def _seed_and_time_budget(request: pytest.FixtureRequest) -> None:
    budget = _harness.settings(request.config).time_budget_s
    if budget is not None and time.monotonic() - request.config.stash[_SESSION_START] > budget:
        pytest.skip(f"the run's time budget of {budget:.0f} s is spent (--bench-time-budget)")
    torch.manual_seed(0)


@pytest.fixture
def bench_settings(request: pytest.FixtureRequest) -> _harness.Settings:
    return _harness.settings(request.config)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["fusedres"] = _harness.run_metadata(_harness.settings(config))


def pytest_benchmark_update_commit_info(config: pytest.Config, commit_info: dict) -> None:
    # A copied tree without .git (a GPU machine) is 'unversioned' to pytest-benchmark.
    commit = _harness.git_commit()
    if commit and commit_info.get("id") in (None, "unknown", "unversioned"):
        commit_info["id"] = commit


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After a case's last competitor (skipped or not), time the case's competitors together."""
    if _harness.case_key(item) != _harness.case_key(nextitem):
        _harness.finish_case(item.config)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    _harness.finish_case(session.config)  # a run stopped early (-x) leaves a case pending


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(_harness.RESULTS, [])
    if not rows:
        return
    if config.getoption("bench_tables"):
        terminalreporter.section("fusedres bench: every case")
        for line in report.render_tables(rows).splitlines():
            terminalreporter.write_line(line)
    terminalreporter.section("fusedres bench summary")
    for line in report.render_summary(rows).splitlines():
        terminalreporter.write_line(line)
    if not config.getoption("bench_tables"):
        terminalreporter.write_line("every case's row: --bench-tables, or --benchmark-json out.json and "
                                    "python bench/report.py out.json")
