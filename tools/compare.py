"""
compare.py — one table of pass@k per arm with bootstrap intervals, from eval.py's results.json.

    python -m tools.compare --arms='base=out/cmp/eval/base ntp=out/cmp/eval/ntp-s* mtp=out/cmp/eval/mtp-s*' --ref=ntp
    python -m tools.compare --arms='ntp=out/cmp/eval/ntp-s*/*/results.json rho1=out/cmp/eval/rho1-s*/*/results.json' \\
                      --out=out/cmp/compare.md --B=5000 --mlflow.enabled=false

An arm is a name and one or more glob patterns (comma-separated; a directory means every
results.json under it): its runs -- usually one fine-tune per training seed, each evaluated by
eval.py. Runs are grouped by their `task` (humaneval, mbpp, ...), giving one row per arm and task:

  - pass@k: the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021) per problem and run,
    averaged over problems and runs (= the mean over seeds of eval.py's pass@k);
  - its 95% interval: a two-way bootstrap -- resample the runs (seeds) and, independently, the
    problems, with replacement, and take the percentile interval of the mean over the resampled
    grid; it covers both seed-to-seed and problem-to-problem variation;
  - the difference to the reference arm (--ref, default `ntp`: the next-token arm), paired by
    problem: each bootstrap draw resamples the problems once for both arms (and each arm's own
    runs independently), so problem difficulty cancels;
  - extras where present: held-out CE per head from training (`heldout_ce` in the checkpoint's
    mtp_config.json, or a heldout.json beside it), and self-speculative tokens per forward
    (results.json files of `eval.py --speculative` runs in the arm; they do not enter pass@k).

Prints the table, writes it as markdown (--out) with a JSON twin (same name, .json), optionally a
forest plot of the differences (--plot=PATH.png), and logs an MLflow run (metrics, the markdown and
plot as artifacts) unless --mlflow.enabled=false or MLflow is not installed.
The bootstrap is seeded per (arm, task) cell, so a cell's interval does not change when arms are
added or reordered.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shlex
import sys
import textwrap
import zlib
from dataclasses import dataclass, field

import numpy as np

from support import config, tracking


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021), eq. 1, as eval.pass_at_k (not imported: eval.py pulls in torch)."""
    if n < k:
        return math.nan
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

def expand(patterns: str) -> list[str]:
    """Comma-separated glob patterns (a directory matched: every results.json under it) -> sorted paths."""
    paths = []
    for pat in filter(None, (p.strip() for p in patterns.split(","))):
        found = []
        for m in glob.glob(pat, recursive=True):
            found += glob.glob(os.path.join(m, "**", "results.json"), recursive=True) if os.path.isdir(m) else [m]
        if not found:
            raise SystemExit(f"compare.py: {pat!r} matches no results.json")
        paths += found
    return sorted(dict.fromkeys(paths))


def read_heldout(results: dict, path: str) -> list[float] | None:
    """Held-out CE per head of the checkpoint a results.json evaluated: `heldout_ce` in its
    mtp_config.json, or heldout.json ({"heldout_ce": [...]} or a list) in it or beside it. Looked
    for at results["model"] (relative to the working directory or to the results file) and in
    final/ of the results file's parent directories."""
    here = os.path.dirname(os.path.abspath(path))
    model = str(results.get("model", ""))
    dirs = [model, os.path.join(here, model)] if model else []
    d = here
    for _ in range(3):
        dirs += [os.path.join(d, "final"), d]
        d = os.path.dirname(d)
    for d in dirs:
        for name in ("mtp_config.json", "heldout.json"):
            f = os.path.join(d, name)
            if os.path.isfile(f):
                with open(f) as fh:
                    v = json.load(fh)
                v = v.get("heldout_ce") if isinstance(v, dict) else v
                if isinstance(v, list) and v:
                    return [float(x) for x in v]
    return None


def load_arm(name: str, patterns: str) -> dict:
    """-> {"name", "runs": {task: [run]}, "speculative": [tokens per forward], "heldout": [[CE per head]]}.
    A run is {"path", "per_problem": {task_id: (n, c)}}."""
    arm = {"name": name, "runs": {}, "speculative": [], "heldout": []}
    for path in expand(patterns):
        with open(path) as f:
            r = json.load(f)
        if "per_problem" not in r or "task" not in r:
            raise SystemExit(f"compare.py: {path} is not an eval.py results.json (no per_problem/task)")
        if "speculative" in r:  # greedy, 1 sample: a speed measurement, not a pass@k run
            arm["speculative"].append(float(r["speculative"]["tokens_per_forward"]))
            continue
        per = {t: (int(v["n"]), int(v["correct"])) for t, v in r["per_problem"].items()}
        arm["runs"].setdefault(r["task"], []).append({"path": path, "per_problem": per})
        ce = read_heldout(r, path)
        if ce is not None and ce not in arm["heldout"]:  # one checkpoint, several tasks: count once
            arm["heldout"].append(ce)
    return arm


