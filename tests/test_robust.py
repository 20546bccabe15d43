"""Failing early and clearly, surviving preemption, never resuming into the wrong model.

  - Every config value and path is checked before anything heavy loads: the error names the key
    and comes in seconds (the model loaders are replaced by a trap here, so a check that comes
    too late fails the test); on the command line it is one line, exit status 2, no traceback.
  - A fresh run refuses an out_dir that holds an earlier run, unless --overwrite.
  - --resume refuses a checkpoint of another model or loss, naming what differs; pruning never
    deletes another run's checkpoints.
  - SIGTERM / SIGINT on a real training process: the step ends, a checkpoint is written, the
    resume command is printed, exit 128 + signal; resuming ends with the uninterrupted run's
    exact weights; a second signal exits at once.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import tiny_files
from safetensors.torch import load_file

import common
import data
import eval as ev
import mtp
import train_critic
import train_rho1
from support import config, model_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
USER_ERRORS = (config.ConfigError, FileNotFoundError, data.DataError)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    _, model_json, _, _ = tiny_files(tmp)
    cfg = tmp / "run.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {{policy: {model_json}, tokenizer: {tmp / 'tok'}, n_heads: 4}}
        data: {{source: jsonl, path: {tmp / 'train.jsonl'}, eval_path: {tmp / 'eval.jsonl'}, max_seq_len: 64}}
        train: {{max_steps: 8, global_batch: 8, micro_batch: 4, lr: 1.0e-2, warmup_steps: 2, eval_every: 0,
                 device: cpu, dtype: float32, out_dir: {tmp / 'out'}}}
        rho1: {{ratio: 0.7}}
        mlflow: {{enabled: false}}
        """))
    return tmp, str(cfg)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model fails the test: the check under test must come before."""
    def trap(*a, **k):
        raise AssertionError("a model was loaded before the config error")
    for obj, name in ((common, "load_policy"), (model_io, "load_model_and_tokenizer"), (model_io, "load_consolidated")):
        monkeypatch.setattr(obj, name, trap)


def refused(main, argv, match):
    """main(argv) stops with a user error whose message matches `match`, in seconds."""
    t0 = time.time()
    with pytest.raises(USER_ERRORS, match=match):
        main(argv)
    assert time.time() - t0 < 5


def cli(script, *args, timeout=120):
    """A script on the command line -> (exit status, stdout + stderr, seconds)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.time() - t0


# ---- every value and path, before anything heavy loads ------------------------------------------

