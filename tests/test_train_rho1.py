"""train_rho1.py end to end on a tiny in-process model: the loss falls, MLflow has the metrics,
the checkpoint loads; config errors name the key."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import char_tokenizer, counting_jsonl, tiny_model_json

import common
import mtp
import train_rho1
from support import config, metrics, model_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_run(tmp_path):
    char_tokenizer(tmp_path / "tok")
    model_json = tiny_model_json(tmp_path / "model.json")
    train = counting_jsonl(tmp_path / "train.jsonl", 64, seed=0)
    held_out = counting_jsonl(tmp_path / "eval.jsonl", 8, seed=1)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{policy: {model_json}, tokenizer: {tmp_path / 'tok'}, n_heads: 2}}
data: {{source: jsonl, path: {train}, eval_path: {held_out}, max_seq_len: 64}}
train: {{max_steps: 40, global_batch: 8, micro_batch: 4, lr: 1.0e-2, warmup_steps: 3,
         eval_every: 20, device: cpu, out_dir: {tmp_path / 'out'}}}
rho1: {{ratio: 0.7}}
mlflow: {{tracking_uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")
    return tmp_path, str(cfg)


def test_training_reduces_loss_and_logs_to_mlflow(tiny_run):
    tmp_path, cfg = tiny_run
    train_rho1.main([cfg])
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test")
    (run,) = client.search_runs([exp.experiment_id])
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 40
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5, loss
    for key in ("head0/ce", "head1/ce", "head1/selected_frac", "head0/w_mean", "lr", "grad_norm",
                "tokens_per_s", "eval/head0_ce"):
        assert key in run.data.metrics, key
    # top-ρ keeps ceil(0.7 n) of every micro-step's valid tokens
    assert 0.7 <= run.data.metrics["head0/selected_frac"] < 0.75
    assert run.data.params["rho1.ratio"] == "0.7"
    model, _ = model_io.load_consolidated(str(tmp_path / "out" / "final"))
    assert model.n_heads == 2


def test_unknown_and_bad_keys_are_named(tiny_run):
    _, cfg = tiny_run
    with pytest.raises(config.ConfigError, match="unknown config key 'train.max_stepz'"):
        train_rho1.main([cfg, "--train.max_stepz=3"])
    with pytest.raises(config.ConfigError, match="unknown config key 'bogus'"):
        train_rho1.main([cfg, "--bogus=1"])
    with pytest.raises(config.ConfigError, match="'train.lr': expected float"):
        train_rho1.main([cfg, "--lr=fast"])
    with pytest.raises(config.ConfigError, match="'rho1.ratio'"):
        train_rho1.main([cfg, "--rho1.ratio=1.5"])
    with pytest.raises(config.ConfigError, match="does not exist"):
        train_rho1.main(["nope.yaml"])


def test_config_overrides():
    c = config.parse_config(train_rho1.Config, ["--max_steps=3", "--rho1.mode=soft", "--dry_run",
                                             "--lr=5e-5", "--model.n_heads=1"])
    assert (c.train.max_steps, c.rho1.mode, c.dry_run, c.train.lr, c.model.n_heads) == (3, "soft", True, 5e-5, 1)


def test_dry_run_cli(tiny_run):
    """The user-facing spellings, through a real subprocess: --dry_run and a bad key."""
    _, cfg = tiny_run
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_rho1.py"), cfg, "--dry_run"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "dry run: step 1 done" in out.stdout and "checkpoint written and read back" in out.stdout
    for part in ("weights", "gradients", "optimizer states", "reference", "activations and the rest", "peak"):
        assert part in out.stdout, part
    bad = subprocess.run([sys.executable, os.path.join(REPO, "train_rho1.py"), cfg, "--max_stepz=3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "max_stepz" in bad.stderr


def test_dry_run_is_the_real_first_step(tiny_run, tmp_path, monkeypatch):
    """A dry run that passes means step 1 passes: it runs the optimizer step, the step's metrics
    and a checkpoint round trip, keeps nothing, and fails where step 1 would."""
    _, cfg = tiny_run
    steps = []
    real_step = common.optimizer_step
    monkeypatch.setattr(common, "optimizer_step", lambda *a, **k: steps.append(a[-1]) or real_step(*a, **k))
    out = tmp_path / "fresh"
    train_rho1.main([cfg, "--dry_run", f"--out_dir={out}", "--mlflow.enabled=false"])
    assert steps == ["step 0"] and not out.exists()  # one update; the scratch checkpoint is gone
    monkeypatch.setattr(metrics.HeadStats, "metrics", lambda self: 1 / 0)  # a bug in the step's metrics
    with pytest.raises(ZeroDivisionError):
        train_rho1.main([cfg, "--dry_run", f"--out_dir={out}", "--mlflow.enabled=false"])


def test_non_finite_loss_stops_before_the_update(tiny_run):
    """A diverging run (absurd learning rate) stops with an error that names the step, before a
    NaN reaches the weights."""
    _, cfg = tiny_run
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite .* weights not updated"):
        train_rho1.main([cfg, "--lr=1e30", "--warmup_steps=0", "--max_steps=10", "--mlflow.enabled=false",
                         "--eval_every=0"])


def test_head_warm_up_leaves_the_base_model_untouched(tiny_run):
    """train.heads_only_steps: during warm-up only heads 1..n-1 move; the base model (embeddings,
    trunk, head 0, norm, unembedding) stays bit for bit; after warm-up everything trains."""
    import torch
    tmp_path, cfg = tiny_run
    start, _ = model_io.load_model_and_tokenizer(str(tmp_path / "model.json"))
    start.save_pretrained(tmp_path / "start")
    shutil.copytree(tmp_path / "tok", tmp_path / "start", dirs_exist_ok=True)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    last_block = {k.split("layers.1.", 1)[1]: v for k, v in before.items() if "layers.1." in k}
    base_args = [cfg, f"--model.policy={tmp_path / 'start'}", "--max_steps=3", "--eval_every=0",
              "--mlflow.enabled=false"]

    def run(warm_up):
        out = tmp_path / f"warm{warm_up}"
        train_rho1.main(base_args + [f"--heads_only_steps={warm_up}", f"--out_dir={out}"])
        model, _ = model_io.load_consolidated(str(out / "final"))
        return model

    warm = run(3)
    for k, v in warm.base.state_dict().items():
        assert torch.equal(v, before[k]), k
    moved = [k for k, v in warm.extra_heads[0].state_dict().items() if not torch.equal(v, last_block[k])]
    assert len(moved) == len(last_block)  # every tensor of head 1 trained
    joint = run(1)  # warm-up ends after step 1: the base trains in steps 2 and 3
    assert not torch.equal(joint.base.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(config.ConfigError, match="heads_only_steps"):
        train_rho1.main(base_args + ["--heads_only_steps=2", "--model.n_heads=1"])


def test_random_weight_control_keeps_the_count_and_loses_the_selection(tiny_run):
    """rho1.shuffle: per head the same number of tokens is kept (the same weights), but they are
    random tokens, so their mean excess loss falls to about the mean over all tokens, while the
    real top-ρ selection's is well above it (at step 3: at step 1 the policy is its own reference)."""
    from mlflow.tracking import MlflowClient
    tmp_path, cfg = tiny_run
    metrics = {}
    for shuffle in (False, True):
        db = f"sqlite:///{tmp_path / f'shuffle{shuffle}.db'}"
        train_rho1.main([cfg, "--max_steps=3", "--eval_every=0", f"--rho1.shuffle={shuffle}",
                         f"--out_dir={tmp_path / f'out{shuffle}'}", f"--mlflow.tracking_uri={db}"])
        client = MlflowClient(db)
        (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        metrics[shuffle] = run.data.metrics
    real, rand = metrics[False], metrics[True]
    for k in (0, 1):
        assert real[f"head{k}/selected_frac"] == rand[f"head{k}/selected_frac"]
        assert real[f"head{k}/w_mean"] == rand[f"head{k}/w_mean"]
        assert real[f"head{k}/excess_selected"] > real[f"head{k}/excess_all"] + 0.05
        assert abs(rand[f"head{k}/excess_selected"] - rand[f"head{k}/excess_all"]) < \
            real[f"head{k}/excess_selected"] - real[f"head{k}/excess_all"]


def test_mlflow_disabled_needs_no_mlflow(tiny_run):
    """--mlflow.enabled=false must work where mlflow is not installed (the GPU box of the
    comparison run had none, and every step failed at its first log call): train, then evaluate,
    in a subprocess where `import mlflow` raises ImportError."""
    tmp_path, cfg = tiny_run
    block = "import sys; sys.modules['mlflow'] = None; import runpy; sys.argv = sys.argv[1:]; "
    for argv in ([os.path.join(REPO, "train_rho1.py"), cfg, "--train.max_steps=2", "--mlflow.enabled=false"],
                 [os.path.join(REPO, "eval.py"), str(tmp_path / "out" / "final"), "--task=mbpp",
                  f"--data_path={_mbpp_rows(tmp_path)}", "--n_samples=1", "--max_new_tokens=4", "--workers=1",
                  "--mlflow.enabled=false", f"--out={tmp_path / 'eval'}"]):
        p = subprocess.run([sys.executable, "-c", block + "runpy.run_path(sys.argv[0], run_name='__main__')", *argv],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    assert os.path.exists(tmp_path / "eval" / "results.json")


def _mbpp_rows(tmp_path):
    """MBPP-format rows: the 3-shot prompt's tasks 2-4 and two test problems (ids 11, 12)."""
    import json
    rows = [{"task_id": i, "text": "Write a function f that returns 1.", "code": "def f():\n    return 1",
             "test_list": ["assert f() == 1"], "test_setup_code": "", "challenge_test_list": []} for i in (2, 3, 4, 11, 12)]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ratio_one_runs_no_reference(tiny_run, monkeypatch):
    """At rho1.ratio=1 (hard) every valid token is kept, so the reference is neither built nor
    run: training must not call it (the weights it would give are all ones on valid tokens:
    tests/test_mtp.py::test_rho1_ratio_one_is_uniform_mtp)."""
    tmp_path, cfg = tiny_run

    def no_reference(*a, **k):
        raise AssertionError("the reference ran at ratio 1")
    monkeypatch.setattr(mtp, "reference_token_ce", no_reference)
    train_rho1.main([cfg, "--rho1.ratio=1", "--train.max_steps=3", "--mlflow.enabled=false"])
    assert model_io.load_consolidated(str(tmp_path / "out" / "final"))[0].n_heads == 2
