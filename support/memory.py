"""
memory.py — where a training step's memory goes, and trading it for speed: the model's blocks (the
units that are sharded and checkpointed), peak memory per backend and `memory_report` (--dry_run's
breakdown); then activation checkpointing, chosen from a memory budget: the modes a trunk block
can run in (off, selective -- op-level SAC --, full; partial = the lowest blocks full), the plan
that applies them (before torch.compile and FSDP2), the memory model that predicts a step's peak
(static parts exact from the parameters, activations per token per block measured once on the
model and device, on a compiled copy when the blocks are compiled) and the picker (`train.checkpointing=auto` with `train.memory_budget_gb`): the
least recomputation the model says fits. Both training scripts call `setup_checkpointing`;
tools/bench.py measures every mode against the peers (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import sys

import torch
import torch.nn as nn
import torch.utils._python_dispatch
import torch.utils._pytree
import torch.utils.checkpoint

import mtp
from support.config import ConfigError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of an MTP model, a value model or a plain HF causal LM (FSDP /
    compile units)."""
    _, blocks, _ = mtp.find_blocks(getattr(model, "base", model))
    return list(blocks) + list(getattr(model, "extra_heads", []))


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


_mps_peak = 0  # bytes: MPS keeps no peak of its own, so record_memory samples it


def record_memory(device):
    """On MPS, sample what the driver holds into the run's peak (optimizer_step calls it at the
    step's fullest points: all gradients alive, then the optimizer's states too)."""
    global _mps_peak
    if device.type == "mps":
        _mps_peak = max(_mps_peak, torch.mps.driver_allocated_memory())


def peak_memory_gb(device) -> float:
    """The process's peak memory on `device`: CUDA's allocator peak; on MPS the largest sample of
    the driver's allocation (record_memory); on the CPU the peak resident set, which getrusage
    reports in KiB on Linux and in bytes on macOS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    if device.type == "mps":
        record_memory(device)
        return _mps_peak / 2 ** 30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def memory_report(device, trained: nn.Module, optimizer, frozen: dict) -> str:
    """Where a step's memory goes, for --dry_run: the trained model's weights, its gradients, the
    optimizer's states (exact, from the tensors after one step), each frozen model (reference,
    value model), and the rest of the measured peak -- activations, the loss's chunks, the
    allocator's slack (on the CPU also the interpreter and libraries)."""
    def gb(tensors):
        return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors) / 2 ** 30
    parts = {"weights": gb(trained.parameters()),
             "gradients": gb(p for p in trained.parameters() if p.requires_grad),  # one per trained weight
             "optimizer states": gb(t for st in optimizer.state.values() for t in st.values()
                                    if torch.is_tensor(t) and t.dim() > 0)}
    parts |= {name: gb(m.parameters()) for name, m in frozen.items() if m is not None}
    peak = peak_memory_gb(device)
    rest = peak - sum(parts.values())
    shown = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
    return (f"memory (GB, this rank): {shown}; activations and the rest {max(rest, 0):.2f} = peak {peak:.2f} "
            f"measured on {device.type}" + (" (peak resident set: the interpreter and libraries included)"
                                            if device.type == "cpu" else ""))


def checkpointing_enable(base):
    """HF activation checkpointing of every layer, non-reentrant (transformers renamed the method in
    5.2x): what a user of plain transformers gets (bench.py's HF peers)."""
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- activation checkpointing: the modes, the plan, the memory model, the picker ----------------
# What a trunk block keeps from its forward for its backward (train.checkpointing):
#   off        everything autograd saves: nothing is recomputed.
#   selective  op-level selective activation checkpointing (SAC): the outputs of the matmuls and of
#              attention are kept, the element-wise work between them (norms, RoPE, SiLU x up,
#              residual adds, autocast's casts) is recomputed from them in the backward. torchtitan's
#              op-level SAC (`_apply_op_sac`) does this, for this reason: the matmuls are the
#              expensive results; the memory-bound element-wise ops are cheap to redo and their
#              outputs (fp32 norm internals, SiLU, RoPE) are a good part of what a block saves.
#              (torchtitan also recomputes every second mm; we keep them all, the partial mode
#              covers the memory below.) Built on PyTorch's
#              torch.utils.checkpoint.create_selective_checkpoint_contexts (see its docs).
#   full       only the block's input: its whole forward runs again in the backward.
#   partial    the lowest train.checkpoint_blocks trunk blocks full, the rest off (HF's
#              every_n_layers / torchtitan's layer-level AC, by count).
#   auto       the mix that the memory model says fits train.memory_budget_gb with the least
#              recomputation (`pick_checkpointing`); no budget: off.
# The heads are not in the plan: with sequential heads each head's activations live only during
# its own forward+backward inside the loss, so recomputing them lowers no peak.