@pytest.mark.parametrize("args, match", [
    (["--model.n_heads=0"], "'model.n_heads' must be >= 1"),
    (["--micro_batch=0"], "'train.micro_batch' must be >= 1"),
    (["--global_batch=0"], "'train.global_batch' must be >= 1"),
    (["--global_batch=6"], r"'train.global_batch' \(6\) must be a multiple of .* = 4: set --train.global_batch=8"),
    (["--max_steps=-1"], "'train.max_steps' must be >= 1"),
    (["--max_steps=0"], "'train.max_steps' must be >= 1"),
    (["--lr=-1e-3"], "'train.lr' must be >= 0"),
    (["--eval_every=-1"], "'train.eval_every' must be >= 0"),
    (["--save_every=-5"], "'train.save_every' must be >= 0"),
    (["--log_every=0"], "'train.log_every' must be >= 1"),
    (["--keep_last=-1"], "'train.keep_last' must be >= 0"),
    (["--warmup_steps=-1"], "'train.warmup_steps' must be >= 0"),
    (["--beta2=1"], r"'train.beta2' must be in \[0, 1\)"),
    (["--rho1.ratio=0"], r"'rho1.ratio' must be in \(0, 1\]"),
    (["--rho1.ratio=1.5"], r"'rho1.ratio' must be in \(0, 1\]"),
    (["--rho1.mode=top"], "'rho1.mode': 'top' is not one of"),
    (["--rho1.temperature=0"], "'rho1.temperature' must be > 0"),
    (["--model.head_discount=0"], "'model.head_discount' must be > 0"),
    (["--data.max_seq_len=1"], "'data.max_seq_len' must be >= 2"),
    (["--heads_only_steps=2", "--model.n_heads=1"], "'train.heads_only_steps': a 1-head model"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=nonsense"], "'train.device'"),
    (["--dtype=fp8"], "'train.dtype': 'fp8' is not one of"),
    (["--data.source=bogus"], "'data.source': 'bogus' is not one of"),
])
def test_bad_values_are_refused_before_loading(setup, no_model_load, args, match):
    _, cfg = setup
    refused(train_rho1.main, [cfg] + args, match)


def test_bad_paths_are_refused_before_loading(setup, no_model_load, tmp_path, monkeypatch):
    tmp, cfg = setup
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = f"--out_dir={tmp_path / 'fresh'}"
    for args, match in [
        ([f"--out_dir={a_file / 'sub'}"], r"'train.out_dir': cannot create .*a_file/sub.*is a file"),
        ([f"--out_dir={a_file}"], r"'train.out_dir': .*a_file' is a file"),
        ([out, f"--model.policy={tmp_path / 'no' / 'such' / 'dir'}"], "'model.policy': .*no such file or directory"),
        ([out, "--model.policy=typo_dir"], r"'model.policy': 'typo_dir': no such file or directory and not a hub id \(org/name\)"),
        ([out, f"--model.policy={tmp_path}"], "'model.policy': directory .* holds no model"),
        ([out, f"--model.policy={a_file}"], "'model.policy': .* is a file, not a model"),
        ([out, f"--model.policy={tmp_path / 'missing.json'}"], "'model.policy': model-config file .* does not exist"),
        ([out, "--model.policy=pkg:no_such_package_xyz/m.gguf"], "'model.policy': .*package 'no_such_package_xyz' is not installed"),
        ([out, f"--model.tokenizer={tmp_path / 'tok'}"], "'model.tokenizer': .*no such file"),
        ([out, "--model.tokenizer="], "'model.tokenizer': a random-init policy"),
        ([out, f"--model.reference={tmp_path / 'ref'}"], "'model.reference': .*no such file"),
        ([out, f"--data.path={tmp_path / 'missing.jsonl'}"], "'data.path': file .*missing.jsonl' does not exist"),
        ([out, f"--data.eval_path={tmp_path / 'missing.jsonl'}"], "'data.eval_path': file .* does not exist"),
        ([out, "--data.path=", "--data.eval_path="], "'data.path': data source 'jsonl' needs a file"),
        ([out, "--resume"], "--resume: nothing to resume in .*: no complete checkpoint under"),
        ([out, f"--resume={tmp_path}"], "is not a complete checkpoint"),
        ([out, "--resume", "--overwrite"], "--resume continues the run in out_dir and --overwrite would delete it"),
    ]:
        refused(train_rho1.main, [cfg] + args, match)
    # a hub id: well-formed, but offline and not in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(train_rho1.main, [cfg, out, "--model.policy=no-such-org/no-such-model"],
            "'model.policy': model 'no-such-org/no-such-model': not a local path, and the Hugging Face hub could not")


