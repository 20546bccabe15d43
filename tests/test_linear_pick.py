"""linear_pick: per-shape choice of the matmul path. On CPU the choice itself (which cuBLAS path
wins) cannot run, so these tests stand in for the GPU: `eligible` admits CPU tensors and `_time`
returns chosen timings. What they check is the dispatch -- each shape timed once, the fastest
kept, never timed inside a capture, every nn.Linear routed and restored -- and that decoding
through the per-row GEMV candidate stays exactly greedy. (The GPU choice is measured by
`bench.py --linear`; the decoder's equality on a GPU by speculate.py's `differ` count.)"""
import pytest
import torch
import torch.nn.functional as F
from test_eval import TOK, mtp_model

from decoding import linear_pick, sampling, speculative

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def on_cpu(monkeypatch):
    """linear_pick as on a GPU, with CPU tensors; returns {name: calls} of each candidate."""
    calls = {}

    def counted(name, fn):
        def run(x, w):
            calls[name] = calls.get(name, 0) + 1
            return fn(x, w)
        return run

    monkeypatch.setattr(linear_pick, "eligible", lambda x, w: 1 < x.numel() // x.shape[-1] <= linear_pick.MAX_ROWS)
    monkeypatch.setattr(linear_pick, "_picked", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(linear_pick, "CANDIDATES", {"slow": counted("slow", F.linear),
                                                    "gemv": counted("gemv", linear_pick._row_gemv)})
    return calls


def test_row_gemv_is_a_matmul():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 24, generator=g), torch.randn(7, 24, generator=g)
    torch.testing.assert_close(linear_pick._row_gemv(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def test_each_shape_timed_once_and_the_fastest_kept(on_cpu, monkeypatch):
    timed = []

    def fake_time(fn, x, w):
        name = next(n for n, f in linear_pick.CANDIDATES.items() if f is fn)
        timed.append((name, x.shape[0]))
        return {"slow": 2.0, "gemv": 1.0}[name]

    monkeypatch.setattr(linear_pick, "_time", fake_time)
    w = torch.randn(6, 8)
    for _ in range(3):
        y = linear_pick.linear(torch.randn(2, 3, 8), w)
    assert y.shape == (2, 3, 6)
    assert sorted(timed) == [("gemv", 6), ("slow", 6)]  # once per candidate, for the 6-row shape only
    assert linear_pick._picked[(6, 8, 6, torch.float32, w.device)] == "gemv"
    linear_pick.linear(torch.randn(12, 8), w)  # more rows than one GEMV per row is worth: not a candidate
    assert ("gemv", 12) not in timed and linear_pick._picked[(12, 8, 6, torch.float32, w.device)] == "slow"
    x = torch.randn(1, 8)  # one row: left to F.linear (cuBLAS's GEMV), never timed
    torch.testing.assert_close(linear_pick.linear(x, w), F.linear(x, w))
    assert not any(r == 1 for _, r in timed)


def test_a_shape_first_met_inside_a_capture_is_not_timed(on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(linear_pick, "_time", lambda *a: pytest.fail("timed during a capture"))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    torch.testing.assert_close(linear_pick.linear(x, w), F.linear(x, w))
    assert not linear_pick._picked and not on_cpu  # the default path, and nothing remembered


def test_patched_routes_every_linear_and_restores(on_cpu, monkeypatch):
    monkeypatch.setattr(linear_pick, "_time", lambda fn, x, w: 0.0 if fn is linear_pick.CANDIDATES["gemv"] else 1.0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))
    x = torch.randn(3, 8)
    expected = model(x)
    with linear_pick.patched(model):
        got = model(x)
    assert on_cpu["gemv"] == 2 and "slow" not in on_cpu  # both layers, through the picked path (timing faked)
    torch.testing.assert_close(got, expected)
    assert all("forward" not in vars(m) for m in model)  # the class's forward again
    n = on_cpu["gemv"]
    model(x)
    assert on_cpu["gemv"] == n


@pytest.mark.parametrize("tree,batch_size", [((2, 2, 1), 1), (None, 2)])
def test_decoding_through_the_picked_path_is_still_exact_greedy(on_cpu, monkeypatch, tree, batch_size):
    """Every matmul of the verify block (and the unembedding) through one GEMV per row: the
    speculative decoder still equals plain greedy decoding by `generate` (F.linear throughout),
    and prefills are left to F.linear."""
    monkeypatch.setattr(linear_pick, "_time", lambda fn, x, w: 0.0 if fn is linear_pick.CANDIDATES["gemv"] else 1.0)
    vocab = 11
    model = mtp_model(vocab, 4, 0.3, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, vocab, (1 + t % 9,), generator=g).tolist() for t in range(5)]
    spec, _ = speculative.decode_rows(model, TOK, prompts, 24, [], set(), batch_size=batch_size, tree=tree, pick_blas=True)
    assert on_cpu["gemv"] > 100  # it was used
    L = len(speculative.draft_tree(tree or (1, 1, 1))["parent"])
    # Only the step's shapes were timed (the block, the heads' drafting): never a prefill's, whose
    # new prompt lengths would be timed inside the decoder's timed run.
    assert {key[0] for key in linear_pick._picked} <= {batch_size * L, batch_size * 3}
    assert any(len(p) * batch_size not in (batch_size * L, batch_size * 3) for p in prompts)
    for p, s in zip(prompts, spec):
        ref, _ = sampling.generate(model, TOK, torch.tensor([p]), 1, 24, 0.0, 1.0, [], set())
        assert s == ref[0]
    assert all("forward" not in vars(m) for m in model.modules())
