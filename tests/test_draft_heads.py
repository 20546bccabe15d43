"""Heads that draft: the KL-to-head-0 loss against a naive float64 computation;
heads-only self-distillation leaves the base state dict identical; speculate.py's measurement
end to end on a tiny checkpoint."""
import json
import shutil

import pytest
import torch
from conftest import char_tokenizer, counting_jsonl, tiny_model_json
from test_eval import tiny_checkpoint  # noqa: F401  (a fixture)

import mtp
import train_rho1
from decoding import speculative
from support import config, model_io
from tools import speculate


@pytest.mark.parametrize("chunk", [None, 5])
def test_head0_distill_loss_and_gradients_equal_naive_float64(chunk):
    torch.manual_seed(0)
    n, B, T, D, V = 3, 2, 7, 8, 11
    h = torch.randn(n, B, T, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (n, B, T))
    coef = torch.rand(n, B, T, dtype=torch.float64) * mtp.align_to_heads(torch.ones(B, T), n).double()
    rows = coef.flatten().nonzero().squeeze(1)
    loss, ce, agree = mtp.head0_distill_loss(h, W, targets, coef, chunk, rows)
    loss.backward()
    g_h, g_W = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    logits = h @ W.t()
    naive = (coef[0] * torch.nn.functional.cross_entropy(logits[0].flatten(0, 1), targets[0].flatten(),
                                                         reduction="none").view(B, T)).sum()
    for k in range(1, n):  # head k at t vs head 0 at t+k, the teacher a constant
        p = logits[0, :, k:].detach().log_softmax(-1)
        q = logits[k, :, :T - k].log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1)
        naive = naive + (coef[k, :, :T - k] * kl).sum()
        torch.testing.assert_close(ce[k, :, :T - k] * (coef[k, :, :T - k] > 0), kl.detach() * (coef[k, :, :T - k] > 0))
    naive.backward()
    torch.testing.assert_close(loss, naive.detach())
    torch.testing.assert_close(g_h, h.grad)
    torch.testing.assert_close(g_W, W.grad)


@pytest.mark.parametrize("sequential", [True, False])
def test_head0_targets_reach_the_models_loss(tmp_path, sequential):
    """MTPModel's loss with head0_targets is head 0's CE plus each head's KL to head 0 (computed
    here from the full logits), on both head paths. A regression test: with sequential heads on
    (the default) head0_targets was dropped, and --model.head_target=head0
    silently trained on the data's tokens (the GPU run's acceptance matched the tokens run's)."""
    torch.manual_seed(0)
    base, _ = model_io.load_model_and_tokenizer(tiny_model_json(tmp_path / "model.json"))
    model = mtp.MTPModel(base.double(), 3)
    model.sequential_heads = sequential
    model.train()
    n, B, T = 3, 2, 12
    ids = torch.randint(0, 128, (B, T))
    targets = mtp.align_to_heads(ids, n)
    valid = mtp.align_to_heads(torch.ones_like(ids), n).double()
    coef = valid / valid.flatten(1).sum(1)[:, None, None]
    loss, *_ = model(ids, targets, coef=coef, head0_targets=True)
    with torch.no_grad():
        logits = model.hidden_states(ids, use_cache=False)[0] @ model.lm_head_weight.t()
    naive = (coef[0] * torch.nn.functional.cross_entropy(logits[0].flatten(0, 1), targets[0].flatten(),
                                                         reduction="none").view(B, T)).sum()
    for k in range(1, n):
        p, q = logits[0, :, k:].log_softmax(-1), logits[k, :, :T - k].log_softmax(-1)
        naive = naive + (coef[k, :, :T - k] * (p.exp() * (p - q)).sum(-1)).sum()
    torch.testing.assert_close(loss.detach(), naive)
    hard, *_ = model(ids, targets, coef=coef)
    assert not torch.allclose(hard.detach(), naive)