def test_random_init_reference_with_another_vocabulary(setup, no_model_load, tmp_path):
    """A model-config .json reference has no tokenizer to compare: its vocab_size must be the policy's
    (the run used to die of an IndexError mid-forward)."""
    tmp, cfg = setup
    ref = json.loads((tmp / "model.json").read_text()) | {"vocab_size": 64}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    refused(train_rho1.main, [cfg, f"--out_dir={tmp_path / 'o'}", f"--model.reference={tmp_path / 'ref.json'}"],
            r"'model.reference': .*ref.json' has vocab_size 64 but the policy .* has 128")


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_data_errors_come_before_the_model_load(setup, no_model_load, tmp_path):
    _, cfg = setup
    out = f"--out_dir={tmp_path / 'o'}"
    good = {"prompt": "p", "completion": "c"}
    cases = [
        ([], "no usable rows \\(the file has no rows\\)"),
        ([good, {"prompt": "p"}], "row 2: field 'completion' is missing \\(set data.skip_bad_rows=true"),
        ([good, "{not json"], r"bad.jsonl:2: not valid JSON .*set data.skip_bad_rows=true to skip"),
        ([good, "[1, 2]"], r"bad.jsonl:2: expected a JSON object, got list"),
    ]
    for lines, match in cases:
        refused(train_rho1.main, [cfg, out, f"--data.path={_write(tmp_path / 'bad.jsonl', lines)}"], match)
    # {prompt, completion} rows read as MBPP, and MBPP rows read as {prompt, completion}: say which source they are
    refused(train_rho1.main, [cfg, out, "--data.source=mbpp"], "set data.source=jsonl")
    mbpp = _write(tmp_path / "mbpp.jsonl", [{"task_id": 601, "text": "t", "code": "x = 1", "test_list": []}])
    refused(train_rho1.main, [cfg, out, f"--data.path={mbpp}"], "field 'prompt' is missing; the rows look like "
                                                               "MBPP's: set data.source=mbpp")


def test_skip_bad_rows_skips_and_counts_malformed_json_lines(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, "{not json", "[1]",
                                      {"prompt": "p"}, {"prompt": "q", "completion": "d"}])
    rows, skipped = data.load_examples("jsonl", p, skip_bad_rows=True)
    assert [r["completion"] for r in rows] == ["c", "d"] and skipped == 3
    labelled = _write(tmp_path / "l.jsonl", [{"prompt": "p", "completion": "c", "passed": True}, "oops",
                                             {"prompt": "p", "completion": "d", "passed": False}])
    rows, skipped = data.load_labelled("jsonl", labelled, skip_bad_rows=True)
    assert len(rows) == 2 and skipped == 1
    mbpp = _write(tmp_path / "m.jsonl", [{"task_id": 601, "text": "t", "code": "x = 1", "test_list": ["assert x"]},
                                         "{broken"])
    rows, skipped = data.load_examples("mbpp", mbpp, "train", skip_bad_rows=True)
    assert len(rows) == 1 and skipped == 1


def test_critic_checks(setup, no_model_load, tmp_path):
    tmp, _ = setup
    base = [f"--model.policy={tmp / 'model.json'}", f"--model.tokenizer={tmp / 'tok'}", "--train.device=cpu",
            f"--value.out_dir={tmp_path / 'v'}", f"--train.out_dir={tmp_path / 'o'}", "--data.source=jsonl",
            f"--data.path={tmp / 'train.jsonl'}"]
    # all valid sources are listed, the offline demo's included
    refused(train_critic.main, base + ["--data.source=bogus"],
            r"'data.source': 'bogus' is not one of \['mbpp_mutants', 'mbpp', 'code_contests', 'samples', 'jsonl'\]")
    for args, match in [
        (["--value.micro_batch=0"], "'value.micro_batch' must be >= 1"),
        (["--value.global_batch=12", "--value.micro_batch=8"], "'value.global_batch' \\(12\\) must be a multiple"),
        (["--value.max_steps=0"], "'value.max_steps' must be >= 1"),
        (["--critic.beta=0"], "'critic.beta' must be > 0"),
        (["--critic.w_max=0.01"], "'critic.w_max' must be >= 0.1"),
        (["--critic.lam=2"], r"'critic.lam' must be in \[0, 1\]"),
        (["--data.eval_frac=1"], r"'data.eval_frac' must be in \[0, 1\)"),
        (["--model.n_heads=0"], "'model.n_heads' must be >= 1"),
        (["--train.max_steps=-1"], "'train.max_steps' must be >= 1"),
        (["--data.path="], "'data.path': data source 'jsonl' needs a file"),
        ([f"--data.path={tmp_path / 'nope.jsonl'}"], "'data.path': file .* does not exist"),
        ([f"--value.backbone={tmp_path / 'nope'}"], "'value.backbone': .*no such file"),
        ([f"--data.reward_model={tmp_path / 'nope'}"], "'data.reward_model': .*no such file"),
        (["--stages=policy", f"--critic.value_model={tmp_path}"], "'critic.value_model': .* is not a value-model directory"),
        ([f"--value.out_dir={tmp / 'model.json'}"], "'value.out_dir': .* is a file"),
        # a directory that never ran: that, not the value model stage 1 would have written
        (["--resume"], r"--resume: nothing to resume in .*/o: no complete checkpoint"),
    ]:
        refused(train_critic.main, base + args, match)
    # stage 1 would replace an earlier value model
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / train_critic.VALUE_CONFIG).write_text("{}")
    refused(train_critic.main, base, r"'value.out_dir': .* holds an earlier value model; use it with --stages=policy")


