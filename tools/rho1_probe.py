"""
rho1_probe.py — what Rho-1's selection keeps, on training data whose junk is known: a forward
pass over the data (no training) with the policy and the reference of a train_rho1.py run.

    python -m tools.noisy_corpus --out=out/noisy --noise=lines:0.12,subst:0.13      # the marked corpus
    python -m tools.rho1_probe configs/tiny.yaml --data.source=jsonl --data.path=out/noisy/train.jsonl \\
        --model.reference=out/noisy/reference/final --probe_steps=20 --out=out/noisy/probe.json

It takes every key of train_rho1.py (the same config file and overrides describe the run being
probed) plus its own (`--help`). Rows whose completions carry `noise_spans` give each token a flag
(data.py: batch["noise"]); for each head, over `probe_steps` optimizer batches of the run's own
batching, it counts the valid target tokens, the injected ones among them (the base rate), and
among the tokens Rho-1 keeps (w > 0) the injected ones: the selection precision a working
Rho-1 must push far below the base rate. The random-weight control (the same weights dealt to
random tokens, `mtp.shuffle_weights`, what `--rho1.shuffle` trains on) is scored on the same
batches: its junk share is the base rate, up to chance. For soft weights: the weight mass on
junk tokens. Output: a table and, with --out, a JSON.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

import common
import data
import mtp
import train_rho1
from support import config


@dataclass
class ProbeConfig(train_rho1.Config):
    probe_steps: int = 20            # optimizer batches of the run's data scored (its first N steps' batches)
    out: str = ""                    # a JSON of the counts and shares ("" = the table only)


def probe(s: train_rho1.Setup, items, pad_id: int, steps: int) -> dict:
    """Per head: valid targets, injected ones, and for Rho-1 and its random control the kept
    tokens, the injected kept ones and the weight mass on injected tokens."""
    cfg, n = s.cfg, s.model.n_heads
    keys = ("valid", "noise", "kept", "noise_kept", "w", "w_noise", "kept_random", "noise_kept_random")
    tot = {k: torch.zeros(n, dtype=torch.float32, device=s.dist.device) for k in keys}
    s.model.eval()
    with torch.no_grad():
        for step in range(steps):
            batches = data.step_batches(items, step, cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed,
                                        s.dist.rank, s.dist.world, pad_id)
            denom = train_rho1.denominators(s, batches)
            for batch in batches:
                if "noise" not in batch:
                    raise data.DataError("no row of this data marks injected tokens (noise_spans): nothing to probe; "
                                         "make the data with python -m tools.noisy_corpus")
                _, _, _, _, valid, w, _ = train_rho1.micro_step(s, batch, denom)
                valid = valid.bool()
                junk = mtp.align_to_heads(batch["noise"].to(valid.device), n).bool() & valid
                random_w = mtp.shuffle_weights(w, valid, common.step_generator(cfg.train.seed, step, s.dist.rank))
                for name, x in {"valid": valid, "noise": junk, "kept": (w > 0) & valid, "noise_kept": (w > 0) & junk,
                                "w": w * valid, "w_noise": w * junk, "kept_random": (random_w > 0) & valid,
                                "noise_kept_random": (random_w > 0) & junk}.items():
                    tot[name] += x.flatten(1).sum(1).float()
    return {k: mtp.all_reduce(v, "sum", s.dist.group).tolist() for k, v in tot.items()}


def shares(counts: dict) -> list[dict]:
    """Per head: the junk share of the data, of Rho-1's kept tokens, of the control's, and of
    Rho-1's weight mass; and the share of junk Rho-1 dropped."""
    out = []
    for k in range(len(counts["valid"])):
        c = {name: v[k] for name, v in counts.items()}
        out.append({"head": k, "base_rate": c["noise"] / max(c["valid"], 1),
                    "rho1_kept": c["noise_kept"] / max(c["kept"], 1),
                    "random_kept": c["noise_kept_random"] / max(c["kept_random"], 1),
                    "rho1_weight": c["w_noise"] / max(c["w"], 1e-12),
                    "junk_dropped": 1 - c["noise_kept"] / max(c["noise"], 1),
                    "kept_frac": c["kept"] / max(c["valid"], 1), "valid": int(c["valid"])})
    return out


def main(argv):
    cfg = config.parse_config(ProbeConfig, argv, ignore=train_rho1.CRITIC_ONLY_KEYS)
    cfg.dry_run, cfg.resume = True, ""  # nothing is trained or written but --out
    train_rho1.check_config(cfg, common.world_size())
    if cfg.rho1.ratio >= 1 and cfg.rho1.mode == "hard":
        raise config.ConfigError("config key 'rho1.ratio' is 1 (hard): every token is kept, there is no selection to probe")
    dist = common.init_distributed(cfg.train.device)
    dtype = common.pick_dtype(cfg.train.dtype, dist.device)
    torch.manual_seed(cfg.train.seed)
    say = print if dist.rank == 0 else (lambda *a, **k: None)
    examples, _ = data.load_examples(cfg.data.source, cfg.data.path or None, cfg.data.split, cfg.data.skip_bad_rows)
    s, tok, _ = train_rho1.load_models(cfg, dist, dtype, say)
    items, counts = data.tokenize_examples(tok, examples, cfg.data.max_seq_len)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    result = probe(s, items, pad_id, cfg.probe_steps)
    rows = shares(result)
    say(f"Rho-1 (ratio {cfg.rho1.ratio}, {cfg.rho1.mode}) on {cfg.data.path}: {cfg.probe_steps} batches of "
        f"{cfg.train.global_batch}; injected tokens as a share of ...")
    say("| head | the data (base rate) | Rho-1's kept tokens | the random control's kept | Rho-1's weight mass "
        "| junk dropped by Rho-1 | kept |\n|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['head']} | {r['base_rate']:.1%} | {r['rho1_kept']:.1%} | {r['random_kept']:.1%} | "
            f"{r['rho1_weight']:.1%} | {r['junk_dropped']:.1%} | {r['kept_frac']:.1%} |")
    if cfg.out and dist.rank == 0:
        with open(cfg.out, "w") as f:
            json.dump({"rows": rows, "counts": result, "data": counts, "policy": cfg.model.policy,
                       "reference": cfg.model.reference, "ratio": cfg.rho1.ratio, "mode": cfg.rho1.mode,
                       "probe_steps": cfg.probe_steps}, f, indent=1)
        say(f"wrote {cfg.out}")
    common.shutdown(dist)
    return rows


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
