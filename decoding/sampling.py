"""
sampling.py — generating completions: what eval.py samples with.

    from decoding import sampling
    rows, stats = sampling.sample_problems(model, tok, problems, indices, n_samples, max_new_tokens,
                                           temperature, top_p, seed, batch_size, eos_ids)

Read top to bottom:
  1. `generate`: the reference sampler (a KV cache, left padding, a torch.Generator per prompt;
     simple and exact, host-bound on a GPU); `completion_text`, which cuts a completion at its
     first stop string; `eos_token_ids`.
  2. `sample_rows` / `sample_problems`: the fast sampler eval.py uses -- slots in a static KV
     cache, each prompt prefilled once, continuous batching, one CUDA graph per decode step,
     stop strings checked in bulk, randomness keyed by (seed, problem, sample, step). Its state
     is a `_SlotSampler` holding the slots' device buffers (`_SlotBuffers`); then its steps in
     the order they run: `_slot_step` (what the CUDA graph holds), `_retire`, `_refill`
     (`_prefill_ahead`, `_start_rows`), `_pack`. The counter-based noise (`sample_key`,
     `uniform_noise`, `sample_tokens`), the static cache (`SlotCache`), its attention
     (`_slot_attention`) and the CUDA-graph helpers live here too: speculative.py decodes with them.
Self-speculative decoding (the MTP heads draft, one forward verifies) is decoding/speculative.py.
The tests hold the fast path to the reference one (tests/test_eval.py).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 1. The reference sampler, and turning tokens into a completion
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


@dataclass
class _SlotBuffers:
    """sample_rows' device state, one entry per slot: static buffers, allocated once (so a CUDA
    graph captured over them stays valid), advanced by the decode step, written by refills."""
    token: torch.Tensor      # [B] the token to feed next: sampled, not yet in the cache
    position: torch.Tensor   # [B] its position, = the slot's length
    n_tokens: torch.Tensor   # [B] tokens sampled so far (also the step that keys the row's noise)
    key: torch.Tensor        # [B] the row's random key
    done: torch.Tensor       # [B] bool: ended (EOS, max_new_tokens, a stop string the host saw, a free slot)
    ring: torch.Tensor       # [B, K] the tokens of the current block of K steps, one column per step
    ring_col: torch.Tensor   # [1] the ring column the next step writes
    kv: list = field(default_factory=list)  # per layer (keys, values) [B, H, S, hd], made at the first prefill

    def stepped(self) -> list[torch.Tensor]:
        """The buffers a decode step advances (all but the cache)."""
        return [self.token, self.position, self.n_tokens, self.key, self.done, self.ring, self.ring_col]


@dataclass
class _SlotSampler:
    """Everything one sample_rows call decodes with: what to sample, the device buffers, and the
    host's bookkeeping (rows are admitted in order, prompt-major; slot j decodes row slot_row[j])."""
    base_model: object           # the model's transformer, without the LM head
    lm_head_weight: torch.Tensor  # the LM head's weight
    cache_kw: str                # the model's name for its cache argument
    tok: object
    prompts: list                # token-id lists
    n_samples: int               # samples per prompt: row p*n + s is sample s of prompt p
    stops: list                  # stop strings per prompt
    keys: list                   # random key per prompt
    eos_ids: set
    temperature: float
    top_p: float
    max_new: int
    check_every: int             # K: decode steps between host checks
    prefill_tokens: int          # prompts prefilled ahead per forward, in padded tokens
    min_batch: int               # the smallest batch the live rows are packed into
    compile: bool
    on_finish: object            # on_finish(row, tokens), or None
    buf: _SlotBuffers
    eos: torch.Tensor            # the EOS ids ([-1]: none)
    positions: torch.Tensor      # arange(S): a slot's positions
    zero: torch.Tensor           # the additive mask's values: seen, and hidden
    neg: torch.Tensor
    stats: dict
    waiting: deque               # (prompt, sample) of the rows not admitted yet
    rows_left: list              # per prompt: its rows not admitted yet
    out: list                    # per row: its tokens, once it has ended
    slot_row: list               # per slot: the row it decodes, None when free
    seen: list                   # per slot: tokens read back
    checked: list                # per slot: tokens checked for stop strings
    active: int                  # slots [0, active) decode (fewer once packed)
    prefilled: dict = field(default_factory=dict)  # prompt -> (keys/values per layer, last logits, length)
    next_prompt: int = 0         # the first prompt not prefilled yet
    row_tokens: dict = field(default_factory=dict)  # row -> its tokens read back so far, while it decodes
    runners: dict = field(default_factory=dict)     # batch size -> its decode step (eager, or a graph's replay)
    pools: list = field(default_factory=list)       # the CUDA graphs' shared memory pool


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

    The loop: retire the rows that ended (`_retire`), give their slots to waiting rows
    (`_refill`), pack the live rows into a smaller batch once nothing waits (`_pack`), then run
    check_every decode steps (`_slot_step`, one CUDA graph each) with no host sync.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return [], {"tokens": 0, "steps": 0}
    sampler = _new_slot_sampler(model, tok, prompts, n, max_new_tokens, temperature, top_p, stop, eos_ids, keys,
                                batch_size, check_every, graphs, compile, prefill_tokens, min_batch, on_finish)
    stats, K = sampler.stats, sampler.check_every
    with _SlotAttention(model.base.config):  # the model's attention modules call _slot_attention
        while True:
            _retire(sampler)
            if _refill(sampler):
                continue  # check the first tokens (EOS, a stop string, max_new_tokens=1) before decoding
            if all(r is None for r in sampler.slot_row):
                break
            _pack(sampler)
            sampler.buf.ring_col.zero_()
            run = _slot_runner(sampler, sampler.active)
            for _ in range(K):  # a block of steps, no host sync
                run()
            stats["steps"] += K
            stats["slot_steps"] += K * sampler.active
    return sampler.out, stats


