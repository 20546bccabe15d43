"""The rules Apple silicon (MPS) sets, held on CPU: nobody here can run MPS, so both training
scripts run their tiny configs -- Rho-1 hard and soft, sequential heads, a checkpoint written
and resumed, the export; the critic's two stages -- under a TorchDispatchMode that fails on
what MPS cannot do:
  - a float64 tensor (MPS has no float64: "Cannot convert a MPS Tensor to float64 dtype"). On a
    CPU run the device and the host are the same, so the rule is stricter than MPS's: no torch
    float64 tensor at all on the training path (host-side arithmetic is done in Python floats).
  - an op without an MPS kernel in the torch versions a Mac user runs (index_copy before 2.8).
The guard is checked to fail on a reintroduced `.double()` of a device tensor."""
import json
import os
import random
import traceback

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import tiny_files, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import common
import mtp
import train_critic
import train_rho1
from support import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

# Ops that have no MPS kernel in some torch a Mac user may run (PyTorch's MPS op coverage list).
NO_MPS_KERNEL = {torch.ops.aten.index_copy, torch.ops.aten.index_copy_}


class MPSRules(TorchDispatchMode):
    """Records every op that would fail on MPS, with the line of ours that ran it."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        why = None
        if func.overloadpacket in NO_MPS_KERNEL:
            why = "no MPS kernel"
        elif any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in pytree.tree_leaves(out)):
            why = "float64"
        if why:
            self.violations.append(f"{why}: {func} at {self._where()}")
        return out

    @staticmethod
    def _where() -> str:
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(REPO) and "site-packages" not in
                f.filename and not f.filename.endswith("test_mps_rules.py")]
        return f"{os.path.relpath(ours[-1].filename, REPO)}:{ours[-1].lineno}" if ours else "?"


def guarded(fn, *args):
    with MPSRules() as rules:
        fn(*args)
    return sorted(set(rules.violations))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mps")
    _, model, _, _ = tiny_files(tmp, n_train=32)
    rng = random.Random(0)
    with open(tmp / "labelled.jsonl", "w") as f:
        for i in range(48):  # a toy pass/fail set: one decision character
            good = rng.random() < 0.5
            f.write(json.dumps({"prompt": f"task {i % 12}:", "problem": f"t{i % 12}", "passed": good,
                                "completion": "".join(rng.choice("abc") for _ in range(6)) + ("G" if good else "B")})
                    + "\n")
    base = [f"--model.policy={model}", f"--model.tokenizer={tmp / 'tok'}", "--train.device=cpu",
              "--train.dtype=float32", "--mlflow.enabled=false", "--train.lr=1e-3", "--train.warmup_steps=1"]
    return tmp, base


def rho1_args(tmp, base, name, *extra):
    return base + ["--data.source=jsonl", f"--data.path={tmp / 'train.jsonl'}", f"--data.eval_path={tmp / 'eval.jsonl'}",
                     "--data.max_seq_len=48", "--train.global_batch=8", "--train.micro_batch=4", "--train.max_steps=2",
                     "--train.eval_every=0", f"--train.out_dir={tmp / name}", *extra]


@pytest.mark.parametrize("extra", [["--rho1.mode=hard"], ["--rho1.mode=soft"], ["--rho1.ratio=1", "--model.n_heads=1"],
                                   ["--train.sequential_heads=false"], ["--rho1.shuffle"]],
                         ids=["hard", "soft", "next-token", "all-heads", "random-control"])
def test_rho1_runs_by_the_mps_rules(tiny, extra):
    tmp, base = tiny
    name = "rho1-" + "-".join(a.strip("-").replace("=", "_").replace(".", "_") for a in extra)
    assert guarded(train_rho1.main, rho1_args(tmp, base, name, *extra)) == []
    assert (tmp / name / "final" / "mtp_heads.safetensors").exists() or "--model.n_heads=1" in extra


def test_checkpoint_resume_and_dry_run_by_the_mps_rules(tiny):
    tmp, base = tiny
    args = rho1_args(tmp, base, "resumed", "--train.save_every=1", "--train.max_steps=3")
    assert guarded(train_rho1.main, args) == []
    assert guarded(train_rho1.main, args + ["--resume=" + str(tmp / "resumed" / "checkpoints" / "step_00000002")]) == []
    assert guarded(train_rho1.main, rho1_args(tmp, base, "dry", "--dry_run")) == []


def test_critic_both_stages_by_the_mps_rules(tiny):
    tmp, base = tiny
    args = base + ["--data.source=jsonl", f"--data.path={tmp / 'labelled.jsonl'}", "--data.max_seq_len=48",
                     "--data.eval_frac=0.25", "--value.train_layers=1", "--value.max_steps=2", "--value.global_batch=8",
                     "--value.micro_batch=4", "--value.eval_every=1", "--value.rank_weight=1",
                     f"--value.out_dir={tmp / 'value'}", "--train.max_steps=2", "--train.global_batch=4",
                     "--train.micro_batch=2", "--train.eval_every=1", "--train.save_every=1", "--model.n_heads=2",
                     f"--train.out_dir={tmp / 'critic'}"]
    assert guarded(train_critic.main, args) == []
    assert (tmp / "critic" / "final" / "mtp_heads.safetensors").exists()


def test_the_guard_catches_a_double_on_the_device(tiny, monkeypatch):
    """The mutation check: the float64 Rho-1 selection count the code had once (n.double() on the
    device) is caught, and named."""
    tmp, base = tiny

    def selected_count_in_float64(n_valid, ratio):
        return torch.ceil(n_valid.double() * ratio - 1e-9).clamp(min=0).to(torch.long).minimum(n_valid.long())
    monkeypatch.setattr(mtp, "selected_count", selected_count_in_float64)
    found = guarded(train_rho1.main, rho1_args(tmp, base, "mutant"))
    assert found and all("float64" in v and "test_mps_rules" not in v for v in found), found
    assert any("train_rho1.py" in v for v in found), found


def test_the_guard_catches_an_op_without_an_mps_kernel():
    with MPSRules() as rules:
        torch.zeros(4).index_copy(0, torch.tensor([1]), torch.ones(1))
    assert rules.violations and "no MPS kernel" in rules.violations[0]


# ---- what makes a 1.3B policy fit a Mac: train the top only, frozen weights in bf16 ----

def test_training_the_top_only_keeps_the_top_gradients(tiny):
    """model.train_layers=N: the trained parameters get exactly the gradients the full model
    gives them (freezing below changes nothing above), the frozen ones none; frozen weights may
    be held in bf16; tied embeddings train with the unembedding."""
    full, top = (mtp.MTPModel(tiny_llama(layers=4, dtype=torch.float64), 3) for _ in range(2))
    common.train_top_only(top, 2)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    coef = torch.rand(3, 2, 12, dtype=torch.float64)
    for m in (full, top):
        loss, *_ = m(x, mtp.align_to_heads(x, 3), coef=coef)
        loss.backward()
    trained = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in top.named_parameters() if n.startswith(("base.model.layers.2.", "base.model.layers.3.",
                                                                             "extra_heads.", "base.model.norm.", "base.lm_head."))}
    full_grads = dict(full.named_parameters())
    for n, p in top.named_parameters():
        assert (p.grad is None) == (n not in trained), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, full_grads[n].grad, rtol=1e-12, atol=1e-12)
    half = mtp.MTPModel(tiny_llama(layers=4, tie=True), 2)
    common.train_top_only(half, 1, torch.bfloat16)
    emb = half.base.get_input_embeddings().weight
    assert emb.requires_grad and emb.dtype == torch.float32  # tied to the unembedding, which trains
    assert {p.dtype for p in half.base.model.layers[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.base.model.layers[3].parameters()} == {torch.float32}
    with pytest.raises(common.ConfigError, match="'model.train_layers' is 9 but the policy has 4 blocks"):
        common.train_top_only(mtp.MTPModel(tiny_llama(layers=4), 2), 9)


def test_top_only_in_bf16_by_the_mps_rules(tiny):
    tmp, base = tiny
    args = rho1_args(tmp, base, "top", "--model.train_layers=1", "--model.frozen_in_compute_dtype",
                     "--train.dtype=bfloat16")
    assert guarded(train_rho1.main, args) == []
    cfg = config.parse_config(train_rho1.Config, args)
    with pytest.raises(config.ConfigError, match="model.frozen_in_compute_dtype' is for one process"):
        common.check_policy(cfg.model, cfg.train, world=2)
