"""Activation checkpointing (common.py): every mode gives the same loss and gradients as the float64
specification; what each mode keeps, measured; the memory model's static part against a hand count;
the budget picker on hand-made numbers; the config keys; FSDP2; and bench.py's budget tables."""
import math
import types

import pytest
import torch
from conftest import tiny_llama

import common
import mtp
from support import config, memory
from tools import bench

pytestmark = pytest.mark.usefixtures("one_thread")

GiB = 2 ** 30
# (full, selective) trunk blocks of a 5-layer model's 4: each mode, and a mix auto can pick
PLANS = {"off": (0, 0), "selective": (0, 4), "partial": (2, 0), "full": (4, 0), "mixed": (1, 2)}


def _model(layers=5, n=3, dtype=torch.float64):
    model = mtp.MTPModel(tiny_llama(layers=layers, dtype=dtype), n, sequential_heads=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # heads that differ, so that a mix-up of heads would show
        for p in model.extra_heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.train()


def _problem(n=3, B=3, T=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[:, :3] = 0  # a prompt
    valid = mtp.align_to_heads(mask, n)
    w = torch.rand(n, B, T, generator=g, dtype=torch.float64)
    lam = mtp.head_lambdas(n, 0.8)
    coef = mtp.loss_coefficients(w, valid, (w * valid).flatten(1).sum(1), lam.double())
    return x, mtp.align_to_heads(x, n), coef, (w, valid, lam)


@pytest.mark.parametrize("name", PLANS)
def test_every_mode_gives_the_float64_reference_loss_and_gradients(name):
    """Sequential heads, 3 heads, 4 trunk blocks under the plan, against mtp.weighted_mtp_loss
    (every head's logits at once) on an identical model without checkpointing; and each
    checkpointed block really runs its forward again in the backward."""
    model, ref = _model(), _model()
    plan = memory.CheckpointPlan(4, *PLANS[name])
    memory.apply_checkpointing(model, plan)
    trunk = memory.trunk_of(model)
    assert [b.checkpoint_mode for b in trunk] == list(plan.modes())
    calls = [0] * len(trunk)
    for i, b in enumerate(trunk):  # the MLP starts once per forward of its block, recomputation included
        # (a pre-hook: the recomputation stops as soon as it has made what the backward needs)
        b.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, targets, coef, (w, valid, lam) = _problem()
    loss, *_ = model(x, targets, coef=coef, chunk_size=5)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert calls == [1 + (m != "off") for m in plan.modes()]

    hiddens, _ = ref.hidden_states(x, use_cache=False)
    naive = mtp.weighted_mtp_loss(hiddens, ref.lm_head_weight, targets, w, valid, lam)
    naive_grads = torch.autograd.grad(naive, list(ref.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, naive, rtol=1e-12, atol=1e-12)
    for (pname, _), g, ng in zip(model.named_parameters(), grads, naive_grads):
        torch.testing.assert_close(g, ng, rtol=1e-9, atol=1e-12, msg=pname)


def test_what_each_mode_keeps_per_token():
    """Measured bytes per token of a tiny Llama block (hidden 32, 4 heads of 8, 2 KV heads, MLP 64),
    fp32, by hand: full keeps only its output (the next block's input); selective the outputs of
    the seven matmuls (q 32, k 16, v 16, o 32, gate 64, up 64, down 32), of attention (32, and its
    log-sum-exp, 4 heads x fp32) and the output; off more than that."""
    model = _model(dtype=torch.float32)
    per_token, trunk_input = memory.measure_activations(model, "cpu", max_len=64)
    assert per_token["full"] == 32 * 4 and trunk_input == 32 * 4
    assert per_token["selective"] == (256 + 32 + 32) * 4 + 4 * 4
    assert per_token["off"] > 1.5 * per_token["selective"]
    bf16, _ = memory.measure_activations(model, "cpu", amp_dtype=torch.bfloat16, max_len=64)
    assert bf16["full"] == 32 * 4 and bf16["selective"] < per_token["selective"]  # bf16 matmul outputs


def _compiled_matmuls(mode):
    """(forward, backward) aten.mm counts of one tiny Llama block compiled as training compiles it
    (block.compile()), partitioned by the min-cut partitioner Inductor uses, with `mode` set."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    counts = {"fw": 0, "bw": 0}

    def count(tag):
        def compiler(gm, _):
            counts[tag] += sum(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes)
            return gm.forward
        return compiler

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=count("fw"), bw_compiler=count("bw"),
                                     partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    model = tiny_llama(layers=1).train()
    memory.checkpoint_block(model.model.layers[0], mode)
    model.model.layers[0].compile(backend=backend)
    model(torch.randint(0, 97, (2, 16)), use_cache=False).logits.sum().backward()
    torch._dynamo.reset()
    return counts["fw"], counts["bw"]


def test_compiled_selective_blocks_recompute_no_matmul():
    """The SAC policy must survive torch.compile: a compiled selective block's backward runs its
    7 matmuls' gradients (2 each) and none of them again, as off does; a full one recomputes them.
    Fails when the checkpoint is not traced inside the compiled block: with transformers' own
    switch on a version that checkpoints `__call__` (5.17, the H200 stack's), or with a graph break
    at the checkpoint (the `kernels` package's context variable, without _trace_checkpoints_whole)."""
    fw, off = _compiled_matmuls("off")
    assert fw == 7 and off == 14
    assert _compiled_matmuls("selective") == (7, 14)
    assert _compiled_matmuls("full")[1] > 14


def test_the_probe_counts_what_each_compiled_mode_recomputes():
    """tools/ckpt_probe.py on 2 tiny blocks, compiled: selective's backward runs off's matmuls (the
    gradients of 2 x 7) and full's runs more (the forward's again) -- the profiler's count, not the
    graph's (test above), so the tool tells the same on any stack it is run on."""
    from tools import ckpt_probe
    cfg = ckpt_probe.ProbeConfig(hidden=32, inter=64, heads=4, kv_heads=2, batch=1, seq=16, steps=1)
    mm = {m: ckpt_probe.probe(cfg, m, True, torch.device("cpu"), torch.float32)["mm"] for m in ("off", "selective", "full")}
    assert mm["off"] == mm["selective"] == 28 and mm["full"] > 28


def _hand_model(**kw):
    """A memory model with round numbers: 4 trunk blocks keeping 1 / 0.5 / 0.1 GiB (off / selective /
    full) for one token, 10 GiB static, nothing else, no margin."""
    return memory.MemoryModel(static={"weights": 10 * GiB}, per_token={"off": GiB, "selective": GiB / 2, "full": GiB / 10},
                              input_per_token=0, tokens=1, heads_alive=1, head_extra=0, loss=0, **kw)


@pytest.mark.parametrize("budget, full, selective", [
    (100, 0, 0),     # off: 10 + 4 x 1 + 1 (the head inside the loss) = 15
    (15, 0, 0),
    (14.7, 0, 1),    # each selective block: -0.5 GiB for 0.1 block forwards of recomputation
    (14, 0, 2),
    (13, 0, 4),      # all selective: 13
    (12.9, 1, 3),    # then each full block instead of a selective one: -0.4 GiB for 0.9 more
    (12.2, 2, 2),
    (11.4, 4, 0),    # all full: 11.4, the smallest
])
def test_auto_picks_the_least_recomputation_that_fits(monkeypatch, budget, full, selective):
    monkeypatch.setattr(memory, "MARGIN_FRACTION", 0.0)
    monkeypatch.setattr(memory, "MARGIN_BYTES", 0.0)
    mem = _hand_model()
    plan = memory.pick_checkpointing(mem, 4, budget)
    assert (plan.full, plan.selective) == (full, selective)
    assert mem.total(plan) <= budget * GiB


def test_a_budget_below_the_smallest_is_one_line_naming_both(monkeypatch):
    monkeypatch.setattr(memory, "MARGIN_FRACTION", 0.0)
    monkeypatch.setattr(memory, "MARGIN_BYTES", 0.0)
    with pytest.raises(config.ConfigError) as e:
        memory.pick_checkpointing(_hand_model(), 4, 11.3)
    msg = str(e.value)
    assert "\n" not in msg and "train.memory_budget_gb" in msg and "11.3 GB" in msg and "11.4 GB" in msg
    assert memory.pick_checkpointing(_hand_model(), 4, 0) == memory.CheckpointPlan(4)  # no budget: off


def test_the_margin_and_the_printed_sum():
    """margin = 10% of activations + loss, plus 0.25 GiB; the start-up line's parts add up."""
    mem = _hand_model()
    plan = memory.CheckpointPlan(4)
    assert mem.margin(plan) == pytest.approx(0.1 * 5 * GiB + 0.25 * GiB)
    line = mem.describe(plan)
    total = float(line.split(" GB = ")[0].split()[-1])
    parts = [float(p.split()[-1]) for p in line.split(" GB = ")[1].split(";")[0].split(" + ")]
    assert total == pytest.approx(sum(parts), abs=0.02) and total == pytest.approx(mem.total(plan) / GiB, abs=0.01)


def test_auto_on_the_measured_model_around_each_modes_estimate():
    """On a real (measured) tiny model: for budgets at and between the estimates of off, selective
    and full, the pick fits and no plan of less recomputation does."""
    model = _model(dtype=torch.float32)
    mem = memory.memory_model(model, {}, "cpu", torch.float32, micro_batch=64, seq_len=64)
    plans = [memory.CheckpointPlan(4, f, s) for f in range(5) for s in range(5 - f)]
    est = {m: mem.total(memory.CheckpointPlan.of(m, 4)) / GiB for m in ("off", "selective", "full")}
    assert est["off"] > est["selective"] > est["full"]
    for budget in (est["off"], (est["off"] + est["selective"]) / 2, est["selective"],
                   (est["selective"] + est["full"]) / 2, est["full"]):
        pick = memory.pick_checkpointing(mem, 4, budget)
        assert mem.total(pick) <= budget * GiB
        assert not [p for p in plans if p.cost < pick.cost and mem.total(p) <= budget * GiB]


class _Peak(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes alive at once among the storages the ops create while it is active (each
    counted until its storage is freed): a CPU step's peak, as the CUDA allocator would report it.
    Views of the `known` tensors (the parameters' .t() in every linear, W.detach() in the loss,
    the optimizer's states) are not new memory: their storages are not counted."""

    def __init__(self, known=()):
        super().__init__()
        self.now = self.peak = 0
        self.seen = {id(t.untyped_storage()) for t in known}

    def _freed(self, n, key):
        self.now -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self.seen:
                self.seen.add(id(s))
                self.now += s.nbytes()
                weakref.finalize(s, self._freed, s.nbytes(), id(s))
        self.peak = max(self.peak, self.now)
        return out


def _step_peak(n, plan_of, sequential=True, heads=False, B=4, T=64, vocab=500):
    """(measured peak of a whole training step -- forward, backward, AdamW -- after a first one,
    the memory model's total without its margin) for a 6-layer Llama of hidden 64."""
    model = mtp.MTPModel(tiny_llama(layers=6, hidden=64, vocab=vocab), n, sequential_heads=sequential and n > 1).train()
    plan = memory.CheckpointPlan(5, *plan_of, heads=heads)
    memory.apply_checkpointing(model, plan)
    mem = memory.memory_model(model, {}, "cpu", torch.float32, B, T)
    opt, _ = common.adamw_cosine(model.parameters(), 1e-3, 0.1, (0.9, 0.95), 1, 10, 0.1, torch.device("cpu"))
    x = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    valid = mtp.align_to_heads(torch.ones(B, T, dtype=torch.long), n)
    coef = mtp.loss_coefficients(valid.float(), valid, valid.flatten(1).sum(1).float(), mtp.head_lambdas(n))
    for _ in range(2):  # the second step: AdamW's states exist from the start, as in a run
        peak = _Peak([*model.parameters(), *(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)),
                      x, valid, coef])
        with peak:
            model(x, mtp.align_to_heads(x, n), coef=coef)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    held = sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return held + peak.peak, mem.total(plan) - mem.margin(plan)


@pytest.mark.parametrize("n,sequential,heads", [(3, True, False), (1, True, False), (3, False, False), (3, True, True),
                                                (1, True, True)],
                         ids=["4-head-seq", "next-token", "4-head-all-at-once", "4-head-seq-ckpt-heads", "next-token-ckpt-head"])
def test_the_model_bounds_a_real_steps_peak(n, sequential, heads):
    """A real step's peak (every storage the ops create, counted while alive) is below the memory
    model without its margin, by less than 15% (a model that counted a head's activations twice
    read 27% over for one head); and, the heads not checkpointed, what a plan saves against another
    -- the part the picker chooses by -- is what the step saves, within 2% (with them: 4-8% more)."""
    got = {name: _step_peak(n, PLAN5[name], sequential, heads) for name in PLAN5}
    for name, (measured, model) in got.items():
        assert measured <= model < 1.15 * measured, name
    for name in ("selective", "full", "mixed") if not heads else ():
        saved = got["off"][0] - got[name][0], got["off"][1] - got[name][1]
        assert saved[1] == pytest.approx(saved[0], rel=0.02), name


PLAN5 = {"off": (0, 0), "selective": (0, 5), "full": (5, 0), "mixed": (2, 3)}


def _count(*modules, only=lambda p: True):
    return sum(p.numel() for m in modules for p in m.parameters() if only(p))


def test_static_part_is_a_hand_count():
    """Tiny Llama, 3 blocks of hidden 32 (q, o 32x32; k, v 32x16; gate, up, down 32x64; two norms of
    32) = 9280 parameters, vocab 97 (embedding and unembedding 97x32 each), final norm 32, 2 heads
    (one extra block): 43360 fp32 parameters."""
    model = _model(layers=3, n=2, dtype=torch.float32)
    block, matmuls, n_params = 9280, 9280 - 64, 97 * 32 * 2 + 32 + 4 * 9280
    assert _count(model) == n_params
    parts = memory.static_memory(model, {}, torch.bfloat16)
    assert parts == {"weights": 4 * n_params, "gradients": 4 * n_params, "AdamW states": 8 * n_params}
    ref = tiny_llama(layers=3)
    parts = memory.static_memory(model, {"reference": ref, "none": None}, torch.bfloat16, amp=True)
    assert parts["reference"] == 2 * (97 * 32 * 2 + 32 + 3 * block)  # frozen, in the compute dtype
    assert parts["autocast copies"] == 2 * 4 * matmuls  # bf16 copies of the 4 blocks' matmul weights
    # the top only: head 0, the extra head, the final norm and the unembedding train
    common.train_top_only(model, 1)
    trained = 2 * block + 32 + 97 * 32
    assert memory.static_memory(model, {}, torch.bfloat16)["AdamW states"] == 8 * trained
    # FSDP2 over 2 ranks: shards of all that, plus the root group (embedding, norm, unembedding and,
    # with sequential heads, both heads) and two trunk blocks, unsharded in bf16
    parts = memory.static_memory(model, {}, torch.bfloat16, world=2)
    assert parts["weights"] == 2 * n_params and parts["gradients"] == 2 * trained
    assert parts["FSDP unsharded"] == 2 * (97 * 32 * 2 + 32 + 2 * block + 2 * block)


def test_static_part_equals_the_tensors_after_a_step():
    """... and what the optimizer and autograd really allocate (memory_report's count)."""
    model = _model(layers=3, n=2, dtype=torch.float32)
    opt, _ = common.adamw_cosine(model.parameters(), 1e-3, 0.1, (0.9, 0.95), 1, 10, 0.1, torch.device("cpu"))
    x, targets, coef, _ = _problem(n=2)
    model(x, targets, coef=coef)[0].backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    opt.step()
    states = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    parts = memory.static_memory(model, {}, torch.float32)
    assert (parts["gradients"], parts["AdamW states"]) == (grads, states)


def _cfg(**train):
    t = common.TrainConfig(micro_batch=2, **train)
    return types.SimpleNamespace(train=t, model=types.SimpleNamespace(grad_checkpointing=False, checkpoint_heads=False),
                                 data=types.SimpleNamespace(max_seq_len=32))


CPU = common.Dist(0, 1, torch.device("cpu"), None)


def test_setup_from_the_config_says_the_choice_and_the_numbers():
    model, said = _model(dtype=torch.float32), []
    plan = memory.setup_checkpointing(model, _cfg(memory_budget_gb=100), CPU, torch.float32, {}, said.append)
    assert plan == memory.CheckpointPlan(4) and len(said) == 2  # a large budget: nothing recomputed
    assert said[0].startswith("activation checkpointing: off (all 4 trunk blocks) -- train.checkpointing=auto, budget 100")
    assert said[1].startswith("memory model: ") and "per token a trunk block keeps off " in said[1]
    plan = memory.setup_checkpointing(model, _cfg(checkpointing="partial", checkpoint_blocks=3), CPU, torch.float32,
                                      {}, said.append)
    assert plan == memory.CheckpointPlan(4, 3) and said[2] == ("activation checkpointing: partial (3 full, 1 off of 4 "
                                                               "trunk blocks) -- train.checkpointing=partial")
    assert [b.checkpoint_mode != "off" for b in memory.trunk_of(model)] == [True, True, True, False]
    with pytest.raises(config.ConfigError, match=r"0.1 GB is below the smallest .*, 0\.3 GB"):
        memory.setup_checkpointing(model, _cfg(memory_budget_gb=0.1), CPU, torch.float32, {}, said.append)


def test_the_legacy_keys_and_the_checks():
    cfg = _cfg()
    cfg.model.grad_checkpointing = cfg.model.checkpoint_heads = True
    assert memory.checkpointing_mode(cfg.train, cfg.model)[:2] == ("full", True)  # old configs: full
    cfg.train.memory_budget_gb = 24  # a budget under auto supersedes it
    assert memory.checkpointing_mode(cfg.train, cfg.model)[:2] == ("auto", False)
    cfg.train.checkpointing = "selective"
    with pytest.raises(config.ConfigError, match="drop model.grad_checkpointing"):
        memory.checkpointing_mode(cfg.train, cfg.model)
    t = config.parse_config(common.TrainConfig, ["--checkpointing=off", "--memory_budget_gb=24"])
    common.check_train(t, 1, "", True, writes=False)
    assert (t.checkpointing, t.memory_budget_gb) == ("off", 24.0)  # YAML's false for a bare off
    for argv, key in ((["--checkpointing=partial"], "checkpoint_blocks"), (["--checkpointing=some"], "checkpointing"),
                      (["--memory_budget_gb=-1"], "memory_budget_gb")):
        with pytest.raises(config.ConfigError, match=key):
            common.check_train(config.parse_config(common.TrainConfig, argv), 1, "", True, writes=False)
    with pytest.raises(config.ConfigError, match="choose 1..4"):
        memory.CheckpointPlan.of("partial", 4, 5)


def test_frozen_lower_blocks_are_not_planned():
    """model.train_layers=3: blocks 2..4 train (head 0 is block 4), so the trunk's blocks 0 and 1
    keep nothing for a backward and only blocks 2 and 3 are planned."""
    model = _model(dtype=torch.float32)
    common.train_top_only(model, 3)
    _, blocks, _ = mtp.find_blocks(model.base)
    assert memory.trunk_of(model) == list(blocks)[2:4]


def test_under_fsdp2(tmp_path):
    """fully_shard over the checkpointed blocks (one rank, gloo): the same loss and gradients."""
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        dist = common.Dist(0, 1, torch.device("cpu"), tdist.group.WORLD)
        out = {}
        for name in ("off", "mixed"):
            model = _model()
            memory.apply_checkpointing(model, memory.CheckpointPlan(4, *PLANS[name]))
            model, _ = common.prepare_for_training(model, None, dist, torch.float64)
            x, targets, coef, _ = _problem()
            loss, *_ = model(x, targets, coef=coef)
            loss.backward()
            out[name] = loss.detach(), [p.grad.full_tensor() for p in model.parameters()]
        torch.testing.assert_close(out["mixed"][0], out["off"][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(out["mixed"][1], out["off"][1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # reduce-scattered in fp32
    finally:
        tdist.destroy_process_group()


# ---- bench.py --budgets --------------------------------------------------------------------------

def _row(variant, setting, tok_s, peak, vocab=32000):
    return {"variant": variant, "setting": setting, "tok_s": tok_s, "peak_gb": peak, "vocab": vocab}


ROWS = [_row("wmtp4", "off", 50_000, 30.0), _row("wmtp4", "selective", 48_000, 17.0),
        _row("wmtp4", "partial:10", 47_000, 20.0), _row("wmtp4", "full", 45_000, 10.5),
        _row("liger_mtp4", "off", 49_000, 31.0), _row("liger_mtp4", "full", 45_500, 13.3),
        _row("liger_mtp4", "full_heads", 42_000, 11.5), _row("liger_mtp4", "selective", math.nan, math.inf),
        _row("wmtp4", "off", 1.0, 1.0, vocab=128256)]


def test_the_best_setting_within_each_budget():
    wmtp4 = [r for r in ROWS if r["variant"] == "wmtp4" and r["vocab"] == 32000]
    assert [bench.best_within(wmtp4, b)["setting"] if bench.best_within(wmtp4, b) else None
            for b in (10, 10.5, 12, 17, 24, 30, None)] == [None, "full", "full", "selective", "selective", "off", "off"]
    assert bench.smallest_budget(wmtp4)["setting"] == "full"
    liger = [r for r in ROWS if r["variant"] == "liger_mtp4"]
    assert bench.smallest_budget(liger)["peak_gb"] == 11.5  # an OOM (inf, nan) never counts
    lines = bench.budget_table(ROWS, 32000, [12, 16, 24], ["wmtp4", "liger_mtp4"])
    assert lines[1] == "| budget GB | wmtp4 | liger_mtp4 | wmtp4 / liger_mtp4 |"
    assert lines[3] == "| 12 | 45,000 full | 42,000 full_heads | 1.07 |"
    assert lines[4] == "| 16 | 45,000 full | 45,500 full | 0.99 |"
    assert lines[5] == "| 24 | 48,000 selective | 45,500 full | 1.05 |"
    assert lines[6] == "| no limit | 50,000 off | 49,000 off | 1.02 |"
    assert lines[7].endswith("wmtp4 10.5 GB (full), liger_mtp4 11.5 GB (full_heads)")
    lines = bench.budget_table(ROWS, 32000, [11], ["wmtp4", "liger_mtp4", "hf_liger"])
    assert lines[3] == "| 11 | 45,000 full | does not fit | not measured | wmtp4 only |"


def test_budgets_parse_and_each_variant_gets_its_settings():
    args = bench.parse_args(["--budgets=12,16,24,40"])
    assert bench.comma_list(args, "budgets", cast=float) == [12.0, 16.0, 24.0, 40.0]
    assert bench.settings_of("wmtp4", args) == ["off", "full", "selective", "partial"]
    assert bench.settings_of("liger_mtp4", args) == ["off", "full"]
    assert bench.settings_of("hf_liger", args) == ["off", "full"]
    args = bench.parse_args(["--budgets=12.5", "--settings=off,partial:6", "--peer_settings=off,full,full_heads,selective",
                             "--setting=off"])
    assert (args.budgets, args.settings, args.setting) == ("12.5", "off,partial:6", "off")
    assert bench.settings_of("hf_liger", args) == ["off", "full", "selective"]  # each peer: the settings it has
    assert bench.settings_of("liger_mtp4", args) == ["off", "full", "full_heads", "selective"]
    args = bench.parse_args(["--budgets=12,24.5", "--settings=full,auto"])  # auto: one plan per budget
    assert bench.settings_of("wmtp1", args) == ["full", "auto:12", "auto:24.5"]
    assert bench.parse_args(["--setting=auto:24.5"]).setting == "auto:24.5"
    for argv, key in ((["--budgets=12,lots"], "'budgets'"), (["--settings=off,sometimes"], "'settings'"),
                      (["--setting=partial:0"], "'setting'"), (["--setting=auto:0"], "'setting'"),
                      (["--setting=auto:many"], "'setting'"), (["--setting=auto"], "'setting'")):
        with pytest.raises(config.ConfigError, match=key):
            bench.parse_args(argv)
