"""tools/critic_probe.py: the positive control for the critic -- localisation of the most negative
TD errors against the known edit of a mutant, its chance rate, the within-problem AUC, the edit
spans that data.mutate records, and the tool end to end on a tiny value model and MBPP-like tasks
labelled by a stand-in executor (no sandbox)."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import char_tokenizer, tiny_model_json

import data
import train_critic
from support import config
from tools import critic_probe as probe

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- localisation -----------------------------------------------------------------------------

def test_topk_hit_by_hand():
    d = [0.1, -0.5, 0.0, -0.2, 0.3]      # most negative: position 1, then 3, then 2
    assert probe.topk_hit(d, [1], 1) == 1.0
    assert probe.topk_hit(d, [3], 1) == 0.0  # second most negative: a top-1 miss ...
    assert probe.topk_hit(d, [3], 3) == 1.0  # ... and a top-3 hit
    assert probe.topk_hit(d, [2], 3) == 1.0  # the third
    assert probe.topk_hit(d, [0, 4], 3) == 0.0  # the two largest: a top-3 miss
    assert probe.topk_hit(d, [], 3) == 0.0
    assert probe.topk_hit([0.2, -0.1], [0], 3) == 1.0  # fewer positions than k: all of them are in


def test_topk_hit_breaks_ties_at_random():
    # position 0 is certainly in the top 3 (a miss); 2 slots left for 3 tied zeros, one a hit:
    # P(hit) = 1 - C(2, 2) / C(3, 2) = 2/3
    assert probe.topk_hit([-1.0, 0.0, 0.0, 0.0], [2], 3) == pytest.approx(2 / 3)
    assert probe.topk_hit([-1.0, 0.0, 0.0, 0.0], [2], 1) == 0.0
    assert probe.topk_hit([0.0, 0.0, 0.0, 0.0], [2], 1) == pytest.approx(1 / 4)  # constant V: chance


def test_chance_rate_by_hand():
    # 5 positions, 2 of them hits: one uniform draw hits with 2/5; three distinct draws miss
    # only if all three are among the 3 misses: 1 - C(3, 3) / C(5, 3) = 1 - 1/10
    assert probe.chance_hit(5, 2, 1) == pytest.approx(0.4)
    assert probe.chance_hit(5, 2, 3) == pytest.approx(0.9)
    assert probe.chance_hit(2, 1, 3) == 1.0 and probe.chance_hit(5, 0, 3) == 0.0
    for n, h in ((5, 2), (7, 1), (9, 4)):  # a constant δ scores exactly chance
        for k in (1, 3):
            assert probe.topk_hit(np.zeros(n), list(range(h)), k) == pytest.approx(probe.chance_hit(n, h, k))
    loc = probe.localisation([0.1, -0.5, 0.0, -0.2, 0.3], [3, 4])
    assert loc == pytest.approx({"top1": 0.0, "top3": 1.0, "chance_top1": 0.4, "chance_top3": 0.9})


def test_hit_tokens_window_and_spans():
    # tokens: "abc" "de" "f" "ghi", then EOS (position 4): 5 positions
    ranges = [(0, 3), (3, 5), (5, 6), (6, 9)]
    assert probe.hit_tokens(ranges, (3, 4), 0, 5) == [1]
    assert probe.hit_tokens(ranges, (3, 4), 2, 5) == [1, 2, 3]
    assert probe.hit_tokens(ranges, (4, 6), 1, 5) == [1, 2, 3]  # a span over two tokens, + 1 after
    assert probe.hit_tokens(ranges, (2, 4), 0, 5) == [0, 1]     # straddling a token boundary
    assert probe.hit_tokens(ranges, (7, 8), 2, 5) == [3, 4]     # the window stops at the last position (EOS)
    assert probe.hit_tokens(ranges, (5, 5), 0, 5) == [2]        # an empty span (dropped line): the next character
    assert probe.hit_tokens(ranges, (9, 9), 2, 5) == []         # nothing there
    # the window's edge: the most negative δ exactly `window` tokens after the edit hits, one more misses
    d = [0.0, 0.1, 0.0, 0.0, 0.0]
    for pos, window, hit in ((3, 2, 1.0), (4, 2, 0.0), (4, 3, 1.0), (1, 0, 1.0), (2, 0, 0.0)):
        dd = list(d)
        dd[pos] = -1.0
        assert probe.topk_hit(dd, probe.hit_tokens(ranges, (3, 4), window, 5), 1) == hit, (pos, window)


def test_token_ranges_tile_the_text(tmp_path):
    tok = char_tokenizer(tmp_path / "tok")
    text = "a <= b\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert probe.token_ranges(tok, text, ids) == [(i, i + 1) for i in range(len(text))]

    class Trimming:  # a tokenizer whose offsets leave a token's leading space out (byte-level BPE)
        is_fast = True

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            return {"input_ids": [5, 6, 7], "offset_mapping": [(0, 2), (3, 5), (6, 8)]}
    r = probe.token_ranges(Trimming(), "ab cd ef", [5, 6, 7])
    assert r == [(0, 2), (2, 5), (5, 8)]
    assert probe.hit_tokens(r, (2, 2), 0, 4) == [1]  # the space before "cd" belongs to "cd"


# ---- within-problem AUC -----------------------------------------------------------------------

def test_within_problem_auc_by_hand():
    assert probe.within_problem_auc(0.9, [0.2, 0.5]) == 1.0   # the reference wins
    assert probe.within_problem_auc(0.3, [0.5]) == 0.0        # it loses
    assert probe.within_problem_auc(0.4, [0.4]) == 0.5        # a tie counts 1/2
    assert probe.within_problem_auc(0.5, [0.2, 0.9, 0.5]) == pytest.approx(0.5)

    def prog(final, prompt, hits=None):
        return {"c": {"final": final, "prompt": prompt, "deltas": np.array([0.0, -1.0, 0.0])}, "hits": hits}
    problems = [{"ref": prog(0.9, 0.6), "mutants": [prog(0.2, 0.6, [1])]},   # wins: 1
                {"ref": prog(0.3, 0.2), "mutants": [prog(0.5, 0.2, [0])]},   # loses: 0
                {"ref": prog(0.4, 0.7), "mutants": [prog(0.4, 0.7, [2])]}]   # ties: 1/2
    m = probe.summarize(problems, lambda p: p["c"])
    assert m["within_auc"] == pytest.approx(0.5) and m["within_auc_prompt"] == 0.5 and m["prompt_spread"] == 0
    # pooled over the 3 references and 3 mutants: 0.9 beats all 3, 0.3 and 0.4 beat 0.2, 0.4 ties 0.4
    assert m["pooled_auc"] == pytest.approx(5.5 / 9)
    assert (m["top1"], m["n_problems"], m["n_mutants"]) == (pytest.approx(1 / 3), 3, 3)
    assert m["chance_top1"] == pytest.approx(1 / 3) and m["chance_top3"] == 1.0


# ---- the edit spans data.mutate records -------------------------------------------------------

CODE = ("def f(a, b):\n    s = 0\n    for i in range(a, b + 1):\n        if i % 2 == 0 and i > 3:\n"
        "            s += i * 2\n    x = min(s, 10)  # a < b\n    return x")


def check_span(code, kind, mutant, span, ref_span):
    (s, e), (rs, re_) = span, ref_span
    assert s == rs and 0 <= s <= e <= len(mutant) and re_ <= len(code)
    assert mutant[:s] == code[:s] and mutant[e:] == code[re_:], (kind, span, ref_span)  # equal outside the edit
    old, new = code[rs:re_], mutant[s:e]
    if kind == "operator":
        assert data._OP_SWAPS[old] == new
    elif kind == "name":
        assert data._NAME_SWAPS[old] == new
    elif kind == "constant":
        assert old.isdigit() and abs(int(new) - int(old)) == 1
    else:
        assert kind == "drop_line" and new == "" and old.strip() and old.count("\n") == 1


def test_mutate_records_the_edit_span():
    muts = data.mutate(CODE, 100, random.Random(0), with_spans=True)
    assert {k for k, *_ in muts} == {"operator", "name", "constant", "drop_line"}
    for kind, m, span, ref_span in muts:
        check_span(CODE, kind, m, span, ref_span)
    # the spans change nothing else: the same mutants, in the same order, from the same rng
    assert [(k, m) for k, m, *_ in muts] == data.mutate(CODE, 100, random.Random(0))
    last = [x for x in muts if x[0] == "drop_line" and "x = min" in CODE[x[3][0]:x[3][1]]]
    assert last and last[0][2] == (CODE.index("    x = min"),) * 2  # the gap: where the next line now starts
    # a dropped last line takes the newline before it; its empty span sits at the end
    code = "def g(x):\n    y = x\n    y += 1"
    (kind, m, span, ref_span), = [x for x in data.mutate(code, 20, random.Random(0), with_spans=True)
                                  if x[0] == "drop_line" and x[1] == "def g(x):\n    y = x"]
    assert span == (len(m), len(m)) and code[ref_span[0]:ref_span[1]] == "\n    y += 1"


def test_mutate_spans_hold_on_all_of_mbpp_train():
    for r in data.load_mbpp_rows(None, "train"):
        code = r["code"].replace("\r\n", "\n")
        for kind, m, span, ref_span in data.mutate(code, 6, random.Random(r["task_id"]), with_spans=True):
            check_span(code, kind, m, span, ref_span)


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def run_programs(programs):
    """A stand-in for the sandbox: runs the (test-written, trusted) programs in-process."""
    out = []
    for p in programs:
        try:
            exec(compile(p, "<program>", "exec"), {})
            out.append(True)
        except Exception:
            out.append(False)
    return out


def mbpp_tasks(path, ids):
    """MBPP-schema tasks with a few mutable sites, their tests computed from the reference."""
    rows = []
    for t in ids:
        i = t % 7
        code = (f"def f(x):\r\n    y = x + {i}\r\n    if y > 3 and x < 10:\r\n        y = y * 2\r\n"
                f"    return y")
        env = {}
        exec(code.replace("\r\n", "\n"), env)
        rows.append({"task_id": t, "text": f"Write f{t}.", "code": code, "test_setup_code": "",
                     "test_list": [f"assert f({x}) == {env['f'](x)}" for x in (1, 6, 20)], "challenge_test_list": []})
    return _write(path, rows)


def test_mbpp_mutants_rows_carry_the_span(tmp_path):
    mbpp = mbpp_tasks(tmp_path / "mbpp.jsonl", range(601, 604))
    old = tmp_path / "cache" / "mbpp_train_mutants3_seed0.jsonl"  # a cache of the old format, by its old name
    os.makedirs(old.parent)
    old.write_text(json.dumps({"prompt": "p", "completion": "c", "problem": "MBPP/601", "kind": "reference",
                               "passed": True}) + "\n")
    path = data.mbpp_mutants(mbpp, "train", per_task=3, cache_dir=str(tmp_path / "cache"), executor=run_programs)
    assert path != str(old) and path.endswith(f"_v{data.MUTANTS_FORMAT}.jsonl")
    rows = data.read_jsonl(path)
    refs = {r["problem"]: r for r in rows if r["kind"] == "reference"}
    assert len(refs) == 3 and all("mutated_span" not in r and r["passed"] for r in refs.values())
    muts = [r for r in rows if r["kind"] != "reference"]
    assert len(muts) == 9 and any(not r["passed"] for r in muts)
    for r in muts:
        ref = refs[r["problem"]]["completion"]
        assert "\r" not in r["completion"] and r["completion"].endswith("\n[DONE]")
        check_span(ref, r["kind"], r["completion"], r["mutated_span"], r["reference_span"])


# ---- the tool end to end ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def value_run(tmp_path_factory):
    """A tiny value model trained (a few steps of train_critic.py stage 1) on MBPP-like tasks and
    their mutants, labelled in-process."""
    tmp = tmp_path_factory.mktemp("probe")
    char_tokenizer(tmp / "tok")
    model_json = tiny_model_json(tmp / "model.json")
    cfg = json.load(open(model_json))
    json.dump(cfg | {"max_position_embeddings": 2048}, open(model_json, "w"))
    # train's tasks 601-616, validation's 511-514, and the prompt split's 2-4 (eval.py's 3-shot prompt)
    mbpp = mbpp_tasks(tmp / "mbpp.jsonl", [2, 3, 4] + list(range(601, 617)) + list(range(511, 515)))
    train_args = [f"--data.path={mbpp}", "--data.mutants_per_task=3", f"--data.label_cache={tmp / 'labels'}",
                  "--data.max_seq_len=400", "--data.eval_frac=0.25", "--train.seed=3"]
    data.mbpp_mutants(mbpp, "train", 3, 3, 0, str(tmp / "labels"), executor=run_programs)  # the labels, cached
    train_critic.main([f"--model.policy={model_json}", f"--model.tokenizer={tmp / 'tok'}", "--stages=value",
                       "--value.train_layers=-1", "--value.max_steps=4", "--value.global_batch=8",
                       "--value.micro_batch=8", "--value.lr=3e-3", "--value.warmup_steps=1", "--value.eval_every=0",
                       f"--value.out_dir={tmp / 'value'}", "--train.device=cpu", "--mlflow.enabled=false"]
                      + train_args)
    return tmp, mbpp, train_args


def probe_argv(tmp, train_args, *extra):
    return [str(tmp / "value"), "--train_args=" + " ".join(train_args), f"--label_cache={tmp / 'labels'}",
            "--random_heads=4", "--batch_size=8", "--device=cpu", *extra]


def test_probe_end_to_end(value_run, capsys):
    tmp, mbpp, train_args = value_run
    report = probe.main(probe_argv(tmp, train_args), executor=run_programs)
    out = capsys.readouterr().out
    assert "| trained |" in out and "| chance |" in out and "untrained (random head, mean of 4)" in out
    saved = json.load(open(tmp / "value" / "critic_probe.json"))
    assert (tmp / "value" / "critic_probe.md").read_text().count("| trained |") == 1
    assert saved["metrics"]["trained"]["n_mutants"] == report["metrics"]["trained"]["n_mutants"] > 0
    # only the value model's held-out problems (its split, replayed), checked against what it recorded
    meta = json.load(open(tmp / "value" / train_critic.VALUE_CONFIG))
    assert saved["problems"]["heldout"] == 4 and 0 < saved["problems"]["probed"] <= 4
    check = saved["heldout_check"]
    assert check["recomputed"]["eval/n"] == meta["heldout"]["eval/n"] == meta["labelled_data"]["heldout_examples"]
    assert check["recomputed"]["eval/auc"] == pytest.approx(meta["heldout"]["eval/auc"], abs=1e-6)
    rows, _ = data.load_labelled("jsonl", data.mbpp_mutants(mbpp, "train", 3, 3, 0, str(tmp / "labels")))
    from transformers import AutoTokenizer
    items, _ = data.tokenize_labelled(AutoTokenizer.from_pretrained(str(tmp / "value")), rows, 400)
    names = sorted({r["problem"] for r in rows})
    held = {names[it[3]] for it in data.split_by_problem(items, 0.25, 3)[1]}
    assert len(held) == 4 and {x["problem"] for x in saved["mutants"]} <= held
    m, t = saved["metrics"], saved["metrics"]["trained"]
    assert t["within_auc_prompt"] == 0.5 and t["prompt_spread"] == 0.0  # the sanity check: a shared prompt
    assert all(0 <= m[row][key] <= 1 for row in ("trained", "random_head", "chance")
               for key in ("within_auc", "pooled_auc", "top1", "top3"))
    muts = saved["mutants"]
    assert m["chance"]["top1"] == pytest.approx(np.mean([len(x["hits"]) / x["n_positions"] for x in muts]))
    assert t["top1"] == pytest.approx(np.mean([x["top1"] for x in muts]))
    for x in muts:  # every failing mutant's hits cover its edit
        assert x["hits"] and x["kind"] in ("operator", "name", "constant", "drop_line")
    # the failing mutants only: the passing ones are counted and left out
    c = saved["counts"]
    assert c["mutants_failing"] + c["mutants_passing"] == sum(k["failing"] + k["passing"] for k in c["by_kind"].values())


def test_probe_disjoint_split_and_samples_format(value_run, tmp_path):
    tmp, mbpp, train_args = value_run
    out = tmp_path / "p.json"
    report = probe.main(probe_argv(tmp, train_args, "--tasks=split", "--mbpp_split=validation",
                                   "--prompt_format=samples", "--mutants_per_task=4", "--max_seq_len=1200", f"--out={out}"),
                        executor=run_programs)
    assert out.exists() and (tmp_path / "p.md").exists()
    assert report["problems"]["mbpp_tasks"] == 4 and report["problems"]["excluded_training"] == 0
    assert report["prompt_format"] == "samples"
    assert all(x["problem"] in {f"MBPP/{t}" for t in range(511, 515)} for x in report["mutants"])
    # the training problems of its own split are left out with --tasks=split; --kinds picks mutation kinds
    again = probe.main(probe_argv(tmp, train_args, "--tasks=split", "--kinds=operator,constant",
                                  f"--out={tmp_path / 'q.json'}"), executor=run_programs)
    assert again["problems"]["excluded_training"] == 12 and again["problems"]["kept"] == 4
    assert {x["kind"] for x in again["mutants"]} == {"operator", "constant"}
    with pytest.raises(config.ConfigError, match="'kinds'"):
        probe.main(probe_argv(tmp, train_args, "--kinds=operator,typo"), executor=run_programs)


def test_baseline_backbone(value_run, tmp_path):
    """The untrained heads on another backbone: here the value model's own directory read as a plain
    causal LM, which must give what the default (the value model's backbone) gives."""
    tmp, _, train_args = value_run
    own = probe.main(probe_argv(tmp, train_args, f"--out={tmp_path / 'a.json'}"), executor=run_programs)
    other = probe.main(probe_argv(tmp, train_args, f"--baseline_backbone={tmp / 'value'}", f"--out={tmp_path / 'b.json'}"),
                       executor=run_programs)
    a, b = own["metrics"]["random_head"], other["metrics"]["random_head"]
    assert b["backbone"] == str(tmp / "value") and "on " + str(tmp / "value") in (tmp_path / "b.md").read_text()
    assert {k: a[k] for k in ("within_auc", "pooled_auc", "top1", "top3")} == pytest.approx(
        {k: b[k] for k in ("within_auc", "pooled_auc", "top1", "top3")}, abs=1e-6)
    assert own["metrics"]["trained"] == other["metrics"]["trained"]


def test_probe_refuses_a_split_that_is_not_the_value_models(value_run):
    tmp, _, train_args = value_run
    wrong = [a for a in train_args if not a.startswith("--data.eval_frac")] + ["--data.eval_frac=0.5"]
    with pytest.raises(config.ConfigError, match="not the value model's"):
        probe.main(probe_argv(tmp, wrong), executor=run_programs)
    with pytest.raises(config.ConfigError, match="train_args"):
        probe.main(probe_argv(tmp, ["--data.bogus=1"]), executor=run_programs)


def test_help_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "tools.critic_probe", "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert out.returncode == 0, out.stderr
    for key in probe.ProbeConfig.__dataclass_fields__:
        assert f"--{key} " in out.stdout
    assert "a δ this many tokens after the edit still hits it" in out.stdout
