"""
stdlib_corpus.py — offline training code: documented functions of the Python standard library,
as HumanEval-style (signature + docstring -> body) examples, deduplicated and checked against
the benchmarks (data.stdlib_examples reads it: `data.source=stdlib`).

MBPP's 374 training tasks are too few for hundreds of fine-tuning steps, and nothing larger
ships offline -- except the interpreter's own standard library: thousands of documented,
reviewed functions. `build` (through `data.stdlib_examples`) turns each into a HumanEval-style example:
  prompt     = the module imports the function uses + its signature + its docstring, verbatim
               ("from x import y\n\n\ndef f(a, b):\n    \"\"\"Doc.\"\"\"\n"); a method gets its
               class line ("class C(Base):\n    def m(self, x):\n        \"\"\"...\"\"\"\n")
  completion = the body after the docstring, verbatim (comments included).
Licence: the CPython standard library is distributed under the PSF License Agreement (PSF-2.0,
permissive, GPL-compatible); a few modules also carry the permissive notices of their original
authors, listed in the Python docs' "Licenses and Acknowledgements for Incorporated Software"
(e.g. http.cookies, trace, uu, xmlrpc, asynchat/asyncore). Training on it and redistributing
derived models is allowed; keep the PSF notice if you redistribute the extracted text itself.
Other directories can be scanned too (`roots`): checking their licences is then up to you.
The examples depend on the interpreter version (3.11 and 3.12 differ); counts name it.
"""
from __future__ import annotations

import json
import os

STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                              "__pycache__"})
STDLIB_VALID_FRAC = 0.05      # share of functions held out (by a hash of their name)


def stdlib_root() -> str:
    """The running interpreter's standard-library directory."""
    import sysconfig
    return sysconfig.get_paths()["stdlib"]


def python_files(root: str) -> list[str]:
    """Relative paths of the .py files under root, sorted; test suites, installed packages
    (site-packages inside a stdlib directory) and caches are skipped."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP_DIRS)
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return sorted(p.replace(os.sep, "/") for p in out)


def code_tokens(src: str, local_names=frozenset()) -> list[str]:
    """Python tokens of `src` with layout and comments dropped, every string literal as "STR",
    and the names in `local_names` (arguments, assigned names, function names) replaced by V0,
    V1, ... in order of appearance. Two functions equal under this are the same code up to
    layout, comments, string contents and renaming."""
    import io
    import textwrap
    import tokenize
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    fstring = {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
               if hasattr(tokenize, n)}
    out, names = [], {}
    try:
        for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(src)).readline):
            if t.type in skip:
                continue
            if t.type == tokenize.STRING or t.type in fstring:
                if not (out and out[-1] == "STR"):
                    out.append("STR")
            elif t.type == tokenize.NAME and t.string in local_names:
                out.append(names.setdefault(t.string, f"V{len(names)}"))
            else:
                out.append(t.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def local_names(node) -> frozenset:
    """Names a function binds itself: its (and nested functions') name and arguments, and every
    name it assigns -- what renaming a variable changes. Globals, attributes and builtins stay."""
    import ast
    names = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not isinstance(n, ast.Lambda):
                names.add(n.name)
            a = n.args
            names |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
    return frozenset(names)


def _body_after_docstring(fn, lines: list[str]) -> str:
    """The source lines of a function's body after its docstring (if any), blank edges stripped."""
    import ast
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        start = body[0].end_lineno  # 1-based line of the docstring's end = 0-based next line
        if len(body) == 1:
            return ""
    else:
        start = min([body[0].lineno] + [d.lineno for d in getattr(body[0], "decorator_list", [])]) - 1
    return "\n".join(lines[start: fn.end_lineno]).strip("\n")


def body_key(body: str, fn) -> str:
    """Hash of a function body up to layout, comments, string contents and renaming."""
    import hashlib
    return hashlib.sha256(" ".join(code_tokens(body, local_names(fn))).encode()).hexdigest()


def _ngrams(seq, n: int) -> set:
    return {tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)}


def _words(text: str) -> list[str]:
    import re
    return re.findall(r"[a-z0-9]+", text.lower())


