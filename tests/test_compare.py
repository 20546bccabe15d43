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
