"""speculative.decode_rows: batched self-speculative decoding. Greedy equals plain greedy row by row
(any batch size, stops, EOS); speculative sampling draws from plain sampling's distribution
(a chi-square test against the exact sequence probabilities); plain decoding equals the
reference sampler."""
import itertools

import pytest
import torch
from test_eval import TOK, mtp_model

from decoding import sampling, speculative
from support import model_io

pytestmark = pytest.mark.usefixtures("one_thread")


def random_prompts(vocab, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1 + t % 17,), generator=g).tolist() for t in range(count)]


@pytest.mark.parametrize("vocab,n_heads,noise", [(97, 4, 0.05), (5, 4, 0.05), (5, 3, 0.3), (3, 4, 0.0), (7, 1, 0.0)])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_speculative_greedy_equals_plain_greedy_per_row(vocab, n_heads, noise, batch_size):
    """Every row of a batch accepts its own number of drafts; each equals `generate`'s plain
    greedy decoding of its prompt alone, token for token, and so does the plain decoder."""
    model = mtp_model(vocab, n_heads, noise)
    prompts = random_prompts(vocab, 10)
    spec, st = speculative.decode_rows(model, TOK, prompts, 40, [], set(), speculative=True, batch_size=batch_size)
    plain, pst = speculative.decode_rows(model, TOK, prompts, 40, [], set(), speculative=False, batch_size=batch_size)
    for i, (p, s, q) in enumerate(zip(prompts, spec, plain)):
        ref, _ = sampling.generate(model, TOK, torch.tensor([p]), 1, 40, 0.0, 1.0, [], set())
        assert s == ref[0] and q == ref[0]
        # The same drafts as the reference decoder (DynamicCache, cropped): as many forwards. Wrong
        # keys/values in an extra head's cache would change its drafts, not the output.
        _, ref_fwd = speculative.generate_speculative(model, TOK, torch.tensor([p]), 40, [], set())
        assert st["forwards"][i] == ref_fwd
    assert pst["forwards"] == [40] * 10 and st["tokens"] == [40] * 10
    assert all(f <= 40 for f in st["forwards"])
    if n_heads > 1 and noise < 0.1 and vocab <= 5:  # heads close to head 0 on a small vocabulary
        assert sum(st["tokens"]) / sum(st["forwards"]) > 1.2
        assert st["accepted"] == sorted(st["accepted"], reverse=True)  # draft k+1 kept only after draft k


def test_batched_speculative_greedy_with_stops_and_eos():
    model = mtp_model(11, 4, 0.05)
    prompts = random_prompts(11, 12, seed=1)
    stop, eos = [" 3 4"], {7}
    spec, _ = speculative.decode_rows(model, TOK, prompts, 50, stop, eos, speculative=True, batch_size=5)
    for p, s in zip(prompts, spec):
        ref, _ = sampling.generate(model, TOK, torch.tensor([p]), 1, 50, 0.0, 1.0, stop, eos)
        assert s == ref[0]  # cut at the same token (drafts accepted past a stop are dropped)


def test_batched_speculative_greedy_with_a_real_tokenizer():
    """With SmolLM2's tokenizer and real stop strings (a tiny random model)."""
    from test_eval import SMOLLM2

    tok = model_io.load_tokenizer(SMOLLM2)
    model = mtp_model(len(tok), 3, 0.02, dtype=torch.float32)
    prompts = [tok(t).input_ids for t in ["def add(a, b):\n", "import math\n\ndef area(r):\n", "x ="]]
    eos, stop = sampling.eos_token_ids(model, tok), ["\ndef"]
    spec, _ = speculative.decode_rows(model, tok, prompts, 30, stop, eos, speculative=True, batch_size=2)
    for p, s in zip(prompts, spec):
        ref, _ = sampling.generate(model, tok, torch.tensor([p]), 1, 30, 0.0, 1.0, stop, eos)
        assert s == ref[0]


@torch.no_grad()
def sequence_probs(model, prompt, m, vocab, temperature, top_p):
    """The exact probability of every m-token continuation under plain sampling (uncached
    forwards of the base model, pick_next's temperature and nucleus)."""
    probs = {}
    for seq in itertools.product(range(vocab), repeat=m):
        ids = torch.tensor([prompt + list(seq)])
        logits = model.base(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + m]
        p = sampling.nucleus_probs(logits, temperature, top_p)
        p = p / p.sum(-1, keepdim=True)
        probs[seq] = float(torch.prod(p[torch.arange(m), torch.tensor(seq)]))
    return probs