def matrix(runs: list[dict], k: int, problems: list[str]) -> np.ndarray:
    """pass@k of every run (rows) on every problem (columns)."""
    return np.array([[pass_at_k(*run["per_problem"][p], k) for p in problems] for run in runs], dtype=float)


def common_problems(runs: list[dict]) -> list[str]:
    """Problems every run evaluated, in the first run's order."""
    keep = set.intersection(*(set(r["per_problem"]) for r in runs))
    return [p for p in runs[0]["per_problem"] if p in keep]


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------

def cell_rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(n.encode()) for n in names])


def resample_counts(rng, n: int, B: int) -> np.ndarray:
    """[B, n]: how often each of n items is drawn in each of B resamples of size n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=B).astype(float)


def grid_means(X: np.ndarray, seed_counts: np.ndarray, problem_counts: np.ndarray) -> np.ndarray:
    """[B]: mean of X [S, P] over each resampled (seeds x problems) grid."""
    S, P = X.shape
    return np.einsum("bs,sp,bp->b", seed_counts, X, problem_counts) / (S * P)


def interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def summarize(arms: list[dict], ref: str | None, ks: list[int], B: int = 5000, seed: int = 0,
              level: float = 0.95) -> list[dict]:
    """One row per (arm, task): runs, problems, samples per problem, and per k the mean pass@k
    with its bootstrap interval and (for arms other than `ref`) the paired difference to `ref`."""
    by_name = {a["name"]: a for a in arms}
    rows = []
    for arm in arms:
        for task, runs in arm["runs"].items():
            problems = common_problems(runs)
            row = {"arm": arm["name"], "task": task, "runs": len(runs), "problems": len(problems),
                   "n_samples": sorted({n for r in runs for n, _ in r["per_problem"].values()}),
                   "dropped_problems": len(set().union(*(set(r["per_problem"]) for r in runs))) - len(problems),
                   "heldout_ce": np.mean(arm["heldout"], axis=0).tolist() if arm["heldout"] and
                   len({len(h) for h in arm["heldout"]}) == 1 else None,
                   "tokens_per_forward": float(np.mean(arm["speculative"])) if arm["speculative"] else None}
            rng = cell_rng(seed, arm["name"], task)
            sc, pc = resample_counts(rng, len(runs), B), resample_counts(rng, len(problems), B)
            other = by_name.get(ref, {}).get("runs", {}).get(task) if ref and arm["name"] != ref else None
            if other:
                shared = [p for p in problems if p in set(common_problems(other))]
                drng = cell_rng(seed, arm["name"], ref, task)
                d_sa, d_sr = resample_counts(drng, len(runs), B), resample_counts(drng, len(other), B)
                d_pc = resample_counts(drng, len(shared), B)
                row["paired_problems"] = len(shared)
            for k in ks:
                X = matrix(runs, k, problems)
                if np.isnan(X).any():
                    row[f"pass@{k}"] = None  # some run has fewer than k samples
                    continue
                row[f"pass@{k}"] = float(X.mean())
                row[f"pass@{k}_ci"] = interval(grid_means(X, sc, pc), level)
                if other:
                    Xa, Xr = matrix(runs, k, shared), matrix(other, k, shared)
                    if np.isnan(Xr).any():
                        continue
                    row[f"diff@{k}"] = float(Xa.mean() - Xr.mean())
                    row[f"diff@{k}_ci"] = interval(grid_means(Xa, d_sa, d_pc) - grid_means(Xr, d_sr, d_pc), level)
            rows.append(row)
    return rows


def heldout_diffs(arms: list[dict], ref: str, B: int = 5000, seed: int = 0, level: float = 0.95,
                  head: int = 0) -> dict[str, dict]:
    """Held-out CE of head `head`, each arm minus `ref` -> {arm: {"diff", "ci", "runs", "ref_runs"}}
    for the arms (not `ref`) where both have it. The difference is that of summarize's `heldout_ce`
    (the mean over an arm's checkpoints, i.e. training seeds); the interval resamples each arm's
    checkpoints independently (different training runs: nothing to pair), as the pass@k bootstrap
    resamples runs -- there are no problems here. "ci" is None when either arm has one checkpoint
    (no seed-to-seed variation to resample)."""
    by_name = {a["name"]: a for a in arms}
    base = [h[head] for h in by_name.get(ref, {}).get("heldout", []) if len(h) > head]
    out = {}
    for arm in arms:
        xs = [h[head] for h in arm["heldout"] if len(h) > head]
        if arm["name"] == ref or not xs or not base:
            continue
        a, r = np.array(xs), np.array(base)
        d = {"diff": float(a.mean() - r.mean()), "ci": None, "runs": len(a), "ref_runs": len(r)}
        if len(a) > 1 and len(r) > 1:
            rng = cell_rng(seed, arm["name"], ref, f"heldout_ce[{head}]")
            ca, cr = resample_counts(rng, len(a), B), resample_counts(rng, len(r), B)
            d["ci"] = interval(ca @ a / len(a) - cr @ r / len(r), level)
        out[arm["name"]] = d
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _pct(x, signed=False) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown(rows: list[dict], ks: list[int], ref: str | None, level: float) -> str:
    pc = f"{round(100 * level)}%"
    head = ["arm", "task", "runs", "problems", "n"] + [f"pass@{k} % [{pc} CI]" for k in ks]
    if ref:
        head += [f"Δpass@{k} vs {ref} (pp) [{pc} CI]" for k in ks]
    extras = [c for c in ("heldout_ce", "tokens_per_forward") if any(r.get(c) is not None for r in rows)]
    head += [{"heldout_ce": "held-out CE per head", "tokens_per_forward": "spec. tokens/forward"}[c] for c in extras]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["arm"], r["task"], str(r["runs"]), str(r["problems"]), "/".join(map(str, r["n_samples"]))]
        for k in ks:
            v = r.get(f"pass@{k}")
            cells.append("n < k" if v is None else f"{_pct(v)} [{_pct(r[f'pass@{k}_ci'][0])}, {_pct(r[f'pass@{k}_ci'][1])}]")
        if ref:
            for k in ks:
                d = r.get(f"diff@{k}")
                cells.append("—" if d is None else
                             f"{_pct(d, True)} [{_pct(r[f'diff@{k}_ci'][0], True)}, {_pct(r[f'diff@{k}_ci'][1], True)}]")
        for c in extras:
            v = r.get(c)
            cells.append("—" if v is None else "/".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _forest_panel(ax, names: list[str], cells: dict, scale: float, better: int, xlabel: str, title: str,
                  fmt: str, missing: str):
    """One forest panel: a row per name (top to bottom), a point at cells[name]["diff"] * scale with its
    interval cells[name]["ci"] (None: no interval); filled when the interval excludes 0 (blue when
    the sign is `better`, red when not), hollow grey when it includes 0 or there is none."""
    ax.axvline(0, color="0.35", lw=0.9, zorder=1)
    for y, name in enumerate(names):
        c = cells.get(name)
        if c is None:
            ax.text(0, y, f"  {missing}", va="center", ha="left", fontsize=7, color="0.45")
            continue
        d, ci = c["diff"] * scale, c.get("ci")
        lo, hi = (ci[0] * scale, ci[1] * scale) if ci else (d, d)
        excludes = ci is not None and (lo > 0 or hi < 0)
        colour = ("tab:blue" if d * better > 0 else "tab:red") if excludes else "0.45"
        if ci:
            ax.plot([lo, hi], [y, y], color=colour, lw=1.8, solid_capstyle="butt", zorder=2)
            ax.plot([lo, hi], [y, y], "|", color=colour, ms=7, zorder=2)
        ax.plot([d], [y], "o", ms=6.5, zorder=3, markeredgecolor=colour, markeredgewidth=1.4,
                markerfacecolor=colour if excludes else "white")
        label = f"{d:{fmt}}" + (f"  [{lo:{fmt}}, {hi:{fmt}}]" if ci else "  (1 seed: no interval)")
        ax.annotate(label, (d, y), xytext=(0, 6.5), textcoords="offset points", ha="center", va="bottom",
                    fontsize=6.5, color="0.2")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.45, -0.75)  # first arm on top; room above it for its label
    lo, hi = ax.get_xlim()
    lo, hi = min(lo, 0), max(hi, 0)
    pad = 0.15 * max(hi - lo, 1e-9)  # room for the value labels, which are centred on their points
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7.5)
    ax.grid(axis="x", color="0.9", lw=0.6, zorder=0)
    ax.set_axisbelow(True)


def forest_figure(rows: list[dict], ref: str, level: float, B: int, heldout: dict | None = None,
                  caption: str = ""):
    """The forest plot of summarize's rows (a matplotlib Figure, Agg canvas): one panel per task with a
    row per arm other than `ref` -- Δpass@1 vs `ref` in points with its paired bootstrap interval --
    and, when `heldout` (heldout_diffs) has any arm, a panel below spanning them all with Δ head-0
    held-out CE vs `ref` (one value per checkpoint, so the same for every task)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    arms = list(dict.fromkeys(r["arm"] for r in rows if r["arm"] != ref))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    n = max(len(arms), 1)
    h1 = 2.2 + 0.35 * n
    h2 = 1.5 + 0.35 * n if heldout else 0.0
    fig = Figure(figsize=(9, h1 + h2), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if heldout else 1, len(tasks), height_ratios=[h1, h2] if heldout else None)
    pc = f"{round(100 * level)}%"
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(grid[0, j])
        cells = {r["arm"]: {"diff": r["diff@1"], "ci": r["diff@1_ci"]}
                 for r in rows if r["task"] == task and r["arm"] != ref and r.get("diff@1") is not None}
        paired = sorted({r["paired_problems"] for r in rows if r["task"] == task and "paired_problems" in r})
        probs = "–".join(map(str, dict.fromkeys(paired[:1] + paired[-1:]))) if paired else "0"
        _forest_panel(ax, arms, cells, 100, +1, f"Δ pass@1 vs {ref} (pp)", f"{task} · {probs} problems", "+.1f",
                      "no runs on this task")
        if j:
            ax.tick_params(labelleft=False)
    if heldout:
        ax = fig.add_subplot(grid[1, :])
        _forest_panel(ax, arms, heldout, 1, -1, f"Δ head-0 held-out CE vs {ref} (nats; lower is better)",
                      "held-out CE, head 0: one value per training run, not per task; the interval resamples seeds",
                      "+.3f", "no held-out CE")
    seeds = {}
    for r in rows:
        seeds.setdefault(r["arm"], set()).add(r["runs"])
    seeds_txt = ", ".join(f"{a} {min(s)}" + (f"–{max(s)}" if len(s) > 1 else "") for a, s in seeds.items())
    fig.suptitle(f"Difference to {ref} with {pc} percentile bootstrap intervals (B = {B} resamples of seeds and "
                 f"problems; pass@1 paired by problem)\nseeds (runs) per arm: {seeds_txt}", fontsize=9)
    legend = [Line2D([], [], ls="", marker="o", color="tab:blue", label=f"{pc} interval excludes 0, better"),
              Line2D([], [], ls="", marker="o", color="tab:red", label=f"{pc} interval excludes 0, worse"),
              Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="0.45",
                     label=f"{pc} interval includes 0 (or none)")]
    # below what the layout engine arranges: a strip with the key, and the command under it
    lines = textwrap.wrap(caption, 150)
    cap = (len(lines) * 6.5 * 1.35 + 4) / (72 * (h1 + h2)) if lines else 0.0
    strip = cap + 16 / (72 * (h1 + h2))
    fig.get_layout_engine().set(rect=(0, strip, 1, 1 - strip))
    fig.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, cap), ncols=3, fontsize=7, frameon=False,
               borderaxespad=0.2)
    if lines:
        fig.text(0.01, 0.5 * cap, "\n".join(lines), fontsize=6.5, color="0.35", ha="left", va="center")
    return fig


