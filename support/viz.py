"""
viz.py — token-weight pages: which tokens of a completion got the weight, drawn token by token.

At every held-out evaluation the training scripts compute, with their own code paths
(mtp.rho1_weights via train_rho1's micro_step; train_critic.critic_step_weights), the weights of
a few fixed held-out examples and hand them here; tracking.Tracker writes the page as HTML (hover a
token for its numbers; readable in the MLflow UI's artifact viewer) and PNG under
<out_dir>/token_weights/ and logs both as MLflow artifacts.

  Rho-1: one line per head k; completion token j is coloured by the weight of the pair (head k,
         target j) -- head k reads position j-k-1 (docs/design.md §4). Green = kept (darker =
         larger excess loss CE - CE_ref), grey = dropped; soft mode: green by w.
  Critic: lines V_t (value after token t), δ_t, A_t (GAE, before whitening) and w_t; w_t is the
         weight of target token t for every head (docs/design.md §6).

A page is plain data -- {"title", "legend", "examples": [{"prompt", "tokens", "lines":
[{"key", "label", "cells": [{"bg", "cls", "title"} or None per token]}]}]} -- so that the two
renderings (html, png) draw the same thing.
"""
from __future__ import annotations

import html as _html
import math
import os

import torch

MAX_TOKENS = 160      # completion tokens drawn per example
PROMPT_CHARS = 160    # the prompt's tail shown above each example

KEPT_LO, KEPT_HI, DROPPED = (0.72, 0.9, 0.72), (0.17, 0.63, 0.17), "#e6e6e6"
WHITE, GREEN, RED, BLUE = (1.0, 1.0, 1.0), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.12, 0.47, 0.71)


def _mix(a, b, t: float) -> str:
    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 0.0
    return "#" + "".join(f"{round(255 * (x + (y - x) * t)):02x}" for x, y in zip(a, b))


def _signed(x: float, scale: float) -> str:
    """Diverging colour: red below 0, green above, white at 0; |x| = scale is full colour."""
    return _mix(WHITE, GREEN if x >= 0 else RED, abs(x) / scale if scale > 0 else 0.0)


def _by_target(x: torch.Tensor) -> torch.Tensor:
    """[n, B, T] in position indexing (head k at position t predicts t+k+1) -> indexed by the
    target token: out[k, b, j] = x[k, b, j-k-1]."""
    out = torch.zeros_like(x)
    T = x.shape[2]
    for k in range(x.shape[0]):
        if T - k - 1 > 0:
            out[k, :, k + 1:] = x[k, :, : T - k - 1]
    return out


def _completions(tok, batch):
    """Per example: (prompt tail, [(target position j, token text)]) of its first MAX_TOKENS
    completion tokens."""
    out = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["loss_mask"].tolist()):
        js = [j for j, m in enumerate(mask) if m][:MAX_TOKENS]
        prompt = tok.decode(ids[:js[0]] if js else ids, skip_special_tokens=False)
        out.append((prompt[-PROMPT_CHARS:], [(j, tok.decode([ids[j]], skip_special_tokens=False)) for j in js]))
    return out


