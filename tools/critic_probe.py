"""
critic_probe.py — a positive control for the critic: on programs whose bug is known, does the value
model rank the correct program above its broken copies, and do its TD errors point at the bug?

    python -m tools.critic_probe out/cmp/value --train_args='--data.source=samples --data.path=out/cmp/labels/samples.jsonl --data.max_seq_len=1536'
    python -m tools.critic_probe out/tiny_critic/value --train_config=configs/tiny_critic.yaml --out=probe.json

The probe set: MBPP tasks the value model never trained on -- its own held-out problems, found by
replaying train_critic.py's split (the training command's config, --train_config/--train_args,
rebuilds its labelled data and data.split_by_problem splits it with data.eval_frac and the seed;
checked against the counts and held-out AUC the value model recorded), or (--tasks=split) every
task of --mbpp_split minus any the value model trained on. Each task's reference solution and its
single-site mutants (data.mbpp_mutants: executed, each with the character span of its edit); a
task whose reference passes and with at least one failing mutant is probed.

Metrics (V = the value model's P(pass | prefix); δ_j = V_j − V_{j−1} over the completion tokens,
EOS included, V_{−1} = V at the last prompt token; the outcome is not substituted at the end):
  - within-problem AUC: per problem, the mean over its failing mutants m of
    1[V_T(ref) > V_T(m)] + ½·1[V_T(ref) = V_T(m)], averaged over problems; the pooled AUC is
    train_critic.binary_auc over every probed program (references 1, failing mutants 0). At the
    prompt's end (V at the last prompt token) the within-problem AUC must be 0.5: the prompt is shared.
  - localisation: a failing mutant's hit tokens are those overlapping its edit ([s, e); an empty
    span -- a dropped line -- counts as [s, s+1), the first character after the gap) and the
    `window` tokens after them. top-k = P(one of the k most negative δ is a hit), ties broken
    uniformly at random (so a constant V scores exactly chance); averaged over mutants. Chance: k
    distinct positions drawn uniformly, 1 − C(n−h, k)/C(n, k) for h hit tokens of n.
  - the same for untrained heads: the value model's backbone with `random_heads` freshly initialised
    heads (ValueModel's init -- bias = logit of the pass rate -- but the weight drawn as nn.Linear's
    default, U(±1/√D): ValueModel's own zero weight gives a constant V), averaged over the heads.
Writes a JSON (--out; default critic_probe.json in the value model's directory) with every
mutant's numbers, a markdown twin (.md), and prints the table.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

import common
import data
import train_critic
from support import config, model_io


@dataclass
class ProbeConfig:
    value_model: str = ""            # the value-model directory stage 1 of train_critic.py wrote (or the positional argument)
    train_config: str = ""           # the YAML train_critic.py trained it with ("" = none: its defaults and train_args)
    train_args: str = ""             # the --key=value overrides it was trained with, space-separated, quoted as one argument
    tasks: Literal["heldout", "split"] = "heldout"  # heldout: the value model's held-out problems (its split, replayed);
                                     #   split: all of mbpp_split, less any problem the value model trained on
    mbpp_path: str = ""              # MBPP JSONL ("" = the training data's when it was mbpp_mutants, else data/mbpp.jsonl)
    mbpp_split: str = "train"        # MBPP split whose tasks are mutated (train_critic's MBPP data is train's)
    mutants_per_task: int = 8        # mutants made of each task (data.mbpp_mutants; the passing ones are left out)
    seed: int = 0                    # seed of the mutants and of the random heads
    exec_timeout: float = 5.0        # seconds per test program when the mutants are executed
    workers: int = 0                 # sandbox workers executing them (0 = every CPU core)
    label_cache: str = "out/labels"  # where the executed mutants are kept (shared with train_critic.py's data.label_cache)
    prompt_format: Literal["auto", "mutants", "samples"] = "auto"  # how a program is shown to the value model:
                                     #   mutants: data.mbpp_mutants' rows (0-shot prompt, code + "\n[DONE]");
                                     #   samples: eval.py's (3-shot prompt, code + "\n", cut at [DONE]);
                                     #   auto: samples if the value model learned from data.source=samples
    max_problems: int = 0            # probe the first N problems only (0 = all; a quick look)
    kinds: str = ""                  # mutation kinds probed, comma-separated: operator,constant,name,drop_line ("" = all)
    max_seq_len: int = 0             # programs longer than this are left out (0 = the training config's data.max_seq_len)
    window: int = 2                  # a δ this many tokens after the edit still hits it
    random_heads: int = 16           # untrained heads on the value model's backbone, >= 1 (their metrics are averaged)
    baseline_backbone: str = ""      # the backbone of the untrained heads ("" = the value model's own; e.g. the base
                                     #   policy when stage 1 trained the backbone too, value.train_layers != 0)
    batch_size: int = 16             # sequences per forward (a problem's programs share one, so one may be larger)
    device: str = "auto"             # auto = cuda > mps > cpu
    dtype: str = "auto"              # auto = bf16 on GPU / MPS (autocast over fp32 weights), fp32 on CPU
    verify_heldout: bool = True      # recompute stage 1's held-out AUC on the replayed split and compare (tasks=heldout)
    out: str = ""                    # the JSON ("" = <value_model>/critic_probe.json); its markdown twin beside it


# --------------------------------------------------------------------------------------------
# 1. The metrics (pure functions; tests/test_critic_probe.py checks them by hand)
# --------------------------------------------------------------------------------------------

def within_problem_auc(ref: float, mutants) -> float:
    """P(V(reference) > V(failing mutant)) over one problem's pairs, ties counting 1/2."""
    m = np.asarray(mutants, dtype=np.float64)
    return float(np.mean((ref > m) + 0.5 * (ref == m)))


