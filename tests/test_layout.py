"""The repository's shape (docs/design.md §2): the card's files at the top level and everything
else in folders named for what they are, imports going one way only, files and functions a
reader can hold in their head, a README that is a front door, `--help` on every entry point, one
command-line dialect, and nothing that reads outside the checkout."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

import eval as ev
import train_critic
import train_rho1
from support import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The card: what a reader opens to learn weighted MTP, plus the one plumbing module.
TOP_LEVEL = {"mtp", "data", "train_rho1", "train_critic", "eval", "common"}
FOLDERS = {"gpu_kernels", "support", "decoding", "tools"}
# Imports go from a higher layer to a lower one only (within a folder: no cycles):
#   gpu_kernels (Triton kernels, nothing of ours) < mtp (the loss and the model) < support, decoding (what the scripts use) <
#   common, data (plumbing) < the scripts < tools (measurements that drive the scripts).
LAYER = {"gpu_kernels": -1, "mtp": 0, "support": 1, "decoding": 1, "common": 2, "data": 2,
         "train_rho1": 3, "train_critic": 3, "eval": 3, "tools": 4}
# Files on the training, evaluation and decoding paths, whose functions must stay short.
READ_PATH = ["mtp.py", "data.py", "common.py", "train_rho1.py", "train_critic.py", "eval.py",
             "decoding/sampling.py", "decoding/speculative.py", "decoding/parallel_heads.py",
             "support/model_io.py", "support/metrics.py"]
MAX_FUNCTION_LINES = 120
ENTRY_POINTS = [["train_rho1.py"], ["train_critic.py"], ["eval.py"], ["-m", "tools.bench"],
                ["-m", "tools.compare"], ["-m", "tools.speculate"]]


def _modules() -> dict[str, str]:
    """Every Python module of the project (not tests) -> its file, by dotted name."""
    out = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(REPO, "*.py"))}
    for d in FOLDERS:
        out |= {f"{d}.{os.path.basename(f)[:-3]}": f for f in glob.glob(os.path.join(REPO, d, "*.py"))
                if not f.endswith("__init__.py")}
    return out


def _imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file, lazily imported ones too)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for n in ast.walk(ast.parse(open(f).read())):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            else:
                continue
            graph[m] |= {x for x in names if x in mods} - {m}
    return graph


def _layer(module: str) -> int:
    return LAYER[module.split(".")[0]]


def test_the_top_level_is_the_card():
    top = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "*.py"))}
    assert top == TOP_LEVEL
    assert {d for d in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, d, "__init__.py"))} == FOLDERS
    for f in ("README.md", "requirements.txt", "data/mbpp.jsonl", "data/README.md"):
        assert os.path.isfile(os.path.join(REPO, f)), f


def test_imports_go_down_the_layers_and_never_around_in_a_circle():
    graph = _imports()
    upward = sorted(f"{a} -> {b}" for a in graph for b in graph[a]
                    if _layer(b) > _layer(a) or (_layer(b) == _layer(a) and a.split(".")[0] != b.split(".")[0]))
    assert upward == []

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(c, b, seen + (a,)) for c in graph[a] if c not in seen)
    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == []
    # the loss stands alone but for its GPU kernel; the sandbox imports only its own fork server, which
    # imports nothing of ours
    assert graph["mtp"] == {"gpu_kernels.cross_entropy"} and graph["gpu_kernels.cross_entropy"] == set()
    assert graph["support.sandbox"] == {"support.sandbox_server"}
    assert graph["support.sandbox_server"] == set()


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The layering check can fail: a support module importing a script is caught."""
    bad = tmp_path / "support"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    (bad / "oops.py").write_text("import train_rho1\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    for name in ("mtp.py", "train_rho1.py"):
        (tmp_path / name).write_text("")
    graph = _imports()
    assert graph["support.oops"] == {"train_rho1"} and _layer("train_rho1") > _layer("support.oops")


def test_files_and_functions_a_reader_can_hold():
    assert sum(1 for _ in open(os.path.join(REPO, "mtp.py"))) <= 800
    long = []
    for rel in READ_PATH:
        tree = ast.parse(open(os.path.join(REPO, rel)).read())
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_the_mtp_module_opens_with_the_specification():
    """mtp.py's first function of substance is the plain weighted MTP loss the fused one must equal."""
    tree = ast.parse(open(os.path.join(REPO, "mtp.py")).read())
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert names.index("weighted_mtp_loss") < names.index("MTPModel") < names.index("weighted_ce")


def test_the_readme_is_a_front_door():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert readme.count("\n") <= 300
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert links, "README links to the detail in docs/"
    missing = [p for p in links if not os.path.isfile(os.path.join(REPO, p))]
    assert missing == []
    for page in glob.glob(os.path.join(REPO, "docs", "*.md")) + [os.path.join(REPO, "README.md")]:
        text = open(page).read()
        assert not re.search(r"\bissue \d+|\bissues? #?\d+", text, flags=re.I), f"{page} speaks of issue numbers"


def test_nothing_reads_outside_the_checkout():
    """A user's clone has nothing beside it: no code, config or script may read the folder that
    lies next to the engineers' checkout (its name is spelled in two parts so this test is no hit)."""
    beside = re.compile(r"\.\./" + "shar" + r"ed\b")
    files = [f for pat in ("*.py", "*/*.py", "configs/*.yaml", "tools/*.sh") for f in glob.glob(os.path.join(REPO, pat))]
    offenders = [os.path.relpath(f, REPO) for f in files if "tests" not in f and beside.search(open(f).read())]
    assert offenders == []


def test_every_cited_design_section_exists():
    design = open(os.path.join(REPO, "docs", "design.md")).read()
    sections = set(re.findall(r"^## §(\d+)", design, flags=re.M))
    cited = set()
    for f in list(_modules().values()) + [os.path.join(REPO, "README.md")]:
        text = open(f).read()
        assert "DESIGN.md" not in text, f"{f} cites a file the repository does not have"
        for group in re.findall(r"docs/design\.md (§[\d§\-, ]+)", text):
            cited |= set(re.findall(r"\d+", group))
    assert cited and cited <= sections, cited - sections


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e[-1])
def test_help_lists_every_key_with_its_default_and_meaning(entry):
    out = subprocess.run([sys.executable, *entry, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: python ") and "Traceback" not in out.stderr
    keys = re.findall(r"^  --([\w.]+)  (.+?) = (.*)$", out.stdout, flags=re.M)
    assert len(keys) >= 5
    lines = out.stdout.split("\n")
    for i, line in enumerate(lines):
        if re.match(r"^  --[\w.]+  ", line):  # every key is followed by its meaning, indented
            assert i + 1 < len(lines) and lines[i + 1].startswith(" " * 8) and lines[i + 1].strip(), line
    short = subprocess.run([sys.executable, *entry, "-h"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert short.returncode == 0 and short.stdout == out.stdout


def test_help_shows_this_scripts_defaults():
    text = config.config_help(train_rho1.Config)
    assert "  --train.out_dir  str = out/rho1\n" in text and "  --rho1.ratio  float = 0.7\n" in text
    assert "        fraction of tokens kept per head" in text
    critic = config.config_help(train_critic.Config)
    assert "  --train.out_dir  str = out/critic\n" in critic and "  --value.lr  float = 0.0001\n" in critic


def test_a_misspelt_key_names_the_key_meant():
    with pytest.raises(config.ConfigError, match=r"unknown config key 'train.max_stepz'; did you mean 'train.max_steps'\?"):
        config.parse_config(train_rho1.Config, ["--train.max_stepz=1"])
    with pytest.raises(config.ConfigError, match=r"unknown config key 'max_stepz'; did you mean 'train.max_steps'\?"):
        config.parse_config(train_rho1.Config, ["--max_stepz=1"])
    with pytest.raises(config.ConfigError, match=r"unknown config key 'zzz'; valid keys"):
        config.parse_config(train_rho1.Config, ["--zzz=1"])


def test_one_config_file_serves_both_training_scripts(capsys):
    m3 = os.path.join(REPO, "configs", "m3.yaml")
    rho1 = config.parse_config(train_rho1.Config, [m3], ignore=train_rho1.CRITIC_ONLY_KEYS)
    critic = config.parse_config(train_critic.Config, [m3], ignore=train_critic.RHO1_ONLY_KEYS)
    assert rho1.rho1.ratio == 0.7 and critic.model.n_heads == rho1.model.n_heads == 4
    assert "ignoring ['rho1'" in capsys.readouterr().out  # said, not silent
    # a key of the other script is accepted; a key of neither is still an error naming it
    config.parse_config(train_critic.Config, [m3, "--rho1.ratio=0.5"], ignore=train_critic.RHO1_ONLY_KEYS)
    config.parse_config(train_rho1.Config, [m3, "--critic.beta=2"], ignore=train_rho1.CRITIC_ONLY_KEYS)
    with pytest.raises(config.ConfigError, match="unknown config key 'train.max_stepz'"):
        config.parse_config(train_critic.Config, [m3, "--train.max_stepz=1"], ignore=train_critic.RHO1_ONLY_KEYS)


def test_bare_resume_parses_in_both_scripts():
    assert config.parse_config(train_rho1.Config, ["--resume"]).resume is True
    assert config.parse_config(train_critic.Config, ["--resume"]).resume is True
    assert config.parse_config(train_critic.Config, ["--resume=out/x/checkpoints/step_00000002"]).resume.endswith("02")


def test_eval_uses_the_same_dialect(tmp_path):
    args = ev.parse_args(["some/model", "--task=mbpp", "--n_samples=3", "--k=1,2,5", "--limit=4"])
    assert (args.model, args.task, args.n_samples, args.k, args.limit) == ("some/model", "mbpp", 3, [1, 2], 4)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: m\ntask: humaneval\ntemperature: 0.2\nmlflow: {enabled: false}\n")
    args = ev.parse_args([str(cfg), "--n_samples=2"])
    assert (args.model, args.temperature, args.mlflow.enabled) == ("m", 0.2, False)
    with pytest.raises(config.ConfigError, match="unknown config key 'tsk'"):
        ev.parse_args(["m", "--tsk=mbpp"])
    with pytest.raises(config.ConfigError, match="'task'"):
        ev.parse_args(["m", "--task=humaneva"])
    with pytest.raises(config.ConfigError, match="write --task=humaneval"):  # the argparse spelling
        ev.parse_args(["m", "--task", "humaneval"])
    with pytest.raises(config.ConfigError, match="write --task=VALUE"):
        ev.parse_args(["m", "--task"])
    with pytest.raises(config.ConfigError, match="'n_samples'"):
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
