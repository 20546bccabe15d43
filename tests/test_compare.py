"""compare.py: means and differences against hand computation, bootstrap intervals against an
independent loop bootstrap and a normal approximation, the CLI end to end on results.json files."""
import json
import math
import random
import statistics

import pytest

from tools import compare

P, N = 40, 10  # problems, samples per problem


def counts(seed, p_solve):
    """Passing samples per problem: problem p is solved with probability p_solve[p]."""
    rng = random.Random(seed)
    return [sum(rng.random() < q for _ in range(N)) for q in p_solve]


EASY = [0.05 + 0.9 * (p % 7) / 6 for p in range(P)]
NTP = [counts(s, [q * 0.6 for q in EASY]) for s in (1, 2)]             # 2 seeds
RHO1 = [counts(10 + s, [min(1, q * 0.8) for q in EASY]) for s in (1, 2, 3)]  # 3 seeds


def arm(name, table):
    return {"name": name, "speculative": [], "heldout": [],
            "runs": {"humaneval": [{"path": f"{name}{s}", "per_problem": {f"HumanEval/{p}": (N, c)
                                                                         for p, c in enumerate(row)}}
                                   for s, row in enumerate(table)]}}


def p1(c):  # pass@1 = c / n; pass@10 with n = 10: solved at all
    return c / N


def loop_bootstrap(tables, B, seed, k_fn, ref_tables=None):
    """The two-way bootstrap written out: draw runs and problems by index with `random`."""
    rng = random.Random(seed)
    stats = []
    for _ in range(B):
        probs = [rng.randrange(P) for _ in range(P)]

        def grid(ts, probs=probs):
            runs = [rng.randrange(len(ts)) for _ in range(len(ts))]
            return sum(k_fn(ts[s][p]) for s in runs for p in probs) / (len(runs) * len(probs))
        stats.append(grid(tables) - (grid(ref_tables) if ref_tables else 0))
    stats.sort()
    return stats[int(0.025 * B)], stats[int(0.975 * B) - 1]