def rho1_page(tok, batch, ce, ref_ce, w, valid, mode: str, title: str) -> dict:
    """Rho-1's weights of a batch: ce, ref_ce (the reference's CE of each pair's target), w and
    valid are [n, B, T] in position indexing, as train_rho1's micro_step returns them."""
    ce, ref, w, valid = (_by_target(x.detach().float().cpu()) for x in (ce, ref_ce, w, valid))
    excess = ce - ref
    kept_ex = excess[(w > 0) & (valid > 0)]
    ex_scale = float(kept_ex.abs().max()) if kept_ex.numel() else 1.0
    w_scale = float(w[valid > 0].max()) if (valid > 0).any() else 1.0
    examples = []
    for b, (prompt, toks) in enumerate(_completions(tok, batch)):
        lines = []
        for k in range(ce.shape[0]):
            cells = []
            for i, (j, text) in enumerate(toks):
                if not valid[k, b, j]:
                    cells.append(None)
                    continue
                kept, e = bool(w[k, b, j] > 0), float(excess[k, b, j])
                tip = (f"head {k} predicts completion token {i} ({text!r}) from position {j - k - 1}\n"
                       f"excess = {e:+.3f} = CE {float(ce[k, b, j]):.3f} − CE_ref {float(ref[k, b, j]):.3f}\n"
                       f"w = {float(w[k, b, j]):.3f}")
                if mode == "hard":
                    cells.append({"cls": "kept" if kept else "dropped", "title": f"{tip} · {'kept' if kept else 'dropped'}",
                                  "bg": _mix(KEPT_LO, KEPT_HI, e / ex_scale) if kept else DROPPED})
                else:
                    cells.append({"cls": "", "title": tip, "bg": _mix(WHITE, GREEN, float(w[k, b, j]) / w_scale)})
            lines.append({"key": f"head{k}", "label": f"head {k}", "cells": cells})
        examples.append({"prompt": prompt, "tokens": [t for _, t in toks], "lines": lines})
    legend = ("Rho-1: each line is one head; a token's colour is the weight of the (head, target token) "
              "pair. " + ("Green = kept (darker = larger excess loss CE − CE_ref), grey = dropped. " if mode == "hard"
                          else "Soft weights: greener = larger w. ")
              + "Selection here is over these examples' tokens (in training: over a micro-step's). Hover for numbers.")
    return {"title": title, "legend": legend, "examples": examples}


def critic_page(tok, batch, values, deltas, advantages, weights, title: str) -> dict:
    """The critic's numbers of a batch, each [B, T] in target indexing (they belong to token t):
    V_t (train_critic.ValueModel, after sigmoid), δ_t (critic_deltas), A_t (gae) and w_t
    (critic_step_weights)."""
    v, d, a, w = (x.detach().float().cpu() for x in (values, deltas, advantages, weights))
    mask = batch["loss_mask"].bool()
    d_scale = float(d[mask].abs().max()) if mask.any() else 1.0
    a_scale = float(a[mask].abs().max()) if mask.any() else 1.0
    lw = torch.log(w[mask].clamp_min(1e-6)) if mask.any() else torch.zeros(1)
    lw_scale = float(lw.abs().max()) or 1.0
    examples = []
    for b, (prompt, toks) in enumerate(_completions(tok, batch)):
        tips = [f"completion token {i} ({text!r}), position {j}\nV_t = {float(v[b, j]):.3f} (before: "
                f"{float(v[b, j - 1]) if j else float('nan'):.3f})\nδ_t = {float(d[b, j]):+.4f}\n"
                f"A_t = {float(a[b, j]):+.4f}\nw_t = {float(w[b, j]):.3f} (every head's weight for this target token)"
                for i, (j, text) in enumerate(toks)]
        colours = {"V": [_mix(WHITE, BLUE, float(v[b, j])) for j, _ in toks],
                   "delta": [_signed(float(d[b, j]), d_scale) for j, _ in toks],
                   "A": [_signed(float(a[b, j]), a_scale) for j, _ in toks],
                   "w": [_signed(math.log(max(float(w[b, j]), 1e-6)), lw_scale) for j, _ in toks]}
        labels = {"V": "V_t", "delta": "δ_t", "A": "A_t", "w": "w_t"}
        lines = [{"key": key, "label": labels[key], "cells": [{"cls": "", "bg": c, "title": t} for c, t in zip(cs, tips)]}
                 for key, cs in colours.items()]
        examples.append({"prompt": prompt, "tokens": [t for _, t in toks], "lines": lines})
    legend = ("Critic: V_t = P(pass | tokens ≤ t) (bluer = higher); δ_t = V_t − V_{t−1} and A_t = GAE(δ) "
              "(green > 0, red < 0); w_t = clip(exp(whitened A_t / β)) (green > 1, red < 1), the weight of "
              "target token t for every head; whitening here is over these examples. Hover for numbers.")
    return {"title": title, "legend": legend, "examples": examples}


def _shown(text: str) -> str:
    return text.replace("\n", "↵\n").replace("\t", "→\t") or "∅"