def chi_square_p_value(counts: dict, probs: dict, n: int) -> tuple[float, float, int]:
    """Pearson's chi-square goodness of fit, outcomes with an expected count below 5 pooled into
    one bin -> (p-value, statistic, degrees of freedom). Survival function of chi2(k):
    the regularised upper incomplete gamma Q(k/2, x/2)."""
    big = [s for s in probs if probs[s] * n >= 5]
    obs = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
    exp = [probs[s] * n for s in big] + [n * (1 - sum(probs[s] for s in big))]
    if exp[-1] < 5:  # too little mass to pool: merge it into the last big outcome
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return chi2_sf(stat, dof), stat, dof


def chi2_sf(x: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_has_plain_sampling_distribution(temperature, top_p):
    """Speculative sampling (Leviathan et al. 2023) must draw every m-token continuation with the
    probability plain sampling gives it, whatever the heads draft. 6,000 draws of 3 tokens from a
    5-token vocabulary (125 outcomes) with heads far from head 0 (many rejections and residual
    draws), checked by a chi-square goodness-of-fit test against the exact probabilities.
    False-alarm rate: the test fails a correct sampler with probability alpha = 1e-3 for a
    random seed (the seeds are fixed, so a given version of the code passes or fails always).
    Power: the commonest mistake -- keeping every draft, i.e. drawing from the heads -- moves
    the expected statistic far past the critical value (checked below)."""
    vocab, m, n = 5, 3, 6000
    model = mtp_model(vocab, 3, 1.0)
    prompt = [1, 3, 0, 2]
    probs = sequence_probs(model, prompt, m, vocab, temperature, top_p)
    keys = [sampling.sample_key(7, i) for i in range(n)]
    rows, st = speculative.decode_rows(model, TOK, [prompt] * n, m, [], set(), speculative=True,
                                    temperature=temperature, top_p=top_p, keys=keys, batch_size=2000)
    counts = {}
    for r in rows:
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    p_value, stat, dof = chi_square_p_value(counts, probs, n)
    assert p_value > 1e-3, (p_value, stat, dof)
    # Both paths ran: some drafts kept, some rejected (then drawn from the residual).
    assert 0 < st["accepted"][0] < st["verify_forwards"]
    # Power: the distribution "first token from head 0, the rest the heads' drafts unverified".
    # Under that mistake the statistic is ~ noncentral chi2(dof, lam): mean dof + lam, variance
    # 2 (dof + 2 lam). Its mean must clear the test's critical value by 4 standard deviations.
    with torch.no_grad():
        h, _ = model.hidden_states(torch.tensor([prompt]), use_cache=False)
        q = sampling.nucleus_probs(torch.nn.functional.linear(h[:, 0, -1], model.lm_head_weight), temperature, top_p)
    q = q / q.sum(-1, keepdim=True)
    wrong = {s: float(q[0, s[0]] * q[1, s[1]] * q[2, s[2]]) for s in probs}
    lam = n * sum((wrong[s] - probs[s]) ** 2 / max(probs[s], 1e-12) for s in probs)
    lo, hi = float(dof), float(10 * dof)  # the critical value: sf(crit) = 1e-3, by bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, dof) > 1e-3 else (lo, mid)
    assert dof + lam > hi + 4 * (2 * (dof + 2 * lam)) ** 0.5, (lam, hi)


def test_plain_sampling_matches_exact_distribution_too():
    """The plain decoder (speculative=False) under the same test: the reference point."""
    vocab, m, n = 5, 3, 4000
    model = mtp_model(vocab, 3, 0.5)
    prompt = [4, 4, 1]
    probs = sequence_probs(model, prompt, m, vocab, 1.0, 1.0)
    keys = [sampling.sample_key(3, i) for i in range(n)]
    rows, _ = speculative.decode_rows(model, TOK, [prompt] * n, m, [], set(), speculative=False,
                                   temperature=1.0, keys=keys, batch_size=n)
    counts = {}
    for r in rows:
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    assert chi_square_p_value(counts, probs, n)[0] > 1e-3


def test_speculative_sampling_rows_do_not_depend_on_batch_size():
    model = mtp_model(7, 4, 0.3)
    prompts = random_prompts(7, 6, seed=2)
    keys = [sampling.sample_key(5, i) for i in range(6)]
    a, _ = speculative.decode_rows(model, TOK, prompts, 20, [], set(), temperature=0.8, top_p=0.95, keys=keys, batch_size=1)
    b, _ = speculative.decode_rows(model, TOK, prompts, 20, [], set(), temperature=0.8, top_p=0.95, keys=keys, batch_size=4)
    assert a == b


def test_draft_tree_tables_by_hand():
    """widths (2, 2): head 1's top 2 under the exact token, head 2's top 2 under each of them."""
    t = speculative.draft_tree((2, 2))
    assert t["parent"] == [0, 0, 0, 1, 1, 2, 2]
    assert t["depth"] == [0, 1, 1, 2, 2, 2, 2]
    assert t["rank"] == [0, 0, 1, 0, 1, 0, 1]
    assert t["path"][5] == [0, 2, 5] and t["path"][1] == [0, 1, 1] and t["path"][0] == [0, 0, 0]
    assert [j for j in range(7) if t["anc"][5][j]] == [0, 2, 5]
    assert not t["chain"] and speculative.draft_tree((1, 1, 1))["chain"]


def test_sparse_tree_tables_by_hand():
    """Nodes by their rank paths, given in any order: numbered depth by depth."""
    t = speculative.draft_tree([(0, 1, 0), (1,), (0,), (0, 1), (0, 0), (2,)])
    # 1: (0,)  2: (1,)  3: (2,)  4: (0, 0)  5: (0, 1)  6: (0, 1, 0)
    assert t["parent"] == [0, 0, 0, 0, 1, 1, 5]
    assert t["depth"] == [0, 1, 1, 1, 2, 2, 3] and t["D"] == 3
    assert t["rank"] == [0, 0, 1, 2, 0, 1, 0] and t["top"] == 3
    assert t["path"][6] == [0, 1, 5, 6] and t["path"][3] == [0, 3, 3, 3]
    assert [j for j in range(7) if t["anc"][6][j]] == [0, 1, 5, 6]
    assert not t["chain"] and speculative.draft_tree([(0,), (0, 0)])["chain"]
    with pytest.raises(ValueError, match="no parent"):
        speculative.draft_tree([(0,), (1, 0)])


def test_calibrated_tree_orders_by_hits_and_stays_a_tree():
    """Hits of the nodes of widths (2, 2) -> nodes by hits, ties to the shallower node; every
    prefix of the list is a tree (a node's parent comes before it)."""
    hits = [100, 40, 30, 30, 5, 12, 1]  # nodes (0,) (1,) (0,0) (0,1) (1,0) (1,1)
    order = speculative.calibrated_tree((2, 2), hits)
    assert order == [([0], 40), ([1], 30), ([0, 0], 30), ([1, 0], 12), ([0, 1], 5), ([1, 1], 1)]
    for k in range(1, len(order) + 1):
        speculative.draft_tree([tuple(p) for p, _ in order[:k]])  # raises if a parent is missing


def test_parse_tree_files_and_errors(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text('{"nodes": [[0], [1], [0, 0], [0, 0, 0]], "hits": [9, 5, 4, 1]}')
    assert speculative.parse_tree(f"{f}:3") == ((0,), (1,), (0, 0))
    assert speculative.parse_tree(str(f)) == ((0,), (1,), (0, 0), (0, 0, 0))
    assert speculative.parse_tree("3x2") == (3, 2) and speculative.parse_tree("chain") is None
    with pytest.raises(ValueError, match="needs 4 heads"):
        speculative.parse_tree(str(f), n_heads=3)
    with pytest.raises(ValueError, match="not a calibrated tree file"):
        speculative.parse_tree(str(tmp_path / "missing.json:4"))
    with pytest.raises(ValueError, match="whole number"):
        speculative.parse_tree(f"{f}:x")
    (tmp_path / "empty.json").write_text('{"nodes": []}')
    with pytest.raises(ValueError, match="no nodes"):
        speculative.parse_tree(str(tmp_path / "empty.json"))
    with pytest.raises(ValueError, match="neither"):
        speculative.parse_tree("3by2")


def reference_tree_forwards(model, prompt, max_new, nodes):
    """Forwards a tree-verifying decoder needs, recomputed from scratch with no cache: after the
    exact token x, the greedy continuation c_1, c_2, ... of (prefix, x) is kept as long as the
    ranks (r_1..r_d) of c_1..c_d among heads 1..d's tokens at the last accepted position name a
    node of the tree; the forward emits c_1..c_{a+1}. Also counts, per node, the forwards that
    kept it."""
    nodes, hits = {tuple(p) for p in nodes}, {}
    depth = max(map(len, nodes))

    def heads_and_greedy(seq):
        with torch.no_grad():
            h, _ = model.hidden_states(torch.tensor([seq]), use_cache=False)
        return h[:, 0, -1] @ model.lm_head_weight.T  # [n, V] at the last position

    def greedy_after(seq, m):
        out = []
        for _ in range(m):
            out.append(int(heads_and_greedy(seq + out)[0].argmax()))
        return out

    prefix, forwards = list(prompt), 1
    logits = heads_and_greedy(prefix)
    x, tokens = int(logits[0].argmax()), []
    tokens.append(x)
    while len(tokens) < max_new:
        forwards += 1
        c = greedy_after(prefix + [x], depth + 1)
        a, ranks = 0, ()
        while a < depth:
            ranks += (logits[a + 1].argsort(descending=True).tolist().index(c[a]),)
            if ranks not in nodes:
                break
            hits[ranks] = hits.get(ranks, 0) + 1
            a += 1
        tokens += c[:a + 1]
        prefix += [x] + c[:a]
        x = c[a]
        logits = heads_and_greedy(prefix)
    return forwards, tokens[:max_new], hits


SPARSE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0))