CHECKPOINT_MODES = ("auto", "off", "selective", "partial", "full")
# Recomputing a selective block's element-wise ops, in forwards of a block (a full block: 1). On a
# 1.1B Llama they move ~100 KB per token through memory against ~100 MFLOP per token of matmuls:
# about a tenth of the block's forward time on an H100-class GPU, less once compiled. The picker only
# needs the order this gives: a block made selective saves a large part of its activations (40% on
# tests/test_checkpointing.py's tiny Llama in fp32) for a tenth of what a fully recomputed one
# costs, so auto goes off -> selective -> full, block by block.
SELECTIVE_COST = 0.1
GiB = 2 ** 30
MARGIN_FRACTION, MARGIN_BYTES = 0.10, 0.25 * GiB  # the memory model's margin (MemoryModel.margin)


def _sac_save_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matmuls and the attention kernels
    (torchtitan's op-level save list). Looked up by name: which attention kernels exist depends
    on the build (CPU, CUDA, ROCm) and the torch version."""
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


SAC_SAVE_OPS = _sac_save_ops()


def _sac_policy(ctx, op, *args, **kwargs):
    # the same answer in the forward and in the recomputation (ctx.is_recompute): SAC matches the
    # recomputed ops against the kept outputs in order
    if op in SAC_SAVE_OPS:
        return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    return torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def _sac_contexts():
    """checkpoint()'s context_fn: a fresh pair of SAC contexts (the forward's cache, the
    recomputation's lookup) for every checkpointed call."""
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_sac_policy)


def checkpoint_block(block: nn.Module, mode: str):
    """Set one transformer block to recompute nothing ("off"), its element-wise ops ("selective")
    or its whole forward ("full") in the backward, by checkpointing the block's `forward` (an
    attribute of the instance; "off" removes it): inside nn.Module.__call__, so FSDP2's hooks on the
    block (all-gather, reshard) stay outside the recomputed region -- what torchtitan's checkpoint
    wrapper applied per block before `fully_shard` achieves --, and inside what block.compile()
    compiles, so that torch.compile traces the checkpoint and applies SAC's policy to the graph. Not
    through transformers' own switch (GradientCheckpointingLayer): some versions (5.17) checkpoint
    `__call__`, which puts a compiled block inside an eager checkpoint -- SAC then sees only the
    compiled code's kernels and saves none of the matmuls (measured on an H200: a compiled
    selective block kept 8 KiB a token, about what full keeps, and its backward ran more matmuls
    than full's; tools/ckpt_probe.py).
    The parameter names, hence the checkpoints, do not change. Set before prepare_for_training, so
    before torch.compile and fully_shard. Non-reentrant, as torchtitan and PyTorch recommend."""
    if mode not in ("off", "selective", "full"):
        raise ValueError(f"checkpoint mode {mode!r}: expected off, selective or full")
    if getattr(block, "gradient_checkpointing", False):
        block.gradient_checkpointing = False  # transformers' switch: ours replaces it
    block.__dict__.pop("forward", None)
    block.checkpoint_mode = mode
    if mode != "off":
        _trace_checkpoints_whole()
        block.forward = functools.partial(_checkpointed_forward, block, _CHECKPOINT[mode == "selective"])


def _checkpointed_forward(block, checkpoint, *args, **kwargs):
    """The block's own forward under `checkpoint` -- when there is a backward to recompute for
    (training, gradients on), as transformers' switch does; otherwise as is (evaluation)."""
    forward = type(block).forward.__get__(block)
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, **kwargs)
    return forward(*args, **kwargs)


def _trace_checkpoints_whole():
    """torch.compile traces a checkpointed forward as one graph (a higher-order op) unless the
    forward mutates Python state from outside it; then the graph breaks, the checkpoint runs
    eagerly around compiled pieces, and SAC's policy is lost (as above). transformers' attention
    does that with the `kernels` package installed: it sets and resets a context variable that
    routes hub kernels, a pair with no effect once the forward returns. Dynamo's switch for this
    case lets it skip replaying such side effects in the recomputation -- here there is nothing
    to replay."""
    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    if hasattr(torch._dynamo.config, flag):
        setattr(torch._dynamo.config, flag, True)


