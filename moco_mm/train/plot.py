"""`moco-mm plot RUN_DIR [RUN_DIR ...]`: pictures of runs from their metrics.jsonl.

    moco-mm plot runs/demo                              # -> runs/demo/plots/*.png
    moco-mm plot runs/a runs/b --out plots/             # the runs overlaid, one legend entry each
    moco-mm plot runs/a --metrics loss,R@1,grad_norm    # any metrics.jsonl key, or a panel name

One PNG per panel (PANEL.png, 640x400 px at the default --dpi 100) plus overview.png, every
panel in one grid. The default panels: loss, temperature, held-out R@1 (eval/i2t_R@1 solid,
eval/t2i_R@1 dashed), samples/s and the data wait fraction, over optimizer steps. A panel no
run has is skipped with a note. A missing or empty metrics.jsonl is an error; a malformed
line (a torn last line from a kill, say) is skipped with a warning naming the file and line.

Matplotlib draws on its Agg canvas (no display, no pyplot state). Exit status: 0 written,
2 bad input or nothing to draw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path


class PlotError(Exception):
    """Bad input: the message names the file (and line)."""


@dataclass(frozen=True)
class Panel:
    name: str  # file name stem and --metrics name
    title: str
    keys: tuple[str, ...]  # metrics.jsonl keys drawn in this panel (line styles in order)
    ylabel: str = ""


PANELS = {p.name: p for p in (
    Panel("loss", "training loss (i2t + t2i)", ("loss",), "loss"),
    Panel("temperature", "temperature", ("temperature",), "T"),
    Panel("R@1", "held-out R@1 (i2t solid, t2i dashed)", ("eval/i2t_R@1", "eval/t2i_R@1"), "R@1 (%)"),
    Panel("samples_per_s", "throughput", ("samples_per_s",), "samples/s"),
    Panel("data_wait_frac", "fraction of each step waiting for data", ("data_wait_frac",), "fraction"),
)}
DEFAULT_PANELS = tuple(PANELS)
STYLES = ("-", "--", ":", "-.")
PANEL_INCHES = (6.4, 4.0)


@dataclass
class Run:
    path: Path  # the metrics.jsonl read
    label: str
    records: list[dict]  # one per step, sorted by step (a later line for a step wins)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                steps.append(r["step"])
                values.append(float(v))
        return steps, values


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of one metrics.jsonl by step (the last line for a step wins, as in
    TensorBoard). Malformed lines are skipped with a warning naming `path:line`."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {path.parent} a run directory?)")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            warn(f"{path}:{n}: not JSON ({e.msg}); line skipped")
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            warn(f"{path}:{n}: no integer 'step'; line skipped")
            continue
        by_step[step] = record
    if not by_step:
        raise PlotError(f"{path}: no logged step (the file is empty or has no valid line)")
    return [by_step[s] for s in sorted(by_step)]


def _labels(paths: list[Path]) -> list[str]:
    """The run directory names, with as many parent directories as it takes to tell them apart."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same directory twice


def load_runs(run_dirs: list[Path], warn=None) -> list[Run]:
    files = [d / "metrics.jsonl" if d.is_dir() or not d.name.endswith(".jsonl") else d for d in run_dirs]
    labels = _labels([f.parent for f in files])
    return [Run(f, label, read_metrics(f, warn)) for f, label in zip(files, labels)]


def resolve_panels(names: list[str]) -> list[Panel]:
    """Panel names (see PANELS) or any metrics.jsonl key (a panel of its own)."""
    return [PANELS.get(n) or Panel(n.replace("/", "_"), n, (n,), n) for n in names]


def _draw(ax, panel: Panel, runs: list[Run]) -> bool:
    """Draw `panel` on `ax`; False if no run has any of its keys."""
    colors = [f"C{i % 10}" for i in range(len(runs))]
    drawn = False
    for run, color in zip(runs, colors):
        for key, style in zip(panel.keys, STYLES * len(panel.keys)):
            steps, values = run.series(key)
            if not steps:
                continue
            label = run.label if len(panel.keys) == 1 else f"{run.label} {key.split('/')[-1]}"
            ax.plot(steps, values, style, color=color, label=label, marker="o" if len(steps) <= 30 else None,
                    markersize=3, linewidth=1.2)
            drawn = True
    if not drawn:
        return False
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if panel.name == "data_wait_frac":
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7, loc="best")
    return True


def plot_runs(runs: list[Run], panels: list[Panel], out: Path, dpi: int = 100, note=None) -> list[Path]:
    """Write PANEL.png for every panel some run has, and overview.png (all of them in a
    grid); returns the paths written. Panels no run has are skipped with `note`."""
    note = note or (lambda msg: print(f"note: {msg}", file=sys.stderr))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("moco-mm plot needs matplotlib, which is not installed: pip install 'moco-mm[logging]' "
                        "(or 'matplotlib>=3.8')") from None
    have = []
    for panel in panels:
        if any(run.series(k)[0] for run in runs for k in panel.keys):
            have.append(panel)
        else:
            note(f"no run logged {' or '.join(panel.keys)}: the {panel.name} panel is skipped")
    if not have:
        raise PlotError("nothing to draw: no run logged any of " + ", ".join(p.name for p in panels))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in have:
        fig = Figure(figsize=PANEL_INCHES, dpi=dpi, layout="constrained")
        _draw(fig.add_subplot(), panel, runs)
        path = out / f"{panel.name.replace('@', '_at_')}.png"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    cols = min(len(have), 3 if len(have) > 4 else 2)
    rows = math.ceil(len(have) / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols * 0.75, PANEL_INCHES[1] * rows * 0.75), dpi=dpi,
                 layout="constrained")
    for i, panel in enumerate(have, 1):
        _draw(fig.add_subplot(rows, cols, i), panel, runs)
    path = out / "overview.png"
    fig.savefig(path, dpi=dpi)
    written.append(path)
    return written


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="moco-mm plot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PNG pictures of one or more runs from their metrics.jsonl, runs overlaid.",
        epilog=f"panels (--metrics): {', '.join(DEFAULT_PANELS)} (R@1: eval/i2t_R@1 and eval/t2i_R@1); "
               "any other metrics.jsonl key (grad_norm, eval/zeroshot_top1, ...) is drawn in a panel of its own")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the PNGs go (default: RUN_DIR/plots for one run, ./plots for several)")
    p.add_argument("--metrics", default=",".join(DEFAULT_PANELS),
                   help="comma-separated panels or metrics.jsonl keys (default: %(default)s)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch; a panel is 6.4 x 4 inches")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    if not names:
        print("plot error: --metrics: no metric named", file=sys.stderr)
        return 2
    first = args.runs[0] if not args.runs[0].name.endswith(".jsonl") else args.runs[0].parent
    out = args.out or (first / "plots" if len(args.runs) == 1 else Path("plots"))
    try:
        runs = load_runs(args.runs)
        written = plot_runs(runs, resolve_panels(names), out, dpi=args.dpi)
    except PlotError as e:
        print(f"plot error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