@pytest.mark.parametrize("tree,batch_size", [((2, 2, 1), 1), ((3, 2), 3), ((4, 1, 2), 8), ((1, 1, 1), 2),
                                             (SPARSE, 1), (SPARSE, 4)])
def test_tree_drafts_equal_plain_greedy_and_a_cacheless_reference(tree, batch_size):
    """Verifying a tree of drafts (product or sparse) keeps greedy decoding exact (the kept
    path's keys/values move to the row's next slots: a wrong move would change later tokens),
    accepts exactly what the cache-free reference accepts (wrong keys/values in an extra head
    would change the drafts) and counts the same forwards keeping each node (`node_hits`)."""
    vocab, max_new = 11, 30
    model = mtp_model(vocab, 4, 0.3)
    prompts = random_prompts(vocab, 6, seed=2)
    spec, st = speculative.decode_rows(model, TOK, prompts, max_new, [], set(), batch_size=batch_size, tree=tree)
    plain, _ = speculative.decode_rows(model, TOK, prompts, max_new, [], set(), speculative=False, batch_size=batch_size)
    assert spec == plain
    t = speculative.draft_tree(tree)
    nodes = t["nodes"]
    if not isinstance(tree[0], tuple):  # widths: every path of ranks below them
        assert nodes == [p for d in range(1, len(tree) + 1) for p in itertools.product(*map(range, tree[:d]))]
    hits = {}
    for i, p in enumerate(prompts):
        forwards, tokens, h = reference_tree_forwards(model, p, max_new, nodes)
        assert tokens == plain[i] and st["forwards"][i] == forwards, i
        for k, v in h.items():
            hits[k] = hits.get(k, 0) + v
    assert st["node_hits"][1:] == [hits.get(tuple(p), 0) for p in nodes]
    assert sum(hits.values()) > 0 and st["node_hits"][0] == sum(st["forwards"]) - len(prompts)
    assert st["n_block"] == len(nodes) + 1 and len(st["accepted"]) == t["D"]


