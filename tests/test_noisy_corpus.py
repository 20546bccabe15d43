"""tools/noisy_corpus.py and the noise marks in data.py: the injector marks exactly the tokens it
inserts, reaches its token share, leaves prompts, the clean split and the validation split alone,
is deterministic; the per-token flag survives tokenize_examples / collate / step_batches in target
indexing; unmarked data batches exactly as before."""
import ast
import functools
import glob
import json
import ntpath
import pickle
import posixpath
import random
import shlex
import textwrap

import pytest
import torch

import data
import mtp
from tests.conftest import char_tokenizer
from tools import noisy_corpus as nc

TOL = 0.01  # the tool's default tolerance, the one the tests hold it to


def _corpus(n=40):
    """{prompt, completion} rows from real code: functions of a few stdlib modules, split after
    their def line (deterministic for an interpreter)."""
    return [dict(r) for r in _functions()[:n]]


@functools.lru_cache(maxsize=1)
def _functions():
    rows = []
    for mod in (textwrap, posixpath, shlex, ntpath, glob):
        with open(mod.__file__) as f:
            lines = f.read().split("\n")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef) and not node.decorator_list:
                src = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno])) + "\n"
                head, _, body = src.partition("\n")
                if head.startswith("def ") and head.endswith(":") and 3 <= body.count("\n") <= 30 and body.isascii():
                    rows.append({"id": f"{mod.__name__}.{node.name}", "prompt": head + "\n", "completion": body})
    assert len(rows) >= 40
    return rows


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE (the GPT-2 / SmolLM2 family) trained in-process on the test corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([r["prompt"] + r["completion"] for r in _corpus()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(str(path))
    tok.path = str(path)
    return tok


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    path = tmp_path_factory.mktemp("chars")
    tok = char_tokenizer(path)
    tok.path = str(path)
    return tok


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------
# The injector
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["bpe", "chars"])
@pytest.mark.parametrize("noise", ["lines:0.25", "subst:0.25", "shuffle:0.2", "lines:0.1,subst:0.1,shuffle:0.05"])
def test_marks_are_exactly_the_injected_tokens(request, which, noise):
    tok = request.getfixturevalue(which)
    rates = nc.parse_noise(noise)
    view = nc.ModelTokens(tok)
    totals = {"tokens": 0, **{k: 0 for k in nc.KINDS}}
    n_spans = dict.fromkeys(rates, 0)
    for i, row in enumerate(_corpus(12)):
        ed = nc.inject(row["completion"], rates, view, random.Random(i), totals)
        text, spans = ed.text, ed.spans()
        for _, _, k in spans:
            n_spans[k] += 1
        # the flags as training computes them (data.tokenize_marked, the row as the tool writes it)
        ids, mask, noise, _ = data.tokenize_marked(tok, row["prompt"], text, [[s, e] for s, e, _ in spans], 10 ** 6)
        n_p = mask.index(1)
        c_ids, c_noise = ids[n_p:-1], noise[n_p:-1]
        assert noise[:n_p] == [0] * n_p and noise[-1] == 0  # prompt and EOS never flagged
        marked = [t for t, f in zip(c_ids, c_noise) if f]
        unmarked = [t for t, f in zip(c_ids, c_noise) if not f]
        # the flagged tokens are exactly the injected text; the others exactly the clean text kept
        assert _decode(tok, marked) == "".join(text[s:e] for s, e, _ in spans)
        kept = [p for p in ed.pieces if p[1] is None]
        assert _decode(tok, unmarked) == "".join(p[0] for p in kept)
        # ... which is the clean completion, in order, less only what subst replaced / shuffle moved
        tiles = sorted([(o, t, None) for t, _, o in kept] + ed.removed)
        assert "".join(t for _, t, _ in tiles) == row["completion"]
        assert all(row["completion"][o: o + len(t)] == t for o, t, _ in tiles)
        assert [t for t, _, o in kept] == [t for _, t, k in tiles if k is None]  # kept in order
        if "subst" not in rates and "shuffle" not in rates:
            assert not ed.removed and "".join(p[0] for p in kept) == row["completion"]
        removed = {k: [t for _, t, kk in ed.removed if kk == k] for k in ("subst", "shuffle")}
        assert len(removed["subst"]) == sum(k == "subst" for _, _, k in spans)  # one token out, one junk token in
        assert sorted(removed["shuffle"]) == sorted(text[s:e] for s, e, k in spans if k == "shuffle")  # moved
        # the unmarked ids are the clean completion's own token ids, less the replaced / moved ones
        clean_ids = tok(row["completion"], add_special_tokens=False)["input_ids"]
        it = iter(clean_ids)
        assert all(any(t == c for c in it) for t in unmarked)  # a subsequence, in order
        if "subst" not in rates and "shuffle" not in rates:
            assert unmarked == clean_ids
        for s, e, k in spans:
            if k == "lines":
                assert text[s] == "\n" and text[s + 1:e].strip() and "\n" not in text[s + 1:e]
    assert all(n_spans.values()), n_spans


def test_marks_without_a_tokenizer_are_exact_on_the_proxy_tokens():
    view = nc.ProxyTokens()
    totals = {"tokens": 0, **{k: 0 for k in nc.KINDS}}
    for i, row in enumerate(_corpus(12)):
        ed = nc.inject(row["completion"], {"lines": 0.15, "subst": 0.1}, view, random.Random(i), totals)
        pieces, offsets = view.encode(ed.text)
        flags = data.noise_flags(offsets, [(s, e) for s, e, _ in ed.spans()])
        assert "".join(p for p, f in zip(pieces, flags) if f) == "".join(ed.text[s:e] for s, e, _ in ed.spans())
        assert "".join(p for p, f in zip(pieces, flags) if not f) == "".join(p[0] for p in ed.pieces if p[1] is None)
    assert abs(totals["lines"] / totals["tokens"] - 0.15) <= TOL and abs(totals["subst"] / totals["tokens"] - 0.1) <= TOL


def _run(tmp_path, *args, source=None, valid=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = _write(tmp_path / "src.jsonl", source or _corpus())
    val = _write(tmp_path / "val.jsonl", valid or [{"prompt": "def v():\n", "completion": "    return 1\n"}])
    out = tmp_path / "out"
    report = nc.main([f"--out={out}", f"--source_path={src}", f"--validation_path={val}", *args])
    return out, src, val, report


@pytest.mark.parametrize("noise", ["lines:0.25", "subst:0.25", "shuffle:0.2", "lines:0.15,subst:0.1"])
def test_share_of_injected_tokens_is_within_tolerance(tmp_path, bpe, noise):
    out, _, _, report = _run(tmp_path, f"--noise={noise}", f"--tokenizer={bpe.path}")
    rates = nc.parse_noise(noise)
    # measured independently: the written rows, read and tokenized as training does
    examples, _ = data.load_examples("jsonl", str(out / "train.jsonl"))
    items, counts = data.tokenize_examples(bpe, examples, 10 ** 6)
    noise_tokens = sum(sum(it.noise) for it in items)
    completion_tokens = sum(sum(it[1]) for it in items) - len(items)  # less one EOS each
    assert abs(noise_tokens / completion_tokens - sum(rates.values())) <= TOL
    assert counts["marked_examples"] == len(items) and counts["noise_tokens"] == noise_tokens
    assert report["measured"]["noise_tokens"] == noise_tokens == report["tokens"]["injected"]
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    for kind, rate in rates.items():  # each kind on its own, from the spans it wrote
        n = sum(sum(data.tokenize_marked(bpe, r["prompt"], r["completion"], [
            sp for sp, k in zip(r["noise_spans"], r["noise_kinds"]) if k == kind], 10 ** 6)[2]) for r in rows)
        assert abs(n / completion_tokens - rate) <= TOL, kind
    assert json.loads((out / "noise.json").read_text())["share"]["total"] == report["share"]["total"]


def test_clean_split_validation_and_prompts_are_untouched(tmp_path, bpe):
    source = _corpus()
    source[3] = {"completion": source[3]["completion"], "prompt": source[3]["prompt"], "extra": [1, "x"]}  # any fields
    out, src, val, _ = _run(tmp_path, "--noise=lines:0.1,subst:0.1,shuffle:0.05", f"--tokenizer={bpe.path}",
                            source=source)
    assert (out / "train_clean.jsonl").read_bytes() == open(src, "rb").read()
    assert (out / "validation.jsonl").read_bytes() == open(val, "rb").read()
    noisy = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(noisy) == len(source)
    for clean, row in zip(source, noisy):
        assert list(row) == list(clean) + ["noise_spans", "noise_kinds"]
        assert {k: v for k, v in row.items() if k not in ("completion", "noise_spans", "noise_kinds")} == \
               {k: v for k, v in clean.items() if k != "completion"}  # prompt and every other field as they were
        assert row["completion"] != clean["completion"] and row["noise_spans"]
    assert sum(r["completion"] == c["completion"] for r, c in zip(noisy, source)) == 0


def test_stdlib_source_writes_its_validation_split_as_is(tmp_path, monkeypatch):
    rows = {s: [{"id": f"m:{s}{i}", "name": "f", "prompt": "def f(x):\n", "completion": c, "split": s}
                for i, c in enumerate(r["completion"] for r in _corpus(10))] for s in ("train", "validation")}
    monkeypatch.setattr(data, "stdlib_examples", lambda split, mbpp_path=None: (
        [dict(r) for r in rows[split]], {"python": "x", "sha256": "y"}))
    nc.main([f"--out={tmp_path}", "--noise=lines:0.25"])
    assert (tmp_path / "validation.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows["validation"])
    assert (tmp_path / "train_clean.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows["train"])
    report = json.loads((tmp_path / "noise.json").read_text())
    assert abs(report["share"]["lines"] - 0.25) <= TOL and report["measured"] is None  # proxy tokens


def test_deterministic_given_the_seed(tmp_path, bpe):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out, *_ = _run(tmp_path / name, "--noise=lines:0.15,subst:0.1", f"--seed={seed}", f"--tokenizer={bpe.path}")
        runs[name] = (out / "train.jsonl").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_bad_settings_are_one_line_errors(tmp_path):
    for bad in ("--noise=junk:0.2", "--noise=lines:1.5", "--noise=lines:0.5,subst:0.5", "--noise=lines"):
        with pytest.raises(ValueError, match="noise"):
            _run(tmp_path, bad)
    marked = [{"prompt": "p", "completion": "x\n", "noise_spans": []}]
    with pytest.raises(ValueError, match="already has noise_spans"):
        _run(tmp_path, source=marked)
    with pytest.raises(ValueError, match="more than 0.01 from the target"):  # one-line completions: nowhere to insert
        _run(tmp_path, "--noise=lines:0.25", source=[{"prompt": "p", "completion": "x \n"}] * 5)


# --------------------------------------------------------------------------------------------
# data.py: the marks travel with the tokens
# --------------------------------------------------------------------------------------------

def test_load_examples_keeps_and_checks_noise_spans(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "abcdef", "noise_spans": [[1, 3]]},
                                      {"prompt": "p", "completion": "abc"}])
    rows, _ = data.load_examples("jsonl", p)
    assert rows == [{"prompt": "p", "completion": "abcdef", "noise_spans": [[1, 3]]},
                    {"prompt": "p", "completion": "abc"}]
    for bad in ([[1, 9]], [[3, 1]], [[0]], "x", [[0.5, 1]]):
        _write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "abcdef"},
                                      {"prompt": "p", "completion": "abcdef", "noise_spans": bad}])
        with pytest.raises(ValueError, match="row 2: field 'noise_spans'"):
            data.load_examples("jsonl", p)


