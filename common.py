"""
common.py — the training plumbing train_rho1.py and train_critic.py share (in the spirit of
nanochat's common.py): how a run is configured, placed on devices, optimized, checkpointed and
tracked. None of the MTP or weighting math is here (that is mtp.py and train_critic.py).

Read top to bottom:
  1. Config: YAML + `--key=value` overrides -> plain dataclasses: the one command-line dialect of
     every script, eval.py's included. Unknown keys and bad values are errors naming the key;
     the checks every script runs on its values and paths before anything heavy loads.
  2. Devices, processes and models: cuda > mps > cpu; torchrun -> a process group and FSDP2
     sharding; the policy loaded from a spec.
  3. Optimizer: AdamW with warmup + cosine, clipping, the NaN/inf guard, head warm-up.
  4. Held-out loss, resumable sharded checkpoints (torch.distributed.checkpoint) that carry the
     run's config and refuse to resume into another model, stopping on SIGTERM/SIGINT, the
     consolidated export. (MLflow itself: tracking.py.)
  5. Step bookkeeping: per-head metrics and throughput, so that each script's step loop shows
     only the algorithm.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
import warnings

import torch
import torch.nn as nn

import mtp
from support import model_io, preflight, tracking
from support.preflight import ConfigError  # the config error every script raises and run_main prints

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
    overwrite: bool = False          # a fresh run may replace an earlier run's checkpoints/ and final/ in out_dir


def run_main(main, argv: list[str]):
    """A script's entry point: a user's mistake -- a bad config value, a missing file or model, a
    malformed data row (an exception whose class sets `user_error`) -- is one line on stderr and
    exit status 2, before anything heavy when it can be; a traceback means a bug in WMTP. Ctrl-C
    outside the training loop (which has its own handler, StopSignal) is one line and status 130."""
    import sys
    try:
        main(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        if "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].end_run(status="KILLED")  # not FINISHED, which MLflow's atexit would say
        sys.exit(130)
    except Exception as e:
        if not getattr(e, "user_error", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_config(cls, argv: list[str], positional: str = "", ignore: tuple[str, ...] = ()):
    """YAML file + `--key=value` overrides -> an instance of the dataclass `cls`.

    `python train_rho1.py configs/tiny.yaml --train.max_steps=3 --dry_run`: a positional argument
    ending in .yaml/.yml is the config file; any other positional argument fills the field named
    by `positional` (eval.py's model). Nested sections are nested dataclasses addressed with dots,
    a bare `--flag` means `--flag=true`, and a bare key that names a field of exactly one section
    is accepted too (`--max_steps=3`). Unknown keys and values of the wrong type are errors that
    name the key. `ignore`: keys (or whole sections) that belong to the *other* training script,
    so that one config file serves both (configs/m3.yaml); they are dropped, and said so.
    """
    import yaml
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, positional))
        raise SystemExit(0)
    values: dict = {}
    files = [a for a in argv if not a.startswith("--") and a.endswith((".yaml", ".yml"))]
    others = [a for a in argv if not a.startswith("--") and not a.endswith((".yaml", ".yml"))]
    for flag, nxt in zip(argv, argv[1:]):
        if flag.startswith("--") and "=" not in flag and not nxt.startswith("--") and nxt in others[1 if positional else 0:]:
            raise ConfigError(f"'{flag} {nxt}': write {flag}={nxt} (options are --key=value)")
    if len(files) > 1:
        raise ConfigError(f"expected one YAML config file, got {files}")
    if others and (not positional or len(others) > 1):
        raise ConfigError(f"unexpected argument(s) {others}: options are written --key=value"
                          + (f", and one positional argument sets {positional!r}" if positional else
                             ", and the one positional argument is a .yaml config file"))
    if files:
        if not os.path.isfile(files[0]):
            raise ConfigError(f"config file {files[0]!r} does not exist")
        try:
            with open(files[0]) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{files[0]} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{files[0]}: top level must be a mapping of keys to values")
    if others:
        values[positional] = others[0]
    for a in argv:
        if not a.startswith("--"):
            continue
        key, eq, raw = a[2:].partition("=")
        try:
            value = yaml.safe_load(raw) if eq else True
        except yaml.YAMLError:
            raise ConfigError(f"--{key}: cannot read {raw!r} as a value (quote it if it is a string)") from None
        if raw.strip() == "":
            value = "" if eq else True
        if any(key == k or key.startswith(k + ".") for k in ignore):
            values.setdefault("__ignored__", {})[key] = value
            continue
        key = _expand_key(cls, key)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {p!r} is not a section")
        node[leaf] = value
    dropped = list(values.pop("__ignored__", {})) + [k for k in ignore if _pop_key(values, k)]
    if dropped:
        print(f"config: ignoring {dropped} (used by the other training script)")
    return _build(cls, values, "")


def _pop_key(values: dict, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for p in parents:
        values = values.get(p)
        if not isinstance(values, dict):
            return False
    return values.pop(leaf, None) is not None


def _expand_key(cls, key):
    hints = typing.get_type_hints(cls)
    if "." in key or key in hints:
        return key
    owners = [name for name, t in hints.items() if dataclasses.is_dataclass(t) and key in typing.get_type_hints(t)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise ConfigError(f"--{key} is ambiguous: it exists in sections {owners}; write --<section>.{key}")
    raise ConfigError(_unknown_key(key, list(_all_keys(cls))))


def _unknown_key(key: str, valid: list[str]) -> str:
    """The one line for a key the config does not have: the key meant, when one is close."""
    import difflib
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
    leaves = {v.rsplit(".", 1)[-1]: v for v in valid}
    close = close or [leaves[c] for c in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), 1, 0.7)]
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {sorted(valid)}"
    return f"unknown config key {key!r}; {hint} (--help lists every key)"


def _all_keys(cls, prefix=""):
    for name, t in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(t):
            yield from _all_keys(t, f"{prefix}{name}.")
        else:
            yield prefix + name


def _build(cls, values, prefix):
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix.rstrip('.')!r} must be a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(_unknown_key(prefix + sorted(unknown)[0], [prefix + n for n in hints]))
    kwargs = {}
    for name, t in hints.items():
        if name not in values:
            continue
        v = values[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, v, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, v, t)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'}: {e}") from None
    return obj


def _check_type(key, v, t):
    origin, args = typing.get_origin(t), typing.get_args(t)
    if v is True and bool not in (args if origin in (typing.Union, types.UnionType) else (t,)):
        raise ConfigError(f"config key {key!r} needs a value: write --{key}=VALUE")  # a bare --key
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and v is None:
                return None
        for a in args:
            if a is not type(None):
                try:
                    return _check_type(key, v, a)
                except ConfigError:
                    pass
        raise ConfigError(f"config key {key!r}: {v!r} is not a valid {t}")
    if origin is typing.Literal:
        if v not in args:
            raise ConfigError(f"config key {key!r}: {v!r} is not one of {list(args)}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {v!r}")
        return type(v)(_check_type(key, x, args[0]) for x in v) if args else v
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t is float and isinstance(v, str):
        try:
            return float(v)  # YAML reads "5e-5" (no dot) as a string
        except ValueError:
            pass
    if t is str and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # YAML reads --batch_sizes=8 as a number; a string key takes its text
    if t in (int, float, str, bool) and not (isinstance(v, t) and not (t is int and isinstance(v, bool))):
        raise ConfigError(f"config key {key!r}: expected {t.__name__}, got {v!r}")
    return v


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
                 "chunk_size", "heads_only_steps"):
        preflight.check_min(f"{key}.{name}", getattr(t, name), 0)
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


def check_policy(m, t: TrainConfig):
    """The `model` section both training scripts share: policy, tokenizer, n_heads, head_discount."""
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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of an MTP model, a value model or a plain HF causal LM (FSDP /
    compile units)."""
    _, blocks, _ = mtp.find_blocks(getattr(model, "base", model))
    return list(blocks) + list(getattr(model, "extra_heads", []))


def checkpointing_enable(base):
    """HF activation checkpointing, non-reentrant (transformers renamed the method in 5.2x)."""
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_grad_checkpointing(model: mtp.MTPModel, heads: bool = False):
    """Recompute the trunk blocks' activations in the backward (memory for ~1/3 more compute).

    The heads are checkpointed only if asked: the backward starts at them right after the loss,
    so checkpointing them saves n-1 blocks' activations at the peak but costs n blocks of
    recomputation every step (bench.py measures both).
    """
    checkpointing_enable(model.base)
    model._last_block.gradient_checkpointing = heads
    for head in model.extra_heads if heads else []:
        head.gradient_checkpointing = True
        head._gradient_checkpointing_func = model._last_block._gradient_checkpointing_func


def prepare_for_training(model, ref, dist: Dist, dtype, compile=False):
    """Put the policy (trainable) and the reference (frozen, or None) on their devices.

    Single process: fp32 master weights on the device (autocast does the low-precision
    compute), reference cast to the compute dtype (it is never updated).
    torchrun: FSDP2 (`fully_shard`) on every block -- trunk and heads -- then the root, bf16
    parameters for compute with fp32 gradient reduction (MixedPrecisionPolicy); the reference is
    sharded the same way.
    """
    if compile:
        for block in transformer_blocks(model):
            block.compile()
    if dist.group is None:
        return model.to(dist.device), (ref.to(dist.device, dtype) if ref is not None else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for m in (model,) + ((ref,) if ref is not None else ()):
        for block in fsdp_blocks(m):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(m, mesh=mesh, mp_policy=mp)
    return model, ref


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded as FSDP units of their own. With sequential heads the heads are not:
    each head runs its backward inside the loss's forward (mtp.MTPModel._sequential_loss), where a
    unit of its own would be resharded and reduce-scattered by FSDP's hooks in the middle of the
    root's forward. They join the root's group instead, with the final norm and the unembedding
    they share: gathered for the whole step (n blocks, ~0.35 GB in bf16 for 1.1B Llama's 4 heads),
    their gradients reduce-scattered once per backward with the root's."""
    blocks = transformer_blocks(model)
    if getattr(model, "sequential_heads", False):
        heads = {id(model._last_block)} | {id(h) for h in model.extra_heads}
        blocks = [b for b in blocks if id(b) not in heads]
    return blocks


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
        lr=lr, betas=betas,  # fused kernels on GPUs, and on the CPU of a single process
        fused=device.type == "cuda" or (device.type == "cpu" and not torch.distributed.is_initialized()))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))
    return optimizer, schedule


