"""
common.py — the training plumbing train_rho1.py and train_critic.py share (in the spirit of
nanochat's common.py): how a run is configured, placed on devices, optimized, checkpointed and
tracked. None of the MTP or weighting math is here (that is mtp.py and train_critic.py).

Read top to bottom:
  1. Config: YAML + `--key=value` overrides -> plain dataclasses: the one command-line dialect of
     every script, eval.py's and the tools' included; `--help` lists every key with its type,
     default and meaning (the comment beside its field). Unknown keys and bad values are errors
     naming the key; the checks of the sections both training scripts share (the generic ones
     are support/preflight.py's).
  2. Devices, processes and models: cuda > mps > cpu; torchrun -> a process group and FSDP2
     sharding; the policy loaded from a spec (support/model_io.py). (Activation checkpointing and
     the memory model: support/memory.py.)
  3. Optimizer: AdamW with warmup + cosine, clipping, the NaN/inf guard, head warm-up.
  4. Held-out loss, resumable sharded checkpoints (torch.distributed.checkpoint) that carry the
     run's config and refuse to resume into another model, stopping on SIGTERM/SIGINT, the
     consolidated export. (MLflow itself: support/tracking.py; per-head step metrics:
     support/metrics.py.)
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
import warnings

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
import torch.utils.checkpoint

import mtp
from support import memory, model_io, preflight, tracking
from support.config import ConfigError

# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------

# The run sections every training script shares (each script sets its own defaults).
@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 100             # optimizer steps of the run
    global_batch: int = 32           # sequences per optimizer step, over all ranks and micro-steps
    micro_batch: int = 4             # sequences per forward, per rank
    lr: float = 2e-5                 # peak learning rate (AdamW), reached after warmup_steps
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10           # linear warm-up of the learning rate from 0
    weight_decay: float = 0.1        # AdamW's decoupled weight decay (not on norms and biases)
    beta1: float = 0.9               # AdamW's β1
    beta2: float = 0.95              # AdamW's β2
    grad_clip: float = 1.0           # clip the global gradient norm to this (0 = no clipping)
    eval_every: int = 50             # held-out loss every N steps (0 = only at the end)
    log_every: int = 1               # metrics to the progress bar and MLflow every N steps
    save_every: int = 0              # sharded resumable checkpoint every N steps (0 = none)
    keep_last: int = 2               # resumable checkpoints to keep
    out_dir: str = "out/run"         # checkpoints/ and the final/ export go here
    device: str = "auto"             # auto = cuda > mps > cpu
    dtype: str = "auto"              # auto = bf16 on cuda/mps, fp32 on cpu
    seed: int = 1337                 # data order and every random draw of the run
    chunk_size: int = 0              # tokens per logits chunk in the loss; 0 = from vocab size
    compile: bool = False            # torch.compile each transformer block
    heads_only_steps: int = 0        # head warm-up: the first N steps train heads 1..n-1 alone
    sequential_heads: bool = True    # Meta's per-head forward+backward (n_heads > 1): one head's activations alive, same gradients
    checkpointing: str | bool = "auto"  # activation checkpointing of the trunk's blocks: off, selective (keep the matmul and
                                     # attention outputs, recompute the element-wise ops), partial (the lowest
                                     # checkpoint_blocks blocks fully, the rest off), full, or auto (the least
                                     # recomputation that the memory model fits in memory_budget_gb; no budget: off)
    checkpoint_blocks: int = 0       # partial: how many trunk blocks (the lowest) recompute their whole forward
    memory_budget_gb: float = 0.0    # auto: the device memory (GB) a step may take, by the memory model printed at
                                     # start-up (weights, gradients, AdamW, activations, loss, margin); 0 = no limit
    overwrite: bool = False          # a fresh run may replace an earlier run's checkpoints/ and final/ in out_dir


# ---- checks before anything heavy loads ----------------------------------------------------
# Each script's check_config(cfg, world) runs right after parse_config and calls these: a bad
# value or path is one line naming the key and the fix (run_main: exit status 2), in seconds,
# instead of a traceback after the model has loaded.

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def world_size() -> int:
    """The number of processes of this run (torchrun sets WORLD_SIZE), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def earlier_run(out_dir: str) -> list[str]:
    """What an earlier run left in out_dir: its checkpoints and its final/ export."""
    found = [os.path.join("checkpoints", os.path.basename(d)) for d in _ckpt_dirs(out_dir)]
    return found[-1:] + (["final/"] if os.path.isdir(os.path.join(out_dir, "final")) else [])


