"""Render the pytest-benchmark JSON of ``pytest bench/`` as markdown tables and a speedup chart.

    python bench/report.py bench/results/X.json                  # writes X.md, and X.png with matplotlib
    python bench/report.py A.json --compare B.json [--out C.md]  # per-row time ratios of two runs

The figures come from each benchmark's ``extra_info`` (see bench/_harness.py); bench/README.md
explains the columns. Needs only the standard library; the chart needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

SUITE_ORDER = ("ops", "blocks", "models")
COMPETITOR_ORDER = ("eager", "compile", "compile-max-autotune", "cudnn-frontend",
                    "fusedres-native", "fusedres-cuda", "fusedres-triton", "fusedres-auto")
DASH = "—"

Section = tuple[str, str, str]  # suite, mode, dtype


def load_rows(data: dict) -> list[dict]:
    """The benchmarks of a pytest-benchmark JSON that carry fusedres figures."""
    return [b for b in data.get("benchmarks", []) if "competitor" in b.get("extra_info", {})]


def by_section(rows: list[dict]) -> dict[Section, dict[str, dict[str, dict]]]:
    """section -> case -> competitor -> extra_info; suites in SUITE_ORDER, the rest as run."""
    sections: dict[Section, dict[str, dict[str, dict]]] = {}
    for row in rows:
        info = row["extra_info"]
        section = (info["suite"], info["mode"], info["dtype"])
        sections.setdefault(section, {}).setdefault(info["case"], {})[info["competitor"]] = info
    order = {suite: i for i, suite in enumerate(SUITE_ORDER)}
    return dict(sorted(sections.items(), key=lambda item: order.get(item[0][0], len(order))))


def _rank(competitor: str) -> int:
    return COMPETITOR_ORDER.index(competitor) if competitor in COMPETITOR_ORDER else len(COMPETITOR_ORDER)


def ordered(competitors) -> list[str]:
    return sorted(competitors, key=lambda name: (_rank(name), name))


def _figure(value: float | None) -> str:
    """Three significant digits, without exponents for the sizes that occur here."""
    if value is None:
        return DASH
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _throughput(info: dict) -> str:
    if info.get("images_per_s"):
        return f"{_figure(info['images_per_s'])} img/s"
    if info["tflops"] >= 1:
        return f"{_figure(info['tflops'])} TFLOP/s"
    return f"{_figure(info['tflops'] * 1e3)} GFLOP/s"


def versus(info: dict, eager: dict) -> tuple[float, bool | None]:
    """(eager's median / this median, whether the spread supports the ratio: None for runs that
    recorded no quartiles). Not supported when the two rows' interquartile ranges overlap or the
    larger spread (IQR / median) exceeds |ratio - 1|: such a ratio is not told apart from 1."""
    ratio = eager["median_ms"] / info["median_ms"]
    if info is eager:
        return ratio, True
    if "q1_ms" not in info or "q1_ms" not in eager:
        return ratio, None
    overlap = info["q1_ms"] <= eager["q3_ms"] and eager["q1_ms"] <= info["q3_ms"]
    return ratio, not overlap and max(info["spread"], eager["spread"]) < abs(ratio - 1)


UNCLEAR = "?"  # marks a ratio the spread does not support
VERDICT_RULE = (f"{UNCLEAR}: the spread swallows the ratio (the interquartile ranges of the row and eager "
                "overlap, or IQR/median > |ratio - 1|)")


def _speedup(info: dict, eager: dict | None) -> str:
    if eager is None:
        return DASH
    ratio, supported = versus(info, eager)
    return f"{ratio:.2f}x" + (f" {UNCLEAR}" if supported is False else "")


def _spread(info: dict) -> str:
    return f"{info['spread']:.0%}" if "spread" in info else DASH


def markdown_table(header: list[str], rows: list[list[str]], right_from: int) -> list[str]:
    """A pipe table padded to line up in a terminal too; columns from ``right_from`` on are numbers.
    Number columns with no figure in any row (e.g. roofline and peak memory on a CPU) are left out."""
    keep = [i for i in range(len(header)) if i < right_from or any(r[i] != DASH for r in rows)]
    header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i < right_from else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return [line(header), line(rule)] + [line(r) for r in rows]


def render_tables(rows: list[dict]) -> str:
    """One table per (suite, mode, dtype): a row per case and competitor, eager first."""
    header = ["case", "competitor", "median ms", "IQR/median", "throughput", "GB/s", "roofline", "vs eager",
              "peak MB"]
    out = []
    for (suite, mode, dtype), cases in by_section(rows).items():
        table = []
        for case, per_competitor in cases.items():
            eager = per_competitor.get("eager")
            for i, competitor in enumerate(ordered(per_competitor)):
                info = per_competitor[competitor]
                fraction = info.get("roofline_fraction")
                table.append([
                    case if i == 0 else "", competitor, _figure(info["median_ms"]), _spread(info), _throughput(info),
                    _figure(info["gbps"]), DASH if fraction is None else f"{fraction:.0%}", _speedup(info, eager),
                    _figure(info.get("peak_mem_mb")),
                ])
        out += [f"### {suite} · {mode} · {dtype}", ""] + markdown_table(header, table, right_from=2) + [""]
    return "\n".join(out + [f"`vs eager`: eager's median time / the row's; {VERDICT_RULE}."])


def render_summary(rows: list[dict]) -> str:
    """The comparisons in a few lines: per (suite, mode, dtype), each competitor's geometric-mean
    speedup over eager across the cases, and how many cases are reliably faster, reliably slower
    or not told apart from eager by the spread."""
    sections = by_section(rows)
    competitors = ordered({c for cases in sections.values() for per in cases.values() for c in per} - {"eager"})
    header = ["suite · mode · dtype", "cases", "spread"] + competitors
    table = []
    for (suite, mode, dtype), cases in sections.items():
        spreads = [info["spread"] for per in cases.values() for info in per.values() if "spread" in info]
        cells = []
        for competitor in competitors:
            verdicts = [versus(per[competitor], per["eager"]) for per in cases.values()
                        if competitor in per and "eager" in per]
            if not verdicts:
                cells.append(DASH)
                continue
            mean = math.exp(statistics.fmean(math.log(r) for r, _ in verdicts))
            if len(verdicts) == 1:
                cells.append(f"{mean:.2f}x" + (f" {UNCLEAR}" if verdicts[0][1] is False else ""))
                continue
            faster = sum(ok is not False and r > 1 for r, ok in verdicts)
            slower = sum(ok is not False and r < 1 for r, ok in verdicts)
            cells.append(f"{mean:.2f}x {faster}+ {slower}- {len(verdicts) - faster - slower}{UNCLEAR}")
        table.append([f"{suite} · {mode} · {dtype}", str(len(cases)),
                      f"{statistics.median(spreads):.0%}" if spreads else DASH] + cells)
    legend = [
        "vs eager PyTorch: eager's median time / the competitor's (above 1: faster); a table with several cases "
        f"gives the geometric mean and how many cases are faster (+), slower (-) or unclear ({UNCLEAR}).",
        f"spread: the median IQR/median of the table's rows. {VERDICT_RULE}.",
    ]
    return "\n".join(markdown_table(header, table, right_from=1) + [""] + legend)


def _meta(data: dict) -> dict:
    return data.get("machine_info", {}).get("fusedres", {})


def describe_run(data: dict) -> list[str]:
    meta = _meta(data)
    commit = meta.get("git_commit") or data.get("commit_info", {}).get("id") or "unknown"
    lines = [
        f"- device: {meta.get('gpu') or 'CPU'} ({meta.get('cpu_threads')} CPU threads); timer: {meta.get('clock')}, median",
        f"- commit {commit}; torch {meta.get('torch')}, CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}, "
        f"triton {meta.get('triton')}; fusedres._C: {meta.get('fusedres_extension')}",
        f"- batch {meta.get('batch')}, {meta.get('image_size')}x{meta.get('image_size')} images"
        f"{' (quick mode)' if meta.get('quick') else ''}; cudnn.benchmark {meta.get('cudnn_benchmark')}, "
        f"TF32 convs {meta.get('cudnn_conv_tf32')}; run {meta.get('date') or data.get('datetime')}",
    ]
    peaks = meta.get("roofline_peaks")
    if peaks:
        lines.append(f"- roofline floor from {peaks['device']} peaks: {peaks['tensor_flops'] / 1e12:.0f} TFLOP/s "
                     f"bf16/fp16, {peaks['tf32_flops'] / 1e12:.0f} TF32, {peaks['fp32_flops'] / 1e12:.0f} fp32, "
                     f"{peaks['bytes_per_s'] / 1e12:.1f} TB/s")
    else:
        lines.append("- no peak figures for this device: no roofline column")
    return lines


def render_document(data: dict, chart: Path | None) -> str:
    meta = _meta(data)
    title = f"# fusedres benchmarks: {meta.get('gpu') or 'CPU'}, {(meta.get('date') or '')[:10]}"
    parts = [title, ""] + describe_run(data) + [
        "", "Columns are explained in bench/README.md; `vs eager` > 1 means faster than eager PyTorch.", "",
    ]
    parts += ["## Summary", "", render_summary(load_rows(data)), "", "## Every case", ""]
    if chart is not None:
        parts += [f"![speedup vs eager]({chart.name})", ""]
    return "\n".join(parts + [render_tables(load_rows(data))])


def render_compare(a: dict, b: dict, a_name: str, b_name: str) -> str:
    """Per-row ratio of two runs: A's median time over B's (> 1: B is faster)."""
    a_rows = {(r["group"], r["extra_info"]["competitor"]): r["extra_info"] for r in load_rows(a)}
    b_rows = {(r["group"], r["extra_info"]["competitor"]): r["extra_info"] for r in load_rows(b)}
    parts = [f"# fusedres benchmarks: {b_name} vs {a_name}", "", f"A = {a_name}:"] + describe_run(a)
    parts += ["", f"B = {b_name}:"] + describe_run(b) + [""]
    if _meta(a).get("gpu") != _meta(b).get("gpu"):
        parts += ["**The runs are on different devices: the ratios compare machines as well as commits.**", ""]
    parts += ["`A/B` is A's median time over B's: above 1, B is faster.", ""]
    header = ["case", "competitor", "A ms", "B ms", "A/B"]
    merged = load_rows(a) + [r for r in load_rows(b) if (r["group"], r["extra_info"]["competitor"]) not in a_rows]
    for (suite, mode, dtype), cases in by_section(merged).items():
        table = []
        for case, per_competitor in cases.items():
            for i, competitor in enumerate(ordered(per_competitor)):
                group = f"{suite} | {mode} | {dtype} | {case}"
                a_info, b_info = a_rows.get((group, competitor)), b_rows.get((group, competitor))
                ratio = DASH if a_info is None or b_info is None else f"{a_info['median_ms'] / b_info['median_ms']:.2f}"
                table.append([case if i == 0 else "", competitor,
                              _figure(a_info and a_info["median_ms"]), _figure(b_info and b_info["median_ms"]), ratio])
        parts += [f"### {suite} · {mode} · {dtype}", ""] + markdown_table(header, table, right_from=2) + [""]
    return "\n".join(parts)


SPEEDUP_TICKS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100)


def render_chart(rows: list[dict], path: Path) -> bool:
    """Horizontal bars of each competitor's speedup over eager, one panel per table, on a log
    axis from 1x (right: faster than eager, left: slower); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import NullLocator
    except ImportError:
        return False
    panels = []
    for section, cases in by_section(rows).items():
        competitors = ordered({c for per in cases.values() if "eager" in per for c in per} - {"eager"})
        if competitors:
            panels.append((section, cases, competitors, 0.9 + 0.14 * len(cases) * len(competitors)))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(p[3] for p in panels)),
                             gridspec_kw={"height_ratios": [p[3] for p in panels]}, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((suite, mode, dtype), cases, competitors, _) in zip(axes[:, 0], panels):
        bar = 0.8 / len(competitors)
        speedups_seen = [1.0]
        handles = []
        for j, competitor in enumerate(competitors):
            ys, speedups, unclear = [], [], []
            for i, per in enumerate(cases.values()):
                if competitor in per and "eager" in per:
                    ratio, supported = versus(per[competitor], per["eager"])
                    ys.append(i - 0.4 + bar * (j + 0.5))
                    speedups.append(ratio)
                    unclear.append(supported is False)
            speedups_seen += speedups
            color = colors[_rank(competitor) % len(colors)]
            bars = ax.barh(ys, [v - 1 for v in speedups], left=1, height=bar, color=color)
            handles.append(Patch(color=color, label=competitor))
            for rectangle, hatched in zip(bars, unclear):
                if hatched:  # the spread does not support this ratio
                    rectangle.set(alpha=0.35, hatch="///", edgecolor=color)
        low, high = min(min(speedups_seen) / 1.2, 0.7), max(max(speedups_seen) * 1.2, 1.6)
        ticks = [t for t in SPEEDUP_TICKS if low <= t <= high]
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels=[f"{t:g}x" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(low, high)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(cases)), labels=list(cases), fontsize=7)
        ax.set_ylim(len(cases) - 0.5, -0.5)
        ax.set_title(f"{suite} · {mode} · {dtype}: speedup over eager PyTorch (hatched, pale: the spread "
                     "swallows the ratio)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (pytest bench/ --benchmark-json FILE)")
    parser.add_argument("--compare", type=Path, metavar="OTHER", help="a second JSON: per-row ratios of the two runs")
    parser.add_argument("--out", type=Path, help="markdown to write (default: RESULTS.md; with --compare: stdout)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())

    if args.compare:
        text = render_compare(data, json.loads(args.compare.read_text()), args.results.name, args.compare.name)
        if args.out:
            args.out.write_text(text)
            print(f"wrote {args.out}")
        else:
            print(text)
        return 0

    out = args.out or args.results.with_suffix(".md")
    chart = None
    if not args.no_chart:
        chart = out.with_suffix(".png")
        if render_chart(load_rows(data), chart):
            print(f"wrote {chart}")
        else:
            chart = None
            print("no chart: matplotlib is not installed here (or no row has an eager baseline); render it "
                  f"later on a machine with matplotlib: python bench/report.py {args.results}")
    out.write_text(render_document(data, chart))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
