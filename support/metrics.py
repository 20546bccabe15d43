"""
metrics.py — a training step's bookkeeping: per-head loss, CE, accuracy and token-weight
statistics summed on the device and reduced over ranks once per step (`HeadStats`), tokens per
second (`Throughput`), and where the numbers go (`log_metrics`: the progress bar and MLflow) --
so that each script's step loop shows only the algorithm.
"""
from __future__ import annotations

import torch

import mtp


class HeadStats:
    """Per-head sums over one optimizer step -- loss, CE, accuracy, and the token weights' mean,
    std, min and max over valid (head, position) pairs -- accumulated on the device (no host
    sync inside the step) and reduced over ranks once, before the update."""

    def __init__(self, n_heads: int, device: torch.device):
        self.n_heads = n_heads
        self.dtype = torch.float32  # sums of per-token float32 values over one step; and MPS has no float64
        self.sums: dict[str, torch.Tensor] = {}
        self.w_min = torch.full((n_heads,), torch.inf, device=device)
        self.w_max = torch.full((n_heads,), -torch.inf, device=device)

    def add(self, coef, ce, correct, valid, w, **extra):
        """One micro-batch; every argument is [n, B, T] in position indexing. `coef` is the loss
        coefficient of each pair (so Σ coef·CE is the loss), `w` its raw weight; `extra` are more
        per-pair values whose per-head sums the caller wants."""
        v = valid.bool()
        for name, x in {"loss": coef * ce, "ce": ce * v, "correct": correct & v, "valid": v,
                        "w": w * v, "w2": w * w * v, **extra}.items():
            s = x.flatten(1).sum(1).to(self.dtype)
            self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.w_min = torch.minimum(self.w_min, torch.where(v, w, torch.inf).flatten(1).amin(1))
        self.w_max = torch.maximum(self.w_max, torch.where(v, w, -torch.inf).flatten(1).amax(1))

    def reduce(self, group) -> torch.Tensor:
        """Sum (min, max) over ranks, in one collective each; -> the step's total loss."""
        names = list(self.sums)
        self.sums = dict(zip(names, mtp.all_reduce(torch.stack([self.sums[k] for k in names]), "sum", group)))
        self.w_min = mtp.all_reduce(self.w_min, "min", group)
        self.w_max = mtp.all_reduce(self.w_max, "max", group)
        return self.sums["loss"].sum()

    def per_valid(self, name: str) -> list[float]:
        """Σ name / Σ valid per head (after reduce), divided on the host in Python floats."""
        return [x / max(n, 1.0) for x, n in zip(self.sums[name].tolist(), self.sums["valid"].tolist())]

    def metrics(self) -> dict[str, float]:
        """The step's numbers (after reduce), as Python floats: the sums come to the host first and
        the arithmetic is done there, in float64 (on the device it could not be: MPS has none)."""
        s = {k: v.tolist() for k, v in self.sums.items()}
        w_min, w_max = self.w_min.tolist(), self.w_max.tolist()
        out = {"loss": sum(s["loss"])}
        for k in range(self.n_heads):
            n = max(s["valid"][k], 1.0)
            w_mean = s["w"][k] / n
            out |= {f"head{k}/loss": s["loss"][k], f"head{k}/ce": s["ce"][k] / n, f"head{k}/acc": s["correct"][k] / n,
                    f"head{k}/w_mean": w_mean, f"head{k}/w_std": max(s["w2"][k] / n - w_mean ** 2, 0.0) ** 0.5,
                    f"head{k}/w_min": w_min[k], f"head{k}/w_max": w_max[k]}
        return out


class Throughput:
    """Tokens/s since the last report, and over the run from the end of its first step (which
    pays for compilation and allocator warm-up)."""

    def __init__(self):
        import time
        self.clock = time.perf_counter
        self.t_last, self.since = self.clock(), 0
        self.t_run, self.run_tokens = None, 0

    def step_done(self, n_tokens: int):
        self.since += n_tokens
        if self.t_run is None:
            self.t_run = self.clock()
        else:
            self.run_tokens += n_tokens

    def rate(self) -> float:
        now = self.clock()
        r = self.since / max(now - self.t_last, 1e-9)
        self.t_last, self.since = now, 0
        return r

    def run_rate(self) -> float | None:
        return self.run_tokens / (self.clock() - self.t_run) if self.run_tokens else None


def log_metrics(metrics: dict, step: int, run, bar=None, **postfix):
    """The progress bar's numbers (shown when the caller advances the bar at the end of the
    step, so the count and the numbers are of the same step) and, with a run, MLflow."""
    if bar is not None:
        bar.set_postfix(postfix, refresh=False)
    if run is not None:
        run.log_metrics(metrics, step + 1)