def token_ranges(tok, completion: str, ids: list[int]) -> list[tuple[int, int]]:
    """The characters [start, end) of `completion` that each of its tokens `ids` covers (EOS not
    included). A token ends at its own end offset and starts where the one before it ended, so the
    ranges tile the text: whitespace a tokenizer leaves out of its offsets (byte-level BPE trims a
    token's leading space) belongs to the token after it."""
    if not getattr(tok, "is_fast", False):
        raise config.ConfigError("the probe needs a fast (Rust) tokenizer: its character offsets map the edit to tokens")
    enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise RuntimeError("the tokenizer gave other ids with offsets than without them")
    ranges, prev = [], 0
    for _, end in enc["offset_mapping"]:
        end = max(end, prev)
        ranges.append((prev, end))
        prev = end
    return ranges


def hit_tokens(ranges: list[tuple[int, int]], span, window: int, n_positions: int) -> list[int]:
    """Positions (0-based over the completion's tokens, EOS = len(ranges)) that count as finding the
    edit [s, e): the tokens overlapping it (an empty span, a dropped line, is [s, s+1): the first
    character after the gap) and the `window` positions after the last of them, up to n_positions."""
    s, e = span
    e = max(e, s + 1)
    over = [i for i, (a, b) in enumerate(ranges) if a < e and s < b]
    if not over:
        return []
    return list(range(over[0], min(over[-1] + window, n_positions - 1) + 1))


def topk_hit(deltas, hits, k: int) -> float:
    """P(at least one of the k most negative δ falls on a hit position), ties broken uniformly at
    random: positions strictly below the k-th smallest value are in; the r slots left go to r of
    the t positions tied at it, h of them hits: 1 − C(t−h, r)/C(t, r). A constant δ gives chance."""
    d = np.asarray(deltas, dtype=np.float64)
    n = len(d)
    k = min(k, n)
    hit = np.zeros(n, dtype=bool)
    hit[list(hits)] = True
    if k == 0 or not hit.any():
        return 0.0
    thr = np.sort(d)[k - 1]
    below, tied = d < thr, d == thr
    if (below & hit).any():
        return 1.0
    r, t, h = k - int(below.sum()), int(tied.sum()), int((tied & hit).sum())
    return 1.0 - math.comb(t - h, r) / math.comb(t, r)