def drop_base_grads(model):
    """Head warm-up (train.heads_only_steps): forget every gradient but the extra heads', so that
    the optimizer step trains heads 1..n-1 alone. AdamW skips a parameter without a gradient
    entirely (no update, no weight decay, no moment update), so the base model -- embeddings,
    trunk, head 0, final norm, unembedding -- stays bit for bit what it was, and its moments
    start clean when warm-up ends. Why: fresh heads start far from their targets (CE ~12 on
    SmolLM2, issue 2's demo) and, trained jointly from step 0, their large gradients pull the
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
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise FloatingPointError(f"{where}: non-finite loss ({loss.item()}) or grad norm "
                                 f"({grad_norm.item()}); weights not updated")
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --------------------------------------------------------------------------------------------
# 4. Held-out loss, checkpoints, export, tracking
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_ce(model, batches, device, amp, chunk_size, group) -> list[float]:
    """Mean CE per head over the completion tokens of held-out batches (all ranks)."""
    was_training = model.training
    model.eval()
    n_heads = model.n_heads
    tot = torch.zeros(2, n_heads, device=device)
    for b in batches:
        ids = b["input_ids"].to(device)
        valid = mtp.align_to_heads(b["loss_mask"].to(device), n_heads)
        with amp:
            _, ce, _, _ = model(ids, mtp.align_to_heads(ids, n_heads), coef=valid.float(), chunk_size=chunk_size)
        tot += torch.stack([(ce * valid).flatten(1).sum(1), valid.flatten(1).sum(1)])
    model.train(was_training)
    tot = mtp.all_reduce(tot, "sum", group)
    return (tot[0] / tot[1].clamp_min(1)).tolist()


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 30
    import resource  # CPU: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


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
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out_dir}/checkpoints (runs write "
                                    f"them every train.save_every steps and when stopped by SIGTERM/SIGINT); "
                                    f"check --train.out_dir, or start a fresh run without --resume")
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
        saved = json.load(fh)["identity"]
    diffs = [k for k, v in current["identity"].items() if k in saved and saved[k] != v]
    if diffs:
        what = "; ".join(f"{k}: {saved[k]!r} in the checkpoint, {current['identity'][k]!r} now" for k in diffs)
        fix = " ".join(f"--{k}={saved[k]}" for k in diffs if k in current["config"])
        raise ConfigError(f"--resume: {path} was written by a run of another model or loss ({what}); resume "
                          f"with the checkpoint's values{f' ({fix})' if fix else ''}, or start a new run in "
                          f"another --train.out_dir")


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


def report_heldout(held_out: list[float], step: int, dist: Dist, run: tracking.Tracker | None, label: str = ""):
    """Print and (rank 0) log the held-out CE of every head at `step`; then the token-weight pages
    of the run's fixed held-out examples (every rank takes part, see Tracker.draw_weight_pages)."""
    if dist.rank == 0:
        print(f"\n{label or f'step {step}'} held-out CE per head: {[round(x, 4) for x in held_out]}")
    if run is not None:
        run.log_metrics({f"eval/head{k}_ce": x for k, x in enumerate(held_out)}, step)
        run.draw_weight_pages(step)


