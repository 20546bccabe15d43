"""The repository's shape (docs/design.md §2): no import cycles, what the code cites exists, one
command-line dialect for every script, and the card's commands get past config parsing."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

import common
import eval as ev
import train_critic
import train_rho1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports() -> dict[str, set[str]]:
    mods = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(REPO, "*.py"))}
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for n in ast.walk(ast.parse(open(f).read())):
            names = ([a.name for a in n.names] if isinstance(n, ast.Import) else
                     [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else [])
            graph[m] |= {x.split(".")[0] for x in names if x.split(".")[0] in mods} - {m}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(c, b, seen + (a,)) for c in graph[a] if c not in seen)
    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == [], cycles
    # the layout of docs/design.md §2: the loss module depends on no other module of ours
    assert graph["mtp"] == set() and graph["sandbox"] == set()
    assert "eval" not in graph["data"]


def test_every_cited_design_section_exists():
    design = open(os.path.join(REPO, "docs", "design.md")).read()
    sections = set(re.findall(r"^## §(\d+)", design, flags=re.M))
    cited = set()
    for f in glob.glob(os.path.join(REPO, "*.py")) + [os.path.join(REPO, "README.md")]:
        text = open(f).read()
        assert "DESIGN.md" not in text, f"{f} cites a file the repository does not have"
        for group in re.findall(r"docs/design\.md (§[\d§\-, ]+)", text):
            cited |= set(re.findall(r"\d+", group))
    assert cited and cited <= sections, cited - sections


def test_one_config_file_serves_both_training_scripts(capsys):
    m3 = os.path.join(REPO, "configs", "m3.yaml")
    rho1 = common.parse_config(train_rho1.Config, [m3], ignore=train_rho1.CRITIC_ONLY_KEYS)
    critic = common.parse_config(train_critic.Config, [m3], ignore=train_critic.RHO1_ONLY_KEYS)
    assert rho1.rho1.ratio == 0.7 and critic.model.n_heads == rho1.model.n_heads == 4
    assert "ignoring ['rho1'" in capsys.readouterr().out  # said, not silent
    # a key of the other script is accepted; a key of neither is still an error naming it
    common.parse_config(train_critic.Config, [m3, "--rho1.ratio=0.5"], ignore=train_critic.RHO1_ONLY_KEYS)
    common.parse_config(train_rho1.Config, [m3, "--critic.beta=2"], ignore=train_rho1.CRITIC_ONLY_KEYS)
    with pytest.raises(common.ConfigError, match="unknown config key 'train.max_stepz'"):
        common.parse_config(train_critic.Config, [m3, "--train.max_stepz=1"], ignore=train_critic.RHO1_ONLY_KEYS)


def test_bare_resume_parses_in_both_scripts():
    assert common.parse_config(train_rho1.Config, ["--resume"]).resume is True
    assert common.parse_config(train_critic.Config, ["--resume"]).resume is True
    assert common.parse_config(train_critic.Config, ["--resume=out/x/checkpoints/step_00000002"]).resume.endswith("02")


def test_eval_uses_the_same_dialect(tmp_path):
    args = ev.parse_args(["some/model", "--task=mbpp", "--n_samples=3", "--k=1,2,5", "--limit=4"])
    assert (args.model, args.task, args.n_samples, args.k, args.limit) == ("some/model", "mbpp", 3, [1, 2], 4)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: m\ntask: humaneval\ntemperature: 0.2\nmlflow: {enabled: false}\n")
    args = ev.parse_args([str(cfg), "--n_samples=2"])
    assert (args.model, args.temperature, args.mlflow.enabled) == ("m", 0.2, False)
    with pytest.raises(common.ConfigError, match="unknown config key 'tsk'"):
        ev.parse_args(["m", "--tsk=mbpp"])
    with pytest.raises(common.ConfigError, match="'task'"):
        ev.parse_args(["m", "--task=humaneva"])
    with pytest.raises(common.ConfigError, match="write --task=humaneval"):  # the argparse spelling
        ev.parse_args(["m", "--task", "humaneval"])
    with pytest.raises(common.ConfigError, match="write --task=VALUE"):
        ev.parse_args(["m", "--task"])
    with pytest.raises(common.ConfigError, match="'n_samples'"):
        ev.parse_args(["m", "--n_samples=0"])


@pytest.mark.parametrize("script", ["train_rho1.py", "train_critic.py"])
def test_the_card_commands_get_past_config_parsing(script):
    """`python train_critic.py configs/m3.yaml` on this (non-Apple) machine: the config parses;
    then the first thing that cannot work here stops the run with a one-line message saying so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, script, "configs/m3.yaml", "--dry_run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "'mps' is not available" in out.stderr
    out = subprocess.run([sys.executable, script, "configs/m3.yaml", "--dry_run", "--train.device=cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "princeton-nlp/Sheared-LLaMA-1.3B" in out.stderr, out.stderr[-2000:]
    assert "hub could not provide it" in out.stderr and "unknown config key" not in out.stderr
