"""
speculate.py — heads that draft: self-distillation data for the MTP heads, and the measurement of
self-speculative decoding against plain decoding.

    # 1. what the model itself writes: greedy + sampled continuations of training prompts
    python -m tools.speculate MODEL --stage=data --out=out/draft/distill.jsonl
    # 2. heads 1..n-1 learn it on the frozen model (the base stays bit for bit unchanged)
    python train_rho1.py configs/smol_draft_heads.yaml
    # 3. which drafts to verify: count, on held-out training prompts, how often decoding keeps each
    #    node of a wide tree; the best N-draft tree is then tree.json:N
    python -m tools.speculate out/draft_heads/final --stage=calibrate --calib_path=out/draft/distill_eval.jsonl \\
        --out=out/draft/tree.json
    # 4. full HumanEval, greedy, speculative (a chain and trees of drafts) vs plain decoding in the
    #    same run, batch 1 and 8
    python -m tools.speculate out/draft_heads/final --stage=measure --base=MODEL \\
        --trees=chain,3x2x1,out/draft/tree.json:10,out/draft/tree.json:32 --out=out/draft/measure.json
    # where a forward's time goes: ms per forward, plain vs each verify, batch 1 (docs/drafting.md's profile);
    # --pick_blas=false: PyTorch's own cuBLAS choice instead of linear_pick's; --parallel_heads=false:
    # the last block and the heads one by one
    python -m tools.speculate out/draft_heads/final --stage=cost --trees=chain,2x2x1,3x2x1,6x3x2 --kernels

Why (docs/design.md §7): a draft is accepted when it is what head 0 would have produced, so the
heads should learn head 0's outputs, not a dataset's. Medusa-2 (Cai et al. 2024, §2.3.2) and
FastMTP (Cai et al. 2025) train their drafting heads on the model's own generations for this
reason ("self-distillation"); heads trained on 374 MBPP reference programs draft what MBPP's
authors wrote, which the model often would not.

Read top to bottom:
  1. `distill_data`: prompts of the training sources (the standard library, MBPP train), each
     continued greedily and by sampling with the fast slot sampler (sampling.sample_rows);
     one JSONL row {prompt, completion, source, kind} per continuation, for `data.source=jsonl`.
  2. `calibrate`: which nodes a tree of drafts should have. Decode held-out training prompts
     verifying a wide tree (8x4x2, 104 drafts) and count, per node, the forwards that kept it;
     the nodes by that count are the best tree of every size (`speculative.calibrated_tree`:
     Medusa's tree construction, counted exactly). Then each --calib_sizes tree is timed
     against plain decoding and the best predicted speed-up is recorded as tree.json's "best".
     Written as tree.json, used as tree.json:N (tree.json alone: the best size).
  3. `measure`: every HumanEval problem decoded plainly and speculatively by speculative.decode_rows
     (the same loop, cache, CUDA graphs and host checks; speculative=False is its one-token
     case) at each batch size, once per drafting shape (`--trees`: the chain, or trees of each
     head's top tokens, `speculative.draft_tree`): tokens per forward, acceptance per head,
     wall-clock speed-up, completions that differ; and whether the base weights equal the
     original model's.
  4. `forward_cost`: the time of one forward at batch 1 -- plain, and each tree's verify -- on a
     few HumanEval prompts without stop strings (CUDA graphs; optionally the top kernels).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

import common
import data
import eval as ev
from decoding import sampling
from decoding.speculative import calibrated_tree, decode_rows, parse_tree
from support import config, preflight


@dataclass
class SpeculateConfig:
    model: str = ""                  # (positional) data: the model to accelerate; measure: the checkpoint with heads
    stage: Literal["data", "calibrate", "measure", "cost"] = "data" # what to run (the docstring describes each stage)
    out: str = ""                    # data: the JSONL to write; calibrate, measure, cost: the JSON to write
    device: str = "auto"             # auto = cuda > mps > cpu
    dtype: str = "auto"              # data: auto = bf16 on GPUs; measure: auto = fp32 (greedy identity, eval.py)
    seed: int = 1234                 # sampling of the distillation data
    # ---- data ----
    sources: str = "stdlib,mbpp"     # prompts: the standard library's functions, MBPP train
    stdlib_path: str = ""            # an exported stdlib JSONL ({prompt, completion}); "" = scan this interpreter's
    mbpp_path: str = ""              # MBPP JSONL ("" = data/mbpp.jsonl) (train split prompts; the stdlib scan's contamination check)
    limit: int = 0                   # at most this many prompts (0 = all)
    greedy: bool = True              # one greedy continuation per prompt (what greedy decoding will meet)
    sampled: int = 3                 # sampled continuations per prompt (the model's other likely paths)
    temperature: float = 0.8         # sampled continuations of the distillation data
    top_p: float = 0.95              # nucleus sampling of the distillation data
    max_new_tokens: int = 256        # tokens generated per prompt at most
    batch_size: int = 512            # slots of the slot sampler
    eval_frac: float = 0.03          # share of prompts (by a hash) written to <out>_eval.jsonl instead
    # ---- calibrate ----
    calib_path: str = "out/draft/distill_eval.jsonl"  # prompts (JSONL with prompt, source): the data stage's held-out ones
    calib_tree: str = "8x4x2"        # the wide tree whose nodes are counted
    calib_limit: int = 0             # at most this many prompts (0 = all)
    calib_batch: int = 8             # rows decoded at once
    calib_sizes: str = "4,6,8,10,12,16,24,32"  # tree sizes (drafts) timed at batch 1; tree.json's "best" is the
                                     # fastest predicted (tokens per forward / cost per forward); "" = no timing
    # ---- measure ----
    base: str = ""                   # the original model: its weights must equal the checkpoint's base
    batch_sizes: str = "1,8"         # measure: rows decoded together, comma-separated (each timed)
    check_every: int = 4             # forwards between host checks (both decoders)
    trees: str = "chain"             # drafts to verify, each measured: chain (one per head), widths like 3x2x1 (a
                                     # tree: head d's top-w_d under every node of depth d-1) or a calibrated
                                     # tree's first N nodes, tree.json:N (greedy only)
    compile: bool = False            # torch.compile the forward of both decoders (costs compile time; measure, cost)
    pick_blas: bool = True           # matmuls of 2-256 rows by the cuBLAS path fastest per shape (linear_pick.py; CUDA)
    parallel_heads: bool = True      # the last block and the heads as one batched block (parallel_heads.py; CUDA)
    # ---- cost (per-forward cost of plain decoding and of each tree's verify, batch 1) ----
    blas: str = ""                   # "" = PyTorch's default; cublas / cublaslt (torch.backends.cuda.preferred_blas_library)
    kernels: bool = False            # also print each decoder's top CUDA kernels (torch.profiler, CUDA graphs)
    task_limit: int = 0              # only the first N HumanEval problems (0 = all 164)
    execute: bool = True             # run the speculative completions' tests (pass@1, greedy)
    workers: int = 0                 # sandbox workers (0 = one per core)


# --------------------------------------------------------------------------------------------
# 1. Self-distillation data
# --------------------------------------------------------------------------------------------

def stop_strings(source: str) -> list[str]:
    """Where a continuation of a training source's prompt ends (as its prompts are cut)."""
    return ev.HUMANEVAL_STOP if source == "stdlib" else ["[DONE]"] if source == "mbpp" else []


