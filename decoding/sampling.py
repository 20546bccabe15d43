"""
sampling.py — generating completions: what eval.py samples with.

    from decoding import sampling
    rows, stats = sampling.sample_problems(model, tok, problems, indices, n_samples, max_new_tokens,
                                           temperature, top_p, seed, batch_size, eos_ids)
    rows, stats = sampling.decode_rows(model, tok, prompts, max_new_tokens, stop, eos_ids, speculative=True,
                                       batch_size=8, tree=(6, 3, 2))

Read top to bottom:
  1. `generate`: the reference sampler (a KV cache, left padding, a torch.Generator per prompt;
     simple and exact, host-bound on a GPU); self-speculative greedy decoding with the MTP heads
     (docs/design.md §7); `completion_text`, which cuts a completion at its first stop string.
  2. `sample_rows` / `sample_problems`: the fast sampler eval.py uses -- slots in a static KV
     cache, each prompt prefilled once, continuous batching, one CUDA graph per decode step,
     stop strings checked in bulk, randomness keyed by (seed, problem, sample, step). The static
     cache both fast paths write (`SlotCache`) and their attention (`_slot_attention`) live here.
  3. `decode_rows`: self-speculative decoding, fast -- batched (each row accepts its own number of
     drafts), exact speculative sampling (Leviathan et al. 2023), greedy trees of drafts
     (`draft_tree`, `parse_tree`; Medusa's tree attention), static cache, CUDA graphs; with
     speculative=False the same loop decodes plainly (what speculate.py and eval.py --speculative
     time against). Its matmuls of a few rows go through `linear_pick`, and a speculative
     forward runs the last block and the extra heads as one (`parallel_heads`; both on CUDA).
     `calibrated_tree` picks a tree's drafts from counts of which ones decoding kept.
The tests hold the fast paths to the reference ones (tests/test_eval.py, tests/test_speculative.py).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 1. The reference sampler, self-speculative decoding, and turning tokens into a completion
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


# --------------------------------------------------------------------------------------------
# 2. Fast sampling: shared prefill, continuous batching, counter-based noise
# --------------------------------------------------------------------------------------------
# `generate` above is the reference: simple, but host-bound on a GPU (a Python stop check per
# row and a per-problem sampling call every step, and a batch that shrinks as rows finish while
# the longest row runs on). `sample_rows` produces the same kind of samples with the GPU kept
# busy:
#   - slots: B rows decode together; each slot holds its own sequence in a static KV cache at
#     positions 0..len-1, so rows of different problems and lengths start and end at any step.
#     A finished row is retired and its slot refilled with the next row waiting (continuous
#     batching); once nothing waits, the live rows are packed into a smaller batch.
#   - a prompt is prefilled once; its keys/values are copied into the slots of its samples.
#   - the decode step has no host sync: the sampled token, EOS and max-length checks, and the
#     bookkeeping all stay on the device, so on CUDA the whole step is one CUDA graph replay.
#     Every `check_every` steps the host reads the new tokens of all rows at once, decodes
#     each live row's tail once to look for stop strings, and retires the finished rows; a row
#     that stopped mid-block is cut back to the token where `finished` would have stopped it.
#   - the randomness of a row is a function of (seed, problem, sample, step) only: a hash gives
#     one uniform number per row and step, and the token is drawn by inverse CDF. So a row's
#     samples do not depend on which rows share its batch, the batch size, the check interval or
#     the rank (a torch.Generator per problem cannot be used once rows of many problems are
#     interleaved in one sampling call).

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x < 2^32 (a Python int or an int64 tensor) without overflowing int64:
    the constant is split in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """lowbias32 (C. Wellons): a 32-bit integer hash with good avalanche; ints or int64 tensors
    give the same values, so keys are made on the host and noise on the device."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_key(seed: int, problem: int, sample: int = None) -> int:
    """The random stream of one sample: (seed, problem index) -> a problem key, then + sample
    index -> the row key that `uniform_noise` hashes with the step. Hash chains (not sums), so
    that two rows' streams are unrelated rather than shifted copies of each other."""
    k = _hash32(_hash32((seed & _M32) ^ 0x9E3779B9) ^ ((seed >> 32) & _M32))
    k = _hash32(k ^ _hash32(problem + 0x632BE5AB))
    return k if sample is None else _row_key(k, sample)


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row: hash(row key, step), 24 bits (exact in fp32)."""
    h = _hash32(_hash32(keys ^ _hash32(steps + 0x27D4EB2F)) + 0x165667B1)
    return (h >> 8).float() * (1.0 / (1 << 24))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """pick_next's distribution, drawn from given uniforms u [B] instead of a generator: greedy at
    temperature 0; else softmax(logits / T) restricted to the same nucleus (chosen on logits
    sorted exactly as pick_next sorts them), drawn by inverse CDF: the first token, in vocabulary
    order, whose cumulative probability exceeds u times the nucleus mass. Vocabulary order, as
    torch.multinomial does, not sorted order: rounding-level differences between batch shapes
    reorder near-equal probabilities in a sort, which would move every interval between them."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(nucleus_probs(logits, temperature, top_p), u)


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """pick_next's distribution over the last dimension, not renormalised: softmax(logits / T)
    with the tokens outside the nucleus set to 0 (chosen as pick_next chooses them)."""
    logits = logits / temperature
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # pick_next's rule, in sorted order
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token from each row of (unnormalised) probs [..., V], by inverse CDF from uniforms u [...]:
    the first token, in vocabulary order, whose cumulative mass exceeds u times the row's total."""
    cdf = probs.reshape(-1, probs.shape[-1]).cumsum(-1)
    total = cdf[:, -1:]
    # u < 1, but u * total can round up to total: stay just below it, so that the search lands
    # on a token with mass, never past the end.
    target = torch.minimum(u.reshape(-1, 1).to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).view(u.shape)


def first_stop(tok, tokens: list[int], start: int, stop: list[str], eos_ids: set[int]) -> int | None:
    """Index of the first token at or after `start` at which `finished` would have ended the
    completion had it been checked after every token, or None. One decode for the whole block;
    token by token only when that finds something (a row's last block)."""
    new = len(tokens) - start
    if new <= 0 or not finished(tok, tokens, new, stop, eos_ids):
        return None
    for i in range(start, len(tokens)):
        if finished(tok, tokens[:i + 1], 1, stop, eos_ids):
            return i
    return None