# One function object per mode, shared by every block: torch.compile guards on it, so blocks of one
# mode share one compiled graph. No context_fn at all for full: tracing checkpoint() takes a user
# function there, and refuses torch's noop_context_fn passed explicitly.
_CHECKPOINT = (functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
               functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False, context_fn=_sac_contexts))


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """What each trunk block recomputes: the lowest `full` blocks everything, the next `selective`
    ones their element-wise ops, the rest nothing. The lowest first: the backward reaches them
    last, when the blocks above have already freed their activations, so re-materialising one of
    them adds least to the peak."""
    blocks: int              # trunk blocks that keep activations for the backward (trunk_of)
    full: int = 0
    selective: int = 0
    heads: bool = False      # the head blocks fully checkpointed too (the legacy model.checkpoint_heads)

    @classmethod
    def of(cls, mode: str, blocks: int, k: int = 0, heads: bool = False) -> CheckpointPlan:
        """A fixed mode: off, selective, full, or partial (the lowest k blocks full)."""
        if mode == "partial" and not 1 <= k <= blocks:
            raise ConfigError(f"config key 'train.checkpoint_blocks': partial checkpointing of {k} blocks, but the "
                              f"trunk has {blocks} that keep activations; choose 1..{blocks}")
        full = {"full": blocks, "partial": k}.get(mode, 0)
        return cls(blocks, full, blocks if mode == "selective" else 0, heads)

    @property
    def off(self) -> int:
        return self.blocks - self.full - self.selective

    def modes(self) -> list[str]:
        """Each trunk block's mode, bottom up."""
        return ["full"] * self.full + ["selective"] * self.selective + ["off"] * self.off

    @property
    def cost(self) -> float:
        """The recomputation of one step, in forwards of one block."""
        return self.full + SELECTIVE_COST * self.selective

    @property
    def name(self) -> str:
        """off, selective, full, partial (full + off) or mixed (full + selective, selective + off)."""
        counts = {"off": self.off, "selective": self.selective, "full": self.full}  # (no blocks: off)
        whole = [m for m, n in counts.items() if n == self.blocks]
        return whole[0] if whole else "partial" if not self.selective else "mixed"

    @property
    def split(self) -> str:
        """The blocks per mode, e.g. '6 full, 16 selective'."""
        return ", ".join(f"{n} {m}" for m, n in (("full", self.full), ("selective", self.selective),
                                                 ("off", self.off)) if n)

    def __str__(self) -> str:
        what = f"all {self.blocks} trunk blocks" if self.name in ("off", "selective", "full") else \
            f"{self.split} of {self.blocks} trunk blocks"
        return f"{self.name} ({what}{'; heads full' if self.heads else ''})"


def trunk_of(model: mtp.MTPModel) -> list[nn.Module]:
    """The trunk blocks (blocks 0..L-2; block L-1 is head 0) whose activations autograd keeps for
    the backward, bottom up: all of them when the embeddings train, else those from the lowest one
    with a trained parameter (model.train_layers: below it nothing needs a gradient, so nothing is
    saved and there is nothing to checkpoint)."""
    _, blocks, _ = mtp.find_blocks(model.base)
    trunk = list(blocks)[:-1]
    if any(p.requires_grad for p in model.base.get_input_embeddings().parameters()):
        return trunk
    trained = [i for i, b in enumerate(trunk) if any(p.requires_grad for p in b.parameters())]
    return trunk[trained[0]:] if trained else []


def apply_checkpointing(model: mtp.MTPModel, plan: CheckpointPlan):
    """Set every block of the model to its mode in `plan` (the blocks outside it: off)."""
    trunk = trunk_of(model)
    if len(trunk) != plan.blocks:
        raise ValueError(f"a plan for {plan.blocks} trunk blocks, but this model has {len(trunk)}")
    heads = [model._last_block, *model.extra_heads]
    for block in [*mtp.find_blocks(model.base)[1], *model.extra_heads]:
        checkpoint_block(block, "off")
    for block, mode in zip(trunk, plan.modes()):
        checkpoint_block(block, mode)
    for block in heads if plan.heads else []:
        checkpoint_block(block, "full")


def enable_grad_checkpointing(model: mtp.MTPModel, heads: bool = False):
    """Every trunk block fully checkpointed (the legacy model.grad_checkpointing: true); the heads
    too if asked (model.checkpoint_heads) -- which lowers the peak only without sequential heads:
    with them each head's activations already live only inside its own part of the loss."""
    apply_checkpointing(model, CheckpointPlan.of("full", len(trunk_of(model)), heads=heads))


# ---- the memory model ---------------------------------------------------------------------------

