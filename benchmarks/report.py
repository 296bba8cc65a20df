"""Regenerate BENCHMARKS.md and its plots from every result file in benchmarks/results/.

    python benchmarks/report.py [--results DIR] [--out BENCHMARKS.md] [--plots DIR] [--no-plots]
    python benchmarks/report.py --compare OLD.json NEW.json     (one benchmark at two commits: new / old)

A result file (benchmarks/common.py: write_result) is a JSON object

    {"benchmark": name, "provenance": {device, device_type, torch, triton, cuda, commit, date, ...},
     <scalars, e.g. the measured copy bandwidth or matmul peak>, "results": [row, ...], <other row lists>}

and each row names its implementation ("impl") and mixes two kinds of fields, told apart by their names:

    metrics  time `ms` / `*_ms`; throughput `*_gbs`, `*_tflops`, `*_per_s`; `*pct*` (% of a measured peak);
             `*mem*` (peak memory); stored `speedup*` fields are left out, the report recomputes ratios
    label    `op`, `backend` (what the impl name says; bench_scaling writes them for the auto table)
    info     the fields a file lists in "info_fields" (they describe a row without defining its case)
    config   everything else (sizes, dtype, flags); rows with equal config form one *case*.

Rows are split into sections by their first time field and their set of config fields (so attention's
forward rows and its attention_received rows get a table each). In every case and for every time field

    ratio(impl) = min over the baselines b of the case of  time(b) / time(impl)     (> 1: faster than the best)

where the baselines are the implementations that are not zigspark's own (torch SDPA, eager attention,
torch.topk, the sequential loop, the dense FFN, mamba-ssm, ...): the file's "baselines" list when it has one,
else every impl whose name does not mention zigspark, spark or hiprune. Files are grouped by device (GPUs
first) and each table cites its file. Plots (plots/<file>.png): time against the size that varies, log-log,
one line per implementation. JSON files that are not benchmark results (e.g. `zigspark check --json`) are
listed, not tabulated.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = RESULTS / "plots"
OUT = ROOT / "BENCHMARKS.md"
AUTO_TABLE = ROOT / "python" / "zigspark" / "auto_backends.json"

ZIGSPARK_TAGS = ("zigspark", "spark", "hiprune")
# the size a plot puts on its x axis: the first of these that varies in the section
SIZE_KEYS = ("L", "seqlen", "N", "tokens", "d", "dim", "image_size", "resolution", "num", "steps", "batch", "keep")
TIME_LABELS = {"fwd_ms": "forward", "fwd_bwd_ms": "forward + backward", "received_ms": "attention_received",
               "ms": "time", "step_ms": "training step", "sample_ms": "sampling run", "infer_ms": "inference"}


# ---------------------------------------------------------------------------------------------- fields


def kind(key: str, info: tuple = ()) -> str:
    """What a row field is: time, throughput, pct, memory, stored (a ratio we recompute), impl, label, info
    (a field the file lists in "info_fields": it describes the row, e.g. the tokens a pruning kept, without
    making it a case of its own) or config."""
    if key == "impl":
        return "impl"
    if key in info:
        return "info"
    if key in ("op", "backend"):
        return "label"  # what the impl name already says (bench_scaling names them for the auto table)
    if key == "ms" or key.endswith("_ms"):
        return "time"
    if key.startswith("speedup") or "_speedup" in key:
        return "stored"
    if key.endswith(("gbs", "tflops", "_per_s")):
        return "throughput"
    if "pct" in key:
        return "pct"
    if "mem" in key:
        return "memory"
    return "config"


def is_baseline(impl: str, declared: list | None = None) -> bool:
    if declared is not None:
        return impl in declared
    return not any(tag in impl.lower() for tag in ZIGSPARK_TAGS)


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Section:
    """Rows of one file that share their first time field and their config fields."""

    time_key: str
    config_keys: tuple
    op: str | None = None
    rows: list = field(default_factory=list)
    info: tuple = ()

    def keys_of(self, wanted: str) -> list:
        return list(dict.fromkeys(k for r in self.rows for k in r if kind(k, self.info) == wanted))

    @property
    def varying(self) -> list:
        """Config fields that change between rows (the others go into the caption)."""
        return [k for k in self.config_keys if len({json.dumps(r.get(k)) for r in self.rows}) > 1]

    @property
    def constant(self) -> dict:
        return {k: self.rows[0].get(k) for k in self.config_keys if k not in self.varying}

    def case(self, row) -> tuple:
        return tuple(json.dumps(row.get(k)) for k in self.config_keys)


@dataclass
class ResultFile:
    path: Path
    data: dict

    @property
    def benchmark(self) -> str:
        return str(self.data.get("benchmark", self.path.stem))

    @property
    def provenance(self) -> dict:
        return self.data.get("provenance") or {}

    @property
    def device(self) -> str:
        return str(self.provenance.get("device", "unknown device"))

    @property
    def device_type(self) -> str:
        return str(self.provenance.get("device_type", "unknown"))

    @property
    def baselines(self) -> list | None:
        declared = self.data.get("baselines")
        return list(declared) if isinstance(declared, list) else None

    @property
    def scalars(self) -> dict:
        skip = {"benchmark", "provenance", "results", "baselines", "info_fields"}
        out = {}
        for k, v in self.data.items():
            if k in skip or isinstance(v, list):
                continue
            out[k] = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v
        return out

    @property
    def extra_tables(self) -> dict:
        """Top-level lists of rows other than "results" (e.g. bench_scaling's fitted exponents)."""
        return {k: v for k, v in self.data.items() if k != "results" and isinstance(v, list) and v
                and all(isinstance(r, dict) for r in v)}

    @property
    def info_fields(self) -> tuple:
        declared = self.data.get("info_fields")
        return tuple(declared) if isinstance(declared, list) else ()

    def sections(self) -> list[Section]:
        out: dict[tuple, Section] = {}
        info = self.info_fields
        for row in self.data.get("results", []):
            if not isinstance(row, dict) or "impl" not in row:
                continue
            times = [k for k in row if kind(k, info) == "time"]
            if not times:
                continue
            config = tuple(k for k in row if kind(k, info) == "config")
            key = (row.get("op"), times[0], config)
            out.setdefault(key, Section(times[0], config, row.get("op"), info=info)).rows.append(row)
        return list(out.values())


def load_results(results_dir: Path) -> tuple[list[ResultFile], list[Path]]:
    """Benchmark result files (sorted by device, benchmark, date) and the other JSON files found."""
    files, others = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            others.append(path)
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), list) and "benchmark" in data:
            files.append(ResultFile(path, data))
        else:
            others.append(path)
    files.sort(key=lambda f: (f.device_type != "cuda", f.device, f.benchmark, str(f.provenance.get("date", ""))))
    return files, others