def check_train(t: TrainConfig, world: int, resume, dry_run: bool, writes: bool = True, key: str = "train"):
    """The shared `train` section: ranges, batch divisibility, device, dtype, out_dir; and a
    fresh run may not write into an earlier run's out_dir unless told (--overwrite). writes=False:
    this run writes nothing to out_dir (train_critic.py --stages=value)."""
    pick_device(t.device, f"{key}.device")
    if t.dtype not in DTYPES:
        raise ConfigError(f"config key '{key}.dtype': {t.dtype!r} is not one of {list(DTYPES)}")
    preflight.check_min(f"{key}.max_steps", t.max_steps, 1)
    preflight.check_batches(key, t.global_batch, t.micro_batch, world)
    preflight.check_min(f"{key}.lr", t.lr, 0)
    preflight.check_range(f"{key}.min_lr_ratio", t.min_lr_ratio, 0, 1)
    preflight.check_range(f"{key}.beta1", t.beta1, 0, 1, hi_open=True)
    preflight.check_range(f"{key}.beta2", t.beta2, 0, 1, hi_open=True)
    for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "keep_last",
                 "chunk_size", "heads_only_steps", "checkpoint_blocks", "memory_budget_gb"):
        preflight.check_min(f"{key}.{name}", getattr(t, name), 0)
    t.checkpointing = memory.checkpointing_name(t.checkpointing, f"{key}.checkpointing")
    if t.checkpointing == "partial" and t.checkpoint_blocks < 1:
        raise ConfigError(f"config key '{key}.checkpoint_blocks': partial checkpointing needs the number of trunk "
                          f"blocks to recompute: set --{key}.checkpoint_blocks=K (K >= 1)")
    preflight.check_min(f"{key}.log_every", t.log_every, 1)
    if not writes:
        return
    preflight.check_out_dir(f"{key}.out_dir", t.out_dir)
    if resume and t.overwrite:
        raise ConfigError("--resume continues the run in out_dir and --overwrite would delete it: choose one")
    found = earlier_run(t.out_dir)
    if found and not (resume or t.overwrite or dry_run):
        raise ConfigError(f"config key '{key}.out_dir': {t.out_dir!r} holds an earlier run ({', '.join(found)}); "
                          f"continue it with --resume, choose a new directory with --{key}.out_dir=DIR, "
                          f"or replace it with --overwrite")


def clear_earlier_run(out_dir: str, dist):
    """--overwrite: rank 0 deletes the earlier run's checkpoints/ and final/ before training (its
    checkpoints would otherwise be taken for this run's by --resume, and its final/ for this run's
    result); other files in out_dir stay."""
    import shutil
    found = earlier_run(out_dir)
    if dist.rank == 0 and found:
        print(f"--overwrite: deleting the earlier run's {', '.join(found)} in {out_dir}")
        for d in ("checkpoints", "final"):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)


def check_policy(m, t: TrainConfig, world: int = 1):
    """The `model` section both training scripts share: policy, tokenizer, n_heads, head_discount,
    which layers train."""
    preflight.check_model_spec("model.policy", m.policy)
    if m.tokenizer:
        preflight.check_model_spec("model.tokenizer", m.tokenizer, kind="tokenizer")
    elif m.policy.endswith(".json"):
        raise ConfigError("config key 'model.tokenizer': a random-init policy (model-config .json) has no "
                          "tokenizer of its own; set --model.tokenizer=DIR_OR_HUB_ID")
    preflight.check_min("model.n_heads", m.n_heads, 1)
    preflight.check_min("model.head_discount", m.head_discount, 0, strict=True)
    if t.heads_only_steps and m.n_heads == 1:
        raise ConfigError("config key 'train.heads_only_steps': a 1-head model has no heads to warm up; "
                          "set --train.heads_only_steps=0 or --model.n_heads=2 or more")
    preflight.check_min("model.train_layers", m.train_layers, 0)
    if m.frozen_in_compute_dtype and world > 1:
        raise ConfigError("config key 'model.frozen_in_compute_dtype' is for one process: FSDP2 shards a block's "
                          "weights together, in one dtype; its mixed precision already computes in train.dtype")