def test_eval_checks(setup, no_model_load, tmp_path):
    tmp, _ = setup
    ckpt = tmp / "tok"  # a directory with a config-less tokenizer: no model
    for args, match in [
        ([str(tmp_path / "no_such_checkpoint")], "'model': .*no such file or directory"),
        ([str(ckpt)], "'model': directory .* holds no model"),
        ([str(tmp / "model.json"), "--n_samples=0"], "'n_samples': must be >= 1"),
        ([str(tmp / "model.json"), "--task=humaneval", f"--data_path={tmp_path / 'he.jsonl.gz'}"],
         "'data_path': file .* does not exist"),
        ([str(tmp / "model.json"), "--workers=-1"], "'workers' must be >= 0"),
        ([str(tmp / "model.json"), "--top_p=0"], r"'top_p' must be in \(0, 1\]"),
        ([str(tmp / "model.json"), "--timeout=0"], "'timeout' must be > 0"),
        ([str(tmp / "model.json"), "--k=0", "--n_samples=2"], "'k': no k with 1 <= k <= n_samples=2 is left"),
        ([str(tmp / "model.json"), "--k=5", "--n_samples=2"], "'k': no k with 1 <= k <= n_samples=2 is left"),
        ([str(tmp / "model.json"), f"--out={tmp / 'model.json'}"], "'out': .* is a file"),
    ]:
        refused(ev.main, args, match)


