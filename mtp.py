"""
mtp.py — the card's "head wrapper plus weighted loss": the multi-token-prediction model, its
token-weighted loss, and Rho-1's weights.

Read top to bottom:
  0. The weighted MTP loss, plainly (docs/design.md §4): `weighted_mtp_loss` materialises every
     head's logits and is the specification -- what everything below must equal (tests/test_mtp.py,
     float64) -- with the indexing it rests on (`align_to_heads`) and the coefficients λ·m·w/Σm·w.
  1. MTPModel: wraps any Hugging Face causal LM whose blocks form one stack into Meta's
     parameter-matched MTP model (Gloeckle et al. 2024, "Better & Faster Large Language Models
     via Multi-token Prediction"): trunk = blocks 0..L-2, head 0 = block L-1, heads 1..n-1 =
     copies of block L-1, one shared final norm and unembedding; the trunk-only forward and
     Meta's sequential heads (each head's forward and backward in turn, `_sequential_loss`).
  2. The same loss, computed chunk by chunk so that the logits of at most one chunk of one head
     are alive at any time (a fused linear + cross-entropy with per-token coefficients).
  3. Rho-1 weights: excess-loss selection (Lin et al. 2024, "Not All Tokens Are What You Need"),
     over the global batch (the two collectives it needs live here too).

The critic's math (value model, TD errors, GAE, exp(A/β)) is in train_critic.py; the training
plumbing both scripts share (config, devices, FSDP2, optimizer, checkpoints) in common.py;
checkpoint formats and loading a model from a spec in support/model_io.py.

Conventions used everywhere below (B = batch, T = sequence length, n = number of heads):
  - "target indexing": a per-token tensor x[b, j] belongs to token j (its weight, its mask,
    the reference model's loss of predicting it).
  - "position indexing": a per-head tensor y[k, b, t] belongs to head k at position t, which
    predicts token t+k+1. `align_to_heads` converts the first into the second; it is the one
    place where the off-by-(k+1) lives.
"""
from __future__ import annotations

import copy
import fractions
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 0. The weighted MTP loss, plainly: the specification
# --------------------------------------------------------------------------------------------

def align_to_heads(x: torch.Tensor, n_heads: int, fill=0) -> torch.Tensor:
    """Target indexing [B, T] -> position indexing [n, B, T]: out[k, b, t] = x[b, t+k+1].

    Head k at position t predicts token t+k+1, so it gets that token's id, mask and weight
    (docs/design.md §4: weights are indexed by the target token). Positions whose target would lie
    past the end of the sequence get `fill` (0 = masked out).
    """
    B, T = x.shape
    out = x.new_full((n_heads, B, T), fill)
    for k in range(n_heads):
        out[k, :, : max(T - k - 1, 0)] = x[:, k + 1:]
    return out


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