def ratios(section: Section, time_key: str, baselines: list | None) -> list:
    """Per row of the section: best baseline time / this row's time in its case, or None."""
    best: dict[tuple, float] = {}
    for row in section.rows:
        value = row.get(time_key)
        if isinstance(value, (int, float)) and value > 0 and is_baseline(row["impl"], baselines):
            case = section.case(row)
            best[case] = min(best.get(case, float("inf")), value)
    out = []
    for row in section.rows:
        value, ref = row.get(time_key), best.get(section.case(row))
        out.append(ref / value if ref is not None and isinstance(value, (int, float)) and value > 0 else None)
    return out


# ---------------------------------------------------------------------------------------------- markdown


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(header: list, rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def section_table(section: Section, baselines: list | None) -> list[str]:
    varying = section.varying
    times = section.keys_of("time")
    ratio_cols = {t: ratios(section, t, baselines) for t in times}
    ratio_cols = {t: r for t, r in ratio_cols.items() if any(v is not None for v in r)}
    others = section.keys_of("throughput") + section.keys_of("pct") + section.keys_of("memory")
    info = section.keys_of("info")
    header = [*varying, "impl", *info]
    for t in times:
        header.append(t)
        if t in ratio_cols:
            header.append(f"{t} ratio")
    header += others
    cases = list(dict.fromkeys(map(section.case, section.rows)))
    order = sorted(range(len(section.rows)), key=lambda i: cases.index(section.case(section.rows[i])))
    body = []
    for i in order:
        row = section.rows[i]
        name = row["impl"] + (" *(baseline)*" if is_baseline(row["impl"], baselines) else "")
        cells = [fmt(row.get(k)) for k in varying] + [fmt(name)] + [fmt(row.get(k)) for k in info]
        for t in times:
            cells.append(fmt(row.get(t)))
            if t in ratio_cols:
                r = ratio_cols[t][i]
                cells.append("—" if r is None else f"{r:.2f}×")
        cells += [fmt(row.get(k)) for k in others]
        body.append(cells)
    return markdown_table(header, body)


def provenance_line(rf: ResultFile) -> str:
    p = rf.provenance
    parts = [f"commit `{p.get('commit')}`" + (" (dirty worktree)" if p.get("dirty_worktree") else ""),
             f"date {p.get('date')}", f"torch {p.get('torch')}", f"triton {p.get('triton')}",
             f"CUDA {p.get('cuda')}", f"Python {p.get('python')}"]
    if p.get("device_type") == "cpu":
        parts.append(f"{p.get('cpu_threads')} threads")
    for key in ("capability", "sms", "memory_gib"):
        if key in p:
            parts.append(f"{key} {p[key]}")
    return "; ".join(parts)


def file_section(rf: ResultFile, out_dir: Path, plot: Path | None) -> list[str]:
    rel = Path(os.path.relpath(rf.path, out_dir)).as_posix()
    lines = [f"### {rf.benchmark}", "", f"Source: [`{rel}`]({rel}) — {provenance_line(rf)}.", ""]
    if rf.scalars:
        lines += ["Parameters: " + ", ".join(f"{k} = {fmt(v)}" for k, v in rf.scalars.items()) + ".", ""]
    baselines = rf.baselines
    for section in rf.sections():
        label = ", ".join(TIME_LABELS.get(t, t) for t in section.keys_of("time"))
        constant = ", ".join(f"{k} {fmt(v)}" for k, v in section.constant.items())
        op = f"{section.op}: " if section.op else ""
        lines += [f"**{op}{label}**" + (f" ({constant})" if constant else ""), ""]
        lines += section_table(section, baselines) + [""]
    for name, rows in rf.extra_tables.items():
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += [f"**{name}**", ""]
        lines += markdown_table(keys, [[fmt(r.get(k)) for k in keys] for r in rows]) + [""]
    if plot is not None:
        prel = Path(os.path.relpath(plot, out_dir)).as_posix()
        lines += [f"![{rf.benchmark} on {rf.device}]({prel})", ""]
    return lines


def auto_table_section(table_path: Path) -> list[str]:
    try:
        table = json.loads(Path(table_path).read_text())["ops"]
    except (OSError, ValueError, KeyError):
        return []
    lines = ["## backend='auto'", "",
             f"`{Path(os.path.relpath(table_path, ROOT)).as_posix()}`, derived from these result files by "
             "`python benchmarks/auto_table.py`: the preference order per op and device type (the first backend "
             "that can run wins) and the evidence for it.", ""]
    rows = []
    for op, entry in table.items():
        evidence = entry.get("evidence", {})
        for device in [k for k in entry if isinstance(entry[k], list)]:
            rows.append([op, device, " → ".join(entry[device]), fmt(evidence.get(device, ""))])
    return lines + markdown_table(["op", "device", "order", "evidence"], rows) + [""]


def render(files: list[ResultFile], others: list[Path], out: Path, plots: dict | None = None,
           table_path: Path | None = AUTO_TABLE) -> str:
    plots = plots or {}
    out_dir = Path(out).resolve().parent
    lines = ["# Benchmarks", "",
             "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.json: do not edit by hand. -->",
             "",
             "Generated by `python benchmarks/report.py` from every result file in `benchmarks/results/` — do not "
             "edit by hand; run the benchmarks (`make bench`) and regenerate. Every figure below is in the result "
             "file the table cites, with the device, library versions and commit that produced it.", "",
             "*ratio* columns: the time of the fastest baseline measured in the same file for the same case (same "
             "sizes, dtype and flags) divided by this implementation's time, so > 1 means faster than the best "
             "baseline. Baselines, marked *(baseline)*, are the implementations that are not zigspark's (torch "
             "SDPA, eager attention, torch.topk, the sequential loop, the dense FFN, ...) unless the file lists "
             "its own. `*_pct_*` columns are percentages of a peak the benchmark measured on the same device "
             "(copy bandwidth or matmul throughput; see each file's parameters).", ""]
    devices = list(dict.fromkeys(f.device for f in files))
    if not devices:
        lines += ["No result files yet.", ""]
    else:
        lines += ["Devices: " + "; ".join(f"{d} ({sum(f.device == d for f in files)} files)" for d in devices) + ".",
                  ""]
    for device in devices:
        lines += [f"## {device}", ""]
        for rf in files:
            if rf.device == device:
                lines += file_section(rf, out_dir, plots.get(rf.path))
    if table_path is not None:
        lines += auto_table_section(table_path)
    if others:
        lines += ["## Other files", "", "JSON files in the results folder that are not benchmark results:", ""]
        lines += [f"- `{Path(os.path.relpath(p, out_dir)).as_posix()}`" for p in others] + [""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- plots


def _x_key(section: Section):
    varying = section.varying
    numeric = [k for k in section.config_keys
               if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in section.rows)]
    for candidates in (varying, section.config_keys):
        for key in [*SIZE_KEYS, *candidates]:
            if key in candidates and key in numeric:
                return key
    return None


def _series_label(row, section: Section, x_key) -> str:
    """The impl, plus the varying config fields that the x value does not already determine."""
    extra = []
    for key in section.varying:
        if key == x_key:
            continue
        per_x = {}
        for r in section.rows:
            per_x.setdefault(json.dumps(r.get(x_key)), set()).add(json.dumps(r.get(key)))
        if any(len(v) > 1 for v in per_x.values()):
            extra.append(f"{key}={fmt(row.get(key))}")
    return row["impl"] + (f" ({', '.join(extra)})" if extra else "")


def plot_file(rf: ResultFile, path: Path) -> Path | None:
    """Time against size, one line per implementation, a panel per time field of each section."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(s, t) for s in rf.sections() for t in s.keys_of("time")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (section, time_key) in zip(axes[0], panels):
        x_key = _x_key(section)
        series: dict[str, list] = {}
        for i, row in enumerate(section.rows):
            if isinstance(row.get(time_key), (int, float)):
                x = row.get(x_key) if x_key else 0
                series.setdefault(_series_label(row, section, x_key), []).append((x, row[time_key]))
        xs = set()
        for label, pts in series.items():
            pts.sort()
            xs.update(p[0] for p in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_key or "")
        ax.set_ylabel(f"{time_key} (ms)")
        ax.set_title(f"{section.op or rf.benchmark}: {TIME_LABELS.get(time_key, time_key)}", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(rf.device, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- compare


def compare(old: Path, new: Path) -> str:
    """Markdown table of every (case, impl, time field) two result files of one benchmark share — e.g. the
    same benchmark at two commits — with new / old (< 1: the new run is faster)."""
    a, b = (ResultFile(Path(p), json.loads(Path(p).read_text())) for p in (old, new))
    if a.benchmark != b.benchmark:
        raise ValueError(f"compare needs two files of one benchmark, got {a.benchmark!r} and {b.benchmark!r}")

    def keyed(rf):
        out = {}
        for section in rf.sections():
            for row in section.rows:
                for t in section.keys_of("time"):
                    if isinstance(row.get(t), (int, float)):
                        config = ", ".join(f"{k} {fmt(row.get(k))}" for k in section.config_keys)
                        out[(config, row["impl"], t)] = row[t]
        return out

    before, after = keyed(a), keyed(b)
    rows = []
    for (config, impl, t), old_ms in before.items():
        new_ms = after.get((config, impl, t))
        if new_ms is not None and old_ms > 0:
            rows.append([config, fmt(impl), t, fmt(old_ms), fmt(new_ms), f"{new_ms / old_ms:.2f}×"])
    head = (f"{a.benchmark}: `{a.path.name}` (commit {a.provenance.get('commit')}, {a.device}) → "
            f"`{b.path.name}` (commit {b.provenance.get('commit')}, {b.device}); {len(rows)} shared measurements")
    return "\n".join([head, "", *markdown_table(["case", "impl", "time", "old", "new", "new / old"], rows)]) + "\n"


# ---------------------------------------------------------------------------------------------- main


def build(results_dir: Path = RESULTS, out: Path = OUT, plots_dir: Path | None = PLOTS,
          table_path: Path | None = AUTO_TABLE) -> tuple[Path, list[Path]]:
    """Write the report (and plots unless plots_dir is None); returns the report's path and the plots."""
    files, others = load_results(Path(results_dir))
    plots = {}
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        wanted = {plots_dir / f"{rf.path.stem}.png" for rf in files}
        for stale in plots_dir.glob("*.png"):
            if stale not in wanted:
                stale.unlink()  # the plot of a result file that is gone
        for rf in files:
            written = plot_file(rf, plots_dir / f"{rf.path.stem}.png")
            if written is not None:
                plots[rf.path] = written
    Path(out).write_text(render(files, others, Path(out), plots, table_path))
    return Path(out), list(plots.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    parser.add_argument("--out", type=Path, default=OUT, help="the markdown report to write")
    parser.add_argument("--plots", type=Path, default=PLOTS, help="folder for the PNG plots")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="print new/old times of two result files of one benchmark (e.g. two commits) instead")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare), end="")
        return 0
    out, plots = build(args.results, args.out, None if args.no_plots else args.plots)
    print(f"wrote {out} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
