"""
speculative.py — self-speculative decoding: the MTP heads draft tokens, one forward verifies them.

    from decoding import speculative
    rows, stats = speculative.decode_rows(model, tok, prompts, max_new_tokens, stop, eos_ids, speculative=True,
                                          batch_size=8, tree=(6, 3, 2))

Read top to bottom:
  1. `generate_speculative`: the reference -- greedy decoding of one prompt, drafted by the heads
     and verified by head 0 (docs/design.md §7), in a DynamicCache cropped on rejection, with a
     host decision per forward. Simple and exact; host-bound on a GPU.
  2. Trees of drafts: `draft_tree` (the tables of a tree: Medusa's tree attention), `parse_tree`
     (a tree named on the command line), `calibrated_tree` (a tree's drafts picked from counts
     of which ones decoding kept).
  3. `decode_rows`: the fast decoder -- batched (each row accepts its own number of drafts),
     exact speculative sampling (Leviathan et al. 2023), greedy trees of drafts, the static
     slot cache and CUDA graphs of sampling.py; with speculative=False the same loop decodes
     plainly (what speculate.py and eval.py --speculative time against). Its state is a
     `_Decoder` holding the rows' device buffers (`_Rows`); then its steps in the order they
     run: `_prefill`, the verify step that is captured as one CUDA graph (`_verify_step`:
     `_block_forward`, `_accept_greedy` or `_accept_sampled`, `_draft`, `_record`), the host's
     check for stop strings (`_decode_batch`) and the counts (`_count_forwards`). Its matmuls
     of a few rows go through `linear_pick`, and a speculative forward runs the last block and
     the extra heads as one (`parallel_heads`; both on CUDA).
The tests hold the fast decoder to the reference ones (tests/test_speculative.py).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from decoding import sampling

# --------------------------------------------------------------------------------------------
# 1. The reference: one prompt, greedy, a host decision per forward
# --------------------------------------------------------------------------------------------


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
    while len(tokens) < max_new_tokens and not sampling.finished(tok, tokens, n_new, stop, eos_ids):
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


# --------------------------------------------------------------------------------------------
# 2. Trees of drafts
# --------------------------------------------------------------------------------------------

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
#     A row's block is written at positions cur..cur+n-1 (cur: the row's `cache_len`); accepting
#     a of its n-1 drafts moves cur by a+1, and the rejected positions are simply past cur:
#     masked, and overwritten by the next block. That is the crop, at no cost.
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
#   - the verify step reads and writes static buffers only (`_Rows`, the cache) and never waits
#     for the host, so on CUDA it is captured once as a CUDA graph and replayed for every forward
#     of every batch; the host reads the rows back every `check_every` forwards.

_NOISE_STRIDE, _NOISE_BONUS, _NOISE_DRAFT = 64, 16, 32  # per forward: 0..n-2 accept, 16 bonus, 32+ drafts


@dataclass
class _Rows:
    """The device state of the decoder's B rows: static buffers, allocated once, written in place
    by `_prefill` and `_verify_step`, read by the host at its checks. Shapes: L = the block (the
    exact token and the drafts), D = the deepest draft, M = max_new_tokens, n = heads."""
    block: torch.Tensor          # [B, L] the exact token (not yet in the cache), then the drafts (tree nodes)
    cache_len: torch.Tensor      # [B] positions in the row's cache: where its block is written
    n_emitted: torch.Tensor      # [B] tokens emitted so far
    n_forwards: torch.Tensor     # [B] forwards run (the prefill is forward 0); keys the noise
    key: torch.Tensor            # [B] the row's random key (`sampling.sample_key`)
    done: torch.Tensor           # [B] bool: ended (EOS, M tokens, a stop string the host saw, padding)
    tokens: torch.Tensor         # [B, M+D+1] the emitted tokens (a last block may overrun M)
    token_forward: torch.Tensor  # [B, M+D+1] the forward that emitted each token
    kept_node: torch.Tensor      # [B, M+2] per verify forward, the block node it kept (depth = drafts accepted)
    draft_probs: torch.Tensor    # [B, max(n-1, 1), V] each draft's distribution q (sampling; V=1 greedy)

    def buffers(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class _Decoder:
    """What one decode_rows call decodes with: the model, the settings, the tree's tables and
    constants as device tensors (made once), the rows' buffers and the static KV cache."""
    model: object
    base_model: object           # the model's transformer, without the LM head
    lm_head_weight: torch.Tensor  # the LM head's weight: every head's unembedding
    cache_kw: str                # the models' name for their cache argument
    n_heads: int                 # heads run per forward: all when drafting, head 0 alone when not
    greedy: bool
    temperature: float
    top_p: float
    tree: dict                   # draft_tree's tables (the chain of one draft per head by default)
    max_new: int                 # M
    cache_size: int              # S: slots per row: the longest prompt, M, and a block past them
    linear: object               # F.linear, or linear_pick's for the step's few-row matmuls
    patch: object                # context around the step: every nn.Linear through linear_pick (or none)
    parallel: object             # parallel_heads.ParallelHeads (the last block and heads as one) or None
    rows: _Rows
    eos: torch.Tensor            # the EOS ids ([-1]: none)
    cache_slots: torch.Tensor    # arange(S): a row's cache slots
    node_offset: torch.Tensor    # arange(D+1): a kept path's offsets from cache_len (also noise roles)
    row_index: torch.Tensor      # arange(B)
    parent: torch.Tensor         # [L] the tree's tables (`draft_tree`)
    depth: torch.Tensor          # [L]
    rank: torch.Tensor           # [L]
    path: torch.Tensor           # [L, D+1]
    ancestors: torch.Tensor      # [L, L] bool
    zero: torch.Tensor           # the additive mask's values: seen, and hidden
    neg: torch.Tensor
    kv: list = field(default_factory=list)        # per layer (keys, values) [B, H, S, hd]: views of ...
    kv_groups: list = field(default_factory=list)  # ... [2, layers, B, H, S, hd] buffers, one per shape
    kv_at: dict = field(default_factory=dict)      # layer -> (its buffer in kv_groups, its index there)


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
    time). pick_blas: every matmul of 2-256 rows (a verify block, a batch of rows) by the cuBLAS
    path fastest for its shape (`linear_pick`; both decoders; default: on CUDA). parallel_heads:
    the speculative forward runs the last block and the extra heads as one batched block
    (`parallel_heads.py`; Llama-family models; default: on CUDA).
    stats: seconds (of which prefill_s in prefills, host_s in host checks while the device
    waited), forwards (per row: the prefill + forwards until its last kept token), tokens, per
    draft position k (head k+1) how many verify forwards accepted it, and per block node how
    many kept it (node_hits; node 0, the exact token, every verify forward).
    """
    prompts = [list(p) for p in prompts]
    dec = _new_decoder(model, prompts, max_new_tokens, eos_ids, speculative, temperature, top_p, batch_size, tree,
                       pick_blas, parallel_heads)
    stops = stop if stop and not isinstance(stop[0], str) else [list(stop)] * len(prompts)
    keys = keys if keys is not None else [sampling.sample_key(0, i) for i in range(len(prompts))]
    device, B, tr = dec.lm_head_weight.device, batch_size, dec.tree
    cuda = device.type == "cuda"
    graphs = cuda if graphs is None else graphs
    check_every = check_every or 4
    L, D = len(tr["parent"]), tr["D"]
    stats = {"seconds": 0.0, "capture_s": 0.0, "prefill_s": 0.0, "host_s": 0.0, "forwards": [], "tokens": [],
             "accepted": [0] * D, "node_hits": [0] * L, "verify_forwards": 0, "batch_size": B, "n_block": L,
             "tree": list(tr["widths"]) if tr["widths"] is not None else [list(p) for p in tr["nodes"]],
             "graphs": graphs, "check_every": check_every}
    results, run, pools = [None] * len(prompts), None, []
    with sampling._SlotAttention(model.base.config):
        for start in range(0, len(prompts), B):
            rows = list(range(start, min(start + B, len(prompts))))
            padded = rows + [rows[0]] * (B - len(rows))  # a short last batch: copies, done from the start
            t0 = time.perf_counter()
            _prefill(dec, [prompts[r] for r in padded], [keys[r] for r in padded])
            if len(rows) < B:
                dec.rows.done[len(rows):] = True
            if cuda:  # (the first host check would wait for it anyway)
                torch.cuda.synchronize(device)
            stats["prefill_s"] += time.perf_counter() - t0
            if run is None:  # made once: every batch reuses the same buffers
                run, capture_s = _step_runner(dec, compile, graphs, pools)
                stats["capture_s"] += capture_s
                t0 += capture_s
            _decode_batch(dec, run, check_every, tok, [stops[r] for r in rows], eos_ids, rows, results, stats)
            stats["seconds"] += time.perf_counter() - t0
            _count_forwards(dec, rows, results, stats)
    for i in range(1, L):  # draft k is kept when a node of depth k is (one per forward)
        stats["accepted"][tr["depth"][i] - 1] += stats["node_hits"][i]
    return results, stats


def _new_decoder(model, prompts, max_new_tokens, eos_ids, speculative, temperature, top_p, batch_size, tree,
                 pick_blas, parallel_heads) -> _Decoder:
    """decode_rows' settings checked, its constants made and its rows' buffers allocated (the KV
    cache waits for the first prefill, which gives the layers' shapes)."""
    base, W = model.base, model.lm_head_weight
    inner, device = base.base_model, W.device
    dtype = next(base.parameters()).dtype
    n = model.n_heads if speculative else 1  # heads run per forward
    greedy = temperature == 0
    widths = tree if tree is not None and speculative else (1,) * (n - 1)
    tr = draft_tree(widths)
    check_tree_depth(widths, n)
    if not greedy and (tr["D"] != n - 1 or not tr["chain"]):
        raise ValueError("tree drafts are for greedy decoding; speculative sampling verifies a chain of every head")
    L, D = len(tr["parent"]), tr["D"]  # block length (exact token + drafts); tokens per forward <= D+1
    B, M, V = batch_size, max_new_tokens, W.shape[0]
    S = -(-(max(map(len, prompts), default=1) + M + D + L) // 64) * 64  # the longest row and a block past it
    long = dict(dtype=torch.long, device=device)
    rows = _Rows(block=torch.zeros(B, L, **long), cache_len=torch.zeros(B, **long), n_emitted=torch.zeros(B, **long),
                 n_forwards=torch.zeros(B, **long), key=torch.zeros(B, **long),
                 done=torch.ones(B, dtype=torch.bool, device=device),
                 tokens=torch.zeros(B, M + D + 1, **long), token_forward=torch.zeros(B, M + D + 1, **long),
                 kept_node=torch.zeros(B, M + 2, **long),
                 draft_probs=torch.zeros(B, max(n - 1, 1), V if not greedy else 1, device=device))
    if device.type == "cuda" if pick_blas is None else pick_blas:  # both decoders: a batch is rows too
        from decoding import linear_pick
        step_rows = {B * L, B * (n - 1)}  # the forward's block, the heads' drafting; not prefills
        linear, patch = functools.partial(linear_pick.linear, row_counts=step_rows), functools.partial(
            linear_pick.patched, model, step_rows)  # around the step only: prefills stay as they are
    else:
        linear, patch = F.linear, contextlib.nullcontext
    from decoding import parallel_heads as ph_mod
    use_parallel = device.type == "cuda" if parallel_heads is None else parallel_heads
    parallel = ph_mod.ParallelHeads(model) if n > 1 and use_parallel and ph_mod.supported(model) else None
    parent, depth, rank, path, anc = (torch.tensor(tr[k], device=device)
                                      for k in ("parent", "depth", "rank", "path", "anc"))
    return _Decoder(
        model=model, base_model=inner, lm_head_weight=W, cache_kw=sampling._cache_kwarg(inner), n_heads=n,
        greedy=greedy, temperature=temperature, top_p=top_p, tree=tr, max_new=M, cache_size=S, linear=linear,
        patch=patch, parallel=parallel, rows=rows, eos=torch.tensor(sorted(eos_ids) or [-1], device=device),
        cache_slots=torch.arange(S, device=device), node_offset=torch.arange(D + 1, device=device),
        row_index=torch.arange(B, device=device), parent=parent, depth=depth, rank=rank, path=path, ancestors=anc,
        zero=torch.zeros((), dtype=dtype, device=device),
        neg=torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


def _prefill(dec: _Decoder, prompts: list[list[int]], keys: list[int]):
    """A batch's prompts (B of them) in one forward, right-padded -> every row's cache, first
    token (drawn as the verify step draws its bonus token) and first drafts; the rows' buffers
    reset for a new batch. Forward 0 of every row."""
    rows, device = dec.rows, dec.lm_head_weight.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lens.max())
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
    t = torch.arange(T, device=device)
    allowed = (t[:, None] >= t[None, :]) & (t[None, None, :] < lens[:, None, None])  # causal, real keys
    rec = sampling._RecordingCache()
    h = _forward(dec, ids, t.expand(len(prompts), T), torch.where(allowed, dec.zero, dec.neg)[:, None], rec)
    h = h[:, dec.row_index, lens - 1]  # [heads, B, D] at each row's last prompt token
    layers = sorted(rec.keys)
    if not dec.kv:
        _allocate_cache(dec, rec)
    for (k, v), li in zip(dec.kv, layers):
        k[:, :, :T], v[:, :, :T] = rec.keys[li], rec.values[li]
    rows.key.copy_(torch.tensor(keys, device=device))
    rows.n_forwards.zero_()
    logits = F.linear(h[0], dec.lm_head_weight)
    first = sampling.sample_tokens(logits.to(torch.promote_types(logits.dtype, torch.float32)), dec.temperature,
                                   dec.top_p, _noise(dec, rows.n_forwards, dec.node_offset[:1] + _NOISE_BONUS)[:, 0])
    if dec.n_heads > 1:
        drafts, q = _draft(dec, h[1:], rows.n_forwards)
        if q is not None:
            rows.draft_probs.copy_(q)
        rows.block.copy_(torch.cat([first[:, None], drafts], 1))
    else:
        rows.block.copy_(first[:, None])
    rows.tokens.zero_()
    rows.tokens[:, 0], rows.token_forward[:, 0], rows.kept_node[:] = first, 0, 0
    rows.cache_len.copy_(lens)
    rows.n_emitted.fill_(1)
    rows.n_forwards.fill_(1)
    rows.done.copy_((first[:, None] == dec.eos).any(-1) | (dec.max_new <= 1))


def _allocate_cache(dec: _Decoder, rec):
    """The static KV cache, shaped after the first prefill's keys/values: per layer [B, H, S, hd],
    as views of one [2, layers, B, H, S, hd] buffer per (H, hd) -- all layers, usually -- so that
    moving a tree's kept path is one op for every layer."""
    layers = sorted(rec.keys)
    B = dec.rows.block.shape[0]
    shape = {li: (rec.keys[li].shape[1], rec.keys[li].shape[3]) for li in layers}  # (kv heads, head dim)
    views = {}
    for hd in dict.fromkeys(shape.values()):
        group = [li for li in layers if shape[li] == hd]
        dec.kv_groups.append(rec.keys[group[0]].new_zeros(2, len(group), B, hd[0], dec.cache_size, hd[1]))
        views.update({li: (dec.kv_groups[-1][0, j], dec.kv_groups[-1][1, j]) for j, li in enumerate(group)})
        dec.kv_at.update({li: (len(dec.kv_groups) - 1, j) for j, li in enumerate(group)})
    dec.kv.extend(views[li] for li in layers)
    par = dec.parallel
    if par is not None and [dec.kv_at[li] for li in par.layers] != [
            (dec.kv_at[par.layers[0]][0], dec.kv_at[par.layers[0]][1] + i) for i in range(par.n)]:
        raise ValueError("parallel_heads: the blocks' caches are not consecutive layers of one buffer")


def _step_runner(dec: _Decoder, compile: bool, graphs: bool, pools: list) -> tuple:
    """The verify step as the loop calls it -> (run, seconds spent capturing). Eager, compiled, or
    captured once as a CUDA graph and replayed: the step is a function of `dec`'s static buffers
    alone, which never move, so one capture serves every forward of every batch. Capturing runs
    the step (warm-up, then the capture): the rows' buffers are restored after it; the keys/values
    it wrote lie past each row's cache, where the next forward writes its block anyway."""
    def step():
        _verify_step(dec)
    run = sampling._within(dec.patch, torch.compile(step) if compile else step)
    if not graphs:
        return run, 0.0
    t0 = time.perf_counter()
    saved = [x.clone() for x in dec.rows.buffers()]
    run = sampling._cuda_graph(run, pools)
    for x, s in zip(dec.rows.buffers(), saved):
        x.copy_(s)
    return run, time.perf_counter() - t0


def _verify_step(dec: _Decoder):
    """One forward of every row's block and its verdict, on the device alone (no host sync: this
    is what the CUDA graph holds): which drafts each row keeps, the tokens it emits, the drafts
    of its next block. A row that is done computes along and writes nothing."""
    rows = dec.rows
    h, logits = _block_forward(dec)
    if dec.greedy:
        kept, n_accepted, emitted = _accept_greedy(dec, logits)
    else:
        kept, n_accepted, emitted = _accept_sampled(dec, logits)
    live = ~rows.done
    if dec.n_heads > 1:  # next round's drafts: the heads at the last accepted node
        drafts, q = _draft(dec, h[1:, dec.row_index, kept], rows.n_forwards)
        if q is not None:
            rows.draft_probs.copy_(torch.where(live[:, None, None], q, rows.draft_probs))
        next_block = torch.cat([emitted.gather(1, n_accepted[:, None]), drafts], 1)
    else:
        next_block = emitted
    _record(dec, live, kept, n_accepted, emitted, next_block)


def _block_forward(dec: _Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's block through the model, written into its cache -> (final hidden states
    [heads, B, L, D], head 0's logits [B, L, V] in fp32 or wider)."""
    rows, L = dec.rows, dec.parent.shape[0]
    # Node i of the block sits in cache slot cur+i (cur = the row's cache_len) at position
    # cur+depth(i), and sees the row's cache and its own ancestors (for the chain: the causal mask).
    offset = dec.cache_slots - rows.cache_len[:, None]  # [B, S]: each slot's place relative to the block
    sees = (offset < 0)[:, None] | (dec.ancestors[:, offset.clamp(0, L - 1)].transpose(0, 1) & (offset < L)[:, None])
    h = _forward(dec, rows.block, rows.cache_len[:, None] + dec.depth, torch.where(sees, dec.zero, dec.neg)[:, None],
                 sampling.SlotCache([k for k, _ in dec.kv], [v for _, v in dec.kv], rows.cache_len))
    logits = dec.linear(h[0], dec.lm_head_weight)
    return h, logits.to(torch.promote_types(logits.dtype, torch.float32))


def _forward(dec: _Decoder, ids, pos, mask, cache) -> torch.Tensor:
    """Final hidden states [heads, B, T, D]: every head's when drafting, head 0's alone otherwise."""
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{dec.cache_kw: cache})
    if dec.n_heads > 1 and dec.parallel is not None and isinstance(cache, sampling.SlotCache):
        return _parallel_forward(dec, kw, cache)
    if dec.n_heads > 1:
        return dec.model.hidden_states(**kw)[0]
    return dec.base_model(**kw).last_hidden_state[None]


def _parallel_forward(dec: _Decoder, kw: dict, cache) -> torch.Tensor:
    """The trunk through the model, then its last block and the heads as one (`parallel_heads`),
    over their layers' slices of the cache buffer."""
    par, ids = dec.parallel, kw.pop("input_ids")
    z, _, block_kw = dec.model.trunk(ids, **kw)
    (g, j), T = dec.kv_at[par.layers[0]], ids.shape[1]
    cos, sin = block_kw["position_embeddings"]
    at = cache.pos[:, None] + torch.arange(T, device=ids.device)
    h = par(z, cos, sin, block_kw["attention_mask"], dec.kv_groups[g][0, j:j + par.n],
            dec.kv_groups[g][1, j:j + par.n], at, sampling._slot_attention)
    return dec.model._norm(h)


def _accept_greedy(dec: _Decoder, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verdict -> (the node each row keeps [B], drafts accepted [B], the greedy token after
    each node of the kept path [B, D+1]: the first n_accepted+1 are the row's new tokens). Node i
    is kept while its token is the greedy token after its parent, all the way up; siblings' tokens
    differ, so the agreeing nodes form one path, and its deepest node is the one kept."""
    greedy_token = logits.argmax(-1)
    agrees = (dec.rows.block == greedy_token[:, dec.parent]) | (dec.depth == 0)
    path_agrees = agrees
    for _ in range(dec.tree["D"]):
        path_agrees = agrees & path_agrees[:, dec.parent]
    kept = (path_agrees * (dec.depth + 1)).argmax(1)
    n_accepted = dec.depth[kept]
    emitted = greedy_token.gather(1, dec.path[kept])
    if not dec.tree["chain"]:
        _move_kept_path(dec, kept)
    return kept, n_accepted, emitted


def _move_kept_path(dec: _Decoder, kept: torch.Tensor):
    """A tree's kept path was written at slots cur+path[kept]: move its keys/values to slots
    cur..cur+D, where a chain's would be (every layer at once: one gather and scatter a buffer)."""
    cache_len, D = dec.rows.cache_len, dec.tree["D"]
    src = (cache_len[:, None] + dec.path[kept])[None, None, :, None, :, None]
    dst = (cache_len[:, None] + dec.node_offset)[None, None, :, None, :, None]
    for x in dec.kv_groups:
        shape = x.shape[:4] + (D + 1, x.shape[-1])
        x.scatter_(4, dst.expand(shape), x.gather(4, src.expand(shape)))


def _accept_sampled(dec: _Decoder, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative sampling of the chain -> (the node kept [B] = drafts accepted [B], the tokens
    [B, D+1]: the accepted drafts, then the token drawn at the first rejection or after the last
    draft). Draft k is kept with probability min(1, p(d_k) / q_k(d_k)), left to right; the token
    at the first rejection is drawn from norm(max(0, p - q_k)), after the last draft from p."""
    rows, n = dec.rows, dec.n_heads
    drafts = rows.block[:, 1:]
    p = sampling.nucleus_probs(logits, dec.temperature, dec.top_p)
    p = p / p.sum(-1, keepdim=True)
    q = rows.draft_probs / rows.draft_probs.sum(-1, keepdim=True).clamp_min(1e-30)
    p_draft, q_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
    accept = _noise(dec, rows.n_forwards, dec.node_offset[:-1]) * q_draft < p_draft
    n_accepted = accept.long().cumprod(1).sum(1)
    p_next = p[dec.row_index, n_accepted]  # the token at the first rejection (or after the last draft)
    dist = p_next
    if n > 1:
        residual = (p_next - q[dec.row_index, n_accepted.clamp_max(n - 2)]).clamp_min(0)
        use = (n_accepted < n - 1)[:, None] & (residual.sum(-1, keepdim=True) > 0)
        dist = torch.where(use, residual, p_next)
    x = sampling.draw(dist, _noise(dec, rows.n_forwards, dec.node_offset[:1] + _NOISE_BONUS)[:, 0])
    emitted = torch.cat([drafts, x[:, None]], 1).scatter(1, n_accepted[:, None], x[:, None])
    return n_accepted, n_accepted, emitted


def _draft(dec: _Decoder, h_heads: torch.Tensor, forward: torch.Tensor):
    """Heads 1..n-1 at one position per row, h_heads [n-1, B, D] -> (the block's drafts [B, L-1],
    their distributions q or None). Greedy: every tree node's token, its head's rank-th best;
    sampling: a chain, each draft drawn from its head's distribution."""
    logits = dec.linear(h_heads, dec.lm_head_weight).transpose(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if dec.greedy:
        top = logits.topk(dec.tree["top"], -1).indices  # [B, n-1, w]
        return top[:, dec.depth[1:] - 1, dec.rank[1:]], None
    q = sampling.nucleus_probs(logits, dec.temperature, dec.top_p)
    return sampling.draw(q, _noise(dec, forward, _NOISE_DRAFT + dec.node_offset[:-1])), q


def _noise(dec: _Decoder, forward: torch.Tensor, role: torch.Tensor) -> torch.Tensor:
    """Uniforms [B, len(role)] of each row's forward [B] (role: indices within the forward)."""
    return sampling.uniform_noise(dec.rows.key[:, None], forward[:, None] * _NOISE_STRIDE + role)


def _record(dec: _Decoder, live, kept, n_accepted, emitted, next_block):
    """The live rows' new tokens (emitted[:, :n_accepted+1]) appended, with the forward that
    emitted them and the node it kept; their caches, counts and blocks advanced; rows that
    emitted EOS or reached max_new_tokens marked done. Rows already done change nothing (their
    writes clamp into the spare columns and write back what was there)."""
    rows, M, D = dec.rows, dec.max_new, dec.tree["D"]
    is_new = (dec.node_offset <= n_accepted[:, None]) & live[:, None]  # [B, D+1]
    at = (rows.n_emitted[:, None] + dec.node_offset).clamp_max(M + D)  # a done row may be past M
    rows.tokens.scatter_(1, at, torch.where(is_new, emitted, rows.tokens.gather(1, at)))
    rows.token_forward.scatter_(1, at, torch.where(is_new, rows.n_forwards[:, None], rows.token_forward.gather(1, at)))
    f_at = rows.n_forwards[:, None].clamp_max(M + 1)
    rows.kept_node.scatter_(1, f_at, torch.where(live[:, None], kept[:, None], rows.kept_node.gather(1, f_at)))
    eos = ((emitted[..., None] == dec.eos).any(-1) & is_new).any(1)
    rows.n_emitted.add_((n_accepted + 1) * live)
    rows.cache_len.add_((n_accepted + 1) * live)
    rows.n_forwards.add_(live.long())
    rows.block.copy_(torch.where(live[:, None], next_block, rows.block))
    rows.done.logical_or_(live & (eos | (rows.n_emitted >= M)))


def _decode_batch(dec: _Decoder, run, check_every: int, tok, stops: list, eos_ids: set, rows: list[int],
                  results: list, stats: dict):
    """Run the step until every row of the batch has ended, `check_every` forwards between host
    checks. A check reads every row's tokens back at once (the one sync), looks for a stop
    string in the new ones (a row that stopped mid-block is cut back to the token where
    `finished` would have stopped it) and retires the rows that ended: results[rows[j]]."""
    buf, M = dec.rows, dec.max_new
    pending, checked = list(range(len(rows))), [0] * len(rows)  # checked: tokens looked at for stops
    while True:
        snapshot = torch.cat([buf.n_emitted[:, None], buf.done[:, None].long(), buf.tokens], 1).tolist()
        t0 = time.perf_counter()  # from here until the next launch the device waits for the host
        for j in list(pending):
            n_emitted, ended = snapshot[j][0], snapshot[j][1]
            toks = snapshot[j][2:2 + min(n_emitted, M)]
            end = sampling.first_stop(tok, toks, checked[j], stops[j], eos_ids)
            checked[j] = len(toks)
            if end is not None or ended:
                results[rows[j]] = toks[:end + 1] if end is not None else toks
                pending.remove(j)
                buf.done[j] = True
        stats["host_s"] += time.perf_counter() - t0
        if not pending:
            return
        for _ in range(check_every):
            run()


def _count_forwards(dec: _Decoder, rows: list[int], results: list, stats: dict):
    """A finished batch's counts: per row the forwards its tokens needed (the prefill and the
    verify forwards up to its last kept token) and, per block node, the verify forwards that
    kept it (a forward that kept node i kept its path's nodes)."""
    token_forward, kept_node, tr = dec.rows.token_forward.tolist(), dec.rows.kept_node.tolist(), dec.tree
    for j, r in enumerate(rows):
        forwards = token_forward[j][len(results[r]) - 1] + 1
        stats["forwards"].append(forwards)
        stats["tokens"].append(len(results[r]))
        stats["verify_forwards"] += forwards - 1
        for node in kept_node[j][1:forwards]:
            for i in tr["path"][node][:tr["depth"][node] + 1]:
                stats["node_hits"][i] += 1