def weighted_mtp_loss(hiddens, W, targets, weights, valid, lambdas):
    """The weighted MTP loss of one batch, as the math writes it (docs/design.md §4):

        L = Σ_k λ_k · ( Σ_t m_{t,k} w_{t,k} CE_{t,k} ) / ( Σ_t m_{t,k} w_{t,k} )

    hiddens [n, B, T, D]: every head's final-normed hidden states; W [V, D]: the unembedding;
    targets, weights w, valid m [n, B, T] in position indexing (`align_to_heads`); lambdas [n].
    A head with Σ m·w = 0 contributes nothing. Every head's logits are alive at once, in float64:
    the specification, not the implementation -- `MTPModel.forward` computes the same loss and
    gradients chunk by chunk (`loss_coefficients` folds λ_k / Σ m·w into one coefficient per
    pair, summed over the *global* batch), and the tests hold it to this function."""
    logits = hiddens.double() @ W.double().t()  # [n, B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 2), targets.reshape(-1), reduction="none").view(targets.shape)
    mw = valid.double() * weights.double()
    num, den = (mw * ce).flatten(1).sum(1), mw.flatten(1).sum(1)
    per_head = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return (lambdas.double().to(per_head.device) * per_head).sum()


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

    def __init__(self, base: nn.Module, n_heads: int, sequential_heads: bool | None = None):
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
        object.__setattr__(self, "_blocks", blocks)
        # Meta's sequential heads for the training loss (`_sequential_loss`): on by default with
        # more than one head, where it saves memory; the loss and its gradients are the same.
        self.sequential_heads = n_heads > 1 if sequential_heads is None else sequential_heads
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
        cache_given = base_kwargs.get("past_key_values") is not None or base_kwargs.get("cache") is not None
        if self.n_heads > 1 and base_kwargs.get("use_cache", True) and not cache_given:
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
                n_nonzero=None, head0_targets=False):
        """Weighted MTP loss of one micro-batch (docs/design.md §4).

        targets: [n, B, T] token ids in position indexing (see `align_to_heads`).
        coef:    [n, B, T] the loss coefficient λ_k · m · w / Σ(m · w) of every (head, position);
                 or coef_fn(ce) -> coef, for weights that depend on the policy's own per-token
                 loss (Rho-1's excess loss): it gets the detached per-head CE [n, B, T] first.
        rows:    optional `loss_rows` of the batch: the unembedding runs on these pairs only.
        n_nonzero: with coef_fn, the number of pairs coef_fn will give a nonzero coefficient, if
                 the host knows it (Rho-1's hard selection in one process keeps exactly
                 Σ_k ceil(ρ·n_valid_k)): the loss's forward/backward then skips the dropped pairs.
        head0_targets: heads 1..n-1 learn head 0's own next-token distribution instead of the
                 data's tokens (`head0_distill_loss`; for drafting heads on a frozen base).
        Returns (loss, ce, correct, coef): the scalar loss, and per (head, position) the
        detached CE (KL for heads 1..n-1 with head0_targets), whether the target was the top logit
        (agreed with head 0's), and the coefficients used.

        Everything happens inside this forward so that, under FSDP, the shared unembedding is
        used while its parameters are gathered.

        rows may also be a list of n index tensors, one per head, into that head's flattened
        [B, T] (`head_rows`); n_nonzero may be a list of per-head counts (the sequential path
        needs them per head). While training with `sequential_heads`, the heads run one after
        another, each forward *and backward* here (`_sequential_loss`); coef_fn is then called
        once per head as coef_fn(ce_k, head=k) with ce_k [1, B, T] -- a coef_fn without a `head`
        argument gets the all-heads path.
        """
        # Sequential heads compute hard-token CE only; head 0's soft targets (drafting heads on a
        # frozen base, whose trunk has no backward to save) take the all-heads path.
        if (self.sequential_heads and torch.is_grad_enabled() and not head0_targets
                and (coef is not None or _takes_head(coef_fn))):
            return self._sequential_loss(input_ids, targets, coef, coef_fn, chunk_size, rows, n_nonzero)
        rows = _flat_rows(rows, targets.shape)
        if isinstance(n_nonzero, (list, tuple)):
            n_nonzero = int(sum(n_nonzero))
        hiddens, _ = self.hidden_states(input_ids, use_cache=False)
        W = self.lm_head_weight
        if coef is None:
            ce, correct = token_ce(hiddens.detach(), W.detach(), targets, chunk_size, rows)
            coef = coef_fn(ce).detach()
            if n_nonzero is not None and not head0_targets:
                flat = coef.reshape(-1)
                pool = rows if rows is not None else torch.arange(flat.numel(), device=flat.device)
                picked = torch.topk((flat[pool] != 0).float(), n_nonzero, sorted=False).indices
                loss, _, _ = weighted_ce(hiddens, W, targets, coef, chunk_size, pool[picked])
                return loss, ce, correct, coef
        loss_fn = head0_distill_loss if head0_targets else weighted_ce
        loss, ce, correct = loss_fn(hiddens, W, targets, coef.detach(), chunk_size, rows)
        return loss, ce, correct, coef


    def trunk(self, input_ids, **base_kwargs) -> tuple[torch.Tensor, tuple, dict]:
        """Run blocks 0..L-2 only -> (trunk output, the last block's other args, its kwargs).

        The base model's forward runs as usual (base_kwargs: a mask, positions, a cache; no
        cache by default), but its last block is swapped for a stub that records what it was
        handed and stops the forward there (`_TrunkEnd`): the heads are then run by the caller
        with exactly those arguments."""
        stub, last = _TrunkEnd(), self._blocks[-1]
        self._blocks[-1] = stub
        try:
            self._inner(input_ids=input_ids, **({"use_cache": False} | base_kwargs))
            raise RuntimeError("the base model never called its last block")
        except _TrunkDone:
            pass
        finally:
            self._blocks[-1] = last
        args, kwargs = stub.args, stub.kwargs
        z = args[0] if args else kwargs.pop("hidden_states")
        return z, args[1:], kwargs

    def _sequential_loss(self, input_ids, targets, coef, coef_fn, chunk_size, rows, n_nonzero):
        """The weighted MTP loss with Meta's sequential heads (Gloeckle et al. 2024, §2 and Fig. 2):
        the trunk runs once; then each head in turn runs forward from the *detached* trunk output,
        its loss (the fused chunked CE), and its backward down to that detached input -- so only
        one head's activations and one chunk of its logits are ever alive -- while the trunk
        output's gradient, the shared norm's and the unembedding's accumulate over heads. The
        trunk's backward then runs once, in the caller's `loss.backward()`.

        To the caller this is the same loss: `_SequentialHeads` keeps the gradients computed here
        and hands them to autograd in the backward, scaled by the incoming gradient, so
        `(loss * world).backward()`, `torch.autograd.grad(loss, params)` and gradient accumulation
        over micro-batches behave as with the all-heads path (tests/test_mtp.py, float64).
        Rho-1's selection is per head (docs/design.md §5; its denominators are counts known before
        the step), so coef_fn needs only that head's CE. Under FSDP2 the heads are not sharded on
        their own (common.prepare_for_training): they belong to the root's group with the norm and
        the unembedding, gathered for the whole forward, and their gradients reach FSDP through the
        backward like any other, reduce-scattered once per backward."""
        n, B, T = targets.shape
        z, args, kwargs = self.trunk(input_ids)
        heads = [self._last_block, *self.extra_heads]
        W = self.lm_head_weight
        norm_params = [p for p in self._norm.parameters() if p.requires_grad]
        head_params = [[p for p in h.parameters() if p.requires_grad] for h in heads]
        params = [p for ps in head_params for p in ps] + norm_params + ([W] if W.requires_grad else [])
        per_head_rows = _head_rows_of(rows, n, B, T)
        counts = n_nonzero if isinstance(n_nonzero, (list, tuple)) else None

        def run(z):
            acc = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
            # The unembedding's gradient in W's own dtype, over every chunk of every head: with bf16
            # parameters that is bf16 (each chunk's product is accumulated in fp32 by the matmul
            # and added once), as Liger-Kernel's fused linear CE does by default, instead of an
            # fp32 buffer of the vocabulary's size (1 GiB at 128k x 2048).
            grad_W = torch.zeros_like(W) if W.requires_grad else None
            grad_z = None
            grads = {}  # id(param) -> gradient, over heads
            ce_all = torch.zeros(n, B * T, device=z.device, dtype=acc)
            correct_all = torch.zeros(n, B * T, device=z.device, dtype=torch.bool)
            coefs, loss = [], torch.zeros((), device=z.device, dtype=acc)
            for k, head in enumerate(heads):
                with torch.enable_grad():
                    zd = z.detach().requires_grad_(z.requires_grad)
                    h = head(zd, *args, **kwargs)
                    h = self._norm(h[0] if isinstance(h, tuple) else h).reshape(B * T, -1)
                    r = per_head_rows[k]
                    hk = h if r is None else h[r]
                y = targets[k].reshape(-1) if r is None else targets[k].reshape(-1)[r]
                if coef is not None:
                    c_full = coef[k].detach()
                    ck = c_full.reshape(-1) if r is None else c_full.reshape(-1)[r]
                    loss_k, ce_k, correct_k, grad_h, _ = _fused_linear_ce(
                        hk.detach(), W.detach(), y, ck, chunk_size, grad_W, need_W=grad_W is not None)
                else:  # Rho-1: this head's CE first (no gradient), its coefficients, then the loss
                    _, ce_k, correct_k, _, _ = _fused_linear_ce(hk.detach(), W.detach(), y, None, chunk_size)
                    ce_full = ce_k if r is None else torch.zeros(B * T, device=z.device, dtype=acc).index_put_((r,), ce_k)
                    c_full = coef_fn(ce_full.view(1, B, T), head=k)[0].detach()
                    ck = c_full.reshape(-1) if r is None else c_full.reshape(-1)[r]
                    if counts is not None:  # only the pairs with a nonzero coefficient
                        picked = torch.topk((ck != 0).float(), counts[k], sorted=False).indices
                        loss_k, _, _, g, _ = _fused_linear_ce(hk.detach()[picked], W.detach(), y[picked],
                                                              ck[picked], chunk_size, grad_W, grad_W is not None)
                        grad_h = torch.zeros_like(hk).index_put_((picked,), g)
                    else:
                        loss_k, _, _, grad_h, _ = _fused_linear_ce(hk.detach(), W.detach(), y, ck, chunk_size,
                                                                   grad_W, grad_W is not None)
                coefs.append(c_full)
                loss = loss + loss_k
                idx = slice(None) if r is None else r
                ce_all[k, idx], correct_all[k, idx] = ce_k, correct_k
                # this head's backward, down to its detached input: its activations die here
                inputs = [zd] * zd.requires_grad + head_params[k] + norm_params
                # (none when this head, the norm and the trunk are all frozen: head 0 of a
                # heads-only run with the base frozen outright: nothing of it needs a gradient)
                got = torch.autograd.grad(hk, inputs, grad_outputs=grad_h, allow_unused=True) if inputs else ()
                del h, hk, grad_h
                if zd.requires_grad:
                    grad_z = got[0] if grad_z is None else grad_z.add_(got[0])
                    got = got[1:]
                for p, g in zip(head_params[k] + norm_params, got):
                    if g is not None:
                        grads[id(p)] = g if id(p) not in grads else grads[id(p)].add_(g)
            if W.requires_grad:
                grads[id(W)] = grad_W if id(W) not in grads else grads[id(W)].add_(grad_W)
            return (loss, ce_all.view(n, B, T), correct_all.view(n, B, T), torch.stack(coefs),
                    [grad_z] + [grads.get(id(p)) for p in params])

        return _SequentialHeads.apply(run, z, *params)


