"""FSDP2 under torchrun (gloo, CPU) against the single-process run, and exact resume.

Properties that must hold:
  1. 2 processes with micro_batch b == 1 process with micro_batch 2b on the same global batch
     (fp32): same per-step losses, Rho-1 selection included, and the same final weights.
  2. N steps straight == N/2 steps + SIGKILL + --resume (on another number of ranks) + N/2.
  3. A run SIGKILLed in the middle of writing a checkpoint resumes from the last complete one.
  4. The consolidated export of the sharded run loads in eval.py's loader and in plain
     transformers with the same logits.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import char_tokenizer, counting_jsonl, tiny_model_json
from safetensors.torch import load_file

import common
from support import model_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    char_tokenizer(tmp / "tok")
    model_json = tiny_model_json(tmp / "model.json")
    train = counting_jsonl(tmp / "train.jsonl", 64, seed=0)
    held_out = counting_jsonl(tmp / "eval.jsonl", 8, seed=1)
    cfg = tmp / "run.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {{policy: {model_json}, tokenizer: {tmp / 'tok'}, n_heads: 3}}
        data: {{source: jsonl, path: {train}, eval_path: {held_out}, max_seq_len: 64}}
        train: {{max_steps: {STEPS}, global_batch: 8, micro_batch: 2, lr: 1.0e-2, warmup_steps: 2,
                 eval_every: 0, device: cpu, dtype: float32}}
        rho1: {{ratio: 0.6}}
        """))
    return tmp, str(cfg)


def launch(cfg, out, *args, nproc=1):
    """Start a run (torchrun when nproc > 1); -> the Popen."""
    db = f"sqlite:///{out}/mlflow.db"
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}"] if nproc > 1 else [])
    cmd += [os.path.join(REPO, "train_rho1.py"), cfg, f"--train.out_dir={out}",
            f"--mlflow.tracking_uri={db}", "--mlflow.experiment=t", *args]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    # its own session, so that a SIGKILL can reach torchrun and its workers at once
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run(cfg, out, *args, nproc=1):
    p = launch(cfg, out, *args, nproc=nproc)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-4000:]
    return log


def losses(out) -> dict:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("t")
    return {m.step: m.value for r in client.search_runs([exp.experiment_id])
            for m in client.get_metric_history(r.info.run_id, "loss")}


def assert_same_weights(dir_a, dir_b, tol):
    for f in ("model.safetensors", model_io.MTP_HEADS):
        a, b = load_file(os.path.join(dir_a, "final", f)), load_file(os.path.join(dir_b, "final", f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.fixture(scope="module")
def straight(setup):
    """The reference runs: 1 process with micro_batch 4, and 2 processes with micro_batch 2."""
    tmp, cfg = setup
    run(cfg, tmp / "one", "--micro_batch=4")
    run(cfg, tmp / "two", nproc=2)
    return tmp / "one", tmp / "two"


def test_two_processes_equal_one(straight):
    one, two = straight
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for s in l1:
        assert l1[s] == pytest.approx(l2[s], rel=1e-5), (s, l1, l2)
    assert l1[STEPS] < l1[1]  # and it is actually training
    assert_same_weights(one, two, 1e-5)


def test_resume_after_sigkill_on_another_world_size(setup, straight):
    tmp, cfg = setup
    out = tmp / "killed"
    p = launch(cfg, out, "--save_every=3", nproc=2)
    ckpt = out / "checkpoints" / "step_00000003"
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), p.communicate()[0][-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    run(cfg, out, "--resume", "--micro_batch=4")  # 1 process now: DCP reshards on load
    l_straight, l_resumed = losses(straight[1]), losses(out)
    for s in range(4, STEPS + 1):
        assert l_resumed[s] == pytest.approx(l_straight[s], rel=1e-5), (s, l_straight, l_resumed)
    assert_same_weights(straight[1], out, 1e-5)


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(setup, straight):
    """The checkpoint of step 4 is being written when SIGKILL arrives: the run must resume from
    step 2 and still end where the uninterrupted run ends."""
    tmp, cfg = setup
    out = tmp / "killed_mid_write"
    # A driver that makes the second checkpoint write hang half-way (one shard file written,
    # no metadata, not renamed), so that the kill lands in the middle of the write.
    driver = tmp / "slow_save.py"
    driver.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {REPO!r})
        import torch.distributed.checkpoint as dcp
        real_save = dcp.save
        def save(state, checkpoint_id):
            if "step_00000004" in str(checkpoint_id):
                os.makedirs(checkpoint_id, exist_ok=True)
                open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"partial")
                print("WRITING", flush=True)
                time.sleep(600)
            return real_save(state, checkpoint_id=checkpoint_id)
        dcp.save = save
        import train_rho1
        train_rho1.main(sys.argv[1:])
        """))
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, str(driver), cfg, f"--train.out_dir={out}", "--save_every=2",
                          "--micro_batch=4", f"--mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
                          "--mlflow.experiment=t"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "WRITING" in line:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_00000002", "step_00000004.tmp"], ckpts
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        common.load_checkpoint(str(out / "checkpoints" / "step_00000004.tmp"), str(out), None, None, None)
    log = run(cfg, out, "--resume", "--micro_batch=4", "--save_every=2")
    assert "resumed from step 2" in log
    assert_same_weights(straight[0], out, 1e-5)


def test_sharded_export_loads_in_eval_loader_and_plain_transformers(straight):
    from transformers import AutoModelForCausalLM
    one, two = straight
    x = torch.randint(3, 90, (2, 12))
    ours, _ = model_io.load_consolidated(str(two / "final"))
    plain = AutoModelForCausalLM.from_pretrained(str(two / "final"))
    single, _ = model_io.load_consolidated(str(one / "final"))
    with torch.no_grad():
        h, _ = ours.hidden_states(x, use_cache=False)
        h1, _ = single.hidden_states(x, use_cache=False)
        torch.testing.assert_close(h[0] @ ours.lm_head_weight.t(), plain(x).logits)
        torch.testing.assert_close(h, h1, rtol=1e-5, atol=1e-5)
    assert ours.n_heads == 3