def _new_slot_sampler(model, tok, prompts, n, max_new_tokens, temperature, top_p, stop, eos_ids, keys, batch_size,
                      check_every, graphs, compile, prefill_tokens, min_batch, on_finish) -> _SlotSampler:
    """sample_rows' defaults settled, its constants made and its slots' buffers allocated (the KV
    cache waits for the first prefill, which gives the layers' shapes); every slot free."""
    base, W = model.base, model.lm_head_weight
    inner, device = base.base_model, W.device
    dtype = next(base.parameters()).dtype
    cuda = device.type == "cuda"
    K = check_every or (16 if cuda else 4)
    if prefill_tokens is None:  # a CPU pays for padding, a GPU for each forward's launches
        prefill_tokens = 16384 if cuda else 0
    B = batch_size
    S = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64  # room for the longest row; 64 | S
    long = dict(dtype=torch.long, device=device)
    buf = _SlotBuffers(token=torch.zeros(B, **long), position=torch.zeros(B, **long), n_tokens=torch.zeros(B, **long),
                       key=torch.zeros(B, **long), done=torch.ones(B, dtype=torch.bool, device=device),
                       ring=torch.zeros(B, K, **long), ring_col=torch.zeros(1, **long))
    stats = {"steps": 0, "slot_steps": 0, "tokens": 0, "prefills": 0, "prefill_tokens": 0, "refills": 0,
             "packs": 0, "graphs": cuda if graphs is None else bool(graphs), "capture_s": 0.0,
             "check_every": K, "batch_size": B}
    return _SlotSampler(
        base_model=inner, lm_head_weight=W, cache_kw=_cache_kwarg(inner), tok=tok, prompts=prompts,
        n_samples=n, stops=stop if stop and not isinstance(stop[0], str) else [list(stop)] * len(prompts), keys=keys,
        eos_ids=eos_ids, temperature=temperature, top_p=top_p, max_new=max_new_tokens, check_every=K,
        prefill_tokens=prefill_tokens, min_batch=min_batch or (16 if cuda else 1), compile=compile,
        on_finish=on_finish, buf=buf, eos=torch.tensor(sorted(eos_ids) or [-1], device=device),
        positions=torch.arange(S, device=device), zero=torch.zeros((), dtype=dtype, device=device),
        neg=torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device), stats=stats,
        waiting=deque((p, s) for p in range(len(prompts)) for s in range(n)), rows_left=[n] * len(prompts),
        out=[None] * (len(prompts) * n), slot_row=[None] * B, seen=[0] * B, checked=[0] * B, active=B)


def _slot_step(sampler: _SlotSampler, b: int):
    """The decode step of slots [0, b) -> a function of no arguments that runs it on the device
    alone (what the CUDA graph holds): feed each slot's token at its position, sample the next
    from the row's noise, record it in the ring, advance live rows, mark rows done. Everything
    it touches is bound here, once: the slices of the static buffers and the settings."""
    buf = sampler.buf
    cache = SlotCache([k[:b] for k, _ in buf.kv], [v[:b] for _, v in buf.kv], buf.position[:b])
    token, position, n_tokens, key, done, ring = (x[:b] for x in (buf.token, buf.position, buf.n_tokens, buf.key,
                                                                  buf.done, buf.ring))
    ring_col, inner, W, cache_kw = buf.ring_col, sampler.base_model, sampler.lm_head_weight, sampler.cache_kw
    positions, zero, neg, eos, max_new = sampler.positions, sampler.zero, sampler.neg, sampler.eos, sampler.max_new
    temperature, top_p = sampler.temperature, sampler.top_p

    def one_step():
        mask = torch.where(positions <= position[:, None], zero, neg)[:, None, None, :]  # [b, 1, 1, S]
        h = inner(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                  **{cache_kw: cache}).last_hidden_state[:, -1]
        logits = F.linear(h, W)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nxt = sample_tokens(logits, temperature, top_p, uniform_noise(key, n_tokens))
        live = ~done
        ring.index_copy_(1, ring_col, nxt[:, None])
        n_tokens.add_(live)
        position.add_(live)
        token.copy_(nxt)
        done.logical_or_(live & ((nxt[:, None] == eos).any(-1) | (n_tokens >= max_new)))
        ring_col.add_(1)
    return torch.compile(one_step) if sampler.compile else one_step