# --------------------------------------------------------------------------------------------
# 2. Devices, processes, models
# --------------------------------------------------------------------------------------------

def pick_device(pref: str = "auto", key: str = "device") -> torch.device:
    """cuda > mps > cpu unless the config names one."""
    if pref != "auto":
        kind = pref.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not (
                getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError(f"config key {key!r}: {pref!r} is not available on this machine "
                              f"(--{key}=auto picks cuda > mps > cpu)")
        try:
            return torch.device(pref)
        except RuntimeError:
            raise ConfigError(f"config key {key!r}: {pref!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(pref: str, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 where the device supports it (cuda, mps), fp32 on cpu, or as named."""
    if pref == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.bfloat16 if device.type == "mps" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[pref]


@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    group: typing.Any  # the default process group under torchrun, None in a single process


def init_distributed(device_pref: str = "auto") -> Dist:
    """Under torchrun (RANK is set), join the process group: NCCL on GPUs, gloo on CPU.
    Otherwise a single process on the preferred device."""
    if "RANK" not in os.environ:
        return Dist(0, 1, pick_device(device_pref), None)
    import torch.distributed as tdist
    device = pick_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                             device_id=device if device.type == "cuda" else None)
    return Dist(tdist.get_rank(), tdist.get_world_size(), device, tdist.group.WORLD)


def shutdown(dist: Dist):
    if dist.group is not None and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train_top_only(model: mtp.MTPModel, train_layers: int, frozen_dtype=None):
    """model.train_layers: fine-tune the top of the model only -- the last `train_layers` blocks of
    the base (head 0 is the last), every extra head, the final norm and the unembedding -- and
    freeze the embeddings and the blocks below them. The frozen part needs no gradient, no AdamW
    states and no backward below the lowest trained block; with `frozen_dtype` (the compute
    dtype) it is also held in that dtype rather than fp32, since it is never updated (autocast
    ran its matmuls in it anyway). A 1.3B Llama with 4 heads and train_layers=8 keeps 0.62B of
    its 1.5B parameters trained: 10 GB of fp32 weights, gradients and AdamW states instead of
    24 (configs/m3.yaml). Tied embeddings train with the unembedding they are."""
    if train_layers <= 0:
        return
    _, blocks, _ = mtp.find_blocks(model.base)
    if train_layers > len(blocks):
        raise ConfigError(f"config key 'model.train_layers' is {train_layers} but the policy has {len(blocks)} blocks")
    trained = {id(p) for m in [*list(blocks)[-train_layers:], *model.extra_heads, model._norm,
                               model.base.get_output_embeddings()] for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
        if id(p) not in trained and frozen_dtype is not None:
            p.data = p.data.to(frozen_dtype)


def prepare_for_training(model, ref, dist: Dist, dtype, compile=False):
    """Put the policy (trainable) and the reference (frozen, or None) on their devices.

    Single process: fp32 master weights on the device (autocast does the low-precision
    compute), reference cast to the compute dtype (it is never updated).
    torchrun: FSDP2 (`fully_shard`) on every block -- trunk and heads -- then the root, bf16
    parameters for compute with fp32 gradient reduction (MixedPrecisionPolicy); the reference is
    sharded the same way.
    """
    if compile:
        for block in memory.transformer_blocks(model):
            block.compile()
    if dist.group is None:
        return model.to(dist.device), (ref.to(dist.device, dtype) if ref is not None else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for m in (model,) + ((ref,) if ref is not None else ()):
        for block in memory.fsdp_blocks(m):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(m, mesh=mesh, mp_policy=mp)
    return model, ref


def autocast(device, dtype, dist: Dist):
    """Low-precision compute on one device; under FSDP its mixed-precision policy does this."""
    import contextlib
    if dtype == torch.float32 or dist.group is not None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_policy(spec: str, n_heads: int, tokenizer: str = "", sequential_heads: bool = True):
    """The policy to fine-tune -> (MTPModel, tokenizer): a Meta MTP checkpoint (its heads are
    already trained, so its n_future_tokens must equal n_heads), or any causal LM wrapped with
    n_heads heads. `tokenizer` overrides the model's own (needed for a random-init .json model).
    `sequential_heads` (train.sequential_heads): the training loss runs the heads one at a time
    (mtp.MTPModel._sequential_loss) when there is more than one. Errors name the config key at
    fault."""
    if model_io.is_meta_checkpoint(spec) or os.path.isfile(os.path.join(spec, model_io.MTP_CONFIG)):
        # trained heads come with the model (Meta's release, or a WMTP export to fine-tune further)
        meta = model_io.is_meta_checkpoint(spec)
        model, tok = model_io.load_meta_checkpoint(spec) if meta else model_io.load_consolidated(spec)
        if model.n_heads != n_heads:
            raise ConfigError(f"config key 'model.n_heads' is {n_heads} but {spec} has "
                              f"{'n_future_tokens' if meta else 'n_heads'}={model.n_heads}")
    else:
        base, tok = model_io.load_model_and_tokenizer(spec, dtype=torch.float32)
        model = mtp.MTPModel(base, n_heads)
    model.sequential_heads = sequential_heads and model.n_heads > 1
    if tokenizer:
        tok = model_io.load_tokenizer(tokenizer)
    if tok is None:
        raise ConfigError(f"config key 'model.tokenizer': policy {spec!r} has no tokenizer of its "
                          f"own, name one")
    if len(tok) > model.config.vocab_size:
        raise ConfigError(f"config key 'model.tokenizer': {len(tok)} tokens do not fit the "
                          f"policy's vocabulary of {model.config.vocab_size}")
    return model, tok


# --------------------------------------------------------------------------------------------
# 3. Optimizer and schedule
# --------------------------------------------------------------------------------------------

def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_cosine(params, lr, weight_decay, betas, warmup, total, min_ratio, device):
    """AdamW + the warmup-cosine LR schedule. No weight decay on norms and biases (1-D tensors),
    as in nanoGPT / Meta's recipes."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=lr, betas=betas, fused=fused_adamw(device))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))
    return optimizer, schedule


def fused_adamw(device) -> bool:
    """AdamW's fused kernel (one launch for all parameters instead of a loop over them): on CUDA,
    on MPS from torch 2.4 (where it arrived; fp32 parameters, as ours are), and on the CPU of a
    single process."""
    if device.type == "mps":
        return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    return device.type == "cuda" or (device.type == "cpu" and not torch.distributed.is_initialized())


def drop_base_grads(model):
    """Head warm-up (train.heads_only_steps): forget every gradient but the extra heads', so that
    the optimizer step trains heads 1..n-1 alone. AdamW skips a parameter without a gradient
    entirely (no update, no weight decay, no moment update), so the base model -- embeddings,
    trunk, head 0, final norm, unembedding -- stays bit for bit what it was, and its moments
    start clean when warm-up ends. Why: fresh heads start far from their targets (CE ~12 on
    SmolLM2, the head warm-up demo of docs/training.md) and, trained jointly from step 0, their large gradients pull the
    shared trunk and unembedding away from next-token prediction (head 0's held-out CE 1.44 ->
    2.52 in that demo). Medusa (Cai et al. 2024, §2.2.2) trains its heads on a frozen backbone
    before joint training for the same reason. The trunk's backward still runs (its gradients
    are simply dropped): simple, and warm-up is short."""
    for p in model.base.parameters():
        p.grad = None


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; works on FSDP's DTensor gradients too."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_step(model, optimizer, schedule, loss: torch.Tensor, max_norm: float, where: str) -> torch.Tensor:
    """Clip, then update -- unless the loss (all ranks' sum) or the gradient norm is NaN/inf: a
    diverging step must not reach the weights, so we stop before the update (the last
    checkpoint stays good) and say where it happened. Returns the gradient norm before clipping."""
    grad_norm = clip_grad_norm(model, max_norm)
    memory.record_memory(grad_norm.device)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise FloatingPointError(f"{where}: non-finite loss ({loss.item()}) or grad norm "
                                 f"({grad_norm.item()}); weights not updated")
    optimizer.step()
    memory.record_memory(grad_norm.device)
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --------------------------------------------------------------------------------------------
# 4. Held-out loss, checkpoints, export, tracking
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_ce(model, batches, device, amp, chunk_size, group, progress: bool = False) -> list[float]:
    """Mean CE per head over the completion tokens of held-out batches (all ranks); `progress`: a
    progress bar (rank 0), which goes away when done."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    n_heads = model.n_heads
    tot = torch.zeros(2, n_heads, device=device)
    for b in tqdm(batches, desc="held-out CE", disable=not progress, leave=False, dynamic_ncols=True):
        ids = b["input_ids"].to(device)
        valid = mtp.align_to_heads(b["loss_mask"].to(device), n_heads)
        with amp:
            _, ce, _, _ = model(ids, mtp.align_to_heads(ids, n_heads), coef=valid.float(), chunk_size=chunk_size)
        tot += torch.stack([(ce * valid).flatten(1).sum(1), valid.flatten(1).sum(1)])
    model.train(was_training)
    tot = mtp.all_reduce(tot, "sum", group)
    return (tot[0] / tot[1].clamp_min(1)).tolist()


def dry_run_checkpoint(out_dir, step, model, optimizer, schedule, run_cfg, dist):
    """--dry_run's proof that checkpoints work: the step's checkpoint written by the code a real
    run uses (into out_dir/.dry_run/), read back into the live model and optimizer, the step and
    a parameter checked, then deleted (out_dir too, if the dry run created it)."""
    import shutil
    scratch = os.path.join(out_dir, ".dry_run")
    created = not os.path.exists(out_dir)
    probe = next(p for p in model.parameters() if p.requires_grad)
    before = (probe.to_local() if hasattr(probe, "to_local") else probe).detach().clone()
    save_checkpoint(scratch, step, model, optimizer, schedule, keep_last=1, run_cfg=run_cfg)
    with torch.no_grad():
        probe.mul_(0)  # so that reading it back must restore it
    loaded = load_checkpoint("latest", scratch, model, optimizer, schedule, run_cfg)
    after = (probe.to_local() if hasattr(probe, "to_local") else probe).detach()
    if loaded != step or not torch.equal(before, after):
        raise RuntimeError(f"dry run: the checkpoint did not read back (step {loaded} of {step})")
    if dist.group is not None:
        torch.distributed.barrier()
    if dist.rank == 0:
        shutil.rmtree(out_dir if created else scratch, ignore_errors=True)


def _ckpt_dirs(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if d.startswith("step_") and not d.endswith(".tmp"))


# Every checkpoint carries the config of the run that wrote it (RUN_CONFIG, written by rank 0
# into the step directory before the rename): `identity` -- what the model and the loss are
# (the weighting, the keys each script lists as RESUME_KEYS, the vocabulary size) -- and the
# whole resolved config, for the record. A resume must have the same identity.
RUN_CONFIG = "run_config.json"


def _norm(v):
    """A spec or path that exists locally, made absolute: the same model named from another cwd
    is the same model."""
    return os.path.realpath(v) if isinstance(v, str) and v and os.path.exists(v) else v


def run_config(weighting: str, cfg, keys: tuple[str, ...], **extra) -> dict:
    """What save_checkpoint records and check_resume compares: {"identity": {weighting, the
    values of `keys` (dotted config keys), extra (e.g. vocab_size once the model is loaded)},
    "config": the whole flattened config}."""
    flat = tracking.flatten_config(cfg)
    values = {k: _norm(extra.pop(k, flat[k])) for k in keys}
    return {"identity": {"weighting": weighting, **values, **extra}, "config": flat}


def find_checkpoint(which: str, out_dir: str) -> str:
    """`--resume` ("latest" or a path) -> the directory of a complete checkpoint, or a one-line
    error (FileNotFoundError) saying why there is none."""
    if which in ("latest", "true", "True"):
        found = _ckpt_dirs(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume: nothing to resume in {out_dir}: no complete checkpoint under "
                                    f"{out_dir}/checkpoints (runs write them every train.save_every steps and when "
                                    f"stopped by SIGTERM/SIGINT); check --train.out_dir, or start a fresh run "
                                    f"without --resume")
        return found[-1]
    if not os.path.isfile(os.path.join(which, ".metadata")):
        raise FileNotFoundError(f"--resume: {which!r} is not a complete checkpoint")
    return which


def check_resume(path: str, current: dict):
    """Refuse to resume a checkpoint written by a run of another model or loss: every key of the
    current run's identity (run_config) that the checkpoint recorded must be equal. A checkpoint
    written before checkpoints carried their config can only be warned about."""
    import json
    import sys
    f = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(f):
        print(f"warning: {path} has no {RUN_CONFIG} (written by an older WMTP): cannot check that it is "
              f"of this run's model and loss", file=sys.stderr)
        return
    with open(f) as fh:
        record = json.load(fh)
    saved = record["identity"]
    diffs = [k for k, v in current["identity"].items() if k in saved and saved[k] != v]
    if diffs:
        what = "; ".join(f"{k}: {saved[k]!r} in the checkpoint, {current['identity'][k]!r} now" for k in diffs)
        fix = " ".join(f"--{k}={saved[k]}" for k in diffs if k in current["config"])
        raise ConfigError(f"--resume: {path} was written by a run of another model or loss ({what}); resume "
                          f"with the checkpoint's values{f' ({fix})' if fix else ''}, or start a new run in "
                          f"another --train.out_dir")
    # The schedule is a function of these keys (warmup_cosine), and the one restored is only its
    # step count: a changed value reshapes the rest of the run's learning rate. Allowed (extending
    # a run is a use), but said.
    schedule = [k for k in ("train.max_steps", "train.warmup_steps", "train.lr", "train.min_lr_ratio")
                if k in record.get("config", {}) and k in current["config"] and record["config"][k] != current["config"][k]]
    if schedule:
        print("note: --resume with " + ", ".join(f"{k}={current['config'][k]} (the checkpoint's run had "
                                                 f"{record['config'][k]})" for k in schedule)
              + ": the learning-rate schedule of the remaining steps follows the new values", file=sys.stderr)


def _identity(path):
    import json
    try:
        with open(os.path.join(path, RUN_CONFIG)) as f:
            return json.load(f)["identity"]
    except (OSError, ValueError, KeyError):
        return None


_last_saved = None  # the directory of this process's latest save_checkpoint


def checkpoint_dir(out_dir, step) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:08d}")


def save_checkpoint(out_dir, step, model, optimizer, schedule, keep_last=2, run_cfg=None):
    """A sharded, resumable checkpoint (torch.distributed.checkpoint): model, optimizer, LR
    schedule, step, RNG, and the run's config (run_config). Every rank writes its shards into
    `step_N.tmp`; only when all are done does rank 0 rename it to `step_N`, so a run killed
    mid-write leaves the previous checkpoint as the latest. The data position is the step itself
    (data.step_batches). Pruning (keep_last) deletes only older checkpoints of the same identity:
    never another run's."""
    import json
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd,
             "meta": {"step": step, "schedule": schedule.state_dict(),
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    final = checkpoint_dir(out_dir, step)
    tmp = final + ".tmp"
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    master = not dist_on or torch.distributed.get_rank() == 0
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if dist_on:
        torch.distributed.barrier()
    with warnings.catch_warnings():  # "... assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    if master and run_cfg is not None:
        with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
            json.dump(run_cfg, f, indent=1, default=str)
    if dist_on:
        torch.distributed.barrier()
    if master:
        if os.path.isdir(final):  # this step again, after resuming from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        mine = _identity(final)
        older = [d for d in _ckpt_dirs(out_dir) if d < final and _identity(d) == mine]
        for old in older[:max(0, len(older) - keep_last + 1)] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist_on:
        torch.distributed.barrier()
    global _last_saved
    _last_saved = os.path.abspath(final)


def load_checkpoint(which, out_dir, model, optimizer, schedule, run_cfg=None) -> int:
    """Restore a checkpoint written by save_checkpoint (`which` = "latest" or a path) into the
    live, already sharded model and optimizer; -> the step to continue from. The checkpoint may
    come from a run with a different number of ranks (DCP reshards on load); with `run_cfg`, it
    must be of the same model and loss (check_resume)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = find_checkpoint(which, out_dir)
    if run_cfg is not None:
        check_resume(path, run_cfg)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd,
             "meta": {"step": 0, "schedule": schedule.state_dict(), "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = state["meta"]
    schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(meta["rng_cpu"])
    if meta["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["rng_cuda"])
    return int(meta["step"])


class StopSignal:
    """SIGTERM (what SLURM and Kubernetes send before they preempt a job) and SIGINT (Ctrl-C)
    during training. The first one is noted; the script checks `requested()` at the end of every
    optimizer step, and then writes a checkpoint, prints the command that resumes it and exits
    with status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT, the shell's
    convention: a scheduler sees a failed job) -- `save_on_stop`. A second signal exits at once
    (same status, nothing written); one within a second of the first is taken for the same
    signal delivered twice (SLURM signals every process of a job step, and torchrun forwards it
    to workers that already got it). Under torchrun the ranks agree every step (one all-reduce
    of one number), so all stop after the same step even if only some got the signal. A signal
    that arrives after the last step lets the final export finish."""

    def __init__(self, script: str, argv: list[str]):
        import signal
        self.script, self.argv, self.signum, self.stopped, self.t_first = script, list(argv), 0, False, 0.0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        import signal
        import time
        name = signal.Signals(signum).name
        if self.signum and time.monotonic() - self.t_first < 1.0:
            return  # the same signal, delivered twice
        if self.signum:
            os.write(2, f"\n{name} again: exiting at once, nothing saved\n".encode())
            os._exit(128 + signum)
        self.signum, self.t_first = signum, time.monotonic()
        # os.write, not print: the handler may interrupt a print (tqdm's) to the same stream
        os.write(2, f"\n{name}: stopping after this step with a checkpoint (send it again to exit at once)\n".encode())

    def requested(self, dist: Dist) -> bool:
        """Did this rank, or any rank, get a signal? (end of a step; a collective under torchrun).
        Sets `stopped`, which all ranks then agree on."""
        if dist.group is not None:
            s = mtp.all_reduce(torch.tensor([self.signum], device=dist.device), "max", dist.group)
            self.signum = int(s.item())
        self.stopped = bool(self.signum)
        return self.stopped

    def restore(self):
        import signal
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def exit_if_stopped(stop: StopSignal, out_dir, step, model, optimizer, schedule, keep_last, run_cfg, dist: Dist,
                    run: tracking.Tracker):
    """After the step loop: if a signal ended it, checkpoint, mark the MLflow run KILLED (not
    FINISHED: it stopped before max_steps) and exit with 128 + the signal's number."""
    if stop.stopped:
        code = save_on_stop(stop, out_dir, step, model, optimizer, schedule, keep_last, run_cfg, dist)
        run.end(status="KILLED")
        sys.exit(code)


def save_on_stop(stop: StopSignal, out_dir, step, model, optimizer, schedule, keep_last, run_cfg, dist: Dist) -> int:
    """After StopSignal.requested(): checkpoint `step` (all ranks take part; unless the periodic
    checkpoint just wrote it), print where it is and the exact command that resumes it, end the
    process group; -> the exit status, 128 + the signal's number."""
    import shlex
    import signal
    path = checkpoint_dir(out_dir, step)
    if _last_saved != os.path.abspath(path):  # (the periodic checkpoint may have just written it)
        save_checkpoint(out_dir, step, model, optimizer, schedule, keep_last, run_cfg)
    if dist.rank == 0:
        args = [a for a in stop.argv if a.split("=")[0] not in ("--resume", "--overwrite", "--train.overwrite")]
        launcher = "torchrun <the same torchrun options>" if dist.group is not None else "python"
        print(f"\nstopped by {signal.Signals(stop.signum).name} after step {step}: checkpoint {path}\n"
              f"resume with: {launcher} {stop.script} {shlex.join(args + ['--resume=' + path])}", flush=True)
    stop.restore()
    shutdown(dist)
    return 128 + stop.signum


def export_consolidated(model, tokenizer, out_dir, dist: Dist, extra=None, save=model_io.save_consolidated):
    """Gather the full state dict (all ranks take part) and let rank 0 write it with `save`:
    model_io.save_consolidated for an MTP model, train_critic.save_value_model for a value model."""
    if dist.group is None:
        save(model, tokenizer, out_dir, extra=extra)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.rank == 0:
        save(model, tokenizer, out_dir, state_dict=sd, extra=extra)
    torch.distributed.barrier()


HELDOUT_LOG = "heldout.jsonl"  # out_dir's record of every held-out evaluation: {"step", "heldout_ce"} per line


def report_heldout(held_out: list[float], step: int, dist: Dist, run: tracking.Tracker | None, label: str = "",
                   out_dir: str = ""):
    """Print and (rank 0) log the held-out CE of every head at `step` -- to MLflow and, with
    `out_dir`, to its HELDOUT_LOG (the curve over steps, MLflow or not); then the token-weight
    pages of the run's fixed held-out examples (every rank takes part, Tracker.draw_weight_pages)."""
    import json
    if dist.rank == 0:
        print(f"\n{label or f'step {step}'} held-out CE per head: {[round(x, 4) for x in held_out]}")
        if out_dir and held_out:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, HELDOUT_LOG), "w" if step == 0 else "a") as f:  # step 0: a fresh run
                f.write(json.dumps({"step": step, "heldout_ce": held_out}) + "\n")
    if run is not None:
        run.log_metrics({f"eval/head{k}_ce": x for k, x in enumerate(held_out)}, step)
        run.draw_weight_pages(step)


