"""tools/compare_arms.sh, the whole comparison matrix, with a stand-in for python that writes
each step's output: every arm gets its own flags, jobs alternate over the GPUs, a re-run skips
what finished and redoes (from scratch) what did not, and compare.py (run for real) tabulates
every arm."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stand-in for `python SCRIPT ARGS`: log the call, write the file the step is judged done by.
STUB = r'''#!/usr/bin/env bash
script=$1; shift
case $script in
  -c) exec "$REAL_PY" -c "$@";;
  -m) case $1 in tools.noisy_corpus|tools.rho1_probe) script="-m $1"; shift;; *) exec "$REAL_PY" -m "$@";; esac;;
esac
echo "$script $* GPU=$CUDA_VISIBLE_DEVICES" >> "$CALLS"
if [ "$script" = "-m tools.noisy_corpus" ]; then  # the marked corpus, its clean twin, the clean validation split
  for a in "$@"; do case $a in --out=*) d=${a#*=}; mkdir -p $d; echo '{}' > $d/noise.json
    for f in train train_clean validation; do echo '{"prompt": "p", "completion": "c"}' > $d/$f.jsonl; done;; esac; done
  exit 0
fi
if [ "$script" = "-m tools.rho1_probe" ]; then
  for a in "$@"; do case $a in --out=*) echo '{}' > ${a#*=};; esac; done
  exit 0
fi
task=humaneval; spec=0
for a in "$@"; do case $a in --task=*) task=${a#*=};; --speculative) spec=1;; esac; done
for a in "$@"; do case $a in
  --train.out_dir=*) d=${a#*=}; mkdir -p $d/final; echo '{"heldout_ce": [2.0, 4.0]}' > $d/final/mtp_config.json
    printf '{"step": 0, "heldout_ce": [2.5, 4.5]}\n{"step": 200, "heldout_ce": [2.0, %s]}\n' "$(( ${#d} % 7 )).5" > $d/heldout.jsonl;;
  --value.out_dir=*) d=${a#*=}; mkdir -p $d; echo '{}' > $d/value_config.json;;
  --out=*) d=${a#*=}; mkdir -p $d; echo '{}' > $d/samples.jsonl
    "$REAL_PY" -c "
import json, sys, zlib
d, task, spec = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
seed = zlib.crc32(d.encode())
res = {'task': task, 'n_samples': 10, 'model': 'x',
       'per_problem': {f'{task}/{i}': {'n': 10, 'correct': (seed >> i) % 3} for i in range(12)}}
if spec:
    res['speculative'] = {'tokens_per_forward': 1.5}
json.dump(res, open(d + '/results.json', 'w'))" "$d" "$task" "$spec";;
esac; done
'''


def run_script(tmp_path, **env):
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(0o755)
    run = tmp_path / "cmp"
    (run / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):  # the pinned stdlib export: step 0 is skipped
        (run / "data" / f"stdlib_{split}.jsonl").write_text('{"prompt": "def f():\\n", "completion": "  return 1\\n"}\n')
    e = dict(os.environ, RUN=str(run), PY=str(stub), REAL_PY=sys.executable, CALLS=str(tmp_path / "calls"),
             GPUS="2", SEEDS="1 2", MBPP="mbpp.jsonl")
    e.update(env)
    p = subprocess.run(["bash", "tools/compare_arms.sh", "/base"], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    (tmp_path / "calls").unlink(missing_ok=True)
    return run, calls, p.stdout


def test_matrix_flags_gpus_restart_and_table(tmp_path):
    run, calls, out = run_script(tmp_path)
    by_out = {c.split("--train.out_dir=")[1].split()[0].rsplit("/", 1)[1]: c for c in calls if "--train.out_dir=" in c}
    assert sorted(by_out) == sorted(["warm", "reference"] + [f"{a}-s{s}" for a in ("ntp", "mtp", "rho1", "random", "critic")
                                                            for s in (1, 2)])
    assert "--model.n_heads=1" in by_out["ntp-s1"] and "--model.policy=/base" in by_out["ntp-s1"]
    for arm in ("mtp", "rho1", "random", "critic"):  # every MTP arm starts from the shared head warm-up
        assert f"--model.policy={run}/warm/final" in by_out[f"{arm}-s2"] and "--model.n_heads=4" in by_out[f"{arm}-s2"]
    assert "--rho1.ratio=0.7" in by_out["rho1-s1"] and "--rho1.shuffle=true" not in by_out["rho1-s1"]
    assert "--rho1.ratio=0.7" in by_out["random-s1"] and "--rho1.shuffle=true" in by_out["random-s1"]
    assert by_out["critic-s1"].startswith("train_critic.py") and f"--critic.value_model={run}/value" in by_out["critic-s1"]
    assert all(f"--train.seed={s}" in by_out[f"{a}-s{s}"] for a in ("ntp", "critic") for s in (1, 2))
    # the same steps and schedule for every fine-tuned arm
    steps = {c.split("--train.max_steps=")[-1].split()[0] for n, c in by_out.items() if n not in ("warm", "reference")}
    assert steps == {"200"}
    evals = [c for c in calls if c.startswith("eval.py") and "--out=" in c and "/eval/" in c]
    assert len([c for c in evals if "--speculative" not in c]) == (1 + 5 * 2) * 2  # base + 5 arms x 2 seeds, 2 tasks
    assert len([c for c in evals if "--speculative" in c]) == 4  # the MTP arms, seed 1
    gpus = [c.rsplit("GPU=", 1)[1] for c in calls]
    assert set(gpus) == {"0", "1"} and abs(gpus.count("0") - gpus.count("1")) <= 1
    table = (run / "comparison.md").read_text()
    for arm in ("base", "ntp", "mtp", "rho1", "random", "critic"):
        assert f"| {arm} | humaneval |" in table and f"| {arm} | mbpp |" in table
    assert json.loads((run / "comparison_vs_base.json").read_text())["ref"] == "base"

    # a re-run does nothing new ...
    _, again, _ = run_script(tmp_path)
    assert again == []
    # ... except what an interrupted run left unfinished, which starts again from scratch
    os.remove(run / "rho1-s2" / "final" / "mtp_config.json")
    (run / "rho1-s2" / "checkpoints").mkdir()
    os.remove(run / "eval" / "critic-s1" / "mbpp" / "results.json")
    _, again, out = run_script(tmp_path)
    assert "restarting" in out and not (run / "rho1-s2" / "checkpoints").exists()
    assert len(again) == 2
    assert any(c.startswith("train_rho1.py") and f"--train.out_dir={run}/rho1-s2 " in c for c in again)
    assert any(c.startswith("eval.py") and f"--out={run}/eval/critic-s1/mbpp " in c for c in again)


def test_an_arm_subset_runs_only_the_shared_steps_it_needs(tmp_path):
    # next-token alone at n = 200 (the HumanEval run for the best arm): no head warm-up,
    # reference, critic labels or value model; pass@100 reaches the evaluation and the table
    run, calls, _ = run_script(tmp_path, ARMS="ntp", SEEDS="1", N="200", K="1,10,100", TASKS="humaneval")
    outs = sorted(c.split("--train.out_dir=")[1].split()[0].rsplit("/", 1)[1] for c in calls if "--train.out_dir=" in c)
    assert outs == ["ntp-s1"]
    assert not any("--value.out_dir=" in c or "/labels" in c for c in calls)
    evals = [c for c in calls if c.startswith("eval.py")]
    assert len(evals) == 2 and all("--n_samples=200" in c and "--k=1,10,100" in c for c in evals)
    assert "| ntp | humaneval |" in (run / "comparison.md").read_text()
    # rho1 alone needs the warm-up and the reference, not the critic's steps
    _, calls, _ = run_script(tmp_path, ARMS="rho1", SEEDS="1", TASKS="humaneval", SPEC_LIMIT="0")
    outs = sorted(c.split("--train.out_dir=")[1].split()[0].rsplit("/", 1)[1] for c in calls if "--train.out_dir=" in c)
    assert outs == ["reference", "rho1-s1", "warm"]
    assert not any("--value.out_dir=" in c for c in calls)


def test_the_noisy_corpus_control(tmp_path):
    """NOISE: the corpus with marked junk is made once, Rho-1's reference trains next-token on its
    clean twin, the probe scores the selection at the arms' start, every arm trains on the noisy
    corpus and is held out on the clean validation split; without TASKS no evaluation runs, and
    the held-out CE table and curves are written."""
    run, calls, _ = run_script(tmp_path, NOISE="lines:0.1,subst:0.1", ARMS="ntp mtp rho1 random", SEEDS="1 2",
                               TASKS="", SPEC_LIMIT="0", EVAL_EVERY="50")
    corpus = [c for c in calls if c.startswith("-m tools.noisy_corpus")]
    assert len(corpus) == 1 and f"--out={run}/data" in corpus[0] and "--noise=lines:0.1,subst:0.1" in corpus[0]
    by_out = {c.split("--train.out_dir=")[1].split()[0].rsplit("/", 1)[1]: c for c in calls if "--train.out_dir=" in c}
    assert f"--data.path={run}/data/train_clean.jsonl" in by_out["reference"] and "--model.n_heads=1" in by_out["reference"]
    for name in ("warm", "ntp-s1", "mtp-s2", "rho1-s1", "random-s2"):
        assert f"--data.path={run}/data/train.jsonl" in by_out[name] and f"--data.eval_path={run}/data/validation.jsonl" \
            in by_out[name] and "--train.eval_every=50" in by_out[name], name
    probe = [c for c in calls if c.startswith("-m tools.rho1_probe")]
    assert len(probe) == 1 and f"--model.reference={run}/reference/final" in probe[0] \
        and f"--model.policy={run}/warm/final" in probe[0] and f"--data.path={run}/data/train.jsonl" in probe[0]
    assert not any(c.startswith("eval.py") for c in calls)
    table = (run / "heldout_ce.md").read_text()
    assert all(f"| {arm} | 2 |" in table for arm in ("ntp", "mtp", "rho1", "random"))
    assert (run / "heldout_ce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_of_arm_variants(tmp_path):
    """An arm named KIND_NAME is arm KIND with the flags of ARGS_KIND_NAME last (so they win) and,
    for the MTP kinds, its own head warm-up length WARM_KIND_NAME (one warm-up per length); a plain
    arm keeps the shared warm-up; every variant is evaluated and tabulated under its own name."""
    run, calls, _ = run_script(tmp_path, ARMS="ntp ntp_lr1 mtp mtp_l01 mtp_w1k", SEEDS="1", TASKS="humaneval",
                               SPEC_LIMIT="0", ARGS_ntp_lr1="--train.lr=1e-5",
                               ARGS_mtp_l01="--model.head_discount=0.1 --train.lr=1e-5", WARM_mtp_w1k="1000")
    by_out = {c.split("--train.out_dir=")[1].split()[0].rsplit("/", 1)[1]: c for c in calls if "--train.out_dir=" in c}
    assert sorted(by_out) == ["mtp-s1", "mtp_l01-s1", "mtp_w1k-s1", "ntp-s1", "ntp_lr1-s1", "warm", "warm1000"]
    assert "--train.max_steps=1000 --train.heads_only_steps=1000" in by_out["warm1000"]
    assert "--train.max_steps=200 --train.heads_only_steps=200" in by_out["warm"]
    assert f"--model.policy={run}/warm1000/final" in by_out["mtp_w1k-s1"]
    assert f"--model.policy={run}/warm/final" in by_out["mtp_l01-s1"] and f"--model.policy={run}/warm/final" in by_out["mtp-s1"]
    # the variant's flags come after the shared ones, so the last --train.lr is the variant's
    assert by_out["mtp_l01-s1"].split("--train.lr=")[-1].split()[0] == "1e-5"
    assert "--model.head_discount=0.1" in by_out["mtp_l01-s1"] and "--model.head_discount" not in by_out["mtp-s1"]
    assert by_out["ntp_lr1-s1"].split("--train.lr=")[-1].split()[0] == "1e-5" and "--model.n_heads=1" in by_out["ntp_lr1-s1"]
    assert by_out["ntp-s1"].split("--train.lr=")[-1].split()[0] == "3e-5"
    table = (run / "comparison.md").read_text()
    for arm in ("base", "ntp", "ntp_lr1", "mtp", "mtp_l01", "mtp_w1k"):
        assert f"| {arm} | humaneval |" in table, arm


def test_a_value_model_from_elsewhere(tmp_path):
    """VALUE=DIR: the critic arm trains against that value model; neither the MBPP labels nor a
    value model of its own are made. A VALUE with no value model in it is refused before anything runs."""
    value = tmp_path / "suf400"
    value.mkdir()
    (value / "value_config.json").write_text("{}")
    run, calls, _ = run_script(tmp_path, ARMS="mtp critic_l01", SEEDS="1", TASKS="humaneval", SPEC_LIMIT="0",
                               VALUE=str(value), ARGS_critic_l01="--model.head_discount=0.1")
    assert not any("--value.out_dir=" in c or "/labels" in c for c in calls)
    critic = [c for c in calls if c.startswith("train_critic.py")]
    assert len(critic) == 1 and f"--critic.value_model={value} " in critic[0] + " "
    assert critic[0].split()[-2] == "--model.head_discount=0.1"  # the variant's flags last (then the stub's GPU=)
    assert "| critic_l01 | humaneval |" in (run / "comparison_vs_base.md").read_text()
    stub = tmp_path / "py"
    e = dict(os.environ, RUN=str(run), PY=str(stub), REAL_PY=sys.executable, CALLS=str(tmp_path / "calls"),
             GPUS="1", ARMS="critic", VALUE=str(tmp_path / "nowhere"))
    p = subprocess.run(["bash", "tools/compare_arms.sh", "/base"], cwd=REPO, env=e, capture_output=True, text=True)
    assert p.returncode == 2 and "no value model there" in p.stderr and not (tmp_path / "calls").exists(), p.stderr


def test_a_bad_arm_name_is_refused_before_anything_runs(tmp_path):
    for arms, words in (("ntp mtpp", "kind 'mtpp'"), ("mtp_l0.1", "letters, digits and _")):
        stub = tmp_path / "py"
        stub.write_text(STUB)
        stub.chmod(0o755)
        (tmp_path / "cmp" / "data").mkdir(parents=True, exist_ok=True)
        e = dict(os.environ, RUN=str(tmp_path / "cmp"), PY=str(stub), REAL_PY=sys.executable,
                 CALLS=str(tmp_path / "calls"), GPUS="1", ARMS=arms)
        p = subprocess.run(["bash", "tools/compare_arms.sh", "/base"], cwd=REPO, env=e, capture_output=True, text=True)
        assert p.returncode == 2 and words in p.stderr and not (tmp_path / "calls").exists(), p.stderr