def _slot_runner(sampler: _SlotSampler, b: int):
    """The decode step at batch size b: eager, or captured once as a CUDA graph and replayed."""
    if b not in sampler.runners:
        fn = _slot_step(sampler, b)
        stats = sampler.stats
        if stats["graphs"]:
            t0 = time.perf_counter()
            # The capture's warm-up steps advance the state: restore it after. The keys/values
            # they wrote are the ones the real steps write again (same tokens: the noise is a
            # function of the step), or lie past a row's end, masked.
            saved = [t.clone() for t in sampler.buf.stepped()]
            try:
                fn = _cuda_graph(fn, sampler.pools)
            except Exception as e:  # keep going, eagerly: slower, same samples
                print(f"sample_rows: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                stats["graphs"] = False
                fn = _slot_step(sampler, b)
            for t, s in zip(sampler.buf.stepped(), saved):
                t.copy_(s)
            stats["capture_s"] += time.perf_counter() - t0
        sampler.runners[b] = fn
    return sampler.runners[b]


def _prefill_prompts(sampler: _SlotSampler, ps: list[int]) -> dict:
    """One forward over prompts ps (right-padded, each at positions 0..len-1) -> per prompt
    (keys and values per layer [H, len, hd], logits at its last position [V], its length)."""
    prompts, device, buf = sampler.prompts, sampler.lm_head_weight.device, sampler.buf
    lens = torch.tensor([len(prompts[p]) for p in ps], device=device)
    T = max(len(prompts[p]) for p in ps)
    ids = torch.tensor([prompts[p] + [0] * (T - len(prompts[p])) for p in ps], device=device)
    t = torch.arange(T, device=device)
    allowed = (t[:, None] >= t[None, :]) & (t[None, None, :] < lens[:, None, None])  # causal, real keys
    rec = _RecordingCache()
    h = sampler.base_model(input_ids=ids, attention_mask=torch.where(allowed, sampler.zero, sampler.neg)[:, None],
                      position_ids=t.expand(len(ps), T), use_cache=True, **{sampler.cache_kw: rec}).last_hidden_state
    logits = F.linear(h[torch.arange(len(ps), device=device), lens - 1], sampler.lm_head_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    layers = sorted(rec.keys)
    if not buf.kv:  # the static cache, shaped after the first prefill: B slots of S positions
        B, S = buf.token.shape[0], sampler.positions.shape[0]
        buf.kv.extend(tuple(x.new_zeros(B, x.shape[1], S, x.shape[3]) for x in (rec.keys[li], rec.values[li]))
                      for li in layers)
    sampler.stats["prefills"] += 1
    sampler.stats["prefill_tokens"] += sum(len(prompts[p]) for p in ps)
    return {p: ([(rec.keys[li][j, :, :len(prompts[p])], rec.values[li][j, :, :len(prompts[p])]) for li in layers],
                logits[j], len(prompts[p])) for j, p in enumerate(ps)}


def _retire(sampler: _SlotSampler):
    """Read the last block's tokens of every live slot (the one host sync), find the rows that
    ended (EOS, a stop string, max_new_tokens) and free their slots."""
    b, buf, K, stats = sampler.active, sampler.buf, sampler.check_every, sampler.stats
    live = [j for j in range(b) if sampler.slot_row[j] is not None]
    if not live:
        return
    snap = torch.cat([buf.ring[:b], buf.n_tokens[:b, None], buf.done[:b, None].long()], 1).tolist()
    freed = []
    for j in live:
        r = sampler.slot_row[j]
        n_steps, ended = snap[j][K], snap[j][K + 1]
        toks = sampler.row_tokens[r]
        toks += snap[j][:n_steps - sampler.seen[j]]  # this block's tokens of slot j: ring columns 0, 1, ...
        sampler.seen[j] = n_steps
        end = first_stop(sampler.tok, toks, sampler.checked[j], sampler.stops[r // sampler.n_samples], sampler.eos_ids)
        sampler.checked[j] = len(toks)
        if end is not None or ended:
            sampler.out[r] = toks[:end + 1] if end is not None else toks
            del sampler.row_tokens[r]
            sampler.slot_row[j] = None
            freed.append(j)
            stats["tokens"] += len(sampler.out[r])
            if sampler.on_finish:
                sampler.on_finish(r, sampler.out[r])
    if freed:  # a row that ended on a stop string is still live on the device
        buf.done[torch.tensor(freed, device=buf.done.device)] = True


def _refill(sampler: _SlotSampler) -> bool:
    """Give free slots to waiting rows -> whether any was given: their prompts prefilled if not
    yet (`_prefill_ahead`), then each row started in its slot (`_start_rows`)."""
    free = [j for j in range(sampler.active) if sampler.slot_row[j] is None]
    if not (sampler.waiting and free):
        return False
    take = [sampler.waiting.popleft() for _ in range(min(len(free), len(sampler.waiting)))]
    _prefill_ahead(sampler, take[-1][0])
    _start_rows(sampler, free[:len(take)], take)
    sampler.stats["refills"] += 1
    return True


def _prefill_ahead(sampler: _SlotSampler, last: int):
    """Prefill every prompt up to `last` not prefilled yet, and the next ones with them, up to
    prefill_tokens (padded) tokens a forward -- on a GPU a forward costs about the same for one
    prompt as for dozens -- so that most refills are copies only."""
    prompts = sampler.prompts
    while last >= sampler.next_prompt:
        first, m = sampler.next_prompt, 1
        width = len(prompts[first])
        while first + m < len(prompts) and (m + 1) * max(width, len(prompts[first + m])) <= sampler.prefill_tokens:
            width = max(width, len(prompts[first + m]))
            m += 1
        sampler.prefilled.update(_prefill_prompts(sampler, list(range(first, first + m))))
        sampler.next_prompt += m


def _start_rows(sampler: _SlotSampler, slots: list[int], take: list[tuple[int, int]]):
    """Rows take[i] = (prompt, sample) into slots[i]: their prompt's keys/values, position, key
    and first token (sampled here from the prefill's logits, as step 0 of the row's noise)."""
    buf, device, n = sampler.buf, sampler.lm_head_weight.device, sampler.n_samples
    for p in dict.fromkeys(p for p, _ in take):  # one prompt's keys/values into all its slots
        idx = torch.tensor([j for j, (q, _) in zip(slots, take) if q == p], device=device)
        layers, _, L = sampler.prefilled[p]
        for (k, v), (pk, pv) in zip(buf.kv, layers):
            k[idx, :, :L] = pk
            v[idx, :, :L] = pv
    idx = torch.tensor(slots, device=device)
    ky = torch.tensor([_row_key(sampler.keys[p], s) for p, s in take], device=device)
    first = sample_tokens(torch.stack([sampler.prefilled[p][1] for p, _ in take]), sampler.temperature,
                          sampler.top_p, uniform_noise(ky, torch.zeros_like(ky)))
    buf.token[idx], buf.key[idx], buf.n_tokens[idx] = first, ky, 1
    buf.position[idx] = torch.tensor([sampler.prefilled[p][2] for p, _ in take], device=device)
    buf.done[idx] = (first[:, None] == sampler.eos).any(-1) | (sampler.max_new <= 1)
    for j, (p, s), t in zip(slots, take, first.tolist()):
        sampler.slot_row[j], sampler.seen[j], sampler.checked[j] = p * n + s, 1, 0
        sampler.row_tokens[p * n + s] = [t]
        sampler.rows_left[p] -= 1
        if sampler.rows_left[p] == 0:
            del sampler.prefilled[p]


def _pack(sampler: _SlotSampler):
    """Nothing waits: move the live rows to the first slots and decode a smaller batch (a step's
    cost falls with the batch until it is bound by reading the weights)."""
    buf, B = sampler.buf, sampler.buf.token.shape[0]
    live = [j for j in range(sampler.active) if sampler.slot_row[j] is not None]
    nb = min(s for s in _buckets(B, sampler.min_batch) if s >= len(live))
    if sampler.waiting or nb >= sampler.active:
        return
    src = torch.tensor(live, device=buf.token.device)
    for t in (buf.token, buf.position, buf.n_tokens, buf.key, buf.done):
        t[:len(live)] = t[src]
    for k, v in buf.kv:
        k[:len(live)] = k[src]
        v[:len(live)] = v[src]
    buf.done[len(live):] = True
    sampler.slot_row, sampler.seen, sampler.checked = (
        [x[j] for j in live] + [z] * (B - len(live))
        for x, z in ((sampler.slot_row, None), (sampler.seen, 0), (sampler.checked, 0)))
    sampler.active = nb
    sampler.stats["packs"] += 1


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