def chance_hit(n: int, h: int, k: int) -> float:
    """P(one of k distinct positions drawn uniformly from n is one of the h hit positions)."""
    k = min(k, n)
    return 1.0 - math.comb(n - h, k) / math.comb(n, k) if n else 0.0


def localisation(deltas, hits) -> dict:
    """One mutant's localisation numbers."""
    n, h = len(deltas), len(hits)
    return {"top1": topk_hit(deltas, hits, 1), "top3": topk_hit(deltas, hits, 3),
            "chance_top1": chance_hit(n, h, 1), "chance_top3": chance_hit(n, h, 3)}


def summarize(problems: list[dict], curve) -> dict:
    """Metrics of one value head over the probed problems: [{"ref": program, "mutants": [program]}],
    `curve(program)` -> its {"final": V_T, "prompt": V_{-1}, "deltas": δ over the completion}, a
    mutant program holding its "hits" (hit_tokens)."""
    within, within_prompt, scores, prompt_scores, labels, loc = [], [], [], [], [], []
    spread = 0.0  # the largest |V_{-1}(mutant) − V_{-1}(reference)|: 0 unless the numerics differ by row
    for p in problems:
        ref = curve(p["ref"])
        muts = [curve(m) for m in p["mutants"]]
        within.append(within_problem_auc(ref["final"], [m["final"] for m in muts]))
        within_prompt.append(within_problem_auc(ref["prompt"], [m["prompt"] for m in muts]))
        spread = max(spread, max(abs(m["prompt"] - ref["prompt"]) for m in muts))
        scores += [ref["final"]] + [m["final"] for m in muts]
        prompt_scores += [ref["prompt"]] + [m["prompt"] for m in muts]
        labels += [1] + [0] * len(muts)
        loc += [localisation(v["deltas"], m["hits"]) for v, m in zip(muts, p["mutants"])]
    return {"within_auc": float(np.mean(within)), "pooled_auc": train_critic.binary_auc(scores, labels),
            "within_auc_prompt": float(np.mean(within_prompt)),
            "pooled_auc_prompt": train_critic.binary_auc(prompt_scores, labels), "prompt_spread": spread,
            **{key: float(np.mean([x[key] for x in loc])) for key in ("top1", "top3", "chance_top1", "chance_top3")},
            "n_problems": len(problems), "n_mutants": len(loc)}


# --------------------------------------------------------------------------------------------
# 2. The probe set: the value model's training split replayed, the mutants of the probed tasks
# --------------------------------------------------------------------------------------------

SPLIT_COUNTS = ("rows", "problems", "examples", "dropped_too_long", "train_examples", "heldout_examples")


def training_config(cfg: ProbeConfig):
    """train_critic.py's config as the value model was trained with (its YAML and overrides)."""
    argv = ([cfg.train_config] if cfg.train_config else []) + shlex.split(cfg.train_args)
    if [a for a in argv[1 if cfg.train_config else 0:] if not a.startswith("--")]:
        raise config.ConfigError(f"config key 'train_args': {cfg.train_args!r}: write --key=value options only")
    try:
        return config.parse_config(train_critic.Config, argv, ignore=train_critic.RHO1_ONLY_KEYS)
    except config.ConfigError as e:
        raise config.ConfigError(f"train_config / train_args (train_critic.py's keys): {e}") from None


