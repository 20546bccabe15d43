"""
curves.py — held-out CE over training steps, per arm: the curve every training run records in
its out_dir/heldout.jsonl (common.report_heldout), one line per arm (the mean over its seeds, the
seeds' range as a band), and a table of the final held-out CE per head with each arm's difference
to a reference arm and its interval over seeds (tools/compare.py's `heldout_diffs`).

    python -m tools.curves --runs='ntp=out/noisy/ntp-s* mtp=out/noisy/mtp-s* rho1=out/noisy/rho1-s*' \\
        --ref=mtp --plot=out/noisy/clean_ce.png --out=out/noisy/clean_ce.md
"""
from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

import common
from support import config
from tools import compare


@dataclass
class CurvesConfig:
    runs: str = ""                   # space-separated NAME=GLOB[,GLOB]: each match a training run's out_dir (table order)
    ref: str = ""                    # arm the final CE differences are taken to ("" = none)
    head: int = 0                    # the head whose curve is drawn
    title: str = "held-out CE"       # the plot's title (say which held-out set)
    plot: str = ""                   # PNG of the curves ("" = none)
    out: str = ""                    # markdown of the final-CE table ("" = print only)
    B: int = 5000                    # bootstrap resamples of the seeds
    level: float = 0.95              # interval level


def read_runs(spec: str) -> list[dict]:
    """NAME=GLOB,... -> [{"name", "dirs", "curves": [{step: [CE per head]} per run], "heldout": [final CE per run]}]."""
    arms = []
    for part in spec.split():
        name, _, patterns = part.partition("=")
        dirs = sorted(d for p in patterns.split(",") for d in glob.glob(p)
                      if os.path.isfile(os.path.join(d, common.HELDOUT_LOG)))
        if not name or not dirs:
            raise config.ConfigError(f"config key 'runs': {part!r} names no run with a {common.HELDOUT_LOG}")
        curves = []
        for d in dirs:
            with open(os.path.join(d, common.HELDOUT_LOG)) as f:
                curve = {}
                for line in f:
                    r = json.loads(line)
                    curve[int(r["step"])] = r["heldout_ce"]  # a resumed run's repeat of a step: the last one
            curves.append(curve)
        arms.append({"name": name, "dirs": dirs, "curves": curves,
                     "heldout": [c[max(c)] for c in curves]})
    return arms


def table(arms: list[dict], ref: str, B: int, level: float) -> str:
    """Final held-out CE per head (mean over seeds) and, per head, the difference to `ref` with its
    interval over seeds."""
    n_heads = max(len(h) for a in arms for h in a["heldout"])
    diffs = [compare.heldout_diffs(arms, ref, B, 0, level, head=k) if ref else {} for k in range(n_heads)]
    lines = [f"| arm | runs | final held-out CE per head | Δ vs {ref or '—'} per head [{level:.0%} interval over seeds] |",
             "|---|---|---|---|"]
    for a in arms:
        ce = np.array([h for h in a["heldout"]], dtype=float)
        means = " / ".join(f"{x:.3f}" for x in ce.mean(0))
        ds = []
        for k in range(ce.shape[1]):
            d = diffs[k].get(a["name"])
            ds.append("—" if d is None else f"{d['diff']:+.3f}" + (f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else ""))
        lines.append(f"| {a['name']} | {len(a['heldout'])} | {means} | {' / '.join(ds)} |")
    return "\n".join(lines)


def plot(arms: list[dict], head: int, title: str, path: str, command: str):
    """One line per arm (mean over its seeds at each step all of them reached), the seeds' range as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for a in arms:
        steps = sorted(set.intersection(*(set(c) for c in a["curves"])))
        ys = np.array([[c[s][head] for s in steps] for c in a["curves"]])
        line, = ax.plot(steps, ys.mean(0), marker="o", ms=3, label=f"{a['name']} ({len(ys)} seeds)")
        if len(ys) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"head {head} held-out CE (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, command, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)


def main(argv):
    cfg = config.parse_config(CurvesConfig, argv)
    arms = read_runs(cfg.runs)
    if cfg.ref and cfg.ref not in [a["name"] for a in arms]:
        raise config.ConfigError(f"config key 'ref': no arm named {cfg.ref!r}")
    md = table(arms, cfg.ref, cfg.B, cfg.level)
    print(md)
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(md + "\n")
    if cfg.plot:
        plot(arms, cfg.head, cfg.title, cfg.plot, "python -m tools.curves " + " ".join(argv))
        print(f"wrote {cfg.plot}")
    return arms


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