def test_means_and_differences_by_hand():
    rows = compare.summarize([arm("ntp", NTP), arm("rho1", RHO1)], "ntp", [1, 10], B=200)
    r_ntp, r_rho = rows
    mean = lambda t, f: sum(f(c) for row in t for c in row) / (len(t) * P)  # noqa: E731
    assert r_ntp["pass@1"] == pytest.approx(mean(NTP, p1), abs=1e-12)
    assert r_rho["pass@10"] == pytest.approx(mean(RHO1, lambda c: float(c > 0)), abs=1e-12)
    assert r_rho["diff@1"] == pytest.approx(mean(RHO1, p1) - mean(NTP, p1), abs=1e-12)
    assert "diff@1" not in r_ntp and r_rho["runs"] == 3 and r_rho["problems"] == P
    # pass@k is eval.py's estimator
    for n, c, k in [(10, 3, 1), (10, 3, 5), (200, 7, 10), (10, 0, 10), (10, 10, 10)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert compare.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(compare.pass_at_k(5, 1, 10))


@pytest.mark.parametrize("k", [1, 10])
def test_intervals_match_an_independent_bootstrap(k):
    f = p1 if k == 1 else (lambda c: float(c > 0))
    rows = compare.summarize([arm("ntp", NTP), arm("rho1", RHO1)], "ntp", [k], B=4000, seed=3)
    lo, hi = loop_bootstrap(RHO1, 4000, 7, f)
    assert rows[1][f"pass@{k}_ci"] == pytest.approx((lo, hi), abs=0.012)
    dlo, dhi = loop_bootstrap(RHO1, 4000, 8, f, ref_tables=NTP)
    assert rows[1][f"diff@{k}_ci"] == pytest.approx((dlo, dhi), abs=0.012)
    assert rows[1][f"pass@{k}_ci"][0] < rows[1][f"pass@{k}"] < rows[1][f"pass@{k}_ci"][1]


def test_one_run_matches_the_normal_approximation():
    """With one run the interval is the problem bootstrap: about mean ± 1.96 sd/√P."""
    row = compare.summarize([arm("x", RHO1[:1])], None, [1], B=10000)[0]
    xs = [p1(c) for c in RHO1[0]]
    half = 1.96 * statistics.pstdev(xs) / math.sqrt(P)
    lo, hi = row["pass@1_ci"]
    assert lo == pytest.approx(row["pass@1"] - half, abs=0.2 * half)
    assert hi == pytest.approx(row["pass@1"] + half, abs=0.2 * half)


def test_identical_single_runs_differ_by_exactly_zero():
    row = compare.summarize([arm("ntp", NTP[:1]), arm("same", NTP[:1])], "ntp", [1], B=500)[1]
    assert row["diff@1"] == 0 and row["diff@1_ci"] == (0.0, 0.0)


def test_deterministic_and_independent_of_other_arms():
    a = compare.summarize([arm("ntp", NTP), arm("rho1", RHO1)], "ntp", [1, 10], B=500)
    b = compare.summarize([arm("extra", NTP[:1]), arm("ntp", NTP), arm("rho1", RHO1)], "ntp", [1, 10], B=500)
    assert a == b[1:]


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _results(task, table_row, model, **extra):
    per = {f"{task}/{p}": {"n": N, "correct": c} for p, c in enumerate(table_row)}
    return {"pass@1": 0.0, "task": task, "model": model, "n_samples": N, "per_problem": per, **extra}


def test_cli_end_to_end(tmp_path, capsys):
    for name, table in (("ntp", NTP), ("rho1", RHO1)):
        for s, row in enumerate(table):
            run = tmp_path / f"{name}-s{s}"
            _write(run / "final" / "mtp_config.json", {"n_heads": 4, "heldout_ce": [1.0 + s, 2.0, 3.0, 4.0]})
            _write(run / "humaneval" / "results.json", _results("HumanEval", row, str(run / "final")))
            _write(run / "mbpp" / "results.json", _results("MBPP", row[::-1], str(run / "final")))
    _write(tmp_path / "rho1-s0" / "spec" / "results.json",
           _results("HumanEval", [0] * 5, "x", speculative={"tokens_per_forward": 1.5}) | {"task": "humaneval"})
    out = tmp_path / "cmp" / "table.md"
    rows = compare.main([f"--arms=ntp={tmp_path}/ntp-s*/*/results.json rho1={tmp_path}/rho1-s*",  # rho1: directories
                         "--B=300", f"--out={out}", "--mlflow.enabled=false"])
    assert [(r["arm"], r["task"], r["runs"]) for r in rows] == [
        ("ntp", "HumanEval", 2), ("ntp", "MBPP", 2), ("rho1", "HumanEval", 3), ("rho1", "MBPP", 3)]
    assert rows[2]["heldout_ce"] == [2.0, 2.0, 3.0, 4.0] and rows[2]["tokens_per_forward"] == 1.5
    md = out.read_text()
    assert "| rho1 | HumanEval | 3 | 40 | 10 |" in md and "Δpass@1 vs ntp" in md and "2.00/2.00/3.00/4.00" in md
    assert json.loads((tmp_path / "cmp" / "table.json").read_text())["rows"][2]["diff@1"] == rows[2]["diff@1"]
    assert "| rho1 | HumanEval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.main([f"--arms=ntp={tmp_path}/nothing-*/results.json", "--mlflow.enabled=false"])


# --------------------------------------------------------------------------------------------
# --plot: the forest plot
# --------------------------------------------------------------------------------------------

MTP = [counts(20 + s, [q * 0.55 for q in EASY]) for s in (1, 2, 3)]  # 3 seeds, a little below ntp
PNG = b"\x89PNG\r\n\x1a\n"


def _tree(root, arms, heldout=True):
    """results.json files of `arms` ({name: (table, CE offset)}) under root/NAME-sS/{humaneval,mbpp}/,
    each beside its checkpoint's mtp_config.json (with held-out CE per head when `heldout`)."""
    for name, (table, ce) in arms.items():
        for s, row in enumerate(table):
            run = root / f"{name}-s{s}"
            _write(run / "final" / "mtp_config.json",
                   {"n_heads": 2} | ({"heldout_ce": [1.0 + ce + 0.01 * s, 2.0]} if heldout else {}))
            _write(run / "humaneval" / "results.json", _results("HumanEval", row, str(run / "final")))
            _write(run / "mbpp" / "results.json", _results("MBPP", row[::-1], str(run / "final")))
    return " ".join(f"{name}={root}/{name}-s*" for name in arms)


@pytest.fixture
def drawn(monkeypatch):
    """The figures main draws (forest_figure, spied on)."""
    figs, real = [], compare.forest_figure
    monkeypatch.setattr(compare, "forest_figure", lambda *a, **kw: figs.append(real(*a, **kw)) or figs[-1])
    return figs


def _rows(ax):
    """The y-axis row names, top to bottom (also of panels that hide them to share the first's)."""
    return list(ax.yaxis.get_major_formatter().format_ticks(ax.get_yticks()))


def _points(ax):
    """x of the plotted points (the round markers), top row first."""
    return [float(line.get_xdata()[0]) for line in ax.lines if line.get_marker() == "o"]


def test_plot_writes_a_forest_png(tmp_path, drawn, capsys):
    arms = _tree(tmp_path, {"rho1": (RHO1, -0.05), "ntp": (NTP, 0.0), "mtp": (MTP, 0.02)})
    png = tmp_path / "fig" / "forest.png"
    rows = compare.main([f"--arms={arms}", "--ref=ntp", "--B=300", f"--out={tmp_path}/t.md", f"--plot={png}",
                         "--mlflow.enabled=false"])
    assert len(rows) == 6 and f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == PNG and 20_000 < len(data) < 2_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 9 * 150 and 600 < height < 2000  # 9 in at 150 dpi; two rows of panels

    (fig,) = drawn
    *tasks, ce = fig.axes
    assert [ax.get_title().split(" · ")[0] for ax in tasks] == ["HumanEval", "MBPP"]
    for ax, task in zip(tasks, ("HumanEval", "MBPP")):
        # exactly the arms other than the reference, in the table's order, top to bottom
        assert _rows(ax) == ["rho1", "mtp"]
        assert ax.get_xlabel() == "Δ pass@1 vs ntp (pp)"
        diffs = {r["arm"]: 100 * r["diff@1"] for r in rows if r["task"] == task and r["arm"] != "ntp"}
        assert _points(ax) == pytest.approx([diffs["rho1"], diffs["mtp"]])
    assert [t.get_text() for t in tasks[0].get_yticklabels()] == _rows(ce) == ["rho1", "mtp"]
    assert ce.get_xlabel().startswith("Δ head-0 held-out CE vs ntp")
    # the differences of the table's held-out CE (head 0, mean over seeds): about -0.05 and +0.02
    by_arm = {r["arm"]: r["heldout_ce"][0] for r in rows}
    assert _points(ce) == pytest.approx([by_arm["rho1"] - by_arm["ntp"], by_arm["mtp"] - by_arm["ntp"]])
    title = fig.get_suptitle()
    assert "95% percentile bootstrap" in title and "seeds (runs) per arm: rho1 3, ntp 2, mtp 3" in title
    assert "40 problems" in tasks[0].get_title()
    assert any("python -m tools.compare" in t.get_text() and "--plot=" in t.get_text() for t in fig.texts)


def test_plot_without_heldout_ce_or_pass_at_1_in_k(tmp_path, drawn):
    """No held-out CE: one row of panels; --k without 1 still plots the table's Δpass@1."""
    arms = _tree(tmp_path, {"ntp": (NTP, 0.0), "rho1": (RHO1, 0.0)}, heldout=False)
    png = tmp_path / "forest.png"
    compare.main([f"--arms={arms}", "--k=10", "--B=300", f"--out={tmp_path}/t.md", f"--plot={png}",
                  "--mlflow.enabled=false"])
    assert png.read_bytes()[:8] == PNG
    (fig,) = drawn
    assert len(fig.axes) == 2 and all(ax.get_xlabel().startswith("Δ pass@1") for ax in fig.axes)
    rows = compare.summarize([compare.load_arm("ntp", f"{tmp_path}/ntp-s*"),
                              compare.load_arm("rho1", f"{tmp_path}/rho1-s*")], "ntp", [1, 10], B=300)
    assert _points(fig.axes[0]) == pytest.approx([100 * rows[2]["diff@1"]])


def test_heldout_differences():
    ce = lambda *xs: [[x, 9.0] for x in xs]  # noqa: E731  head 0 = x
    arms = [{"name": "ntp", "heldout": ce(1.0, 1.2)}, {"name": "a", "heldout": ce(0.9, 0.95, 1.0)},
            {"name": "one", "heldout": ce(1.5)}, {"name": "none", "heldout": []}]
    d = compare.heldout_diffs(arms, "ntp", B=2000)
    assert set(d) == {"a", "one"}  # not the reference, not an arm without held-out CE
    assert d["a"]["diff"] == pytest.approx(0.95 - 1.1) and (d["a"]["runs"], d["a"]["ref_runs"]) == (3, 2)
    lo, hi = d["a"]["ci"]
    assert -0.3 <= lo < d["a"]["diff"] < hi <= 0.0  # resampled means lie within the extremes: 0.9-1.2, 1.0-1.0
    assert d["one"]["diff"] == pytest.approx(0.4) and d["one"]["ci"] is None  # one checkpoint: no interval
    assert compare.heldout_diffs(arms, "ntp", B=2000) == d  # seeded
    assert compare.heldout_diffs(arms, "none", B=2000) == {}


@pytest.mark.parametrize("arms, ref, why", [
    ("ntp=nothing/* rho1=nothing/*", "", "--ref is empty"),
    ("ntp=nothing/* rho1=nothing/*", "rho2", "no arm is named 'rho2'"),
    ("ntp=nothing/*", "ntp", "no arm besides it"),
])
def test_plot_needs_a_reference_arm(tmp_path, capsys, arms, ref, why):
    """The plot shows differences: without a reference arm (or with nothing to compare to it) it is
    refused in one line, before any results.json is read (the globs here match nothing)."""
    args = [f"--arms={arms}", f"--ref={ref}", f"--plot={tmp_path}/p.png", "--mlflow.enabled=false"]
    with pytest.raises(compare.config.ConfigError, match=why) as e:
        compare.main(args)
    assert "\n" not in str(e.value) and "plot" in str(e.value)
    with pytest.raises(SystemExit) as exit_:
        compare.config.run_main(compare.main, args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and why in err
    assert not (tmp_path / "p.png").exists()


def test_plot_is_logged_to_mlflow(tmp_path, monkeypatch):
    """The PNG goes where the markdown and JSON go: the compare run's artifacts."""
    import contextlib
    import types
    logged = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = fake.set_experiment = fake.log_params = fake.log_metrics = lambda *a, **kw: None
    fake.start_run = lambda **kw: contextlib.nullcontext()
    fake.log_artifact = logged.append
    monkeypatch.setitem(__import__("sys").modules, "mlflow", fake)
    arms = _tree(tmp_path, {"ntp": (NTP, 0.0), "rho1": (RHO1, 0.0)})
    compare.main([f"--arms={arms}", "--B=200", f"--out={tmp_path}/t.md", f"--plot={tmp_path}/p.png"])
    assert logged == [f"{tmp_path}/t.md", f"{tmp_path}/t.json", f"{tmp_path}/p.png"]