def replay_split(tcfg, tok, meta: dict, dist) -> tuple[list[dict], list, list, set, set]:
    """The value model's labelled data and split, rebuilt exactly as train_critic.py built them ->
    (rows, train items, held-out items, training problems, held-out problems), checked against the
    counts the value model recorded (value_config.json's labelled_data)."""
    rows, counts = train_critic.read_labelled_data(tcfg, dist)
    train_items, eval_items, counts = train_critic.tokenize_labelled_data(tcfg, tok, rows, counts, dist)
    names = sorted({r["problem"] for r in rows})  # data.tokenize_labelled's problem index
    recorded = meta.get("labelled_data") or {}
    differ = {k: (recorded[k], counts.get(k)) for k in SPLIT_COUNTS if k in recorded and recorded[k] != counts.get(k)}
    if differ:
        raise config.ConfigError(
            f"the training data replayed from train_config/train_args is not the value model's: (recorded, replayed) "
            f"{differ}; pass the data.* keys and train.seed it was trained with")
    if not recorded:
        print("warning: the value model recorded no labelled_data counts: its split cannot be checked", file=sys.stderr)
    return (rows, train_items, eval_items, {names[it[3]] for it in train_items},
            {names[it[3]] for it in eval_items})


def mbpp_file(cfg: ProbeConfig, tcfg) -> str:
    return cfg.mbpp_path or (tcfg.data.path if tcfg.data.source in ("mbpp", "mbpp_mutants") else "") or data.MBPP_FILE


def mutant_rows(cfg: ProbeConfig, tcfg, executor=None) -> list[dict]:
    """The executed reference + mutant rows of every task of cfg.mbpp_split (cached)."""
    mbpp = mbpp_file(cfg, tcfg)
    executor = executor or data.default_executor(cfg.exec_timeout, cfg.workers or os.cpu_count() or 1)
    path = data.mbpp_mutants(mbpp, cfg.mbpp_split, cfg.mutants_per_task, cfg.seed, 0, cfg.label_cache,
                             cfg.exec_timeout, executor=executor, skip_bad_rows=tcfg.data.skip_bad_rows)
    rows = [r for r in data.read_jsonl(path) if isinstance(r, dict)]
    if any(r["kind"] != "reference" and "mutated_span" not in r for r in rows):
        raise data.DataError(f"{path}: mutant rows without 'mutated_span' (an old cache?): delete it")
    return rows


def samples_prompts(mbpp: str, split: str, train_rows: list[dict], wanted: set) -> dict:
    """eval.py's MBPP prompt (3-shot) of each wanted problem: the one its samples were drawn with,
    from the training rows where it has any, else built by eval.load_mbpp."""
    prompts = {r["problem"]: r["prompt"] for r in train_rows if r["problem"] in wanted}
    if wanted - set(prompts):
        import eval as evaluation
        prompts |= {p["task_id"]: p["prompt"] for p in evaluation.load_mbpp(mbpp, split)
                    if p["task_id"] in wanted and p["task_id"] not in prompts}
    return prompts