def finish_training(model, tok, out_dir, dist: Dist, held_out: list[float], run: tracking.Tracker | None, steps: int,
                    script: str):
    """The end of a training run, the same for every script: report the final held-out CE per
    head, write the consolidated export (all ranks take part; its mtp_config.json names the MLflow
    run), log and register it (Tracker.log_export), close the MLflow run and the process group."""
    run = run if run is not None else tracking.Tracker()
    report_heldout(held_out, steps, dist, run, label="final", out_dir=out_dir)
    final_dir = os.path.join(out_dir, "final")
    export_consolidated(model, tok, final_dir, dist, extra={"trained_with": script, "steps": steps,
                                                            "heldout_ce": held_out, **run.link()})
    if dist.rank == 0:
        print(f"saved {final_dir}")
    run.log_params({"final_dir": os.path.abspath(final_dir)})
    run.log_export(final_dir)
    run.end()
    shutdown(dist)


# --------------------------------------------------------------------------------------------
# 5. Step helpers (the per-head metrics and throughput: support/metrics.py)
# --------------------------------------------------------------------------------------------

def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for the randomness of one optimizer step on one rank, seeded by (seed, step,
    rank) alone: a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def every(step: int, n: int, max_steps: int) -> bool:
    """Is the end of `step` (0-based) a multiple of `n` before the last step? (periodic held-out
    loss and checkpoints; the last step has its own.)"""
    return bool(n) and (step + 1) % n == 0 and step + 1 < max_steps