class Contamination:
    """Which training functions overlap an evaluation problem. An example is contaminated if
      - body:      its body equals a benchmark function's body up to layout, comments, string
                   contents and renaming of locals ("name+body" if the function name agrees too);
      - code:      >= `code_frac` of the benchmark solution's `code_n`-grams of Python tokens
                   (identifiers as written, strings "STR", no comments or layout) occur in its
                   body, and at least `code_min` of them: a copied solution, even inside a longer
                   function (a one-line solution is too generic for this; the body test has it);
      - docstring: its docstring shares a `text_n`-gram of words with the benchmark's
                   description (GPT-3's 13-gram test; HumanEval's prompts are docstrings).
    A shared function name alone is not contamination (reported, dunder names aside, not dropped)."""

    def __init__(self, benchmarks: list[dict], code_n: int = 10, code_frac: float = 0.5, code_min: int = 10,
                 text_n: int = 13):
        import ast
        import warnings
        self.code_n, self.code_frac, self.code_min, self.text_n = code_n, code_frac, code_min, text_n
        self.bodies, self.names, self.code_index, self.text_index, self.code_size = {}, {}, {}, {}, {}
        for b in benchmarks:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences in regexes
                    tree = ast.parse(b["code"])
            except SyntaxError:
                tree = None
            lines = b["code"].split("\n")
            for fn in ast.walk(tree) if tree else []:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = _body_after_docstring(fn, lines)
                    if len(code_tokens(body)) >= 3:  # `pass`, `return x` match too much
                        self.bodies.setdefault(body_key(body, fn), []).append((b["id"], fn.name))
                    self.names.setdefault(fn.name, []).append(b["id"])
            grams = _ngrams(code_tokens(b["solution"]), code_n)
            self.code_size[b["id"]] = len(grams)
            for g in grams:
                self.code_index.setdefault(g, []).append(b["id"])
            for g in _ngrams(_words(b["text"]), text_n):
                self.text_index.setdefault(g, set()).add(b["id"])

    def check(self, name: str, body: str, fn, doc: str) -> tuple[list[dict], list[str], dict | None]:
        """-> (overlaps [{"benchmark", "kind", "score"}], benchmark ids sharing only the name,
        the largest code overlap {"benchmark", "score", "ngrams"} or None)."""
        hits = []
        for bid, bname in self.bodies.get(body_key(body, fn), []):
            hits.append({"benchmark": bid, "kind": "name+body" if bname == name else "body", "score": 1.0})
        shared: dict = {}
        for g in _ngrams(code_tokens(body), self.code_n):
            for bid in self.code_index.get(g, ()):
                shared[bid] = shared.get(bid, 0) + 1
        best = None
        for bid, c in sorted(shared.items()):
            frac = round(c / self.code_size[bid], 3)
            if c >= self.code_frac * self.code_size[bid] and c >= self.code_min:
                hits.append({"benchmark": bid, "kind": "code", "score": frac})
            elif best is None or frac > best["score"]:
                best = {"benchmark": bid, "score": frac, "ngrams": c}
        for bid in sorted({b for g in _ngrams(_words(doc), self.text_n) for b in self.text_index.get(g, ())}):
            hits.append({"benchmark": bid, "kind": "docstring", "score": 1.0})
        name_only = [] if hits or name.startswith("__") else sorted(set(self.names.get(name, [])))
        return hits, name_only, best


def _import_lines(tree, used: set) -> list[str]:
    """The module's top-level imports (also those under a top-level `try:` or `if`) that bind a
    name the function uses, in the module's order (`from m import a, b` merged per module);
    `from __future__` and star imports left out."""
    import ast
    plain, froms = [], {}
    nodes = [n for top in tree.body for n in ([top] + (top.body if isinstance(top, (ast.Try, ast.If)) else []))]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if (a.asname or a.name.split(".")[0]) in used:
                    plain.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            mod = "." * node.level + (node.module or "")
            for a in node.names:
                if a.name != "*" and (a.asname or a.name) in used:
                    froms.setdefault(mod, []).append(a.name + (f" as {a.asname}" if a.asname else ""))
    return list(dict.fromkeys(plain)) + [f"from {m} import {', '.join(dict.fromkeys(ns))}" for m, ns in froms.items()]


def _candidates(tree, methods: bool):
    """(function node, enclosing class or None) of the module's top-level functions and, with
    `methods`, of its top-level classes' methods; in source order."""
    import ast
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, funcs):
                    yield sub, (node if methods else False)