def log_mlflow(rows, args, md_path, json_path, plot_path=None):
    try:
        import mlflow
    except ImportError:
        print("compare.py: mlflow is not installed; no MLflow run", file=sys.stderr)
        return
    if args.mlflow.tracking_uri:
        mlflow.set_tracking_uri(args.mlflow.tracking_uri)
    mlflow.set_experiment(args.mlflow.experiment)
    with mlflow.start_run(run_name="compare"):
        mlflow.log_params({"arms": ",".join(a.split("=", 1)[0] for a in args.arm), "ref": args.ref or "",
                           "k": ",".join(map(str, args.k)), "B": args.B, "seed": args.seed, "level": args.level})
        metrics = {}
        for r in rows:
            for key in [f"pass@{k}" for k in args.k] + [f"diff@{k}" for k in args.k]:
                if r.get(key) is not None:
                    name = f"{r['arm']}.{r['task']}.{key.replace('@', '_at_')}"
                    lo, hi = r[key + "_ci"]
                    metrics |= {name: r[key], name + "_lo": lo, name + "_hi": hi}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(md_path)
        mlflow.log_artifact(json_path)
        if plot_path:
            mlflow.log_artifact(plot_path)


@dataclass
class CompareConfig:
    arms: str = ""                   # space-separated NAME=GLOB[,GLOB] (table order); a directory = its results.json files
    ref: str = "ntp"                 # arm the differences are taken to ("" = none)
    k: str | int = "1,10"            # comma-separated k of pass@k
    B: int = 5000                    # bootstrap resamples
    seed: int = 0                    # the bootstrap's random draws
    level: float = 0.95              # interval coverage
    out: str = "out/compare/compare.md"  # markdown file (JSON beside it)
    plot: str = ""                   # forest plot PNG: Δpass@1 vs ref with its interval per task and arm,
                                     #   and Δ head-0 held-out CE where present; needs ref ("" = no plot)
    mlflow: tracking.MlflowConfig = field(default_factory=lambda: tracking.MlflowConfig(experiment="wmtp-compare"))


