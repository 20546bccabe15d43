"""data.py: prompt masking, EOS, truncation, malformed rows, deterministic rank-split batching."""
import json

import pytest
import torch

import data

MBPP = data.MBPP_FILE


class CharTok:
    """A character-level tokenizer with a BOS: enough to check masks by hand."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % 90 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_prompt_is_masked_and_eos_is_a_target():
    ids, mask, truncated = data.tokenize_example(CharTok(), "ab", "xyz", 100)
    assert ids == [1, 3 + ord("a") % 90, 3 + ord("b") % 90, 3 + ord("x") % 90, 3 + ord("y") % 90, 3 + ord("z") % 90, 2]
    assert mask == [0, 0, 0, 1, 1, 1, 1]  # BOS + prompt out of the loss; completion + EOS in
    assert not truncated


def test_truncation_keeps_prompt_and_is_counted():
    items, counts = data.tokenize_examples(
        CharTok(), [{"prompt": "ab", "completion": "xyz"}, {"prompt": "a" * 10, "completion": "x"},
                    {"prompt": "a", "completion": "x"}], max_seq_len=5)
    assert counts == {"examples": 2, "truncated": 2, "dropped_prompt_too_long": 1}
    assert items[0][1] == [0, 0, 0, 1, 1] and len(items[0][0]) == 5


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_malformed_rows_error_names_the_row_or_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    _write(p, [{"prompt": "p", "completion": "c"}, {"prompt": "p"}, {"prompt": "p", "completion": "  "}])
    with pytest.raises(ValueError, match="row 2: field 'completion' is missing"):
        data.load_examples("jsonl", str(p))
    rows, skipped = data.load_examples("jsonl", str(p), skip_bad_rows=True)
    assert len(rows) == 1 and skipped == 2
    _write(p, [{"prompt": "p", "completion": "c"}, "{not json"])
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        data.load_examples("jsonl", str(p))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_examples("jsonl", str(tmp_path / "missing.jsonl"))
    _write(p, [{"prompt": "p"}])
    with pytest.raises(ValueError, match="no usable rows"):
        data.load_examples("jsonl", str(p), skip_bad_rows=True)


def test_mbpp_splits_and_format():
    sizes = {s: len(data.load_examples("mbpp", MBPP, s)[0]) for s in data.MBPP_SPLITS}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    ex = data.load_examples("mbpp", MBPP, "train")[0][0]
    assert ex["prompt"].startswith("You are an expert Python programmer, and here is your task: ")
    assert ex["prompt"].endswith("[BEGIN]\n") and ex["completion"].endswith("\n[DONE]")
    assert "\r" not in ex["completion"]


def test_humaneval_from_the_package():
    rows, _ = data.load_examples("humaneval")
    assert len(rows) == 164 and rows[0]["prompt"].startswith("from typing import List")


def test_batches_are_deterministic_and_ranks_partition_the_step():
    items = [([5] * (i % 7 + 1), [0] + [1] * (i % 7)) for i in range(40)]
    one = data.step_batches(items, 3, global_batch=8, micro_batch=4, seed=0)
    again = data.step_batches(items, 3, global_batch=8, micro_batch=4, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, again))
    # two ranks with micro_batch 2 see, together and in order, what one rank with 4 sees
    r0 = data.step_batches(items, 3, global_batch=8, micro_batch=2, seed=0, rank=0, world=2)
    r1 = data.step_batches(items, 3, global_batch=8, micro_batch=2, seed=0, rank=1, world=2)
    for m in range(2):
        joint = one[m]["loss_mask"].sum(1).tolist()
        assert joint == r0[m]["loss_mask"].sum(1).tolist() + r1[m]["loss_mask"].sum(1).tolist()
    # the 5 steps of an epoch cover every example once; the next epoch is another permutation
    seen = sorted(int(b["loss_mask"].sum()) for s in range(5)
                  for b in data.step_batches(items, s, 8, 8, seed=0))
    assert sum(seen) == sum(sum(m) for _, m in items)
    with pytest.raises(ValueError, match="not a multiple"):
        data.step_batches(items, 0, global_batch=8, micro_batch=3, seed=0)


def test_collate_pads_right_to_a_multiple_of_8():
    b = data.collate([([1, 2, 3], [0, 1, 1]), ([4], [1])], pad_id=0)
    assert b["input_ids"].shape == (2, 8) and b["input_ids"][1].tolist() == [4] + [0] * 7
    assert b["loss_mask"][1].tolist() == [1] + [0] * 7 and b["n_tokens"] == 4


def test_eval_batches_same_count_on_every_rank():
    items = [([1, 2], [0, 1])] * 5
    counts = [len(data.eval_batches(items, 2, r, 3)) for r in range(3)]
    assert counts == [1, 1, 1]
    total = sum(int(b["loss_mask"].sum()) for r in range(3) for b in data.eval_batches(items, 2, r, 3))
    assert total == 5