class _LiveStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Notes, weakly, the storage of every tensor an op creates while it is active; alive_bytes()
    then sums those still alive: what the code run under it kept -- saved for the backward, cached
    by SAC, returned -- however it is kept (autograd's saved tensors, a checkpoint's inputs and SAC's
    cache all hold storages). A storage's Python object lives as long as the storage does, so a weak
    reference to it dies exactly when the memory is freed. Storages of `known` tensors (the inputs,
    the parameters) and their views are not counted."""

    def __init__(self, known):
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in known}
        self.made = {}  # id(storage) -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self.known:
                self.made[id(s)] = (weakref.ref(s), s.nbytes())
        return out

    def alive_bytes(self) -> int:
        import gc
        # cycles among what the forward just made: the young generations (a full collection takes
        # ~0.2 s with transformers loaded, and a measurement counts six times)
        gc.collect(1)
        return sum(n for ref, n in self.made.values() if ref() is not None)


class _Captured(Exception):
    pass


class _Capture(nn.Module):
    """Stands in for block 0 while block_inputs runs the base model: records what the block is
    handed and stops the forward."""

    def forward(self, *args, **kwargs):
        self.call = (args, kwargs)
        raise _Captured


def block_inputs(model: mtp.MTPModel, T: int):
    """(args, kwargs) that block 0 gets for one sequence of T random tokens: the base model's own
    embedding, positions and mask, its forward stopped at block 0 (so no block runs)."""
    inner, blocks, _ = mtp.find_blocks(model.base)
    stub, first = _Capture(), blocks[0]
    device = model.base.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
    blocks[0] = stub
    try:
        with torch.no_grad():
            inner(input_ids=ids, use_cache=False)
        raise RuntimeError("the base model never called its first block")
    except _Captured:
        pass
    finally:
        blocks[0] = first
    return stub.call


def _held_bytes(block, args, kwargs, mode: str, amp_dtype) -> int:
    """Bytes that `block`'s forward in `mode` keeps alive until its backward, its output included
    (the next block's input). Counted after autocast's context has closed: the weights' casts it
    caches are counted once, with the static part (static_memory)."""
    checkpoint_block(block, mode)
    x = args[0].detach().requires_grad_()  # a block in the middle of a trained stack
    others = [t for t in torch.utils._pytree.tree_leaves((args[1:], kwargs)) if isinstance(t, torch.Tensor)]
    live = _LiveStorages([x, *others, *block.parameters(), *block.buffers()])
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with live, amp:
        out = block(x, *args[1:], **kwargs)
    held = live.alive_bytes()
    del out
    return held


def _saved_by_compiled_code(out: torch.Tensor, known) -> int | None:
    """Bytes that the autograd graph behind `out` keeps for the backward, `out` included, when that
    graph is compiled code: what each compiled region saved -- AOTAutograd's backward node
    (CompiledFunctionBackward) holds it, in `saved_tensors` and, saved without a version check,
    `_tensors_no_vc_check` --, storages of the `known` tensors (inputs, parameters) not counted.
    Compiled code allocates outside the dispatcher, so _LiveStorages cannot see it, and the CPU has
    no allocator statistics: the graph is the one account of it on every device. None when an eager
    op saved something too (a graph break: that part ran eagerly, and what it saved inside a
    checkpoint cannot be read without recomputing it)."""
    nodes, todo, seen = [], [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        todo += [f for f, _ in node.next_functions]
    compiled = [n for n in nodes if type(n).__name__ == "CompiledFunctionBackward"]
    eager = [n for n in nodes if type(n).__name__ != "CompiledFunctionBackward" and (
        isinstance(n, torch.autograd.function.BackwardCFunction) or any(a.startswith("_saved_") for a in dir(n)))]
    if not compiled or eager:
        return None
    counted, total = {t.untyped_storage().data_ptr() for t in known}, 0
    for n in compiled:
        for t in (*n.saved_tensors, *getattr(n, "_tensors_no_vc_check", ()), out):
            if isinstance(t, torch.Tensor) and (ptr := t.untyped_storage().data_ptr()) not in counted:
                counted.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def _compiled_call():
    """torch.compile of `block(*args, **kwargs)` as the training compiles a block
    (common.prepare_for_training: inductor, default options), but through a function of its own:
    dynamo keeps compiled graphs and counts recompiles per code object, so the measurement's
    graphs are not entries in the training blocks' cache, nor count toward their recompile limit.
    dynamic=True: one graph serves both lengths (the default would compile T, then recompile for
    2T, dynamic)."""
    import types

    def call(block, *args, **kwargs):
        return block(*args, **kwargs)
    code = call.__code__.replace(co_name="_measured_block")
    return torch.compile(types.FunctionType(code, call.__globals__, "_measured_block"), dynamic=True)


@contextlib.contextmanager
def _drop_new_graphs():
    """On exit, drop the compiled graphs of every code object that dynamo first compiled inside
    (torch._dynamo.reset_code, what reset_code_caches does to all): the measurement's function,
    and after a graph break the block's own frames that dynamo compiled on their own -- so that
    the training's compile starts from the cache it would have had, and the copy is freed. A no-op
    where this torch lacks the bookkeeping it reads."""
    tracker = getattr(getattr(torch._dynamo, "convert_frame", None), "input_codes", None)
    before = set(getattr(tracker, "seen_ids", ()))
    try:
        yield
    finally:
        if tracker is not None and hasattr(torch._dynamo, "reset_code"):
            for ref in list(getattr(tracker, "seen", ())):
                if (code := ref()) is not None and id(code) not in before:
                    torch._dynamo.reset_code(code)


def _compiled_held_bytes(compiled, block, args, kwargs, mode: str, amp_dtype) -> int | None:
    """_held_bytes of the compiled block (compiled: _compiled_call()); None if it did not compile
    whole (_saved_by_compiled_code)."""
    checkpoint_block(block, mode)
    x = args[0].detach().requires_grad_()
    others = [t for t in torch.utils._pytree.tree_leaves((args[1:], kwargs)) if isinstance(t, torch.Tensor)]
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with amp:
        out = compiled(block, x, *args[1:], **kwargs)
    out = next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return _saved_by_compiled_code(out, [x, *others, *block.parameters(), *block.buffers()])


@dataclasses.dataclass
class BlockMeasurement:
    """What measure_blocks found: bytes per token that one trunk block keeps in each mode, the
    trunk input's bytes per token, and the modes measured on a compiled copy."""
    per_token: dict[str, float]
    input_per_token: float
    compiled: tuple[str, ...] = ()
    compile: bool = False  # the blocks are compiled in training

    def how(self) -> str:
        """'eager', 'compiled', or which modes ran eagerly under compile (a graph break)."""
        if not self.compile:
            return "eager"
        broken = [m for m in ("off", "selective") if m not in self.compiled]
        return "compiled" + (f"; {', '.join(broken)} ran eagerly: a graph break" if broken else "")


def measure_blocks(model: mtp.MTPModel, device, amp_dtype=None, param_dtype=None, max_len: int = 256,
                   compile: bool = False) -> BlockMeasurement:
    """What one trunk block keeps for its backward per token in each mode, measured on `device`: a
    copy of a trunk block (its parameters trained, cast to `param_dtype` if given -- FSDP2's mixed
    precision --, run under autocast to `amp_dtype` if given) runs forward on the base model's own
    inputs for one sequence of T and of 2T tokens, and the per-token figure is (bytes(2T) -
    bytes(T)) / T: the difference removes what does not grow with the sequence. Linear in the
    tokens, as with SDPA's kernels (flash, memory-efficient, cuDNN, CPU flash); eager attention's
    T x T weights would be underestimated.

    compile (train.compile: each block torch.compile'd): off and selective are measured on a
    compiled copy (_compiled_call: one compile each, dynamic in the sequence length, the forward
    only -- the backward compiles lazily, and is never run here), counted from the saved tensors
    of its autograd graph (_saved_by_compiled_code): inductor keeps less than eager (the norms'
    fp32 internals, the SiLU, RoPE's products are recomputed in the backward). A mode whose
    compiled copy graph-breaks inside the block is measured eagerly, as it then runs (the
    checkpoint runs eagerly as a whole). full is measured eagerly in both cases: a fully
    checkpointed block keeps only its input and its output, compiled or not."""
    def to_device(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        return t.to(param_dtype) if param_dtype is not None and t.is_floating_point() else t

    _, blocks, _ = mtp.find_blocks(model.base)
    block = copy.deepcopy(blocks[max(0, len(blocks) - 2)]).to(device).requires_grad_(True).train()
    if param_dtype is not None:
        block.to(param_dtype)
    T = max(1, min(128, max_len // 2))
    inputs = [torch.utils._pytree.tree_map(to_device, block_inputs(model, length)) for length in (T, 2 * T)]
    held, compiled = {}, []
    with _drop_new_graphs() if compile else contextlib.nullcontext():
        fn = _compiled_call() if compile else None
        for mode in ("off", "selective", "full"):
            if fn is not None and mode != "full":
                held[mode] = [_compiled_held_bytes(fn, block, a, kw, mode, amp_dtype) for a, kw in inputs]
                if None not in held[mode]:
                    compiled.append(mode)
                    continue
            held[mode] = [_held_bytes(block, a, kw, mode, amp_dtype) for a, kw in inputs]
    return BlockMeasurement({m: (b[1] - b[0]) / T for m, b in held.items()},
                            (inputs[1][0][0].nbytes - inputs[0][0][0].nbytes) / T, tuple(compiled), compile)


def measure_activations(model: mtp.MTPModel, device, amp_dtype=None, param_dtype=None,
                        max_len: int = 256, compile: bool = False) -> tuple[dict[str, float], float]:
    """-> ({mode: bytes per token that one trunk block keeps for its backward}, bytes per token of
    the trunk's input): measure_blocks."""
    m = measure_blocks(model, device, amp_dtype, param_dtype, max_len, compile)
    return m.per_token, m.input_per_token


def static_memory(model: mtp.MTPModel, frozen: dict, dtype, world: int = 1, amp: bool = False) -> dict[str, float]:
    """The parts of a step's memory that do not depend on the tokens (bytes, this rank), exact from
    the parameters -- the same parts memory_report measures from the tensors after a step: the
    weights as held (fp32 master weights, or frozen ones in the compute dtype); a gradient per
    trained parameter, in its dtype; AdamW's two states (exp_avg, exp_avg_sq), each like its
    parameter; each frozen model (reference, value model) in the compute dtype. With autocast:
    its compute-dtype copies of the trained blocks' matmul weights, which it caches for the whole
    forward (the loss's included, where the peak is); compiled blocks have no cache, but an off
    one saves its casts for the backward (the compiled copy keeps them: the part of what it keeps
    that does not grow with the tokens), selective and full ones recast them -- counted for every
    block, an upper bound there. Under FSDP2 (world > 1): all of that sharded
    1/world (fp32 shards), plus the root group (embeddings, final norm, unembedding; the heads
    too with sequential heads: fsdp_blocks) and two blocks (one computing, one prefetched)
    unsharded in the compute dtype."""
    e = dtype.itemsize

    def nbytes(ps):
        return sum(p.numel() * p.element_size() for p in ps)

    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    parts = {"weights": nbytes(params) / world, "gradients": nbytes(trained) / world,
             "AdamW states": 2 * nbytes(trained) / world}
    for name, m in frozen.items():
        if m is not None:
            parts[name] = sum(p.numel() * (e if world == 1 else p.element_size()) for p in m.parameters()) / world
    if amp:
        parts["autocast copies"] = e * sum(p.numel() for b in transformer_blocks(model) for p in b.parameters()
                                           if p.requires_grad and p.ndim >= 2 and p.dtype != dtype)
    if world > 1:
        units = fsdp_blocks(model)
        in_units = {id(p) for b in units for p in b.parameters()}
        largest = max((sum(p.numel() for p in b.parameters()) for b in units), default=0)
        parts["FSDP unsharded"] = e * (sum(p.numel() for p in params if id(p) not in in_units) + 2 * largest)
    return parts


def loss_buffers(model: mtp.MTPModel, dtype, tokens: int, chunk_size: int = 0, world: int = 1, amp: bool = False,
                 compiled_chunk: bool = False) -> float:
    """The chunked loss's buffers alive together (mtp._fused_linear_ce), bytes: one chunk of logits
    in the compute dtype and what mtp._ce_chunk makes of it. Eager (CPU, MPS): the logits and their
    upcast to the accumulation dtype (fp32 for 16-bit W; no copy if the logits are in it already),
    then the upcast worked in place and the gradient's cast to the hidden states' dtype (no copy if
    it is the accumulation dtype) -- the larger pair: the logits go when the upcast replaces them
    (the callee's argument is their last reference); fp32 is one buffer, bf16 6 bytes a logit.
    On CUDA (`compiled_chunk`, mtp._ce_chunk_gpu): one kernel reads the logits and writes the
    gradient, no upcast buffer -- over the logits where Triton's kernel runs (gpu_kernels/
    cross_entropy.py). Then the unembedding's gradient buffer (W's dtype; the compute dtype under
    FSDP2); W's compute-dtype copy under autocast with fp32 W; the loss rows' hidden states and
    their gradient, in the hidden states' dtype (fp32 under autocast: the residual stream and the
    norm stay in the master weights' dtype). Rows: one head's tokens with sequential heads, every
    head's otherwise."""
    W = model.lm_head_weight
    V, D = W.shape
    e = dtype.itemsize
    w_dtype = dtype if world > 1 else W.dtype  # W as the loss sees it (FSDP2: unsharded in the compute dtype)
    acc = 4 if w_dtype in (torch.bfloat16, torch.float16) else w_dtype.itemsize
    hidden = e if world > 1 else W.element_size()
    rows = tokens * (1 if model.sequential_heads else model.n_heads)
    upcast, cast = (acc if acc != e else 0), (hidden if hidden != acc else 0)
    in_place = compiled_chunk and hidden == e and acc == 4 and bool(mtp.ce_kernel())  # the gradient over the logits
    chunk = min(chunk_size or mtp.default_chunk_size(V, in_place), rows)
    per_logit = e if in_place else e + hidden if compiled_chunk else max(e + upcast, acc + cast)
    out = chunk * V * per_logit + 2 * rows * D * hidden
    if W.requires_grad:
        out += V * D * (e if world > 1 else W.element_size())
    if amp and W.dtype != dtype:
        out += V * D * e
    return out


def gradient_split(model: mtp.MTPModel, dtype, world: int = 1) -> tuple[float, float]:
    """-> (bytes of the gradients that exist before the trunk's backward begins, bytes of one trunk
    block's gradient as it is formed). The first: every trained parameter outside the trunk blocks
    (the heads, the final norm, the unembedding: their gradients come from the loss) but the input
    embedding, whose gradient comes last; the trunk blocks' gradients appear one block at a time
    as the backward frees that block's activations. One block's: in its parameters' dtype; under
    FSDP2, unsharded in the compute dtype and its fp32 copy for the reduce-scatter
    (MixedPrecisionPolicy's reduce_dtype)."""
    trunk = trunk_of(model)
    in_trunk = {id(p) for b in trunk for p in b.parameters()}
    emb, W = model.base.get_input_embeddings().weight, model.lm_head_weight
    early = sum(p.numel() * p.element_size() for p in model.parameters()
                if p.requires_grad and id(p) not in in_trunk and (p is not emb or p is W)) / world
    block = max((sum(p.numel() * (p.element_size() if world == 1 else dtype.itemsize + 4)
                     for p in b.parameters() if p.requires_grad) for b in trunk), default=0)
    return early, block


@dataclasses.dataclass
class MemoryModel:
    """A step's peak device memory under a checkpointing plan (bytes, this rank), as a sum a reader
    can redo from the start-up line (describe):
        total = Σ static but the gradients + max(forward, end) + margin
        forward = activations + loss buffers + the gradients so far
        activations = tokens x ( input + Σ_trunk blocks per_token[its mode]
                                 + heads_alive x (per_token[heads' mode] + head_extra)
                                 + per_token["off"] - per_token[heads' mode] )
        end = all gradients + tokens x (input + per_token["off"] + head_extra)
        margin = MARGIN_FRACTION x (activations + loss buffers) + MARGIN_BYTES
    static: static_memory (exact from the parameters). per_token: measured (measure_blocks), on a
    compiled copy when the blocks are compiled. heads_alive: 1 with sequential heads (one head's
    activations alive at a time, inside the loss), n otherwise; head_extra: the final norm's
    saved input, its output and the trunk output's gradient, 3 hidden states in fp32 (an upper
    bound). The last term of activations: the head in its backward is an off block again
    (re-materialized, when the heads are checkpointed); a trunk block re-materialized later never
    meets the heads' activations, freed by then, so it is not added (it was: one head's model read
    13-19% over the peak on an H200, tests/test_checkpointing.py bounds a real step's within 15%).

    The gradients are not all alive with the activations: the trunk's backward frees a block's
    activations as it makes that block's gradient, so the peak is at one of its two ends (the
    blocks are alike and keep more the higher they are -- full, selective, off, bottom up --, so
    what is alive along the backward is convex in the block reached). `forward` is the loss and the start of the trunk's backward: every
    activation, the gradients from the loss (gradient_split: heads, norm, unembedding) and the top
    block's being made (`block_gradient`); `end` is the lowest block's backward: every gradient,
    that block's activations re-materialized (at most an off block's) and the hidden-state
    gradients. `early_gradients` None -- gradient accumulation (micro-batches after the first
    find every gradient there), or FSDP2 -- counts every gradient in `forward` too. An upper bound
    also in the head's term and in the loss buffers counting W's gradient twice; the margin is for
    what the sum leaves out: cuBLAS workspaces and small buffers (the fixed part), and the caching
    allocator's fragmentation (memory reserved beyond what is allocated), which a budget of device
    memory must hold though torch.cuda.max_memory_allocated does not show it (the fraction: a
    headroom, not derived)."""
    static: dict[str, float]
    per_token: dict[str, float]
    input_per_token: float
    tokens: int
    heads_alive: int
    head_extra: float
    loss: float
    device: str = ""
    early_gradients: float | None = None  # bytes of the gradients alive before the trunk's backward; None: all
    block_gradient: float = 0.0           # one trunk block's gradient, made at the backward's start
    measured: str = "eager"               # how per_token was measured (BlockMeasurement.how)

    def activations(self, plan: CheckpointPlan) -> float:
        trunk = sum(self.per_token[m] for m in plan.modes())
        head = self.per_token["full" if plan.heads else "off"]
        heads = self.heads_alive * (head + self.head_extra) + self.per_token["off"] - head  # one re-materialized
        return self.tokens * (self.input_per_token + trunk + heads)

    def phases(self, plan: CheckpointPlan) -> tuple[dict[str, float], dict[str, float]]:
        """(forward, end): the two candidates for the peak beyond the static parts but the gradients."""
        grads = self.static.get("gradients", 0.0)
        early = grads if self.early_gradients is None else self.early_gradients
        forward = {"activations": self.activations(plan), "loss buffers": self.loss,
                   "gradients so far": early + self.block_gradient}
        end = {"all gradients": grads,
               "the lowest block's backward": self.tokens * (self.input_per_token + self.per_token["off"] + self.head_extra)}
        return forward, end

    def parts(self, plan: CheckpointPlan) -> dict[str, float]:
        """The terms of the total, the margin included: the static parts and the larger phase."""
        fixed = {k: v for k, v in self.static.items() if k != "gradients"}
        return fixed | max(self.phases(plan), key=lambda p: sum(p.values())) | {"margin": self.margin(plan)}

    def margin(self, plan: CheckpointPlan) -> float:
        return MARGIN_FRACTION * (self.activations(plan) + self.loss) + MARGIN_BYTES

    def total(self, plan: CheckpointPlan) -> float:
        return sum(self.parts(plan).values())

    def describe(self, plan: CheckpointPlan) -> str:
        parts = self.parts(plan)
        other = next(p for p in self.phases(plan) if not set(p) <= set(parts))
        per = " / ".join(f"{m} {v / 1024:.1f}" for m, v in self.per_token.items())
        return (f"memory model: {self.total(plan) / GiB:.2f} GB = " + " + ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items())
                + "; at the other end, less: " + " + ".join(f"{k} {v / GiB:.2f}" for k, v in other.items())
                + f"; per token a trunk block keeps {per} KiB, the trunk's input {self.input_per_token / 1024:.1f} "
                f"KiB (measured on {self.device}, {self.measured}), x {self.tokens} tokens")


def memory_model(model: mtp.MTPModel, frozen: dict, device, dtype, micro_batch: int, seq_len: int,
                 chunk_size: int = 0, world: int = 1, amp: bool = False, compile: bool = False,
                 micro_steps: int = 1) -> MemoryModel:
    """The memory model of a training step of `model` (before prepare_for_training: its blocks as
    they will be trained) on `device`: micro_batch x seq_len tokens, compute dtype `dtype`, under
    autocast (`amp`: fp32 master weights, one process) or FSDP2 over `world` ranks; `compile`: the
    blocks are torch.compile'd (train.compile), so they are measured compiled; `micro_steps`:
    micro-batches per optimizer step (more than one: every gradient exists from the second on)."""
    m = measure_blocks(model, device, dtype if amp else None, dtype if world > 1 else None, seq_len, compile)
    tokens = micro_batch * seq_len
    seq = bool(model.sequential_heads and model.n_heads > 1)
    early, block = gradient_split(model, dtype, world)
    device = torch.device(device)
    return MemoryModel(static_memory(model, frozen, dtype, world, amp), m.per_token, m.input_per_token, tokens,
                       1 if seq else model.n_heads, 3 * model.config.hidden_size * 4,
                       loss_buffers(model, dtype, tokens, chunk_size, world, amp, device.type == "cuda"),
                       str(device), early if world == 1 and micro_steps == 1 else None, block, m.how())


def pick_checkpointing(mem: MemoryModel | None, blocks: int, budget_gb: float, heads: bool = False) -> CheckpointPlan:
    """auto: of every split of the trunk's blocks into full / selective / off, the one with the
    least recomputation (CheckpointPlan.cost; equal cost: less memory) whose memory model fits
    `budget_gb`; no budget (0): off. A budget below the smallest plan (all full) is refused, in one
    line naming both numbers."""
    if budget_gb <= 0 or mem is None:
        return CheckpointPlan(blocks, heads=heads)
    plans = [CheckpointPlan(blocks, f, s, heads) for f in range(blocks + 1) for s in range(blocks + 1 - f)]
    fits = [p for p in plans if mem.total(p) <= budget_gb * GiB]
    if not fits:
        least = math.ceil(min(mem.total(p) for p in plans) / GiB * 10 - 1e-9) / 10  # rounded up: it fits
        raise ConfigError(f"config key 'train.memory_budget_gb': {budget_gb:g} GB is below the smallest this run fits "
                          f"in by the memory model, {least:.1f} GB (every trunk block fully checkpointed); raise "
                          f"the budget, or lower train.micro_batch or data.max_seq_len")
    return min(fits, key=lambda p: (p.cost, mem.total(p)))


def checkpointing_name(value, key: str = "train.checkpointing") -> str:
    """The mode a config value names: YAML reads a bare off / on as false / true (on: full)."""
    name = {False: "off", True: "full"}.get(value, value) if isinstance(value, bool) else value
    if name not in CHECKPOINT_MODES:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(CHECKPOINT_MODES)}")
    return name


def checkpointing_mode(t, m) -> tuple[str, bool, str]:
    """-> (mode, heads, why) from train.checkpointing and the legacy keys of the `model` section:
    model.grad_checkpointing: true = full (model.checkpoint_heads: the heads too); a budget under
    auto (the default) supersedes it. Conflicting settings are a one-line ConfigError."""
    mode = checkpointing_name(t.checkpointing)
    budget = f", budget {t.memory_budget_gb:g} GB" if t.memory_budget_gb > 0 else ", no budget"
    if not getattr(m, "grad_checkpointing", False):
        return mode, False, f"train.checkpointing={mode}" + (budget if mode == "auto" else "")
    if mode not in ("auto", "full"):
        raise ConfigError(f"config key 'model.grad_checkpointing': true means train.checkpointing=full, but "
                          f"train.checkpointing is {mode}: drop model.grad_checkpointing")
    if mode == "auto" and t.memory_budget_gb > 0:
        return "auto", False, "train.checkpointing=auto" + budget + " (it supersedes model.grad_checkpointing)"
    heads = bool(getattr(m, "checkpoint_heads", False))
    return "full", heads, "model.grad_checkpointing=true, i.e. train.checkpointing=full"


def setup_checkpointing(model: mtp.MTPModel, cfg, dist, dtype, frozen: dict | None = None,
                        say=print) -> CheckpointPlan:
    """The training scripts' activation checkpointing, before prepare_for_training: the plan from
    train.checkpointing / train.memory_budget_gb (or the legacy model.grad_checkpointing), applied
    to the blocks, said in one or two lines (the choice; with a budget, the memory model's numbers).
    With a budget the memory model is measured first: a copy of one block on the device, six
    forwards of at most 256 tokens (train.compile: four of them compiled, two compiles of the
    block's forward -- measure_blocks). `frozen`: {name: the frozen models that share the device}."""
    t = cfg.train
    mode, heads, why = checkpointing_mode(t, cfg.model)
    blocks = len(trunk_of(model))
    mem = None
    if t.memory_budget_gb > 0:
        amp = dtype != torch.float32 and dist.group is None  # common.autocast's rule
        mem = memory_model(model, frozen or {}, dist.device, dtype, t.micro_batch, cfg.data.max_seq_len,
                           t.chunk_size, dist.world, amp, t.compile,
                           max(1, t.global_batch // (t.micro_batch * dist.world)))
    plan = (pick_checkpointing(mem, blocks, t.memory_budget_gb, heads) if mode == "auto"
            else CheckpointPlan.of(mode, blocks, t.checkpoint_blocks, heads))
    apply_checkpointing(model, plan)
    say(f"activation checkpointing: {plan} -- {why}")
    if mem is not None:
        over = mode != "auto" and mem.total(plan) > t.memory_budget_gb * GiB
        say(mem.describe(plan) + (f"; above the budget of {t.memory_budget_gb:g} GB: "
                                  f"--train.checkpointing=auto picks by it" if over else ""))
    return plan