class SlotCache:
    """The KV cache of the decoder's slots, for transformers' attention modules (which only call
    `update`, given a 4-D mask and position ids). Layer l's keys are one static [B, H, S, D]
    buffer; slot b holds its sequence at positions 0..pos[b]-1 (no padding inside a slot). A
    decode step writes each slot's new key/value at that slot's own position pos[b] and returns
    the whole buffer; the mask hides positions past pos[b] (stale values of a slot's previous
    occupant included)."""

    def __init__(self, keys, values, pos):
        self.keys, self.values, self.pos = keys, values, pos
        self.at = None  # the write index: every layer of a forward writes the same slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        Q = key_states.shape[2]  # 1 when sampling; a speculative block writes Q positions from pos[b]
        shape = (k.shape[0], k.shape[1], Q, k.shape[3])
        if self.at is None or self.at.shape != shape:  # built once per forward, not per layer (2 kernels x layers)
            at = self.pos.view(-1, 1, 1, 1) if Q == 1 else (self.pos[:, None] + torch.arange(Q, device=k.device)).view(-1, 1, Q, 1)
            self.at = at.expand(shape)
        k.scatter_(2, self.at, key_states)
        v.scatter_(2, self.at, value_states)
        return k, v


class _RecordingCache:
    """Prefill (no past): keeps each layer's keys/values, to be copied into slots."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states


def _slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention under our additive 4-D mask [B, 1, Q, S]. With a mask, transformers' SDPA path
    repeats every key/value head for its G query heads (5.17; 5.24 packs them for one query),
    i.e. copies the whole static cache every layer and step. For one query token we fold the G
    query heads of a key/value head into G query positions instead: each key/value is read once."""
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise NotImplementedError("the slot decoder supports plain causal attention only")
    B, H, Q, D = query.shape
    G = H // key.shape[1]
    if Q == 1 and G > 1:
        # (Folding a speculative block's Q tokens the same way, mask repeated G times, measured
        # slower on an H200 at batch 1: 5.99 vs 5.72 ms per chain forward, 7.19 vs 7.06 for a tree.)
        out = F.scaled_dot_product_attention(query.reshape(B, H // G, G, D), key, value,
                                             attn_mask=attention_mask, scale=scaling).reshape(B, H, 1, D)
    else:
        if G > 1:  # query head h reads key/value head h // G (transformers' repeat_kv)
            key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class _SlotAttention:
    """Context: the model's attention modules dispatch to `_slot_attention` (by config name)."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        from transformers import AttentionInterface
        AttentionInterface.register("wmtp_slots", _slot_attention)
        self.old = self.config._attn_implementation
        self.config._attn_implementation = "wmtp_slots"

    def __exit__(self, *exc):
        self.config._attn_implementation = self.old


def _cache_kwarg(inner) -> str:
    """transformers renamed the models' `past_key_values` argument to `cache` (5.2x)."""
    import inspect
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _buckets(B: int, floor: int) -> list[int]:
    """Batch sizes the decoder packs into once nothing waits: B, B/2, B/4, ... down to floor.
    (A step's cost falls with the batch until it is bound by reading the weights.)"""
    sizes = [B]
    while sizes[-1] > max(floor, 1):
        sizes.append(max((sizes[-1] + 1) // 2, floor))
    return sizes


def _cuda_graph(fn, pools: list):
    """Warm fn up on a side stream (lazy initialisation, cuBLAS workspaces), then capture one call
    as a CUDA graph -> its replay. Every graph shares one memory pool (pools[0]): they never run
    concurrently and none has outputs read outside it (everything lands in static tensors)."""
    if not pools:
        pools.append(torch.cuda.graph_pool_handle())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pools[0]):
        fn()
    return graph.replay


def _within(context, fn):
    """fn, each call of it inside a fresh `context()`."""
    def call():
        with context():
            return fn()
    return call


def _row_key(problem_key: int, sample: int) -> int:
    return _hash32(problem_key ^ _hash32(sample + 0x85EBCA6B))


@torch.no_grad()
def sample_rows(model, tok, prompts, n, max_new_tokens, temperature, top_p, stop, eos_ids, keys, batch_size,
                check_every=None, graphs=None, compile=False, prefill_tokens=None, min_batch=None,
                on_finish=None):
    """n samples of each prompt, continuously batched in `batch_size` slots -> (token lists, stats).

    prompts: token-id lists; row p*n + s of the result is sample s of prompt p, cut exactly where
    `generate` would have stopped it (first EOS or stop string, checked token by token, or
    max_new_tokens). stop: one list of stop strings, or one list per prompt. keys: a key per
    prompt (`sample_key(seed, problem)`): the row of (prompt p, sample s) draws from
    hash(keys[p], s, step) only. check_every: decode steps between host checks (stop strings,
    retiring, refilling); it costs the tokens a finished row decodes past its end, at most
    check_every - 1. graphs: replay each decode step as a CUDA graph (default: on CUDA).
    compile: torch.compile the step first (measure: it costs compile time). prefill_tokens:
    prompts prefilled ahead per forward, in padded tokens (default 16k on CUDA, one prompt at a
    time elsewhere). min_batch: the smallest batch the live rows are packed into once nothing
    waits. on_finish(row, tokens): called as rows end. Uses the base model (head 0 of an MTP model).
    """
    from collections import deque
    base, W = model.base, model.lm_head_weight
    inner, device = base.base_model, W.device
    dtype = next(base.parameters()).dtype
    cache_kw = _cache_kwarg(inner)
    prompts = [list(p) for p in prompts]
    if not prompts:
        return [], {"tokens": 0, "steps": 0}
    stops = stop if stop and not isinstance(stop[0], str) else [list(stop)] * len(prompts)
    cuda = device.type == "cuda"
    K = check_every or (16 if cuda else 4)
    if prefill_tokens is None:  # a CPU pays for padding, a GPU for each forward's launches
        prefill_tokens = 16384 if cuda else 0
    B = batch_size
    S = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64  # room for the longest row; 64 | S
    # Device state of every slot: the token to feed, its position (= the slot's length), tokens
    # generated, the row's random key, done; `ring` collects the tokens of a block of steps.
    tok_d = torch.zeros(B, dtype=torch.long, device=device)
    cur = torch.zeros_like(tok_d)
    steps = torch.zeros_like(tok_d)
    key_d = torch.zeros_like(tok_d)
    done = torch.ones(B, dtype=torch.bool, device=device)
    ring = torch.zeros(B, K, dtype=torch.long, device=device)
    col = torch.zeros(1, dtype=torch.long, device=device)  # the ring column of the next step
    state = [tok_d, cur, steps, key_d, done, ring, col]
    eos_t = torch.tensor(sorted(eos_ids) or [-1], device=device)
    positions = torch.arange(S, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    kv = []  # per layer (keys, values) [B, H, S, D], allocated at the first prefill
    stats = {"steps": 0, "slot_steps": 0, "tokens": 0, "prefills": 0, "prefill_tokens": 0, "refills": 0,
             "packs": 0, "graphs": cuda if graphs is None else bool(graphs), "capture_s": 0.0,
             "check_every": K, "batch_size": B}

    def step_fn(b):
        """One decode step of slots [0, b), device-only: feed each slot's token at its position,
        sample the next from the row's noise, record it, advance live rows, mark rows done."""
        cache = SlotCache([k[:b] for k, _ in kv], [v[:b] for _, v in kv], cur[:b])
        tk, cu, sp, ky, dn, rg = tok_d[:b], cur[:b], steps[:b], key_d[:b], done[:b], ring[:b]

        def one_step():
            mask = torch.where(positions <= cu[:, None], zero, neg)[:, None, None, :]  # [b, 1, 1, S]
            h = inner(input_ids=tk[:, None], attention_mask=mask, position_ids=cu[:, None], use_cache=True,
                      **{cache_kw: cache}).last_hidden_state[:, -1]
            logits = F.linear(h, W)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nxt = sample_tokens(logits, temperature, top_p, uniform_noise(ky, sp))
            live = ~dn
            rg.index_copy_(1, col, nxt[:, None])
            sp.add_(live)
            cu.add_(live)
            tk.copy_(nxt)
            dn.logical_or_(live & ((nxt[:, None] == eos_t).any(-1) | (sp >= max_new_tokens)))
            col.add_(1)
        return torch.compile(one_step) if compile else one_step

    runners, pools = {}, []

    def runner(b):
        """The decode step at batch size b: eager, or captured once as a CUDA graph and replayed."""
        if b not in runners:
            fn = step_fn(b)
            if stats["graphs"]:
                t0 = time.perf_counter()
                # The capture's warm-up steps advance the state: restore it after. The keys/values
                # they wrote are the ones the real steps write again (same tokens: the noise is a
                # function of the step), or lie past a row's end, masked.
                saved = [t.clone() for t in state]
                try:
                    fn = _cuda_graph(fn, pools)
                except Exception as e:  # keep going, eagerly: slower, same samples
                    print(f"sample_rows: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                    stats["graphs"] = False
                    fn = step_fn(b)
                for t, s in zip(state, saved):
                    t.copy_(s)
                stats["capture_s"] += time.perf_counter() - t0
            runners[b] = fn
        return runners[b]

    def prefill(ps):
        """One forward over prompts ps (right-padded, each at positions 0..len-1) -> per prompt
        (keys and values per layer [H, len, D], logits at its last position [V])."""
        lens = torch.tensor([len(prompts[p]) for p in ps], device=device)
        T = max(len(prompts[p]) for p in ps)
        ids = torch.tensor([prompts[p] + [0] * (T - len(prompts[p])) for p in ps], device=device)
        t = torch.arange(T, device=device)
        allowed = (t[:, None] >= t[None, :]) & (t[None, None, :] < lens[:, None, None])  # causal, real keys
        rec = _RecordingCache()
        h = inner(input_ids=ids, attention_mask=torch.where(allowed, zero, neg)[:, None],
                  position_ids=t.expand(len(ps), T), use_cache=True, **{cache_kw: rec}).last_hidden_state
        logits = F.linear(h[torch.arange(len(ps), device=device), lens - 1], W)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        layers = sorted(rec.keys)
        if not kv:
            kv.extend(tuple(x.new_zeros(B, x.shape[1], S, x.shape[3]) for x in (rec.keys[li], rec.values[li]))
                      for li in layers)
        stats["prefills"] += 1
        stats["prefill_tokens"] += sum(len(prompts[p]) for p in ps)
        return {p: ([(rec.keys[li][j, :, :len(prompts[p])], rec.values[li][j, :, :len(prompts[p])]) for li in layers],
                    logits[j], len(prompts[p])) for j, p in enumerate(ps)}

    # Host side. Rows are admitted in order (prompt-major); slot j decodes row slot_row[j].
    waiting = deque((p, s) for p in range(len(prompts)) for s in range(n))
    prefilled = {}  # prompt -> (its keys/values, last logits, length) while some of its rows wait
    next_p = 0  # the first prompt not prefilled yet
    left = [n] * len(prompts)  # rows of each prompt not admitted yet
    out, rows_tokens = [None] * (len(prompts) * n), {}
    slot_row, seen, checked = [None] * B, [0] * B, [0] * B  # seen/checked: tokens read back / checked for stops
    b = B  # slots [0, b) decode

    def retire():
        """Read the last block's tokens of every live slot (the one host sync), find rows that
        ended (EOS, stop string, max_new_tokens), free their slots."""
        live = [j for j in range(b) if slot_row[j] is not None]
        if not live:
            return
        snap = torch.cat([ring[:b], steps[:b, None], done[:b, None].long()], 1).tolist()
        freed = []
        for j in live:
            r = slot_row[j]
            n_steps, ended = snap[j][K], snap[j][K + 1]
            toks = rows_tokens[r]
            toks += snap[j][:n_steps - seen[j]]  # this block's tokens of slot j: ring columns 0, 1, ...
            seen[j] = n_steps
            end = first_stop(tok, toks, checked[j], stops[r // n], eos_ids)
            checked[j] = len(toks)
            if end is not None or ended:
                out[r] = toks[:end + 1] if end is not None else toks
                del rows_tokens[r]
                slot_row[j] = None
                freed.append(j)
                stats["tokens"] += len(out[r])
                if on_finish:
                    on_finish(r, out[r])
        if freed:  # a row that ended on a stop string is still live on the device
            done[torch.tensor(freed, device=device)] = True

    def refill() -> bool:
        """Give free slots to waiting rows: their prompt's keys/values, position, key and first
        token (sampled here from the prefill's logits)."""
        nonlocal next_p
        free = [j for j in range(b) if slot_row[j] is None]
        if not (waiting and free):
            return False
        take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        slots = free[:len(take)]
        # Prefill ahead: the prompts of the rows taken and the next ones, up to prefill_tokens
        # (padded) tokens a forward -- on a GPU a forward costs about the same for one prompt as
        # for dozens -- so that most refills are copies only.
        while take[-1][0] >= next_p:
            m, width = 1, len(prompts[next_p])
            while next_p + m < len(prompts) and (m + 1) * max(width, len(prompts[next_p + m])) <= prefill_tokens:
                width = max(width, len(prompts[next_p + m]))
                m += 1
            prefilled.update(prefill(list(range(next_p, next_p + m))))
            next_p += m
        for p in dict.fromkeys(p for p, _ in take):  # one prompt's keys/values into all its slots
            idx = torch.tensor([j for j, (q, _) in zip(slots, take) if q == p], device=device)
            layers, _, L = prefilled[p]
            for (k, v), (pk, pv) in zip(kv, layers):
                k[idx, :, :L] = pk
                v[idx, :, :L] = pv
        idx = torch.tensor(slots, device=device)
        ky = torch.tensor([_row_key(keys[p], s) for p, s in take], device=device)
        first = sample_tokens(torch.stack([prefilled[p][1] for p, _ in take]), temperature, top_p,
                              uniform_noise(ky, torch.zeros_like(ky)))
        tok_d[idx], key_d[idx], steps[idx] = first, ky, 1
        cur[idx] = torch.tensor([prefilled[p][2] for p, _ in take], device=device)
        done[idx] = (first[:, None] == eos_t).any(-1) | (max_new_tokens <= 1)
        for j, (p, s), t in zip(slots, take, first.tolist()):
            slot_row[j], seen[j], checked[j] = p * n + s, 1, 0
            rows_tokens[p * n + s] = [t]
            left[p] -= 1
            if left[p] == 0:
                del prefilled[p]
        stats["refills"] += 1
        return True

    def pack():
        """Nothing waits: move the live rows to the first slots and decode a smaller batch."""
        nonlocal b, slot_row, seen, checked
        live = [j for j in range(b) if slot_row[j] is not None]
        nb = min(s for s in _buckets(B, min_batch or (16 if cuda else 1)) if s >= len(live))
        if waiting or nb >= b:
            return
        src = torch.tensor(live, device=device)
        for t in (tok_d, cur, steps, key_d, done):
            t[:len(live)] = t[src]
        for k, v in kv:
            k[:len(live)] = k[src]
            v[:len(live)] = v[src]
        done[len(live):] = True
        slot_row, seen, checked = ([x[j] for j in live] + [z] * (B - len(live))
                                   for x, z in ((slot_row, None), (seen, 0), (checked, 0)))
        b = nb
        stats["packs"] += 1

    with _SlotAttention(base.config):  # the model's attention modules call _slot_attention
        while True:
            retire()
            if refill():
                continue  # check the first tokens (EOS, a stop string, max_new_tokens=1) before decoding
            if all(r is None for r in slot_row):
                break
            pack()
            col.zero_()
            run = runner(b)
            for _ in range(K):  # a block of steps, no host sync
                run()
            stats["steps"] += K
            stats["slot_steps"] += K * b
    return out, stats


def sample_problems(model, tok, problems, indices, n_samples, max_new_tokens, temperature, top_p, seed,
                    batch_size, eos_ids, progress=True, **kw):
    """n_samples completions of problems[i] for i in indices -> ([(i, sample, tokens)], stats).

    All of them go through one `sample_rows` (continuous batching over every problem of this
    rank). Sample s of problem i depends only on (seed, i, s): not on indices, batch_size or the
    rank. A tqdm bar (samples done, generated tokens/s, ETA) when progress is true. kw: options
    of sample_rows (check_every, graphs, compile, ...)."""
    from tqdm import tqdm
    prompts = [tok(problems[i]["prompt"]).input_ids for i in indices]
    bar = tqdm(total=len(indices) * n_samples, unit="sample", desc="generate", disable=not progress,
               dynamic_ncols=True)
    t0, tokens = time.time(), 0

    def on_finish(row, toks):
        nonlocal tokens
        tokens += len(toks)
        bar.update(1)
        bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s", refresh=False)

    out, stats = sample_rows(model, tok, prompts, n_samples, max_new_tokens, temperature, top_p,
                             [problems[i]["stop"] for i in indices], eos_ids,
                             [sample_key(seed, i) for i in indices], batch_size, on_finish=on_finish, **kw)
    bar.close()
    stats["seconds"] = time.time() - t0
    return [(i, s, out[j * n_samples + s]) for j, i in enumerate(indices) for s in range(n_samples)], stats


# --------------------------------------------------------------------------------------------
# 3. Self-speculative decoding, fast: batched, exact sampling, static cache, CUDA graphs
# --------------------------------------------------------------------------------------------
# `generate_speculative` (section 1) is the reference: one prompt, greedy, a DynamicCache cropped
# on rejection, a host decision per forward. `decode_rows` is what the measurements use: the
# same algorithm for B rows at once, each accepting its own number of drafts, decided on the
# device; greedy or sampled; and, with speculative=False, the plain decoder it is timed against
# -- the same loop, cache, graphs and checks with a block of one token and head 0 only, so that
# the speed-up compares the algorithm and nothing else.
#   - the cache: SlotCache's static buffers, one per layer (the extra heads' layers included).
#     A row's block is written at positions cur..cur+n-1; accepting a of its n-1 drafts moves
#     cur by a+1, and the rejected positions are simply past cur: masked, and overwritten by the
#     next block. That is the crop, at no cost.
#   - sampling keeps the output distribution exact: speculative sampling (Leviathan et al. 2023,
#     "Fast Inference from Transformers via Speculative Decoding", Alg. 1; Chen et al. 2023,
#     "Accelerating LLM Decoding with Speculative Sampling"). Head k drafted d_k ~ q_k at the
#     last accepted position; head 0 over the block gives p at every block position. Draft k
#     is kept with probability min(1, p(d_k)/q_k(d_k)), left to right; at the first rejection
#     the token is drawn from norm(max(0, p - q_k)); if all are kept, from p after the last.
#     Every emitted token is then distributed exactly as p given its prefix -- plain sampling's
#     distribution (with the same temperature and nucleus) -- whatever the heads draft.
#   - trees (greedy only, `draft_tree`): the block holds a tree of drafts instead of a chain. Node i
#     is written to slot cur+i at position cur+depth(i) and sees the cache and its ancestors; the
#     deepest node agreeing with greedy all the way up is kept, and its path's keys/values are
#     gathered to slots cur..cur+a (one op over the [2, layers, B, H, S, D] buffer) -- the crop
#     again, plus one move.
#   - randomness: uniform_noise keyed by the row and (forward, role): a row's samples do not
#     depend on its batch mates or the batch size.

_NOISE_STRIDE, _NOISE_BONUS, _NOISE_DRAFT = 64, 16, 32  # per forward: 0..n-2 accept, 16 bonus, 32+ drafts


MAX_TREE_DRAFTS = 512


def draft_tree(tree) -> dict:
    """The tables of a tree of drafts (Medusa, Cai et al. 2024, §2.1.2 "tree attention"). Node 0
    is the block's exact token; a node of depth d is one of head d's top tokens, drafted at the
    row's last accepted position (as the chain's), under a node of depth d-1.

    tree: widths, e.g. (3, 2, 1) -- a product tree: head d's top-widths[d-1] under every node of
    depth d-1; (1, 1, 1) is the chain. Or nodes, e.g. ((0,), (1,), (0, 0)) -- any tree, each
    node named by its path of ranks (Medusa's "choices"; (0, 1) = head 2's second-best token
    under head 1's best), as `calibrated_tree` picks them. Nodes are numbered depth by depth;
    per node: its parent, depth, rank among its siblings (= which of its head's top tokens it
    is), `anc` [L, L] (j is i or an ancestor of i: what node i attends to within the block) and
    `path` [L, D+1] (i's ancestor at each depth; i itself past its own depth)."""
    tree = tuple(tree)
    if tree and isinstance(tree[0], (tuple, list)):
        nodes = sorted(dict.fromkeys(tuple(int(r) for r in p) for p in tree), key=lambda p: (len(p), p))
        if not nodes or min(map(len, nodes)) < 1 or min(min(p) for p in nodes) < 0:
            raise ValueError(f"tree nodes must be non-empty paths of ranks >= 0, got {tree}")
        missing = [p for p in nodes if len(p) > 1 and p[:-1] not in nodes]
        if missing:
            raise ValueError(f"tree node {list(missing[0])} has no parent {list(missing[0][:-1])} in the tree")
        widths = None
    else:
        widths = tuple(int(w) for w in tree)
        if any(w < 1 for w in widths):
            raise ValueError(f"tree widths must be >= 1, got {widths}")
        nodes = range(sum(math.prod(widths[:d]) for d in range(1, len(widths) + 1)))  # (their count, first)
    if len(nodes) > MAX_TREE_DRAFTS:
        raise ValueError(f"tree {tree_name(tree)} has {len(nodes)} drafts per forward; at most "
                         f"{MAX_TREE_DRAFTS} (past ~60 a forward stops being latency-bound even at batch 1)")
    if widths is not None:  # every path of ranks below the widths, depth by depth
        nodes = [p for d in range(1, len(widths) + 1) for p in itertools.product(*map(range, widths[:d]))]
    index = {(): 0} | {p: i + 1 for i, p in enumerate(nodes)}
    parent = [0] + [index[p[:-1]] for p in nodes]
    depth, rank = [0] + [len(p) for p in nodes], [0] + [p[-1] for p in nodes]
    L, D = len(parent), max(depth)
    path = []
    for i in range(L):
        up = [i]
        while up[-1]:
            up.append(parent[up[-1]])
        up = up[::-1]
        path.append(up + [i] * (D + 1 - len(up)))
    anc = [[j in path[i][:depth[i] + 1] for j in range(L)] for i in range(L)]
    return {"widths": widths, "nodes": nodes, "parent": parent, "depth": depth, "rank": rank, "path": path,
            "anc": anc, "D": D, "top": max(rank[1:], default=0) + 1, "chain": L == D + 1 and max(rank) == 0}


def tree_name(tree) -> str:
    """(3, 2, 1) -> '3x2x1'; nodes -> 'N nodes, depth D'."""
    tree = tuple(tree or ())
    if tree and isinstance(tree[0], (tuple, list)):
        return f"{len(tree)} nodes, depth {max(map(len, tree))}"
    return "x".join(map(str, tree)) or "none"


def check_tree_depth(tree, n_heads: int):
    """A tree of depth D drafts with heads 1..D: the model needs D+1 heads."""
    D = draft_tree(tree)["D"] if tree else 0
    if D > n_heads - 1:
        raise ValueError(f"a tree of depth {D} needs {D + 1} heads, the model has {n_heads}")


def parse_tree(name: str, n_heads: int | None = None):
    """'chain' -> None (one draft per head); '6x3x2' -> (6, 3, 2), the widths of `draft_tree`;
    'tree.json:16' -> the first 16 nodes of a `calibrated_tree` file ('tree.json': its "best"
    size, which speculate.py --stage=calibrate times, else every node); with n_heads, also
    whether the model has the heads the tree's depth needs."""
    name = name.strip()
    if name == "chain":
        return None
    file, _, count = name.rpartition(":") if ":" in name else (name, "", "")
    if file.endswith(".json"):
        try:
            with open(file) as f:
                saved = json.load(f)
            nodes = [tuple(p) for p in saved["nodes"]]
            count = count or str(saved.get("best", ""))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{file!r}: not a calibrated tree file ({type(e).__name__}: {e})") from None
        if count:
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"{name!r}: the count after ':' must be a whole number >= 1")
            nodes = nodes[:int(count)]
        if not nodes:
            raise ValueError(f"{file!r}: no nodes")
        tree = tuple(nodes)
    else:
        try:
            tree = tuple(int(w) for w in name.split("x"))
        except ValueError:
            raise ValueError(f"{name!r} is neither 'chain', widths like 3x2x1, nor a tree file like tree.json:16") from None
        if min(tree) < 1:
            raise ValueError(f"{name!r} needs widths >= 1")
    draft_tree(tree)  # its size and shape, now
    if n_heads is not None:
        check_tree_depth(tree, n_heads)
    return tree


def calibrated_tree(tree, node_hits) -> list:
    """The nodes of `tree` (a wide calibration tree) ordered by how often decoding kept them ->
    [(path of ranks, hits), ...]; its first N are the best N-draft tree (Medusa's tree
    construction, Cai et al. 2024 §2.1.2, here counted exactly rather than from per-head
    accuracies). Why exact: siblings hold different tokens, so the nodes that agree with greedy
    decoding form one path from the root; in any ancestor-closed subtree a forward keeps exactly
    that path's nodes that the subtree contains. Tokens per forward of a subtree T are therefore
    1 + Σ_{i∈T} hits_i / forwards, and taking nodes by hits (a parent is kept whenever its child
    is, so has at least its hits; ties go to the shallower node) gives the best T of each size."""
    tr = draft_tree(tree)
    order = sorted(range(1, len(tr["parent"])), key=lambda i: (-node_hits[i], tr["depth"][i], i))
    return [(list(tr["nodes"][i - 1]), int(node_hits[i])) for i in order]


@torch.no_grad()
def decode_rows(model, tok, prompts, max_new_tokens, stop, eos_ids, speculative=True, temperature=0.0, top_p=1.0,
                keys=None, batch_size=1, check_every=None, graphs=None, tree=None, compile=False, pick_blas=None,
                parallel_heads=None):
    """Decode each prompt once, `batch_size` rows at a time -> (token lists, stats).

    prompts: token-id lists. stop: one list of stop strings, or one per prompt. Each row is cut
    exactly where `generate` stops (first EOS or stop string, or max_new_tokens). speculative:
    heads 1..n-1 draft and one forward of all heads verifies (greedy: = plain greedy, token for
    token; temperature > 0: speculative sampling, plain sampling's distribution); False: plain
    decoding, one token per forward with head 0 only. keys: a random key per prompt (sampling).
    check_every: forwards between host checks (stop strings, the end of a batch). graphs:
    replay each forward as a CUDA graph (default: on CUDA). tree: greedy only, a tree of drafts
    (`draft_tree`: the widths of a product tree, or nodes as rank paths; default the chain, one
    draft per head): one forward verifies every path and keeps the longest that greedy decoding
    agrees with. compile: torch.compile the forward first (both decoders; it costs compile
    time). pick_blas: every
    matmul of 2-256 rows (a verify block, a batch of rows) by the cuBLAS path fastest for its
    shape (`linear_pick`; both decoders; default: on CUDA). parallel_heads: the speculative
    forward runs the last block and the extra heads as one batched block (`parallel_heads.py`;
    Llama-family models; default: on CUDA).
    stats: seconds (of which prefill_s in prefills, host_s in host checks while the device
    waited), forwards (per row: the prefill + forwards until its last kept token), tokens, per
    draft position k (head k+1) how many verify forwards accepted it, and per block node how
    many kept it (node_hits; node 0, the exact token, every verify forward).
    """
    base, W = model.base, model.lm_head_weight
    inner, device = base.base_model, W.device
    dtype = next(base.parameters()).dtype
    cache_kw = _cache_kwarg(inner)
    n = model.n_heads if speculative else 1  # heads run per forward
    greedy = temperature == 0
    spec = tree if tree is not None and speculative else (1,) * (n - 1)
    tr = draft_tree(spec)
    check_tree_depth(spec, n)
    if not greedy and (tr["D"] != n - 1 or not tr["chain"]):
        raise ValueError("tree drafts are for greedy decoding; speculative sampling verifies a chain of every head")
    L, D = len(tr["parent"]), tr["D"]  # block length (exact token + drafts); tokens per forward <= D+1
    prompts = [list(p) for p in prompts]
    stops = stop if stop and not isinstance(stop[0], str) else [list(stop)] * len(prompts)
    keys = keys if keys is not None else [sample_key(0, i) for i in range(len(prompts))]
    cuda = device.type == "cuda"
    graphs = cuda if graphs is None else graphs
    K = check_every or 4
    B, M = batch_size, max_new_tokens
    S = -(-(max(map(len, prompts), default=1) + M + D + L) // 64) * 64  # the longest row and a block past it
    V = W.shape[0]
    # Device state of every row: its block (the exact token not yet in the cache + drafts), its
    # cache length, tokens emitted, forwards run, done; the emitted tokens, the forward that
    # emitted each, the block node each forward kept last (its depth = drafts accepted); the
    # drafts' distributions (sampling).
    long = dict(dtype=torch.long, device=device)
    blk, cur, steps, fwd = (torch.zeros(B, L, **long), torch.zeros(B, **long), torch.zeros(B, **long),
                            torch.zeros(B, **long))
    key_d, done = torch.zeros(B, **long), torch.ones(B, dtype=torch.bool, device=device)
    out, out_fwd, acc = torch.zeros(B, M + D + 1, **long), torch.zeros(B, M + D + 1, **long), torch.zeros(B, M + 2, **long)
    qd = torch.zeros(B, max(n - 1, 1), V if not greedy else 1, device=device)
    state = [blk, cur, steps, fwd, key_d, done, out, out_fwd, acc, qd]
    eos_t = torch.tensor(sorted(eos_ids) or [-1], device=device)
    positions, ar_d, ar_b = torch.arange(S, device=device), torch.arange(D + 1, device=device), torch.arange(B, device=device)
    parent, depth, rank, path, anc = (torch.tensor(tr[k], device=device) for k in ("parent", "depth", "rank", "path", "anc"))
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    kv = []  # per layer (keys, values) [B, H, S, D], allocated at the first prefill
    kv_all = []  # ... as views of [2, layers, B, H, S, D] buffers (one per shape): a tree's move is one op
    kv_at = {}  # layer -> (its buffer, its index there)
    if device.type == "cuda" if pick_blas is None else pick_blas:  # both decoders: a batch is rows too
        from decoding import linear_pick
        step_rows = {B * L, B * (n - 1)}  # the forward's block, the heads' drafting; not prefills
        lin, patch = functools.partial(linear_pick.linear, row_counts=step_rows), functools.partial(
            linear_pick.patched, model, step_rows)  # around the step only: prefills stay as they are
    else:
        lin, patch = F.linear, contextlib.nullcontext

    from decoding import parallel_heads as ph_mod
    par = ph_mod.ParallelHeads(model) if n > 1 and (cuda if parallel_heads is None else parallel_heads) \
        and ph_mod.supported(model) else None

    def forward(ids, pos, mask, cache):
        """Final hidden states [m, B, T, D]: every head's when drafting, head 0's alone otherwise."""
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
        if n > 1 and par is not None and isinstance(cache, SlotCache):
            return parallel_forward(kw, cache)
        if n > 1:
            return model.hidden_states(**kw)[0]
        return inner(**kw).last_hidden_state[None]

    def parallel_forward(kw, cache):
        """The trunk through the model, then its last block and the heads as one (`parallel_heads`)."""
        ids = kw.pop("input_ids")
        z, _, bkw = model.trunk(ids, **kw)
        (g, j), T = kv_at[par.layers[0]], ids.shape[1]
        cos, sin = bkw["position_embeddings"]
        at = cache.pos[:, None] + torch.arange(T, device=device)
        h = par(z, cos, sin, bkw["attention_mask"], kv_all[g][0, j:j + par.n], kv_all[g][1, j:j + par.n], at,
                _slot_attention)
        return model._norm(h)

    def noise(f, role):  # uniforms [B, len(role)] of forward f [B] (role: indices within the forward)
        return uniform_noise(key_d[:, None], f[:, None] * _NOISE_STRIDE + role)

    def drafts_from(h_heads, f):
        """Heads 1..n-1 at one position per row, h_heads [n-1, B, D] -> the block's drafts [B, L-1]
        (greedy: every tree node's token, its head's rank-th best; sampling: a chain, and q)."""
        logits = lin(h_heads, W).transpose(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if greedy:
            top = logits.topk(tr["top"], -1).indices  # [B, n-1, w]
            return top[:, depth[1:] - 1, rank[1:]], None
        q = nucleus_probs(logits, temperature, top_p)
        return draw(q, noise(f, _NOISE_DRAFT + ar_d[:-1])), q

    def step():
        """One forward of every row's block, and its verdict -- no host sync (a CUDA graph)."""
        # Node i of the block sits in cache slot cur+i at position cur+depth(i), and sees the
        # row's cache and its own ancestors (for the chain: the causal mask).
        off = positions - cur[:, None]  # [B, S]
        see = (off < 0)[:, None] | (anc[:, off.clamp(0, L - 1)].transpose(0, 1) & (off < L)[:, None])
        h = forward(blk, cur[:, None] + depth, torch.where(see, zero, neg)[:, None],
                    SlotCache([k for k, _ in kv], [v for _, v in kv], cur))
        logits = lin(h[0], W)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [B, L, V]
        if greedy:  # keep node i while its token is the greedy token after its parent, all the way up
            g = logits.argmax(-1)
            ok = (blk == g[:, parent]) | (depth == 0)
            kept_node = ok
            for _ in range(D):
                kept_node = ok & kept_node[:, parent]
            best = (kept_node * (depth + 1)).argmax(1)  # siblings' tokens differ: one path is kept
            a = depth[best]  # drafts accepted, per row
            emit = g.gather(1, path[best])  # the greedy token after each node of the path
            if not tr["chain"]:  # move the kept path's keys/values to slots cur..cur+a, every layer at once
                src = (cur[:, None] + path[best])[None, None, :, None, :, None]
                dst = (cur[:, None] + ar_d)[None, None, :, None, :, None]
                shape = kv_all[0].shape[:4] + (D + 1, kv_all[0].shape[-1])
                for x in kv_all:
                    x.scatter_(4, dst.expand(shape), x.gather(4, src.expand(shape)))
        else:  # the chain: keep draft k with probability min(1, p(d) / q(d))
            d = blk[:, 1:]
            p = nucleus_probs(logits, temperature, top_p)
            p = p / p.sum(-1, keepdim=True)
            q = qd / qd.sum(-1, keepdim=True).clamp_min(1e-30)
            pd, qd_d = p[:, :-1].gather(-1, d[..., None])[..., 0], q.gather(-1, d[..., None])[..., 0]
            ok = noise(fwd, ar_d[:-1]) * qd_d < pd
            a = best = ok.long().cumprod(1).sum(1)  # drafts accepted, per row
            pa = p[ar_b, a]  # the token at the first rejection (or after the last draft)
            dist = pa
            if n > 1:
                res = (pa - q[ar_b, a.clamp_max(n - 2)]).clamp_min(0)
                use = (a < n - 1)[:, None] & (res.sum(-1, keepdim=True) > 0)
                dist = torch.where(use, res, pa)
            x = draw(dist, noise(fwd, ar_d[:1] + _NOISE_BONUS)[:, 0])
            emit = torch.cat([d, x[:, None]], 1).scatter(1, a[:, None], x[:, None])
        live = ~done
        if n > 1:  # next round's drafts: the heads at the last accepted node
            nxt, qn = drafts_from(h[1:, ar_b, best], fwd)
            if qn is not None:
                qd.copy_(torch.where(live[:, None, None], qn, qd))
            new_blk = torch.cat([emit.gather(1, a[:, None]), nxt], 1)
        else:
            new_blk = emit
        kept = (ar_d <= a[:, None]) & live[:, None]  # emit[:, :a+1] are this forward's tokens
        at = (steps[:, None] + ar_d).clamp_max(M + D)  # a done row may be past M (it writes nothing)
        out.scatter_(1, at, torch.where(kept, emit, out.gather(1, at)))
        out_fwd.scatter_(1, at, torch.where(kept, fwd[:, None], out_fwd.gather(1, at)))
        f_at = fwd[:, None].clamp_max(M + 1)
        acc.scatter_(1, f_at, torch.where(live[:, None], best[:, None], acc.gather(1, f_at)))
        eos = ((emit[..., None] == eos_t).any(-1) & kept).any(1)
        steps.add_((a + 1) * live)
        cur.add_((a + 1) * live)
        fwd.add_(live.long())
        blk.copy_(torch.where(live[:, None], new_blk, blk))
        done.logical_or_(live & (eos | (steps >= M)))

    def prefill(rows):
        """The rows' prompts in one forward (right-padded) -> their caches, first tokens, drafts."""
        lens = torch.tensor([len(prompts[r]) for r in rows], device=device)
        T = int(lens.max())
        ids = torch.tensor([prompts[r] + [0] * (T - len(prompts[r])) for r in rows], device=device)
        t = torch.arange(T, device=device)
        allowed = (t[:, None] >= t[None, :]) & (t[None, None, :] < lens[:, None, None])
        rec = _RecordingCache()
        h = forward(ids, t.expand(len(rows), T), torch.where(allowed, zero, neg)[:, None], rec)
        h = h[:, ar_b, lens - 1]  # [m, B, D] at each row's last prompt token
        layers = sorted(rec.keys)
        if not kv:
            shape = {li: (rec.keys[li].shape[1], rec.keys[li].shape[3]) for li in layers}  # (kv heads, head dim)
            views = {}
            for hd in dict.fromkeys(shape.values()):  # one buffer per shape: all layers, usually
                group = [li for li in layers if shape[li] == hd]
                kv_all.append(rec.keys[group[0]].new_zeros(2, len(group), B, hd[0], S, hd[1]))
                views.update({li: (kv_all[-1][0, j], kv_all[-1][1, j]) for j, li in enumerate(group)})
                kv_at.update({li: (len(kv_all) - 1, j) for j, li in enumerate(group)})
            kv.extend(views[li] for li in layers)
            if par is not None and [kv_at[li] for li in par.layers] != [(kv_at[par.layers[0]][0], kv_at[par.layers[0]][1] + i)
                                                                        for i in range(par.n)]:
                raise ValueError("parallel_heads: the blocks' caches are not consecutive layers of one buffer")
        for (k, v), li in zip(kv, layers):
            k[:, :, :T], v[:, :, :T] = rec.keys[li], rec.values[li]
        key_d.copy_(torch.tensor([keys[r] for r in rows], device=device))
        fwd.zero_()
        logits = F.linear(h[0], W)
        first = sample_tokens(logits.to(torch.promote_types(logits.dtype, torch.float32)), temperature, top_p,
                              noise(fwd, ar_d[:1] + _NOISE_BONUS)[:, 0])
        if n > 1:
            nxt, q = drafts_from(h[1:], fwd)
            if q is not None:
                qd.copy_(q)
            blk.copy_(torch.cat([first[:, None], nxt], 1))
        else:
            blk.copy_(first[:, None])
        out.zero_()
        out[:, 0], out_fwd[:, 0], acc[:] = first, 0, 0
        cur.copy_(lens)
        steps.fill_(1)
        fwd.fill_(1)
        done.copy_((first[:, None] == eos_t).any(-1) | (M <= 1))

    run, pools = None, []
    stats = {"seconds": 0.0, "capture_s": 0.0, "prefill_s": 0.0, "host_s": 0.0, "forwards": [], "tokens": [],
             "accepted": [0] * D, "node_hits": [0] * L, "verify_forwards": 0, "batch_size": B, "n_block": L,
             "tree": list(tr["widths"]) if tr["widths"] is not None else [list(p) for p in tr["nodes"]],
             "graphs": graphs, "check_every": K}
    results = [None] * len(prompts)
    with _SlotAttention(base.config):
        for start in range(0, len(prompts), B):
            rows = list(range(start, min(start + B, len(prompts))))
            padded = rows + [rows[0]] * (B - len(rows))  # a short last batch: copies, done from the start
            t0 = time.perf_counter()
            prefill(padded)
            if len(rows) < B:
                done[len(rows):] = True
            if cuda:  # (the first host check would wait for it anyway)
                torch.cuda.synchronize(device)
            stats["prefill_s"] += time.perf_counter() - t0
            if run is None:
                run = _within(patch, torch.compile(step) if compile else step)
                if graphs:  # capture once (the buffers never move); the warm-up steps are undone
                    tc = time.perf_counter()
                    saved = [x.clone() for x in state]
                    run = _cuda_graph(run, pools)
                    for x, s in zip(state, saved):
                        x.copy_(s)
                    stats["capture_s"] += time.perf_counter() - tc
                    t0 += time.perf_counter() - tc
            live, checked = {j: [] for j in range(len(rows))}, [0] * len(rows)
            while True:
                snap = torch.cat([steps[:, None], done[:, None].long(), out], 1).tolist()
                th = time.perf_counter()  # from here until the next launch the device waits for the host
                for j in list(live):
                    n_steps, ended = snap[j][0], snap[j][1]
                    toks = snap[j][2:2 + min(n_steps, M)]
                    end = first_stop(tok, toks, checked[j], stops[rows[j]], eos_ids)
                    checked[j] = len(toks)
                    if end is not None or ended:
                        results[rows[j]] = toks[:end + 1] if end is not None else toks
                        del live[j]
                        done[j] = True
                stats["host_s"] += time.perf_counter() - th
                if not live:
                    break
                for _ in range(K):
                    run()
            stats["seconds"] += time.perf_counter() - t0
            of, ac = out_fwd.tolist(), acc.tolist()
            for j, r in enumerate(rows):
                f = of[j][len(results[r]) - 1] + 1  # the prefill + the verify forwards its tokens needed
                stats["forwards"].append(f)
                stats["tokens"].append(len(results[r]))
                stats["verify_forwards"] += f - 1
                for node in ac[j][1:f]:  # the node each verify forward kept: its path's nodes were kept
                    for i in tr["path"][node][:tr["depth"][node] + 1]:
                        stats["node_hits"][i] += 1
    for i in range(1, L):  # draft k is kept when a node of depth k is (one per forward)
        stats["accepted"][tr["depth"][i] - 1] += stats["node_hits"][i]
    return results, stats