@pytest.mark.parametrize("head_target", ["tokens", "head0"])
def test_heads_only_self_distillation_leaves_the_base_identical(tmp_path, head_target):
    """train.heads_only_steps = max_steps (configs/smol_draft_heads.yaml): the base model never
    gets a gradient -- its state dict after training equals the starting model's bit for bit --
    while every tensor of every extra head moves."""
    char_tokenizer(tmp_path / "tok")
    start, _ = model_io.load_model_and_tokenizer(tiny_model_json(tmp_path / "model.json"))
    start.save_pretrained(tmp_path / "start")
    shutil.copytree(tmp_path / "tok", tmp_path / "start", dirs_exist_ok=True)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    last_block = {k.split("layers.1.", 1)[1]: v for k, v in before.items() if "layers.1." in k}
    train = counting_jsonl(tmp_path / "train.jsonl", 32)  # stands in for speculate.py's continuations
    train_rho1.main(["configs/smol_draft_heads.yaml", f"--model.policy={tmp_path / 'start'}", "--model.n_heads=3",
                     f"--model.head_target={head_target}", f"--data.path={train}", f"--data.eval_path={train}",
                     "--data.max_seq_len=64", "--max_steps=4", "--heads_only_steps=4", "--global_batch=4",
                     "--micro_batch=2", "--lr=1e-2", "--warmup_steps=1", "--train.device=cpu", "--train.dtype=float32",
                     f"--out_dir={tmp_path / 'out'}"])
    model, _ = model_io.load_consolidated(str(tmp_path / "out" / "final"))
    after = model.base.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert torch.equal(v, before[k]), k
    for head in model.extra_heads:
        moved = [k for k, v in head.state_dict().items() if not torch.equal(v, last_block[k])]
        assert len(moved) == len(last_block)


def test_head0_target_needs_a_frozen_base(tmp_path):
    with pytest.raises(config.ConfigError, match="head_target"):
        train_rho1.main(["configs/smol_draft_heads.yaml", "--model.head_target=head0", "--heads_only_steps=10",
                         f"--out_dir={tmp_path}", "--dry_run"])