def finish_training(model, tok, out_dir, dist: Dist, held_out: list[float], run: tracking.Tracker | None, steps: int,
                    script: str):
    """The end of a training run, the same for every script: report the final held-out CE per
    head, write the consolidated export (all ranks take part; its mtp_config.json names the MLflow
    run), log and register it (Tracker.log_export), close the MLflow run and the process group."""
    run = run if run is not None else tracking.Tracker()
    report_heldout(held_out, steps, dist, run, label="final")
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
# 5. Step bookkeeping (the per-head metrics and throughput: support/metrics.py)
# --------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for the randomness of one optimizer step on one rank, seeded by (seed, step,
    rank) alone: a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def every(step: int, n: int, max_steps: int) -> bool:
    """Is the end of `step` (0-based) a multiple of `n` before the last step? (periodic held-out
    loss and checkpoints; the last step has its own.)"""
    return bool(n) and (step + 1) % n == 0 and step + 1 < max_steps




# ---- --help: every key, its type, its default and its meaning --------------------------------
# The meaning of a key is the comment written beside its field in the config dataclass: the
# dataclasses are the documentation, and --help prints them.

def config_help(cls, positional: str = "") -> str:
    """What `--help` prints: the script's title and example commands (its docstring), then every
    key of the config `cls`, grouped by section, with its type, default and meaning."""
    path = os.path.relpath(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else "SCRIPT.py"
    folder, _, name = path.rpartition(os.sep)
    prog = f"python -m {folder}.{name[:-3]}" if folder == "tools" else f"python {path}"
    arg = f" [{positional.upper()}]" if positional else ""
    doc = [p for p in (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip("\n").split("\n\n")]
    out = [f"usage: {prog} [CONFIG.yaml]{arg} [--key=value ...]"]
    for paragraph in doc[:2]:
        out += ["", paragraph.rstrip()]
    out += ["", "Every key can be set in the YAML file (sections as nested mappings) or on the command line as",
            "--section.key=value (a key that exists in one section only may drop the section); a bare --flag",
            "means --flag=true. Defaults are this script's own."]
    _help_lines(cls, cls(), "", out)
    return "\n".join(out)


def _help_lines(cls, value, prefix: str, out: list[str]):
    import textwrap
    hints = typing.get_type_hints(cls)
    class_note, notes = _field_notes(cls)
    scalars = [n for n, t in hints.items() if not dataclasses.is_dataclass(t)]
    if scalars:
        title = prefix.rstrip(".") or "(top level)"
        out += ["", f"{title}:" + (f"  ({class_note})" if class_note else "")]
    for name in scalars:
        default = getattr(value, name)
        shown = '""' if default == "" else default if isinstance(default, str) else repr(default)
        out.append(f"  --{prefix}{name}  {_type_name(hints[name])} = {shown}")
        meaning = " ".join(x for x in notes.get(name, ("", "")) if x)
        out += textwrap.wrap(meaning, 100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    for name, t in hints.items():
        if dataclasses.is_dataclass(t):
            _help_lines(t, getattr(value, name), f"{prefix}{name}.", out)


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return "one of " + "|".join('""' if a == "" else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(t, "__name__", str(t))


def _field_notes(cls) -> tuple[str, dict[str, tuple[str, str]]]:
    """The comments of a config dataclass's source -> (the comment on its `class` line, {field:
    (the comment lines just above it, its trailing comment and the comment lines that continue
    it, indented further)})."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return "", {}
    comments, code = {}, set()
    for tk in tokenize.generate_tokens(io.StringIO(src).readline):
        if tk.type == tokenize.COMMENT:
            comments[tk.start[0]] = (tk.start[1], tk.string.lstrip("#").strip())
        elif tk.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code.add(tk.start[0])
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
    notes = {}
    for f in (n for n in node.body if isinstance(n, ast.AnnAssign)):
        above, ln = [], f.lineno - 1
        while ln in comments and ln not in code and comments[ln][0] == f.col_offset:
            above.insert(0, comments[ln][1])
            ln -= 1
        after, ln = [comments[f.end_lineno][1]] if f.end_lineno in comments else [], f.end_lineno + 1
        while ln in comments and ln not in code and comments[ln][0] > f.col_offset:
            after.append(comments[ln][1])
            ln += 1
        notes[f.target.id] = (" ".join(above), " ".join(after))
    return (comments[node.lineno][1] if node.lineno in comments else ""), notes