def probe_set(cfg: ProbeConfig, tok, rows: list[dict], keep: set, prompts: dict | None, max_len: int):
    """Mutant rows of the kept problems -> (problems, counts). A problem {"name", "ref", "mutants"} is
    probed when its reference passes its tests and at least one failing mutant fits max_len (passing
    mutants -- equivalent, or edits the tests never reach -- are left out). A program: {"kind",
    "span", "ids", "mask", "n_prompt", "ranges", "completion"} and, a mutant, "hits"."""
    by_problem: dict[str, list[dict]] = {}
    kinds = {k.strip() for k in cfg.kinds.split(",") if k.strip()}
    for r in rows:
        if r["problem"] in keep and (not kinds or r["kind"] in kinds | {"reference"}):
            by_problem.setdefault(r["problem"], []).append(r)
    counts = {"tasks": len(by_problem), "reference_failed": 0, "reference_too_long": 0, "no_failing_mutant": 0,
              "mutants_failing": 0, "mutants_passing": 0, "mutants_too_long": 0, "mutants_no_hit_token": 0,
              "by_kind": {}}
    problems = []
    for name, group in by_problem.items():
        for r in group:
            if r["kind"] != "reference":
                c = counts["by_kind"].setdefault(r["kind"], {"failing": 0, "passing": 0})
                c["passing" if r["passed"] else "failing"] += 1
                counts["mutants_passing" if r["passed"] else "mutants_failing"] += 1
        refs = [r for r in group if r["kind"] == "reference"]
        if not refs or not refs[0]["passed"]:
            counts["reference_failed"] += 1
            continue
        programs = []
        for r in refs[:1] + [r for r in group if r["kind"] != "reference" and not r["passed"]]:
            prompt, completion = r["prompt"], r["completion"]
            if prompts is not None:  # eval.py's samples: the 3-shot prompt, the text before the stop [DONE]
                prompt, completion = prompts[name], completion[: -len("\n[DONE]")] + "\n"
            ids, mask, truncated = data.tokenize_example(tok, prompt, completion, max_len)
            if truncated:
                counts["reference_too_long" if r["kind"] == "reference" else "mutants_too_long"] += 1
                if r["kind"] == "reference":
                    break
                continue
            n_prompt = len(mask) - sum(mask)
            ranges = token_ranges(tok, completion, ids[n_prompt:-1])
            prog = {"kind": r["kind"], "span": r.get("mutated_span"), "ids": ids, "mask": mask, "n_prompt": n_prompt,
                    "ranges": ranges, "completion": completion}
            if r["kind"] != "reference":
                prog["hits"] = hit_tokens(ranges, r["mutated_span"], cfg.window, sum(mask))
                if not prog["hits"]:  # cannot happen with offsets that tile the text; counted, not probed
                    counts["mutants_no_hit_token"] += 1
                    continue
            programs.append(prog)
        if not programs or programs[0]["kind"] != "reference":
            continue
        if len(programs) == 1:
            counts["no_failing_mutant"] += 1
            continue
        problems.append({"name": name, "ref": programs[0], "mutants": programs[1:]})
    return problems, counts


# --------------------------------------------------------------------------------------------
# 3. The value model's V on every program: trained head and random heads, one backbone forward
# --------------------------------------------------------------------------------------------