def _function_example(fn, cls, tree, lines, module: str, min_doc: int, min_body_lines: int,
                      max_body_lines: int, max_chars: int) -> tuple[dict | None, str]:
    """One function -> (example, "") or (None, the reason it was filtered out)."""
    import ast
    if cls is False:
        return None, "method"
    doc_node = fn.body[0] if fn.body else None
    doc = ast.get_docstring(fn)
    if doc is None:
        return None, "no_docstring"
    if len(doc.strip()) <= min_doc:
        return None, "short_docstring"
    if len(fn.body) < 2:
        return None, "short_body"
    if lines[doc_node.lineno - 1][:doc_node.col_offset].strip() or fn.body[1].lineno <= doc_node.end_lineno \
            or lines[doc_node.end_lineno - 1][doc_node.end_col_offset:].strip():
        return None, "layout"  # the docstring shares a line with the signature or with code
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    signature = "\n".join(lines[start - 1: doc_node.lineno - 1])
    docstring = "\n".join(lines[doc_node.lineno - 1: doc_node.end_lineno])
    body = _body_after_docstring(fn, lines)
    code_lines = [ln for ln in body.split("\n") if ln.strip() and not ln.strip().startswith("#")]
    if len(code_lines) < min_body_lines:
        return None, "short_body"
    if len(code_lines) > max_body_lines:
        return None, "long"
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    header = ""
    if cls is not None:
        used |= {n.id for b in cls.bases + cls.keywords for n in ast.walk(b) if isinstance(n, ast.Name)}
        bases = ", ".join([ast.unparse(b) for b in cls.bases] + [ast.unparse(k) for k in cls.keywords])
        header = f"class {cls.name}" + (f"({bases})" if bases else "") + ":\n"
    imports = _import_lines(tree, used)
    prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + header + signature + "\n" + docstring + "\n"
    completion = body + "\n"
    if len(prompt) + len(completion) > max_chars:
        return None, "long"
    try:
        ast.parse(prompt + completion)
    except SyntaxError:
        return None, "unparseable"
    qualname = f"{cls.name}.{fn.name}" if cls is not None else fn.name
    return {"id": f"{module}:{qualname}", "name": fn.name, "prompt": prompt, "completion": completion,
            "_fn": fn, "_doc": doc}, ""


def split_of(example_id: str, valid_frac: float = STDLIB_VALID_FRAC) -> str:
    """'validation' for a fixed valid_frac of ids (by SHA-256, so stable across runs, machines
    and Python versions), else 'train'."""
    import hashlib
    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big")
    return "validation" if h < valid_frac * 2 ** 64 else "train"


def _scan(roots, methods: bool, counts: dict, **limits):
    """Every candidate example (with its "_fn" node and "_doc") of every file under `roots`, in
    order; files, functions, documented functions ("found") and filter reasons are counted."""
    import ast
    import warnings
    for root in roots:
        for rel in python_files(root):
            counts["files"] += 1
            try:
                with open(os.path.join(root, rel), encoding="utf-8") as f:
                    source = f.read()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences in old code
                    tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                counts["unparseable_files"] += 1
                continue
            lines = source.split("\n")
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            for fn, cls in _candidates(tree, methods):
                counts["functions"] += 1
                counts["found"] += ast.get_docstring(fn) is not None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ex, why = _function_example(fn, cls, tree, lines, module, **limits)
                if ex is None:
                    if why != "no_docstring":
                        counts["filtered"][why] = counts["filtered"].get(why, 0) + 1
                    continue
                yield ex


def build(roots, benchmarks: list[dict], methods, min_doc, min_body_lines, max_body_lines, max_chars, valid_frac):
    """Every kept example of `roots` (with its "split") and the counts: data.stdlib_examples
    documents the filters; `benchmarks` are what the examples must not overlap
    (data.benchmark_functions: HumanEval and MBPP's test split)."""
    import hashlib
    import platform
    contamination = Contamination(benchmarks)
    counts = {"python": platform.python_version(), "files": 0, "unparseable_files": 0, "functions": 0,
              "found": 0, "filtered": {}, "exact_duplicates": 0, "near_duplicates": 0,
              "contaminated": [], "name_only_matches": {}}
    pool, seen_text, seen_norm, near = [], set(), set(), []
    for ex in _scan(roots, methods, counts, min_doc=min_doc, min_body_lines=min_body_lines,
                    max_body_lines=max_body_lines, max_chars=max_chars):
        fn, doc = ex.pop("_fn"), ex.pop("_doc")
        text = "\n".join(ln.rstrip() for ln in ex["completion"].strip().split("\n"))
        if text in seen_text:
            counts["exact_duplicates"] += 1
            continue
        seen_text.add(text)
        norm = body_key(ex["completion"], fn)
        if norm in seen_norm:
            counts["near_duplicates"] += 1
            continue
        seen_norm.add(norm)
        hits, name_only, best = contamination.check(ex["name"], ex["completion"], fn, doc)
        if hits:
            counts["contaminated"].append({"id": ex["id"], "overlaps": hits})
            continue
        if best:
            near.append({"id": ex["id"], **best})
        if name_only:
            counts["name_only_matches"][ex["id"]] = name_only
        ex["split"] = split_of(ex["id"], valid_frac)
        pool.append(ex)
    # the closest code overlaps that were not enough to drop the function: for a human to judge
    counts["closest_code_overlaps"] = sorted(near, key=lambda r: (-r["score"], -r["ngrams"], r["id"]))[:10]
    counts["filtered_total"] = sum(counts["filtered"].values())
    counts["kept"] = len(pool)
    counts["kept_train"] = sum(ex["split"] == "train" for ex in pool)
    counts["kept_validation"] = counts["kept"] - counts["kept_train"]
    counts["sha256"] = hashlib.sha256(json.dumps([(e["id"], e["prompt"], e["completion"]) for e in pool])
                                      .encode()).hexdigest()[:16]
    return pool, counts