def test_tree_with_stops_eos_and_wide_first_level():
    model = mtp_model(11, 4, 0.3)
    prompts = random_prompts(11, 9, seed=3)
    stop, eos = [" 3 4"], {7}
    spec, _ = speculative.decode_rows(model, TOK, prompts, 40, stop, eos, batch_size=4, tree=(6, 2, 2))
    for p, s in zip(prompts, spec):
        ref, _ = sampling.generate(model, TOK, torch.tensor([p]), 1, 40, 0.0, 1.0, stop, eos)
        assert s == ref[0]


def test_tree_needs_greedy_and_enough_heads():
    model = mtp_model(11, 3, 0.1)
    with pytest.raises(ValueError, match="greedy"):
        speculative.decode_rows(model, TOK, [[1, 2]], 5, [], set(), temperature=0.8, tree=(2, 1))
    with pytest.raises(ValueError, match="needs 4 heads"):
        speculative.decode_rows(model, TOK, [[1, 2]], 5, [], set(), tree=(2, 1, 1))


def test_with_graphs_the_captured_step_is_the_compiled_one(monkeypatch):
    """decode_rows(compile=True) with CUDA graphs captures the compiled step, not the eager one
    (it once captured the eager step, so --compile measured nothing). Stand-ins: torch.compile
    wraps with a counter, and the "capture" returns the function it was given."""
    calls = []

    def fake_compile(fn):
        def compiled(*args):
            calls.append(1)
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(sampling, "_cuda_graph", lambda fn, pools: fn)
    model = mtp_model(11, 4, 0.3)
    prompts = random_prompts(11, 3, seed=5)
    spec, st = speculative.decode_rows(model, TOK, prompts, 12, [], set(), graphs=True, compile=True, tree=(2, 1))
    plain, _ = speculative.decode_rows(model, TOK, prompts, 12, [], set(), speculative=False, graphs=False)
    assert spec == plain
    assert len(calls) >= max(st["forwards"]) - 1  # every verify forward ran the compiled step