def parse_args(argv=None) -> CompareConfig:
    """The project's one dialect (config.parse_config): --key=value, or a YAML file of the same keys."""
    args = config.parse_config(CompareConfig, sys.argv[1:] if argv is None else argv)
    args.arm = args.arms.split()
    if not args.arm:
        raise config.ConfigError("config key 'arms': give at least one NAME=GLOB, e.g. --arms='ntp=out/cmp/eval/ntp-s*'")
    bad = [a for a in args.arm if "=" not in a or not a.split("=", 1)[0]]
    if bad:
        raise config.ConfigError(f"config key 'arms': each arm is NAME=GLOB[,GLOB], got {bad}")
    names = [a.split("=", 1)[0] for a in args.arm]
    if len(set(names)) != len(names):
        raise config.ConfigError(f"config key 'arms': names must be unique, got {names}")
    if args.plot and (args.ref not in names or len(names) < 2):
        why = ("--ref is empty" if not args.ref else f"no arm is named {args.ref!r} (arms: {' '.join(names)})"
               if args.ref not in names else "there is no arm besides it")
        raise config.ConfigError(f"config key 'plot': the plot shows differences to the reference arm, but {why}")
    try:
        args.k = sorted({int(k) for k in str(args.k).split(",") if k.strip()})
    except ValueError:
        raise config.ConfigError(f"config key 'k': expected comma-separated integers, got {args.k!r}") from None
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    arms = [load_arm(*a.split("=", 1)) for a in args.arm]
    ref = args.ref or None
    if ref and ref not in {a["name"] for a in arms}:
        print(f"compare.py: no arm named {ref!r}; no differences (--ref=NAME names the reference)", file=sys.stderr)
        ref = None
    rows = summarize(arms, ref, args.k, args.B, args.seed, args.level)
    for arm in arms:
        for task, runs in arm["runs"].items():
            print(f"{arm['name']} / {task}: {len(runs)} runs: {', '.join(r['path'] for r in runs)}")
    for r in rows:
        if r["dropped_problems"]:
            print(f"note: {r['arm']} / {r['task']}: {r['dropped_problems']} problems not evaluated by every run "
                  f"are left out", file=sys.stderr)
        if r.get("paired_problems") is not None and r["paired_problems"] < r["problems"]:
            print(f"note: {r['arm']} / {r['task']}: the difference to {ref} uses the {r['paired_problems']} "
                  f"problems both evaluated", file=sys.stderr)
    md = markdown(rows, args.k, ref, args.level)
    note = (f"\nMean over runs (seeds) and problems; {round(100 * args.level)}% percentile bootstrap intervals "
            f"over runs and problems (B = {args.B}, seed {args.seed}); differences paired by problem"
            + (f", to `{ref}`" if ref else "") + "; pass@k by the unbiased estimator.\n")
    print("\n" + md + note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md + note)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump({"rows": rows, "ref": ref, "k": args.k, "B": args.B, "seed": args.seed, "level": args.level,
                   "arms": {a["name"]: {t: [r["path"] for r in runs] for t, runs in a["runs"].items()} for a in arms}},
                  f, indent=2)
    print(f"wrote {args.out} and {json_path}")
    if args.plot:
        # the cells' draws do not depend on k, so pass@1 alone gives the table's diff@1 when k has no 1
        prows = rows if 1 in args.k else summarize(arms, ref, [1], args.B, args.seed, args.level)
        fig = forest_figure(prows, ref, args.level, args.B, heldout_diffs(arms, ref, args.B, args.seed, args.level),
                            caption="python -m tools.compare " + shlex.join(argv))
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")
    if args.mlflow.enabled:
        log_mlflow(rows, args, args.out, json_path, args.plot or None)
    return rows


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