def test_noise_flag_survives_tokenize_collate_and_step_batches_in_target_indexing(chars, bpe):
    # char tokenizer: one token per character, so the flags can be written by hand
    ex = {"prompt": "def f():\n", "completion": "    x = 1\n    @#!\n    return x\n", "noise_spans": [[9, 17]]}
    items, counts = data.tokenize_examples(chars, [ex], 100)
    (item,) = items
    ids, mask = item  # still the (ids, mask) pair every caller unpacks
    n_p = len(ex["prompt"])
    want = [0] * n_p + [int(9 <= i < 17) for i in range(len(ex["completion"]))] + [0]
    assert item.noise == want and mask == [0] * n_p + [1] * (len(ex["completion"]) + 1)
    assert _decode(chars, [t for t, f in zip(ids, item.noise) if f]) == "\n    @#!"
    assert counts["marked_examples"] == 1 and counts["noise_tokens"] == 8
    batch = data.collate([item, ([5, 6, 7], [0, 1, 1])], pad_id=0)
    T = batch["input_ids"].shape[1]
    assert batch["noise"].tolist() == [want + [0] * (T - len(want)), [0] * T]
    assert not (batch["noise"].bool() & ~batch["loss_mask"].bool()).any()  # flags only on targets
    # target indexing: head k at position t predicts token t+k+1 and gets that token's flag
    j = want.index(1)
    heads = mtp.align_to_heads(batch["noise"], 3)
    assert [heads[k, 0, j - k - 1].item() for k in range(3)] == [1, 1, 1]
    assert [heads[k, 0, j - k - 2].item() for k in range(3)] == [0, 0, 0]
    # truncation cuts the flags with the tokens
    cut, _ = data.tokenize_examples(chars, [ex], n_p + 12)
    assert cut[0].noise == want[: n_p + 12]
    # byte-level BPE: a token that only partly overlaps a span is flagged (its characters overlap)
    ids, mask, noise, _ = data.tokenize_marked(bpe, "p", "value = compute(value)\n", [[9, 11]], 100)
    toks = [_decode(bpe, [t]) for t in ids[1:-1]]
    flagged = "".join(t for t, f in zip(toks, noise[1:-1]) if f)
    assert "om" in flagged and flagged in " compute" and noise[0] == noise[-1] == 0
    # through step_batches and eval_batches: every row's flags come back with its tokens
    rows = _corpus(16)
    marked = [{**r, "noise_spans": [[0, 4]] if i % 2 else []} for i, r in enumerate(rows)]
    data_items, _ = data.tokenize_examples(bpe, marked, 256)
    by_ids = {tuple(it[0]): it.noise for it in data_items}
    for batches in [data.step_batches(data_items, s, 8, 4, seed=1) for s in range(2)] + \
                   [data.eval_batches(data_items, 3, r, 2, pad_id=0) for r in range(2)] + \
                   [data.eval_batches(data_items[:4], 2, r, 3, pad_id=0) for r in range(3)]:  # rank 2: a filler
        for b in batches:
            for row_ids, row_noise, row_mask in zip(b["input_ids"], b["noise"], b["loss_mask"]):
                n = int((row_mask != 0).nonzero().max()) + 1 if row_mask.any() else 0
                if n == 0:  # eval_batches' filler for an empty rank slice: nothing flagged
                    assert not row_noise.any()
                    continue
                assert row_noise[:n].tolist() == by_ids[tuple(row_ids[:n].tolist())]
                assert not row_noise[n:].any()
    assert sum(sum(f) for f in by_ids.values()) > 0
    filler = data.eval_batches(data_items[:4], 2, 2, 3, pad_id=0)
    assert len(filler) == 1 and not filler[0]["loss_mask"].any() and "noise" in filler[0]