def test_parse_errors_are_one_line_config_errors(setup, tmp_path):
    _, cfg = setup
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  n_heads: [4\ntrain: {max_steps: 3}\n")
    for argv, match in [([str(broken)], r"broken.yaml is not valid YAML: .*line"),
                        ([cfg, "--model.n_heads=[4"], r"--model.n_heads: cannot read '\[4' as a value"),
                        ([cfg, "--max_steps=ten"], "'train.max_steps': expected int"),
                        ([cfg, "--lr=fast"], "'train.lr': expected float"),
                        ([str(tmp_path / "missing.yaml")], "config file .* does not exist")]:
        with pytest.raises(config.ConfigError, match=match) as e:
            config.parse_config(train_rho1.Config, argv)
        assert "\n" not in str(e.value)


def test_a_number_for_a_string_key_is_its_text():
    # `speculate.py --batch_sizes=8` (one batch size) reads as the int 8; it was refused as
    # "expected str". A string key takes a number's text; a bool is still refused.
    from tools import speculate
    cfg = config.parse_config(speculate.SpeculateConfig, ["m", "--batch_sizes=8", "--out=7"], positional="model")
    assert (cfg.batch_sizes, cfg.out) == ("8", "7")
    with pytest.raises(config.ConfigError, match="'batch_sizes'"):
        config.parse_config(speculate.SpeculateConfig, ["m", "--batch_sizes=true"], positional="model")


@pytest.mark.parametrize("script, args, match", [
    ("train_rho1.py", ["--model.n_heads=0"], "config error: config key 'model.n_heads' must be >= 1"),
    ("train_rho1.py", ["--model.n_heads=[4"], "config error: --model.n_heads: cannot read"),
    ("train_rho1.py", ["--data.path=/nonexistent/train.jsonl"], "error: config key 'data.path': file"),
    ("train_rho1.py", ["--model.policy=org/name-not-cached"], "hub could not provide it"),
    ("train_critic.py", ["--data.source=bogus"], "'bogus' is not one of ['mbpp_mutants'"),
    ("eval.py", ["--n_samples=0"], "config error: config key 'n_samples'"),
])
def test_command_line_errors_are_one_line_exit_2_in_seconds(setup, tmp_path, script, args, match):
    tmp, cfg = setup
    if script == "eval.py":
        args = [tmp / "model.json"] + args
    elif script == "train_critic.py":
        args = [f"--model.policy={tmp / 'model.json'}", f"--model.tokenizer={tmp / 'tok'}"] + args
    else:
        args = [cfg, f"--out_dir={tmp_path / 'o'}"] + args
    code, out, seconds = cli(script, *args)
    assert code == 2, out
    assert out.strip().count("\n") == 0 and "Traceback" not in out, out
    assert match in out
    assert seconds < 30  # the interpreter and imports; no model is loaded


# ---- out_dir holding an earlier run ---------------------------------------------------------------

def test_fresh_run_refuses_an_earlier_runs_out_dir_unless_overwrite(setup, tmp_path):
    _, cfg = setup
    out = tmp_path / "out"
    args = [cfg, f"--out_dir={out}", "--max_steps=2"]
    (out / "final").mkdir(parents=True)
    (out / "final" / "old").write_text("the earlier run's export")
    with pytest.raises(config.ConfigError, match=r"holds an earlier run \(final/\); continue it with --resume, "
                                                 r"choose a new directory .*, or replace it with --overwrite"):
        train_rho1.main(args)
    (out / "checkpoints" / "step_00000050").mkdir(parents=True)  # an earlier, longer run's checkpoint
    with pytest.raises(config.ConfigError, match=r"checkpoints/step_00000050, final/"):
        train_rho1.main(args)
    train_rho1.main(args + ["--dry_run"])  # a dry run writes nothing: allowed
    assert (out / "final" / "old").exists()
    train_rho1.main(args + ["--overwrite", "--save_every=1", "--keep_last=5"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000001"]  # step 50 was not this run's
    assert not (out / "final" / "old").exists() and (out / "final" / "mtp_config.json").exists()


# ---- resume: the same model and loss, or a refusal naming what differs ----------------------------

def test_resume_refuses_another_model_or_loss(setup, tmp_path, no_model_load):
    _, cfg = setup
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_text("")
    run_cfg = common.run_config("rho1", config.parse_config(train_rho1.Config, [cfg]), train_rho1.RESUME_KEYS,
                                vocab_size=128)
    (ckpt / common.RUN_CONFIG).write_text(json.dumps(run_cfg))
    args = [cfg, f"--out_dir={out}", "--resume"]
    for extra, match in [(["--model.n_heads=2"], r"model.n_heads: 4 in the checkpoint, 2 now\); resume with the "
                                                 r"checkpoint's values \(--model.n_heads=4\)"),
                         (["--model.n_heads=6"], "model.n_heads: 4 in the checkpoint, 6 now"),
                         (["--rho1.ratio=0.5"], "rho1.ratio: 0.7 in the checkpoint, 0.5 now"),
                         (["--rho1.mode=soft"], "rho1.mode: 'hard' in the checkpoint, 'soft' now"),
                         (["--model.head_discount=0.5"], "model.head_discount"),
                         ([f"--model.reference={cfg.replace('run.yaml', 'model.json')}"], "model.reference")]:
        refused(train_rho1.main, args + extra, match)
    # the vocabulary is known once the model has loaded: checked then (load_checkpoint)
    with pytest.raises(config.ConfigError, match="vocab_size: 128 in the checkpoint, 32000 now"):
        common.check_resume(str(ckpt), run_cfg | {"identity": run_cfg["identity"] | {"vocab_size": 32000}})
    # a checkpoint of the other weighting
    critic_cfg = train_critic.run_config(config.parse_config(train_critic.Config, [
        f"--model.policy={run_cfg['config']['model.policy']}", f"--model.tokenizer={run_cfg['config']['model.tokenizer']}"]))
    with pytest.raises(config.ConfigError, match="weighting: 'rho1' in the checkpoint, 'critic' now"):
        common.check_resume(str(ckpt), critic_cfg)


def test_resume_with_another_schedule_says_so(setup, tmp_path, capsys):
    """A longer run continued from a checkpoint is a use, but its learning rate then follows the
    new schedule: one line says which keys changed."""
    _, cfg = setup
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    run_cfg = common.run_config("rho1", config.parse_config(train_rho1.Config, [cfg]), train_rho1.RESUME_KEYS)
    (ckpt / common.RUN_CONFIG).write_text(json.dumps(run_cfg))
    common.check_resume(str(ckpt), run_cfg)
    assert "learning-rate schedule" not in capsys.readouterr().err
    longer = common.run_config("rho1", config.parse_config(train_rho1.Config, [cfg, "--max_steps=10"]),
                               train_rho1.RESUME_KEYS)
    common.check_resume(str(ckpt), longer)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_steps=10 (the checkpoint's run had 8)" in err, err


def test_real_checkpoint_carries_its_config_and_refuses_a_mismatch(setup, tmp_path):
    _, cfg = setup
    out = tmp_path / "out"
    train_rho1.main([cfg, f"--out_dir={out}", "--max_steps=3", "--save_every=2"])
    saved = json.loads((out / "checkpoints" / "step_00000002" / common.RUN_CONFIG).read_text())
    assert saved["identity"]["model.n_heads"] == 4 and saved["identity"]["vocab_size"] == 128
    assert saved["identity"]["weighting"] == "rho1" and saved["config"]["train.save_every"] == 2
    code, log, seconds = cli("train_rho1.py", cfg, f"--out_dir={out}", "--resume", "--model.n_heads=2")
    assert code == 2 and "Traceback" not in log and "model.n_heads: 4 in the checkpoint, 2 now" in log, log


def test_pruning_never_deletes_another_runs_checkpoints(tmp_path, llama):
    model = mtp.MTPModel(llama, 2)
    opt, sched = common.adamw_cosine(model.parameters(), 1e-3, 0.0, (0.9, 0.95), 1, 10, 0.1, torch.device("cpu"))
    ours = {"identity": {"weighting": "rho1", "model.n_heads": 2}, "config": {}}
    theirs = {"identity": {"weighting": "rho1", "model.n_heads": 4}, "config": {}}
    common.save_checkpoint(str(tmp_path), 1, model, opt, sched, keep_last=1, run_cfg=theirs)
    for step in (2, 3, 4):
        common.save_checkpoint(str(tmp_path), step, model, opt, sched, keep_last=2, run_cfg=ours)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001", "step_00000003", "step_00000004"]
    # the same step again (after resuming from an earlier checkpoint) replaces it, no crash
    common.save_checkpoint(str(tmp_path), 3, model, opt, sched, keep_last=2, run_cfg=ours)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001", "step_00000003", "step_00000004"]


# ---- SIGTERM / SIGINT on a real training process ---------------------------------------------------

SLOW_STEPS = """
import sys, time
sys.path.insert(0, {repo!r})
import data
real = data.step_batches
def slow(*a, **k):  # every step announced and slowed down, so that a signal lands mid-run
    print(f"STEP {{a[1]}}", flush=True)
    time.sleep({seconds})
    return real(*a, **k)
data.step_batches = slow
import train_rho1
from support import config
config.run_main(train_rho1.main, sys.argv[1:])
"""


def start_slow(tmp_path, cfg, *args, seconds=0.3):
    driver = tmp_path / "slow.py"
    driver.write_text(SLOW_STEPS.format(repo=REPO, seconds=seconds))
    return subprocess.Popen([sys.executable, str(driver), cfg, *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(p, text, log):
    for line in p.stdout:
        log.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never came:\n{''.join(log)[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_gives_the_uninterrupted_weights(setup, tmp_path, sig):
    """The whole path for SIGTERM (what schedulers send); SIGINT up to the checkpoint."""
    _, cfg = setup
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    full = sig == signal.SIGTERM
    args = [f"--out_dir={tmp_path / 'stopped'}"] + (
        ["--mlflow.enabled=true", f"--mlflow.tracking_uri={db}", "--mlflow.experiment=sig"] if full else [])
    p = start_slow(tmp_path, cfg, *args)
    log = []
    read_until(p, "STEP 3", log)  # in the middle of the 8 steps
    p.send_signal(sig)
    log += p.stdout.readlines()
    p.wait(timeout=120)
    log = "".join(log)
    assert p.returncode == 128 + sig, log[-3000:]
    assert f"{sig.name}: stopping after this step with a checkpoint" in log
    (resume_line,) = [x for x in log.splitlines() if x.startswith("resume with: ")]
    cmd = shlex.split(resume_line[len("resume with: "):])
    assert cmd[:3] == ["python", "train_rho1.py", cfg] and cmd[-1].startswith("--resume=")
    ckpt = cmd[-1].split("=", 1)[1]
    step = int(ckpt.rsplit("_", 1)[1])
    assert 3 <= step < 8 and f"after step {step}: checkpoint {ckpt}" in log
    assert os.path.isfile(os.path.join(ckpt, ".metadata")) and os.path.isfile(os.path.join(ckpt, common.RUN_CONFIG))
    assert not os.path.exists(tmp_path / "stopped" / "final")
    if not full:
        return
    # the exact command printed, then the same run uninterrupted
    resumed = subprocess.run([sys.executable] + cmd[1:], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout
    straight = subprocess.run([sys.executable, "train_rho1.py", cfg, f"--out_dir={tmp_path / 'straight'}"],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for f in ("model.safetensors", model_io.MTP_HEADS):
        a, b = (load_file(str(tmp_path / d / "final" / f)) for d in ("stopped", "straight"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # MLflow: the interrupted run is KILLED, not FINISHED; the resumed one finished
    from mlflow.tracking import MlflowClient
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("sig").experiment_id], order_by=["attributes.start_time"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]


def test_second_signal_exits_at_once(setup, tmp_path):
    """A second signal exits at once, nothing written; one within a second of the first is the
    same signal delivered twice (SLURM signals every process of a step, torchrun forwards it)."""
    _, cfg = setup
    p = start_slow(tmp_path, cfg, f"--out_dir={tmp_path / 'out'}", seconds=2.0)
    log = []
    read_until(p, "STEP 1", log)
    p.send_signal(signal.SIGINT)
    read_until(p, "SIGINT: stopping after this step", log)
    time.sleep(1.2)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    log += p.stdout.readlines()
    p.wait(timeout=30)
    assert p.returncode == 130 and time.time() - t0 < 1.5, "".join(log)[-2000:]
    assert "SIGINT again: exiting at once, nothing saved" in "".join(log)
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
    # twice at once: one stop, with its checkpoint
    p = start_slow(tmp_path, cfg, f"--out_dir={tmp_path / 'twice'}", seconds=2.0)
    read_until(p, "STEP 1", log)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGTERM)
    log = "".join(p.stdout.readlines())
    p.wait(timeout=60)
    assert p.returncode == 143 and "exiting at once" not in log and "resume with:" in log, log[-2000:]
    assert (tmp_path / "twice" / "checkpoints" / "step_00000002").is_dir()