class _TrunkDone(Exception):
    pass


class _TrunkEnd(nn.Module):
    """Stands in for the last block during `MTPModel.trunk`: records its arguments and stops the
    base model's forward (the final norm and anything after it are not needed)."""

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, dict(kwargs)
        raise _TrunkDone


class _SequentialHeads(torch.autograd.Function):
    """The sequential heads' loss as one autograd node: `run` computes the loss and, already,
    the gradients of the trunk output and of every head parameter (the heads' backward runs in
    the forward, one head at a time); the backward hands them over, scaled by the incoming
    gradient (in place: no second copy of a gradient)."""

    @staticmethod
    def forward(ctx, run, z, *params):
        loss, ce, correct, coef, grads = run(z)
        ctx.grads = grads
        ctx.mark_non_differentiable(ce, correct, coef)
        return loss, ce, correct, coef

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads, ctx.grads = ctx.grads, None
        return (None, *(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads))


def _takes_head(coef_fn) -> bool:
    """Does coef_fn accept `head=k` (a per-head coefficient function, for sequential heads)?"""
    import inspect
    if coef_fn is None:
        return False
    try:
        return "head" in inspect.signature(coef_fn).parameters
    except (TypeError, ValueError):
        return False


def head_rows(mask: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """`loss_rows` per head: for each head k, indices into its flattened [B, T] of the positions
    whose target is a completion token. Call it on the CPU copy of the mask: no device sync."""
    return [v.flatten().nonzero().squeeze(1) for v in align_to_heads(mask, n_heads)]


def _head_rows_of(rows, n, B, T):
    """Per-head rows from either form `forward` accepts (None = every position of every head).
    A flat `loss_rows` tensor is split here, which costs one host sync on a GPU: pass
    `head_rows(...)` instead."""
    if rows is None:
        return [None] * n
    if isinstance(rows, (list, tuple)):
        return list(rows)
    bounds = torch.searchsorted(rows, torch.arange(n + 1, device=rows.device) * (B * T)).tolist()
    return [rows[bounds[k]: bounds[k + 1]] - k * B * T for k in range(n)]


def _flat_rows(rows, shape):
    """Per-head rows -> indices into the flattened [n, B, T] (the all-heads path's form)."""
    if not isinstance(rows, (list, tuple)):
        return rows
    n, B, T = shape
    return torch.cat([r + k * B * T for k, r in enumerate(rows)])


# --------------------------------------------------------------------------------------------
# 2. The weighted loss, chunked
# --------------------------------------------------------------------------------------------

def default_chunk_size(vocab_size: int, in_place: bool = False) -> int:
    # ~64M logits per chunk (128 MB in bf16), at least 1024 rows: large enough to keep the
    # matmuls efficient and the grad_W accumulations few at vocab 128k (each one reads and
    # writes the whole W-sized buffer), small enough that the loss never dominates memory
    # (docs/design.md §3: naive MTP at 128k needs 1.6x the memory of next-token training). 1024
    # rows at 128k: 0.25 GiB of bf16 logits and as much for their gradient; `in_place` (Triton's
    # kernel writes it over the logits): twice the rows in those bytes, +1.5% a 4-head step at 128k.
    return max(1024, (1 << 26) // vocab_size) * (2 if in_place else 1)


def _ce_chunk(logits, y, coef, acc: torch.dtype, need_grad: bool, out_dtype: torch.dtype):
    """One chunk of rows: CE, whether the target's logit is the largest (ties count as right) and
    (if needed) d(Σ coef·CE)/d logits = coef · (softmax - onehot). On CUDA, gpu_kernels/
    cross_entropy.py does the same in one kernel (else torch.compile of this pure function)."""
    logits = logits.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    x_y = logits.gather(1, y[:, None]).squeeze(1)
    ce, correct = lse - x_y, x_y == logits.amax(-1)
    if not need_grad:
        return ce, correct, None
    if torch.compiler.is_compiling():
        # pointwise only (one-hot by comparison, not scatter): one kernel, no fp32 chunk-sized buffer
        onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == y[:, None]
        g = (torch.exp(logits - lse[:, None]) - onehot.to(acc)) * coef[:, None].to(acc)
    else:  # eager: in place, so that one chunk of logits is the only chunk-sized buffer
        minus_one = -torch.ones_like(lse)[:, None]
        g = logits.sub_(lse[:, None]).exp_().scatter_add_(1, y[:, None], minus_one).mul_(coef[:, None].to(acc))
    return ce, correct, g.to(out_dtype)


def _kl_chunk(logits, teacher_logits, coef, acc: torch.dtype, need_grad: bool, out_dtype: torch.dtype):
    """One chunk of soft-target rows (`head0_distill_loss`): KL(p ‖ q) of the student's q against
    the teacher's p, whether their argmaxes agree, and (if needed) d(Σ coef·KL)/d logits =
    coef · (q − p); no gradient reaches the teacher."""
    log_q = logits.to(acc).log_softmax(-1)
    log_p = teacher_logits.to(acc).log_softmax(-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    agree = log_q.argmax(-1) == log_p.argmax(-1)
    if not need_grad:
        return kl, agree, None
    return kl, agree, ((log_q.exp() - p) * coef[:, None].to(acc)).to(out_dtype)


_ce_chunk_compiled, _ce_kernel = None, None  # _ce_kernel: gpu_kernels.cross_entropy, False without Triton


def ce_kernel():
    """gpu_kernels.cross_entropy, or False without Triton (PyTorch's CUDA wheels bring it)."""
    global _ce_kernel
    if _ce_kernel is None:
        try:
            from gpu_kernels import cross_entropy as _ce_kernel
        except ImportError:
            _ce_kernel = False
    return _ce_kernel


def _ce_chunk_gpu(logits, y, coef, acc, need_grad, out_dtype):
    """On CUDA: the Triton kernel where it applies, else torch.compile of _ce_chunk (dynamic: the last chunk's rows vary)."""
    global _ce_chunk_compiled
    if ce_kernel() and _ce_kernel.applies(logits.dtype, acc, out_dtype, need_grad):
        return _ce_kernel.ce_chunk(logits, y, coef, need_grad)
    _ce_chunk_compiled = _ce_chunk_compiled or torch.compile(_ce_chunk, dynamic=True)
    return _ce_chunk_compiled(logits, y, coef, acc, need_grad, out_dtype)


_ADDMM_OUT_DTYPE = None  # whether this torch/device accumulates bf16 products into fp32 in place


def _add_matmul(acc, a, b):
    """acc += a @ b in place: one addmm into acc when the dtypes agree (the product accumulates
    in fp32 inside the matmul and is added once); an fp32 acc of bf16 products (fp32 master
    weights under autocast) in place with cuBLAS where torch supports addmm's out_dtype, else
    via a temporary."""
    global _ADDMM_OUT_DTYPE
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, out=acc)
        return
    if acc.dtype != a.dtype and a.is_cuda and _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, acc.dtype, out=acc)
            _ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE = False
    acc += a @ b


def _fused_linear_ce(h, W, targets, coef, chunk_size=None, grad_W=None, need_W=True, teacher=None):
    """Σ_i coef_i · CE(h_i W^T, y_i) and its gradients, without ever materialising all logits.

    Walks over row chunks: logits of one chunk -> CE -> (softmax - onehot) · coef, from which
    this chunk's gradients w.r.t. h and W are computed right away (the "fused linear
    cross-entropy" of Liger-Kernel / Wijmans et al. 2024, "Cut Your Losses"). Cost: the same
    three matmuls as the naive loss; memory: one chunk of logits plus the gradient buffers.
    coef None: CE and correctness only (no gradient, no loss). grad_W: a buffer (W's shape) the
    unembedding's gradient is added into -- over heads, for sequential heads; if None and W needs
    one, a fresh buffer of W's dtype (bf16 parameters: bf16, as Liger's default accum_dtype; the
    matmul accumulates each chunk in fp32); need_W=False: no gradient for W at all. teacher:
    rows of hidden states whose distribution softmax(teacher_i W^T) replaces the hard target y_i
    (`_kl_chunk`: the loss is then Σ coef · KL, "ce" the KL, "correct" the argmaxes' agreement).
    Plain tensors in, plain tensors out (no autograd).
    Returns (loss, ce, correct, grad_h, grad_W) (None where not computed).
    """
    need = coef is not None
    # fp32 statistics for bf16/fp16 models (as HF upcasts logits for its loss); fp64 stays fp64.
    acc = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
    N = h.shape[0]
    in_place = h.is_cuda and teacher is None and bool(ce_kernel()) and _ce_kernel.applies(None, acc, h.dtype, need)
    chunk_size = chunk_size or default_chunk_size(W.shape[0], in_place)
    ce, correct = torch.empty(N, device=h.device, dtype=acc), torch.empty(N, device=h.device, dtype=torch.bool)
    grad_h = torch.empty_like(h) if need else None
    if need and need_W and grad_W is None:
        grad_W = torch.zeros_like(W)
    chunk_fn = _ce_chunk_gpu if h.is_cuda else _ce_chunk
    c = coef if need else ce  # (unused without a gradient)
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        ce[s:e], correct[s:e], g = (
            chunk_fn(h[s:e] @ W.t(), targets[s:e], c[s:e], acc, need, h.dtype) if teacher is None else
            _kl_chunk(h[s:e] @ W.t(), teacher[s:e] @ W.t(), c[s:e], acc, need, h.dtype))
        if g is not None:
            torch.mm(g, W, out=grad_h[s:e])
            if need_W:
                _add_matmul(grad_W, g.t(), h[s:e])
        del g  # before the next chunk's logits exist: one chunk-sized buffer fewer at the peak
    loss = (coef.to(acc) * ce).sum() if need else None
    return loss, ce, correct, grad_h, grad_W if need and need_W else None


class _WeightedLinearCE(torch.autograd.Function):
    """`_fused_linear_ce` as an autograd node (the all-heads path): the gradients are computed
    in the forward; the backward only scales them by the incoming scalar, in place. With
    `teacher` rows (no gradient reaches them), soft targets: Σ coef · KL."""

    @staticmethod
    def forward(ctx, h, W, targets, coef, chunk_size, teacher=None):
        need_h, need_W = h.requires_grad, W.requires_grad
        if need_h or need_W:
            loss, ce, correct, grad_h, grad_W = _fused_linear_ce(h, W, targets, coef, chunk_size, need_W=need_W,
                                                                 teacher=teacher)
            ctx.grads = (grad_h if need_h else None, grad_W)
        else:
            _, ce, correct, _, _ = _fused_linear_ce(h, W, targets, None, chunk_size, teacher=teacher)
            acc = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
            loss, ctx.grads = (coef.to(acc) * ce).sum(), (None, None)
        ctx.mark_non_differentiable(ce, correct)
        return loss, ce, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_correct):
        grads, ctx.grads = ctx.grads, None
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))  # noqa: E731
        return scale(grads[0]), scale(grads[1]), None, None, None, None