def random_heads(hidden: int, k: int, init_pass_rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k fresh value heads -> (weight [k, D], bias [k]): ValueModel(base, init_pass_rate)'s bias
    (the logit of the pass rate), the weight drawn as nn.Linear's default U(±1/√D) (seeded)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(hidden)
    w = (torch.rand(k, hidden, generator=g) * 2 - 1) * bound
    p = min(max(init_pass_rate, 1e-3), 1 - 1e-3)
    return w, torch.full((k,), math.log(p / (1 - p)))


def batches_by_problem(problems: list[dict], batch_size: int) -> list[list[dict]]:
    """Whole problems per batch (a problem's programs share a forward, so their shared prompt gets
    bit-identical values), about batch_size programs each."""
    out, cur = [], []
    for p in problems:
        progs = [p["ref"]] + p["mutants"]
        if cur and len(cur) + len(progs) > batch_size:
            out.append(cur)
            cur = []
        cur += progs
    return out + ([cur] if cur else [])


def value_curve(v: np.ndarray, prog: dict) -> dict:
    """One program's V over its positions -> {"final", "prompt", "deltas"} (δ over the completion)."""
    n0, n = prog["n_prompt"], len(prog["ids"])
    seg = v[n0 - 1: n]  # V_{-1} (last prompt token), then every completion token
    return {"final": float(v[n - 1]), "prompt": float(v[n0 - 1]), "deltas": np.diff(seg)}


@torch.no_grad()
def score(value_model, heads, problems, batch_size: int, amp, device, pad_id: int, baseline=None):
    """Adds "trained" and "random" (a list, one per head) value curves to every program. The
    random heads read the value model's last hidden states, or `baseline`'s (a causal LM)."""
    w, b = heads[0].to(device), heads[1].to(device)
    for progs in batches_by_problem(problems, batch_size):
        batch = data.collate([(p["ids"], p["mask"]) for p in progs], pad_id)
        ids = batch["input_ids"].to(device)
        with amp:
            h = value_model.base.base_model(input_ids=ids, use_cache=False).last_hidden_state
            trained = torch.sigmoid(value_model.head(h).squeeze(-1).float())
            if baseline is not None:
                h = baseline.base_model(input_ids=ids, use_cache=False).last_hidden_state
            rand = torch.sigmoid((h @ w.to(h.dtype).T + b.to(h.dtype)).float()).permute(2, 0, 1)  # [K, B, T]
        trained, rand = trained.double().cpu().numpy(), rand.double().cpu().numpy()
        for i, p in enumerate(progs):
            p["trained"] = value_curve(trained[i], p)
            p["random"] = [value_curve(rand[k, i], p) for k in range(rand.shape[0])]


def random_summary(problems: list[dict], k: int) -> dict:
    """summarize() per random head, then the mean (and std) over the heads."""
    per_head = [summarize(problems, lambda prog, j=j: prog["random"][j]) for j in range(k)]
    keys = [key for key, v in per_head[0].items() if isinstance(v, float)]
    out = {key: float(np.mean([s[key] for s in per_head])) for key in keys}
    return out | {"std_over_heads": {key: float(np.std([s[key] for s in per_head])) for key in keys},
                  "n_heads": k, "n_problems": per_head[0]["n_problems"], "n_mutants": per_head[0]["n_mutants"]}


def by_kind(problems: list[dict]) -> dict:
    """Localisation per mutation kind: trained, random heads (mean), chance."""
    out: dict[str, dict] = {}
    for p in problems:
        for m in p["mutants"]:
            trained = localisation(m["trained"]["deltas"], m["hits"])
            rand = [localisation(r["deltas"], m["hits"]) for r in m["random"]]
            row = out.setdefault(m["kind"], {"n": 0, "top1": [], "top3": [], "random_top1": [], "random_top3": [],
                                             "chance_top1": [], "chance_top3": []})
            row["n"] += 1
            for key in ("top1", "top3", "chance_top1", "chance_top3"):
                row[key].append(trained[key])
            for key in ("top1", "top3"):
                row[f"random_{key}"].append(float(np.mean([x[key] for x in rand])))
    return {kind: {key: (v if key == "n" else float(np.mean(v))) for key, v in row.items()}
            for kind, row in sorted(out.items())}


# --------------------------------------------------------------------------------------------
# 4. Report
# --------------------------------------------------------------------------------------------

def table(metrics: dict, kinds: dict) -> str:
    def f(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
    t, r, c = metrics["trained"], metrics["random_head"], metrics["chance"]
    lines = ["| value head | within-problem AUC | pooled AUC | top-1 loc | top-3 loc | n problems | n mutants |",
             "|---|---|---|---|---|---|---|"]
    on = f", on {r['backbone']}" if r.get("backbone") else ""
    for name, m in (("trained", t), (f"untrained (random head, mean of {r['n_heads']}{on})", r), ("chance", c)):
        lines.append(f"| {name} | {f(m['within_auc'])} | {f(m['pooled_auc'])} | {f(m['top1'])} | {f(m['top3'])} | "
                     f"{m['n_problems']} | {m['n_mutants']} |")
    lines += ["", f"At the prompt's end (sanity: the within-problem AUC must be 0.5, the prompt is shared): "
                  f"within-problem {f(t['within_auc_prompt'])}, pooled {f(t['pooled_auc_prompt'])}.", "",
              "| mutation kind | n | top-1 trained | top-1 random head | top-1 chance | top-3 trained | top-3 chance |",
              "|---|---|---|---|---|---|---|"]
    for kind, k in kinds.items():
        lines.append(f"| {kind} | {k['n']} | {f(k['top1'])} | {f(k['random_top1'])} | {f(k['chance_top1'])} | "
                     f"{f(k['top3'])} | {f(k['chance_top3'])} |")
    return "\n".join(lines) + "\n"


def mutant_records(problems: list[dict]) -> list[dict]:
    out = []
    for p in problems:
        for m in p["mutants"]:
            d = m["trained"]["deltas"]
            order = np.argsort(d, kind="stable")
            out.append({"problem": p["name"], "kind": m["kind"], "span": m["span"],
                        "edit": m["completion"][m["span"][0]: max(m["span"][1], m["span"][0] + 1)],
                        "n_positions": len(d), "hits": m["hits"], "argmin_delta": order[:3].tolist(),
                        "v_final": m["trained"]["final"], "v_final_reference": p["ref"]["trained"]["final"],
                        "delta_at_hits": float(d[m["hits"]].mean()) if m["hits"] else None,
                        "delta_elsewhere": float(np.delete(d, m["hits"]).mean()) if len(d) > len(m["hits"]) else None,
                        **{k: v for k, v in localisation(d, m["hits"]).items()}})
    return out


def main(argv, executor=None):
    """`executor`: [program] -> [passed?] for the mutants (tests: a stand-in for the sandbox)."""
    cfg = config.parse_config(ProbeConfig, argv, positional="value_model")
    if not cfg.value_model:
        raise config.ConfigError("give the value model's directory: python -m tools.critic_probe VALUE_MODEL_DIR")
    if not os.path.isfile(os.path.join(cfg.value_model, train_critic.VALUE_CONFIG)):
        raise FileNotFoundError(f"{cfg.value_model!r} is not a value-model directory (no {train_critic.VALUE_CONFIG})")
    for name, lo in (("window", 0), ("max_seq_len", 0), ("max_problems", 0), ("workers", 0), ("random_heads", 1), ("batch_size", 1),
                     ("mutants_per_task", 1)):
        if getattr(cfg, name) < lo:
            raise config.ConfigError(f"config key {name!r} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        raise config.ConfigError(f"config key 'dtype': {cfg.dtype!r} is not one of auto, float32, bfloat16, float16")
    if bad := {k.strip() for k in cfg.kinds.split(",") if k.strip()} - {"operator", "constant", "name", "drop_line"}:
        raise config.ConfigError(f"config key 'kinds': {sorted(bad)} not among operator, constant, name, drop_line")
    if cfg.exec_timeout <= 0:
        raise config.ConfigError(f"config key 'exec_timeout' must be > 0, got {cfg.exec_timeout}")
    tcfg = training_config(cfg)
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(cfg.dtype, device)
    dist = common.Dist(rank=0, world=1, device=device, group=None)
    amp = common.autocast(device, dtype, dist)
    torch.manual_seed(cfg.seed)

    value_model, tok, meta = train_critic.load_value_model(cfg.value_model)
    value_model = value_model.to(device).requires_grad_(False).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_len = cfg.max_seq_len or tcfg.data.max_seq_len

    # the value model's training data and split, replayed
    train_rows, _, eval_items, trained_on, held_out = replay_split(tcfg, tok, meta, dist)
    heldout_check = {}
    if cfg.tasks == "heldout" and cfg.verify_heldout and eval_items:
        again = train_critic.evaluate_value(value_model, eval_items, cfg.batch_size, amp, dist, pad_id)
        value_model.eval()
        recorded = meta.get("heldout") or {}
        heldout_check = {"recorded": {k: recorded.get(k) for k in again}, "recomputed": again}
        if recorded.get("eval/n") not in (None, again["eval/n"]):
            raise config.ConfigError(f"the replayed held-out split has {again['eval/n']} examples, the value model's "
                                     f"had {recorded['eval/n']}: pass the keys it was trained with")
        if abs((recorded.get("eval/auc") or again["eval/auc"]) - again["eval/auc"]) > 0.02:
            print(f"warning: held-out AUC recomputed {again['eval/auc']:.4f}, recorded {recorded['eval/auc']:.4f}: "
                  f"is the replayed split (train.seed, data.*) the one it was trained on?", file=sys.stderr)

    rows = mutant_rows(cfg, tcfg, executor)
    tasks = {r["problem"] for r in rows}
    if cfg.tasks == "heldout":
        keep = tasks & held_out
        if not keep:
            raise config.ConfigError(f"none of the value model's {len(held_out)} held-out problems is an MBPP "
                                     f"{cfg.mbpp_split} task: use --tasks=split with a split it did not train on")
        excluded = 0
    else:
        keep, excluded = tasks - trained_on, len(tasks & trained_on)
        if excluded:
            print(f"note: {excluded} of the {len(tasks)} MBPP {cfg.mbpp_split} tasks are training problems of the "
                  f"value model: left out", file=sys.stderr)
    fmt = cfg.prompt_format if cfg.prompt_format != "auto" else (
        "samples" if tcfg.data.source == "samples" else "mutants")
    prompts = samples_prompts(mbpp_file(cfg, tcfg), cfg.mbpp_split, train_rows, keep) if fmt == "samples" else None
    problems, counts = probe_set(cfg, tok, rows, keep, prompts, max_len)
    problems = problems[: cfg.max_problems or None]
    if not problems:
        raise data.DataError(f"no probe problem: {counts}")

    baseline = None
    if cfg.baseline_backbone:
        baseline, btok = model_io.load_model_and_tokenizer(cfg.baseline_backbone)
        if btok is not None:
            model_io.check_same_tokenizer(tok, btok, cfg.value_model, cfg.baseline_backbone,
                                          needs="the baseline backbone reads the value model's tokens")
        baseline = baseline.to(device).requires_grad_(False).eval()
    heads = random_heads((baseline if baseline is not None else value_model).config.hidden_size, cfg.random_heads,
                         (meta.get("labelled_data") or {}).get("mean_label", 0.5), cfg.seed)
    score(value_model, heads, problems, cfg.batch_size, amp, device, pad_id, baseline)
    trained = summarize(problems, lambda prog: prog["trained"])
    metrics = {"trained": trained,
               "random_head": random_summary(problems, cfg.random_heads) | {"backbone": cfg.baseline_backbone},
               "chance": {"within_auc": 0.5, "pooled_auc": 0.5, "top1": trained["chance_top1"],
                          "top3": trained["chance_top3"], "n_problems": trained["n_problems"],
                          "n_mutants": trained["n_mutants"]}}
    kinds = by_kind(problems)
    where = (f"the value model's held-out problems ({len(held_out)}; its split replayed: data.source={tcfg.data.source}, "
             f"data.eval_frac={tcfg.data.eval_frac}, train.seed={tcfg.train.seed})" if cfg.tasks == "heldout" else
             f"MBPP {cfg.mbpp_split}, less {excluded} training problems")
    md = (f"Probed {len(problems)} MBPP {cfg.mbpp_split} problems of {where}; prompt format {fmt}; window "
          f"{cfg.window}; {counts['mutants_passing']} passing mutants of {counts['tasks']} tasks left out.\n\n" + table(metrics, kinds))
    out = cfg.out or os.path.join(cfg.value_model, "critic_probe.json")
    report = {"value_model": os.path.abspath(cfg.value_model), "config": asdict(cfg),
              "training": {"source": tcfg.data.source, "path": tcfg.data.path, "split": tcfg.data.split,
                           "eval_frac": tcfg.data.eval_frac, "seed": tcfg.train.seed, "max_seq_len": tcfg.data.max_seq_len},
              "prompt_format": fmt, "problems": {"heldout": len(held_out), "trained": len(trained_on),
                                                 "mbpp_tasks": len(tasks), "kept": len(keep),
                                                 "excluded_training": excluded, "probed": len(problems)},
              "counts": counts, "heldout_check": heldout_check, "metrics": metrics, "by_kind": kinds,
              "mutants": mutant_records(problems)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"# critic probe: {cfg.value_model}\n\n" + md)
    print(md + f"\nwrote {out}")
    return report


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