def training_prompts(cfg: SpeculateConfig) -> list[tuple[str, str, list[str]]]:
    """(source, prompt, stop strings) of the training sources. Standard-library prompts are
    HumanEval-shaped (imports, signature, docstring) and are cut like HumanEval's (trailing
    newline stripped, eval.py's stop strings), so the heads learn the positions they will draft
    at; MBPP train prompts stop at [DONE]. Nothing of HumanEval or MBPP test enters."""
    out = []
    for source in [s.strip() for s in cfg.sources.split(",") if s.strip()]:
        if source == "stdlib":
            rows = (data.read_jsonl(cfg.stdlib_path) if cfg.stdlib_path
                    else data.stdlib_examples("train", mbpp_path=cfg.mbpp_path or None)[0])
            out += [("stdlib", r["prompt"].rstrip(), stop_strings("stdlib")) for r in rows]
        elif source == "mbpp":
            out += [("mbpp", ex["prompt"], stop_strings("mbpp"))
                    for ex in data.load_examples("mbpp", cfg.mbpp_path or None, "train")[0]]
        else:
            raise config.ConfigError(f"config key 'sources': unknown source {source!r}; stdlib, mbpp")
    return out[:cfg.limit or None]


def distill_data(cfg: SpeculateConfig):
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(cfg.dtype, device)
    model, tok = ev.load_model(cfg.model, device, dtype)
    eos_ids = sampling.eos_token_ids(model, tok)
    prompts = training_prompts(cfg)
    ids = [tok(p).input_ids for _, p, _ in prompts]
    print(f"{len(prompts)} prompts ({', '.join(f'{s}: {sum(x[0] == s for x in prompts)}' for s in dict.fromkeys(x[0] for x in prompts))}), "
          f"model {cfg.model} on {device}/{dtype}")
    runs = ([("greedy", 1, 0.0)] if cfg.greedy else []) + ([("sampled", cfg.sampled, cfg.temperature)] if cfg.sampled else [])
    out_eval = os.path.splitext(cfg.out)[0] + "_eval.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    counts = {"train": 0, "eval": 0, "empty": 0, "tokens": 0}
    with open(cfg.out, "w") as f_train, open(out_eval, "w") as f_eval:
        for kind, n, temperature in runs:
            t0 = time.time()
            keys = [sampling.sample_key(cfg.seed, i) for i in range(len(prompts))]
            rows, stats = sampling.sample_rows(model, tok, ids, n, cfg.max_new_tokens, temperature, cfg.top_p,
                                               [s for _, _, s in prompts], eos_ids, keys, cfg.batch_size)
            for r, toks in enumerate(rows):
                source, prompt, stop = prompts[r // n]
                text, kept = sampling.completion_text(tok, torch.tensor([ids[r // n]]), toks, stop, eos_ids)
                if not text.strip():
                    counts["empty"] += 1
                    continue
                # Held out by prompt (all continuations of a prompt on one side).
                held = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) < cfg.eval_frac * 2 ** 32
                (f_eval if held else f_train).write(json.dumps({"prompt": prompt, "completion": text,
                                                                "source": source, "kind": kind}) + "\n")
                counts["eval" if held else "train"] += 1
                counts["tokens"] += len(kept)
            seconds = time.time() - t0
            print(f"{kind}: {len(rows)} continuations, {stats['tokens']:,} tokens in {seconds:.1f}s "
                  f"({stats['tokens'] / seconds:,.0f} tokens/s)", flush=True)
    print(f"wrote {cfg.out} ({counts['train']} rows) and {out_eval} ({counts['eval']}); {counts['empty']} empty "
          f"continuations skipped; {counts['tokens']:,} completion tokens")
    return counts


# --------------------------------------------------------------------------------------------
# 2. Which drafts to verify
# --------------------------------------------------------------------------------------------

def calibrate(cfg: SpeculateConfig) -> dict:
    """Decode the held-out prompts greedily, verifying the wide --calib_tree, and write its nodes
    ordered by the forwards that kept them (`speculative.calibrated_tree`), with the tokens per
    forward each size of tree would have had. Prompts of the training sources, not HumanEval:
    the tree is chosen on what the heads were trained for, and measured on what they were not."""
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype("float32" if cfg.dtype == "auto" else cfg.dtype, device)
    rows = [r for r in data.read_jsonl(cfg.calib_path) if isinstance(r, dict) and r.get("prompt")]
    prompts = list(dict.fromkeys((r["prompt"], r.get("source", "")) for r in rows))[:cfg.calib_limit or None]
    if not prompts:
        raise config.ConfigError(f"config key 'calib_path': no rows with a 'prompt' in {cfg.calib_path}")
    model, tok = ev.load_model(cfg.model, device, dtype)
    eos_ids = sampling.eos_token_ids(model, tok)
    wide = parse_trees(cfg.calib_tree, model.n_heads)[cfg.calib_tree.strip()] or (1,) * (model.n_heads - 1)
    ids = [tok(p).input_ids for p, _ in prompts]
    t0 = time.time()
    _, st = decode_rows(model, tok, ids, cfg.max_new_tokens, [stop_strings(s) for _, s in prompts], eos_ids,
                        tree=wide, batch_size=cfg.calib_batch, pick_blas=cfg.pick_blas,
                        parallel_heads=cfg.parallel_heads)
    order = calibrated_tree(wide, st["node_hits"])
    F = max(st["verify_forwards"], 1)
    expected = {str(size): round(counted_tpf(order, size, F), 4)
                for size in (1, 2, 4, 8, 10, 15, 16, 20, 30, 32, 40, 60, 64) if size <= len(order)}
    result = {"model": cfg.model, "calib_path": cfg.calib_path, "prompts": len(prompts),
              "calibration_tree": cfg.calib_tree, "max_new_tokens": cfg.max_new_tokens,
              "verify_forwards": st["verify_forwards"], "seconds": round(time.time() - t0, 1),
              "tokens_per_forward": sum(st["tokens"]) / max(sum(st["forwards"]), 1),
              "expected_tokens_per_forward": expected,
              "nodes": [p for p, _ in order], "hits": [h for _, h in order]}
    print(f"{len(prompts)} prompts, {st['verify_forwards']} verify forwards of {cfg.calib_tree}: "
          f"{result['tokens_per_forward']:.2f} tokens/forward; the best N-draft tree would have had "
          + ", ".join(f"{k}: {v:.2f}" for k, v in expected.items()))
    print("first nodes (rank paths, share of forwards that kept them): "
          + ", ".join(f"{''.join(map(str, p))} {h / F:.2f}" for p, h in order[:12]))
    if cfg.calib_sizes:
        result["sizes"] = time_sizes(model, tok, ids[:TIME_PROMPTS], eos_ids, order, F, cfg)
        result["best"] = max(result["sizes"], key=lambda k: result["sizes"][k]["predicted_speedup"])
        print(f"best size: {result['best']} drafts (tree.json without ':N' means these)")
    write_json(cfg.out, result)
    return result


TIME_PROMPTS, TIME_TOKENS = 4, 64  # what `time_sizes` decodes: a forward's cost depends on its shape, not the text


def counted_tpf(order, size: int, forwards: int) -> float:
    """Tokens per forward of the first `size` calibrated nodes: 1 + their hits / forwards."""
    return 1 + sum(h for _, h in order[:size]) / max(forwards, 1)


def ms_per_forward(model, tok, prompts, max_new, eos_ids, cfg, speculative, tree, **kw) -> tuple[float, dict]:
    """Batch-1 decoding of `prompts` (no stop strings) after an untimed warm-up on the first
    (kernel choice, graph capture) -> (ms per forward, prefills excluded; its stats)."""
    run = functools.partial(decode_rows, model, tok, speculative=speculative, tree=tree,
                            check_every=cfg.check_every, pick_blas=cfg.pick_blas,
                            parallel_heads=cfg.parallel_heads, compile=cfg.compile, **kw)
    run(prompts[:1], 16, [], eos_ids)
    _, st = run(prompts, max_new, [], eos_ids)
    return 1000 * (st["seconds"] - st["prefill_s"]) / max(sum(st["forwards"]) - len(prompts), 1), st


def time_sizes(model, tok, ids, eos_ids, order, forwards, cfg) -> dict:
    """Each --calib_sizes tree (the first N calibrated nodes) timed at batch 1 against plain
    decoding on the same prompts (ms per forward, prefills excluded), and its predicted speed-up:
    the tokens per forward the calibration counted for it x plain's ms / its ms. The size is
    then chosen on held-out training prompts and this GPU's timings, not on the test set."""
    plain, _ = ms_per_forward(model, tok, ids, TIME_TOKENS, eos_ids, cfg, False, None)
    sizes = {}
    for size in sorted({int(x) for x in cfg.calib_sizes.split(",") if x.strip()}):
        if size > len(order):
            continue
        tpf = counted_tpf(order, size, forwards)
        cost, _ = ms_per_forward(model, tok, ids, TIME_TOKENS, eos_ids, cfg, True, tuple(tuple(p) for p, _ in order[:size]))
        sizes[str(size)] = {"tokens_per_forward": round(tpf, 4), "ms_per_forward": round(cost, 3),
                            "plain_ms_per_forward": round(plain, 3), "predicted_speedup": round(tpf * plain / cost, 4)}
        print(f"  {size} drafts: {tpf:.2f} tokens/forward, {cost:.2f} ms per forward (plain {plain:.2f}): "
              f"predicted {tpf * plain / cost:.2f}x", flush=True)
    return sizes


# --------------------------------------------------------------------------------------------
# 3. The measurements: the speed-up (`measure`) and where a forward's time goes (`forward_cost`)
# --------------------------------------------------------------------------------------------

def base_identical(model, spec: str) -> dict:
    """Is the checkpoint's base model (trunk, head 0, norm, unembedding) bit for bit the original?"""
    original, _ = ev.load_model(spec, "cpu", torch.float32)
    mine = {k: v.detach().cpu() for k, v in model.base.state_dict().items()}
    theirs = original.base.state_dict()
    differ = [k for k in theirs if k not in mine or not torch.equal(mine[k].to(theirs[k].dtype), theirs[k])]
    return {"base": spec, "tensors": len(theirs), "differ": differ, "identical": not differ and len(mine) == len(theirs)}


def measure(cfg: SpeculateConfig):
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype("float32" if cfg.dtype == "auto" else cfg.dtype, device)
    t_load = time.time()
    model, tok = ev.load_model(cfg.model, device, dtype)
    eos_ids = sampling.eos_token_ids(model, tok)
    problems = ev.load_humaneval(None)[:cfg.task_limit or None]
    prompts = [tok(p["prompt"]).input_ids for p in problems]
    stops = [p["stop"] for p in problems]
    result = {"model": cfg.model, "n_heads": model.n_heads, "device": str(device), "dtype": str(dtype),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "task": "humaneval", "n_problems": len(problems),
              "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy", "check_every": cfg.check_every,
              "pick_blas": cfg.pick_blas, "parallel_heads": cfg.parallel_heads,
              "load_seconds": round(time.time() - t_load, 1), "batch": {}}
    if cfg.base:
        result["base_check"] = base_identical(model, cfg.base)
        print(f"base weights identical to {cfg.base}: {result['base_check']['identical']}", flush=True)

    trees = parse_trees(cfg.trees, model.n_heads)

    def run(speculative, bs, idx=None, tree=None):
        ps = prompts if idx is None else [prompts[i] for i in idx]
        ss = stops if idx is None else [stops[i] for i in idx]
        return decode_rows(model, tok, ps, cfg.max_new_tokens, ss, eos_ids, speculative=speculative,
                           batch_size=bs, check_every=cfg.check_every, tree=tree, compile=cfg.compile,
                           pick_blas=cfg.pick_blas, parallel_heads=cfg.parallel_heads)

    texts = {}
    for bs in [int(b) for b in cfg.batch_sizes.split(",") if b.strip()]:
        t0 = time.time()
        warm = range(min(bs, len(prompts)))  # untimed warm-up: lazy initialisation, kernel choice, compiling
        run(False, bs, warm)
        plain, ps = run(False, bs)
        r = {"plain_seconds": round(ps["seconds"], 2), "plain_prefill_seconds": round(ps["prefill_s"], 2),
             "plain_host_seconds": round(ps["host_s"], 2), "plain_tokens_per_s": sum(ps["tokens"]) / max(ps["seconds"], 1e-9),
             "plain_tokens_per_forward": sum(ps["tokens"]) / max(sum(ps["forwards"]), 1), "speculative": {}}
        for name, tree in trees.items():
            run(True, bs, warm, tree)
            spec, ss = run(True, bs, tree=tree)
            r["speculative"][name] = speculative_stats(ps, ss, plain, spec, problems)
            texts.setdefault(bs, (plain, spec))
            s = r["speculative"][name]
            print(f"batch {bs}, drafts {name} ({ss['n_block'] - 1} per forward): {s['tokens_per_forward']:.2f} "
                  f"tokens/forward, acceptance {', '.join(f'{v:.2f}' for v in s['acceptance_per_head'].values())}, "
                  f"plain {r['plain_seconds']}s vs speculative {s['speculative_seconds']}s = {s['speedup']:.2f}x, "
                  f"{s['completions_differing_from_plain']} differ", flush=True)
        r["wall_seconds"] = round(time.time() - t0, 1)
        result["batch"][str(bs)] = r
    if len(texts) > 1:  # batching itself (a different batch shape) may round differently
        (b1, (p1, _)), *rest = texts.items()
        result["plain_differing_across_batch_sizes"] = {
            f"{b1}_vs_{b}": sum(x != y for x, y in zip(p1, p)) for b, (p, _) in rest}
    if cfg.execute:
        t0 = time.time()
        _, spec = next(iter(texts.values()))
        done = [sampling.completion_text(tok, torch.tensor([prompts[i]]), spec[i], stops[i], eos_ids)[0]
                for i in range(len(problems))]
        from support import sandbox
        verdicts = sandbox.check_all(list(zip(problems, done)), cfg.workers or os.cpu_count() or 1)
        result["pass@1_speculative_greedy"] = sum(bool(v["passed"]) for v in verdicts) / max(len(problems), 1)
        result["execution_seconds"] = round(time.time() - t0, 1)
        print(f"pass@1 (greedy, speculative = plain where they agree): {result['pass@1_speculative_greedy']:.4f}")
    write_json(cfg.out, result)
    return result


def write_json(path: str, result: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def forward_cost(cfg: SpeculateConfig) -> dict:
    """ms per forward of plain decoding and of each --trees verify at batch 1, on the first
    --task_limit HumanEval prompts (default 6) with no stop strings, --max_new_tokens each: the
    decoders of `measure` (CUDA graphs, host checks every --check_every), prefills excluded. The
    cost does not depend on what the heads draft, only on the block's shape."""
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype("float32" if cfg.dtype == "auto" else cfg.dtype, device)
    if cfg.blas:
        torch.backends.cuda.preferred_blas_library(cfg.blas)
    model, tok = ev.load_model(cfg.model, device, dtype)
    eos_ids = sampling.eos_token_ids(model, tok)
    prompts = [tok(p["prompt"]).input_ids for p in ev.load_humaneval(None)[:cfg.task_limit or 6]]
    result = {"model": cfg.model, "dtype": str(dtype), "blas": cfg.blas or "default", "pick_blas": cfg.pick_blas,
              "parallel_heads": cfg.parallel_heads, "compile": cfg.compile,
              "n_prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens, "ms_per_forward": {}}
    shapes = [("plain", False, None)] + [(name, True, tree) for name, tree in parse_trees(cfg.trees, model.n_heads).items()]
    for name, speculative, tree in shapes:
        ms, st = ms_per_forward(model, tok, prompts, cfg.max_new_tokens, eos_ids, cfg, speculative, tree)
        result["ms_per_forward"][name] = round(ms, 3)
        print(f"{name}: {ms:.3f} ms per forward ({st['n_block']} tokens per block)", flush=True)
        if cfg.kernels and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CUDA graphs, as measured (the profiler sees inside them)
                decode_rows(model, tok, prompts[:1], 40, [], eos_ids, speculative=speculative, tree=tree,
                            check_every=cfg.check_every, pick_blas=cfg.pick_blas,
                            parallel_heads=cfg.parallel_heads, compile=cfg.compile)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70))
    write_json(cfg.out, result)
    return result


def parse_trees(spec: str, n_heads: int | None = None) -> dict:
    """--trees=chain,3x2x1 -> {"chain": None, "3x2x1": (3, 2, 1)}: the drafts each speculative run
    verifies (`speculative.draft_tree`: head d's top widths[d-1] under every node of depth d-1)."""
    trees = {}
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        try:
            trees[name] = parse_tree(name, n_heads)
        except ValueError as e:
            raise config.ConfigError(f"trees: {e}") from None
    if not trees:
        raise config.ConfigError("trees: empty; use chain, widths like 3x2x1 or tree.json:N")
    return trees


def speculative_stats(ps, ss, plain, spec, problems) -> dict:
    """One speculative run against the plain run of the same batch size."""
    n_drafts = len(ss["accepted"])
    differ = [problems[i]["task_id"] for i in range(len(problems)) if plain[i] != spec[i]]
    return {"tree": list(ss["tree"]), "block": ss["n_block"], "speculative_seconds": round(ss["seconds"], 2),
            # of which: prefills, and the host's checks while the device waited (the rest: forwards)
            "prefill_seconds": round(ss["prefill_s"], 2), "host_seconds": round(ss["host_s"], 2),
            "speedup": ps["seconds"] / max(ss["seconds"], 1e-9), "tokens": sum(ss["tokens"]),
            "speculative_tokens_per_s": sum(ss["tokens"]) / max(ss["seconds"], 1e-9),
            "tokens_per_forward": sum(ss["tokens"]) / max(sum(ss["forwards"]), 1),
            # Draft k's acceptance: the share of verify forwards that kept it (it is kept only if
            # drafts 1..k-1 were); conditional: given draft k-1 was kept.
            "acceptance_per_head": {f"head{k + 1}": ss["accepted"][k] / max(ss["verify_forwards"], 1)
                                    for k in range(n_drafts)},
            "conditional_acceptance_per_head": {
                f"head{k + 1}": ss["accepted"][k] / max(ss["accepted"][k - 1] if k else ss["verify_forwards"], 1)
                for k in range(n_drafts)},
            "completions_differing_from_plain": len(differ), "differing_task_ids": differ,
            "capture_seconds": round(ps["capture_s"] + ss["capture_s"], 2)}


def main(argv):
    cfg = config.parse_config(SpeculateConfig, argv, positional="model")
    if not cfg.model:
        raise config.ConfigError("no model: python -m tools.speculate MODEL --stage=data|calibrate|measure|cost [--key=value ...]")
    preflight.check_model_spec("model", cfg.model)
    if cfg.base:
        preflight.check_model_spec("base", cfg.base)
    if cfg.stage == "data":
        for key in ("stdlib_path", "mbpp_path"):
            if getattr(cfg, key):
                preflight.check_file(key, getattr(cfg, key))
    if cfg.stage == "calibrate":
        preflight.check_file("calib_path", cfg.calib_path)
        preflight.check_min("calib_batch", cfg.calib_batch, 1)
        preflight.check_min("calib_limit", cfg.calib_limit, 0)
        if not all(x.strip().isdigit() and int(x) >= 1 for x in cfg.calib_sizes.split(",") if x.strip()):
            raise config.ConfigError(f"config key 'calib_sizes': whole numbers >= 1 like 4,8,16; got {cfg.calib_sizes!r}")
        parse_trees(cfg.calib_tree)
    if cfg.stage in ("measure", "cost"):
        parse_trees(cfg.trees)  # the syntax (and tree files) now; the depth once the model's heads are known
    preflight.check_min("sampled", cfg.sampled, 0)
    preflight.check_min("max_new_tokens", cfg.max_new_tokens, 1)
    preflight.check_min("batch_size", cfg.batch_size, 1)
    preflight.check_range("eval_frac", cfg.eval_frac, 0, 1)
    if cfg.blas not in ("", "cublas", "cublaslt"):
        raise config.ConfigError(f"config key 'blas': one of '', cublas, cublaslt; got {cfg.blas!r}")
    if not cfg.out:
        cfg.out = {"data": "out/draft/distill.jsonl", "calibrate": "out/draft/tree.json",
                   "measure": "out/draft/measure.json", "cost": "out/draft/cost.json"}[cfg.stage]
    preflight.check_out_dir("out", os.path.dirname(os.path.abspath(cfg.out)))
    return {"data": distill_data, "calibrate": calibrate, "measure": measure, "cost": forward_cost}[cfg.stage](cfg)


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