def weighted_ce(hiddens, W, targets, coef, chunk_size=None, rows=None):
    """Weighted CE over all heads: hiddens [n, B, T, D], targets/coef [n, B, T].

    rows: optional indices into the flattened [n, B, T] of the (head, position) pairs that are
    in the loss (`loss_rows`); the unembedding then runs on those rows only -- prompt, padding
    and past-the-end positions cost nothing. Computed on the host from the batch's mask, so
    their number is known without a device sync.
    Returns (loss, ce [n, B, T], correct [n, B, T]); ce and correct are detached (0 off rows).
    """
    D = hiddens.shape[-1]
    h, y, c = hiddens.reshape(-1, D), targets.reshape(-1), coef.reshape(-1)
    if rows is not None:
        h, y, c = h[rows], y[rows], c[rows]
    loss, ce, correct = _WeightedLinearCE.apply(h, W, y, c, chunk_size)
    if rows is not None:
        # index_put_, not index_copy_: the latter has no MPS kernel before torch 2.8 (tests/test_mps_rules.py)
        ce = torch.zeros(targets.numel(), device=ce.device, dtype=ce.dtype).index_put_((rows,), ce)
        correct = torch.zeros(targets.numel(), device=ce.device, dtype=torch.bool).index_put_((rows,), correct)
    return loss, ce.view(targets.shape), correct.view(targets.shape)