def test_measure_end_to_end(tiny_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "m.json"
    res = speculate.main([tiny_checkpoint, "--stage=measure", f"--base={tiny_checkpoint}", "--task_limit=3",
                          "--batch_sizes=1,2", "--max_new_tokens=16", "--execute=false", "--device=cpu",
                          "--trees=chain,3x2", f"--out={out}"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["base_check"]["identical"] and saved["n_problems"] == 3
    for b in ("1", "2"):
        r = saved["batch"][b]
        assert r["plain_tokens_per_forward"] == 1.0 and set(r["speculative"]) == {"chain", "3x2"}
        for name, block in (("chain", 3), ("3x2", 1 + 3 + 6)):
            s = r["speculative"][name]
            assert s["completions_differing_from_plain"] == 0 and s["block"] == block
            assert 1.0 <= s["tokens_per_forward"] <= 3
            assert set(s["acceptance_per_head"]) == {"head1", "head2"}
            assert 0 <= s["prefill_seconds"] + s["host_seconds"] <= s["speculative_seconds"] + 0.02  # (each rounded to 0.01 s)
        assert 0 <= r["plain_prefill_seconds"] + r["plain_host_seconds"] <= r["plain_seconds"] + 0.02
    assert saved["plain_differing_across_batch_sizes"] == {"1_vs_2": 0}


def test_calibrate_then_measure_a_calibrated_tree(tiny_checkpoint, tmp_path):  # noqa: F811
    """--stage=calibrate writes the wide tree's nodes by hits (every prefix a tree), with the
    tokens per forward each size would have had; measure then verifies tree.json:N."""
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": p, "completion": "x", "source": s}) + "\n"
                             for p, s in [("def f(x):", "stdlib"), ("Write a function", "mbpp"), ("def f(x):", "stdlib"),
                                          ("import os", "stdlib")]))
    tree = tmp_path / "tree.json"
    res = speculate.main([tiny_checkpoint, "--stage=calibrate", f"--calib_path={calib}", "--calib_tree=3x2",
                          "--max_new_tokens=16", "--device=cpu", "--calib_batch=2", f"--out={tree}"])
    saved = json.loads(tree.read_text())
    assert saved == json.loads(json.dumps(res)) and saved["prompts"] == 3  # the repeated prompt once
    assert len(saved["nodes"]) == 3 + 6 and saved["hits"] == sorted(saved["hits"], reverse=True)
    for k in range(1, 10):
        nodes = [tuple(p) for p in saved["nodes"][:k]]
        assert all(len(p) == 1 or p[:-1] in nodes for p in nodes)
    F = saved["verify_forwards"]
    assert saved["expected_tokens_per_forward"]["4"] == round(1 + sum(saved["hits"][:4]) / F, 4)
    # the sizes timed (those the 9-node tree has), the best by predicted speed-up; tree.json alone = the best
    sizes = saved["sizes"]
    assert set(sizes) == {"4", "6", "8"} and sizes["8"]["tokens_per_forward"] == round(1 + sum(saved["hits"][:8]) / F, 4)
    for v in sizes.values():
        assert v["predicted_speedup"] == pytest.approx(v["tokens_per_forward"] * v["plain_ms_per_forward"] / v["ms_per_forward"],
                                                       rel=1e-3)
    assert saved["best"] == max(sizes, key=lambda k: sizes[k]["predicted_speedup"])
    assert speculative.parse_tree(str(tree)) == tuple(tuple(p) for p in saved["nodes"][:int(saved["best"])])
    with pytest.raises(config.ConfigError, match="calib_sizes"):
        speculate.main([tiny_checkpoint, "--stage=calibrate", f"--calib_path={calib}", "--calib_sizes=0,4", f"--out={tree}"])
    out = tmp_path / "m.json"
    m = speculate.main([tiny_checkpoint, "--stage=measure", "--task_limit=2", "--batch_sizes=1", "--max_new_tokens=12",
                        "--execute=false", "--device=cpu", f"--trees={tree}:4", f"--out={out}"])
    s = m["batch"]["1"]["speculative"][f"{tree}:4"]
    assert s["block"] == 5 and s["completions_differing_from_plain"] == 0
    assert s["tree"] == sorted(saved["nodes"][:4], key=lambda p: (len(p), p))  # draft_tree numbers them depth by depth


@pytest.mark.parametrize("spec,msg", [("3xa", "neither"), ("0x1", "widths >= 1"), ("2x2x2x2", "depth 4 needs 5 heads, the model has 3"),
                                      ("64x64", "4160 drafts per forward; at most 512"), (" ,", "empty"),
                                      ("nope.json:4", "not a calibrated tree file")])
def test_bad_trees_are_refused_before_decoding(spec, msg):
    with pytest.raises(config.ConfigError, match=msg):
        speculate.parse_trees(spec, 3)
    assert speculate.parse_trees("chain, 2x1", 3) == {"chain": None, "2x1": (2, 1)}


def test_forward_cost_end_to_end(tiny_checkpoint, tmp_path):  # noqa: F811
    """--stage=cost: one ms-per-forward figure for plain decoding and each tree, written as JSON;
    a bad BLAS name is refused before loading."""
    out = tmp_path / "c.json"
    res = speculate.main([tiny_checkpoint, "--stage=cost", "--task_limit=2", "--max_new_tokens=12", "--device=cpu",
                          "--trees=chain,2x2", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert set(res["ms_per_forward"]) == {"plain", "chain", "2x2"} and min(res["ms_per_forward"].values()) > 0
    with pytest.raises(config.ConfigError, match="blas"):
        speculate.main([tiny_checkpoint, "--stage=cost", "--blas=mkl", f"--out={out}"])