def test_marked_item_is_a_pair_for_existing_callers(bpe):
    items, _ = data.tokenize_examples(bpe, [{"prompt": "p", "completion": "x = 1\n", "noise_spans": [[0, 1]]}], 64)
    it = items[0]
    ids, mask = it
    assert len(it) == 2 and it[0] == ids and it == (ids, mask)
    assert [(i, m, 1.0, 0) for i, m in items][0][:2] == (ids, mask)  # train_critic.policy_data's rebuild
    back = pickle.loads(pickle.dumps(it))
    assert back == it and back.noise == it.noise and isinstance(back, data.MarkedItem)


# --------------------------------------------------------------------------------------------
# Unmarked data: exactly as before (the functions as they were before marks, frozen here)
# --------------------------------------------------------------------------------------------

def _old_tokenize_example(tok, prompt, completion, max_seq_len):
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, mask = p + c, [0] * len(p) + [1] * len(c)
    truncated = len(ids) > max_seq_len
    return ids[:max_seq_len], mask[:max_seq_len], truncated


def _old_tokenize_examples(tok, examples, max_seq_len):
    out, n_trunc, n_dropped = [], 0, 0
    for ex in examples:
        ids, mask, truncated = _old_tokenize_example(tok, ex["prompt"], ex["completion"], max_seq_len)
        n_trunc += truncated
        if sum(mask) == 0:
            n_dropped += 1
            continue
        out.append((ids, mask))
    return out, {"examples": len(out), "truncated": n_trunc, "dropped_prompt_too_long": n_dropped}


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def test_unmarked_data_batches_exactly_as_before(bpe):
    rows = _corpus(24)
    for max_len in (40, 4096):
        new, new_counts = data.tokenize_examples(bpe, rows, max_len)
        old, old_counts = _old_tokenize_examples(bpe, rows, max_len)
        assert new == old and new_counts == old_counts and all(type(it) is tuple for it in new)
        for ex in rows[:5]:
            assert data.tokenize_example(bpe, ex["prompt"], ex["completion"], max_len) == \
                   _old_tokenize_example(bpe, ex["prompt"], ex["completion"], max_len)
    labelled = [(ids, m, float(i % 2), i // 3) for i, (ids, m) in enumerate(new)]
    # collate, by hand: right-padded to a multiple of 8, the same keys as ever, no "noise"
    two = [([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])]
    _same(data.collate(two, pad_id=0), {"input_ids": torch.tensor([[5, 6, 7] + [0] * 5, [8, 9] + [0] * 6]),
                                        "loss_mask": torch.tensor([[0, 1, 1] + [0] * 5, [0, 1] + [0] * 6]),
                                        "n_tokens": 5})
    both = data.collate([(*two[0], 1.0, 3), (*two[1], 0.0, 4)], pad_id=0)
    assert both["passed"].tolist() == [1.0, 0.0] and both["problem"].tolist() == [3, 4] and "noise" not in both
    batches = ([b for s in range(3) for b in data.step_batches(new, s, 8, 4, seed=2, pad_id=0)]
               + [b for r in range(3) for b in data.eval_batches(new, 4, r, 3, pad_id=0)]
               + data.step_batches(labelled, 0, 6, 3, seed=0, by_problem=True))
    assert len(batches) == 6 + 6 + 2 and not any("noise" in b for b in batches)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        nc.main(["--help"])
    text = capsys.readouterr().out
    for key in nc.NoisyCorpusConfig.__dataclass_fields__:
        assert f"--{key}" in text
    assert "target" in text and "MIN-MAX" in text