def html(page: dict) -> str:
    """The page as one self-contained HTML file (no script: hovering shows each token's numbers)."""
    e = _html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(page['title'])}</title><style>",
           "body{font-family:sans-serif;margin:1em;max-width:70em} .legend{color:#444;font-size:13px}",
           ".ex{margin:1.2em 0;border-top:1px solid #ccc;padding-top:.5em}",
           ".prompt{color:#888;font-family:monospace;font-size:12px;white-space:pre-wrap}",
           ".line{display:flex;margin:.25em 0} .label{flex:none;width:5em;color:#555;font-size:12px}",
           ".toks{font-family:monospace;font-size:13px;white-space:pre-wrap;line-height:1.6}",
           ".t{border-radius:2px} .dropped{color:#888} .none{color:#bbb}</style></head><body>",
           f"<h3>{e(page['title'])}</h3><p class='legend'>{e(page['legend'])}</p>"]
    for n, ex in enumerate(page["examples"]):
        out.append(f"<div class='ex'><div class='prompt'>example {n}: …{e(ex['prompt'])}</div>")
        for line in ex["lines"]:
            spans = []
            for i, (text, c) in enumerate(zip(ex["tokens"], line["cells"])):
                if c is None:
                    spans.append(f"<span class='t none'>{e(_shown(text))}</span>")
                else:
                    spans.append(f"<span class=\"t {c['cls']}\" data-line=\"{line['key']}\" data-pos=\"{i}\" "
                                 f"style=\"background:{c['bg']}\" title=\"{e(c['title'])}\">{e(_shown(text))}</span>")
            out.append(f"<div class='line'><span class='label'>{e(line['label'])}</span>"
                       f"<span class='toks'>{''.join(spans)}</span></div>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def png(page: dict, path: str, width: int = 110):
    """The same colours as a picture: tokens laid out in monospace, wrapped at `width` characters,
    one row per line (head or quantity) under each wrapped piece. Matplotlib without pyplot (no
    global backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    rows = [("title", page["title"])]  # (kind, payload), drawn top to bottom
    used = 40
    for n, ex in enumerate(page["examples"]):
        rows.append(("text", f"example {n}: …{ex['prompt'][-width + 12:]}".replace("\n", "↵")))
        shown = [t.replace("\n", "↵").replace("\t", "→") or "∅" for t in ex["tokens"]]
        start, x = 0, 0
        pieces = []
        for i, t in enumerate(shown):
            if x + len(t) > width and i > start:
                pieces.append((start, i))
                start, x = i, 0
            x += len(t)
        pieces.append((start, len(shown)))
        used = max(used, *(sum(map(len, shown[a:b])) for a, b in pieces))
        for a, b in pieces:
            for line in ex["lines"]:
                rows.append(("cells", (line["label"], shown[a:b], line["cells"][a:b])))
            rows.append(("gap", None))
    char_in, row_in, label_chars, font = 7 * 0.602 / 72, 0.17, 7, 7
    width = min(width, used)
    total = width + label_chars + 2  # 2: a margin on the right
    fig = Figure(figsize=(total * char_in, len(rows) * row_in), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-label_chars, width + 2)
    ax.set_ylim(-len(rows), 0)
    ax.axis("off")
    for r, (kind, payload) in enumerate(rows):
        y = -r - 0.5
        if kind in ("title", "text"):
            ax.text(-label_chars, y, payload[: total], fontsize=font + (1 if kind == "title" else 0),
                    family="monospace", va="center", color="black" if kind == "title" else "#777")
        elif kind == "cells":
            label, toks, cells = payload
            ax.text(-0.5, y, label, fontsize=font - 1, ha="right", va="center", color="#555")
            x = 0
            for t, c in zip(toks, cells):
                if c is not None:
                    ax.add_patch(Rectangle((x, y - 0.42), len(t), 0.84, facecolor=c["bg"], edgecolor="none"))
                ax.text(x, y, t, fontsize=font, family="monospace", va="center",
                        color="#888" if c is None or c["cls"] == "dropped" else "black")
                x += len(t)
    fig.savefig(path)


def save(page: dict, out_dir: str, name: str) -> list[str]:
    """Write <out_dir>/<name>.html and .png (the PNG only where matplotlib is installed; MLflow
    depends on it) -> the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name + ".html")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(html(page))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths
    paths.append(os.path.join(out_dir, name + ".png"))
    png(page, paths[1])
    return paths