def head0_distill_loss(hiddens, W, targets, coef, chunk_size=None, rows=None):
    """Self-distillation of the drafting heads (Medusa-2's self-distillation, Cai et al. 2024,
    §2.3.2; FastMTP): head 0 keeps its weighted CE against the data's tokens; head k >= 1 at
    position t learns head 0's own distribution of the same token t+k+1 -- the one head 0
    computes at position t+k -- as a soft target: KL(p_0(· | x_<=t+k) ‖ p_k(· | x_<=t)), with the
    same coefficients. A draft is accepted when it is head 0's argmax, so matching head 0's whole
    distribution (its near-ties included) is the target that decoding rewards; the data's token
    is only one sample of it. Head 0's hidden states are the target, not trained through.
    Same arguments and returns as weighted_ce (ce holds the KL of heads >= 1, correct whether the
    head's argmax is head 0's)."""
    n, B, T, D = hiddens.shape
    N = B * T
    rows = rows if rows is not None else torch.arange(n * N, device=hiddens.device)
    r0, rk = rows[rows < N], rows[rows >= N]
    loss, ce, correct = weighted_ce(hiddens, W, targets, coef, chunk_size, r0)
    if rk.numel():
        flat = hiddens.reshape(-1, D)
        teacher = flat[rk % N + rk // N].detach()  # row (k, b, t) -> head 0 at (b, t + k)
        loss_k, kl, agree = _WeightedLinearCE.apply(flat[rk], W, targets.reshape(-1)[rk], coef.reshape(-1)[rk],
                                                    chunk_size, teacher)
        loss = loss + loss_k
        ce = ce.reshape(-1).index_put((rk,), kl.to(ce.dtype)).view(ce.shape)
        correct = correct.reshape(-1).index_put((rk,), agree).view(correct.shape)
    return loss, ce, correct


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
    """How many of n_valid tokens the top-ρ selection keeps: ceil(ρ·n) (at least one if any).
    Exact, in integers on the device: ρ as the fraction p/q it was written as (0.7 = 7/10), so
    ceil(ρ·n) = (n·p + q − 1) // q -- no float64, which MPS does not have, and no float32
    rounding of ρ·n."""
    p, q = fractions.Fraction(ratio).limit_denominator(1_000_000).as_integer_ratio()
    n = n_valid.long()
    return ((n * p + (q - 1)) // q).clamp(min=0).minimum(n)


def rho1_weights(excess, valid, ratio, mode="hard", temperature=1.0, group=None):
    """Rho-1 token weights from the signed excess loss CE_policy - CE_ref (docs/design.md §5).

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


def all_reduce(x, op, group):
    """Sum / max / min over ranks (identity in a single process)."""
    if group is None:
        return x
    x = x.clone()
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(x, op=ops[op], group=group)
    return x
