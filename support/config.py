"""
config.py — the one command-line dialect of every script: a YAML file and `--key=value`
overrides -> a plain dataclass. Nested sections are nested dataclasses addressed with dots; a bare
`--flag` means `--flag=true`; an unknown key or a value of the wrong type is one line naming the
key (with the key meant, when one is close); `--help` lists every key with its type, its default
and its meaning -- the comment written beside its field, so the dataclasses are the
documentation. `run_main` is every script's entry point: a user's mistake is one line on stderr
and exit status 2, never a traceback.

    cfg = config.parse_config(Config, sys.argv[1:])           # in a script's main(argv)
    if __name__ == "__main__": config.run_main(main, sys.argv[1:])
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing


class ConfigError(ValueError):
    """A bad config value, key or combination: the user's to fix (one line, exit status 2)."""


def run_main(main, argv: list[str]):
    """A script's entry point: a user's mistake -- a bad config value, a missing file or model, a
    malformed data row (an exception whose class sets `user_error`) -- is one line on stderr and
    exit status 2, before anything heavy when it can be; a traceback means a bug in WMTP. Ctrl-C
    outside the training loop (which has its own handler, StopSignal) is one line and status 130."""
    import sys
    try:
        main(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        if "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].end_run(status="KILLED")  # not FINISHED, which MLflow's atexit would say
        sys.exit(130)
    except Exception as e:
        if not getattr(e, "user_error", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_config(cls, argv: list[str], positional: str = "", ignore: tuple[str, ...] = ()):
    """YAML file + `--key=value` overrides -> an instance of the dataclass `cls`.

    `python train_rho1.py configs/tiny.yaml --train.max_steps=3 --dry_run`: a positional argument
    ending in .yaml/.yml is the config file; any other positional argument fills the field named
    by `positional` (eval.py's model). Nested sections are nested dataclasses addressed with dots,
    a bare `--flag` means `--flag=true`, and a bare key that names a field of exactly one section
    is accepted too (`--max_steps=3`). Unknown keys and values of the wrong type are errors that
    name the key. `ignore`: keys (or whole sections) that belong to the *other* training script,
    so that one config file serves both (configs/m3.yaml); they are dropped, and said so.
    """
    import yaml
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, positional))
        raise SystemExit(0)
    values: dict = {}
    files = [a for a in argv if not a.startswith("--") and a.endswith((".yaml", ".yml"))]
    others = [a for a in argv if not a.startswith("--") and not a.endswith((".yaml", ".yml"))]
    for flag, nxt in zip(argv, argv[1:]):
        if flag.startswith("--") and "=" not in flag and not nxt.startswith("--") and nxt in others[1 if positional else 0:]:
            raise ConfigError(f"'{flag} {nxt}': write {flag}={nxt} (options are --key=value)")
    if len(files) > 1:
        raise ConfigError(f"expected one YAML config file, got {files}")
    if others and (not positional or len(others) > 1):
        raise ConfigError(f"unexpected argument(s) {others}: options are written --key=value"
                          + (f", and one positional argument sets {positional!r}" if positional else
                             ", and the one positional argument is a .yaml config file"))
    if files:
        if not os.path.isfile(files[0]):
            raise ConfigError(f"config file {files[0]!r} does not exist")
        try:
            with open(files[0]) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{files[0]} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{files[0]}: top level must be a mapping of keys to values")
    if others:
        values[positional] = others[0]
    for a in argv:
        if not a.startswith("--"):
            continue
        key, eq, raw = a[2:].partition("=")
        try:
            value = yaml.safe_load(raw) if eq else True
        except yaml.YAMLError:
            raise ConfigError(f"--{key}: cannot read {raw!r} as a value (quote it if it is a string)") from None
        if raw.strip() == "":
            value = "" if eq else True
        if any(key == k or key.startswith(k + ".") for k in ignore):
            values.setdefault("__ignored__", {})[key] = value
            continue
        key = _expand_key(cls, key)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {p!r} is not a section")
        node[leaf] = value
    dropped = list(values.pop("__ignored__", {})) + [k for k in ignore if _pop_key(values, k)]
    if dropped:
        print(f"config: ignoring {dropped} (used by the other training script)")
    return _build(cls, values, "")


def _pop_key(values: dict, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for p in parents:
        values = values.get(p)
        if not isinstance(values, dict):
            return False
    return values.pop(leaf, None) is not None


def _expand_key(cls, key):
    hints = typing.get_type_hints(cls)
    if "." in key or key in hints:
        return key
    owners = [name for name, t in hints.items() if dataclasses.is_dataclass(t) and key in typing.get_type_hints(t)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise ConfigError(f"--{key} is ambiguous: it exists in sections {owners}; write --<section>.{key}")
    raise ConfigError(_unknown_key(key, list(_all_keys(cls))))


def _unknown_key(key: str, valid: list[str]) -> str:
    """The one line for a key the config does not have: the key meant, when one is close."""
    import difflib
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
    leaves = {v.rsplit(".", 1)[-1]: v for v in valid}
    close = close or [leaves[c] for c in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), 1, 0.7)]
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {sorted(valid)}"
    return f"unknown config key {key!r}; {hint} (--help lists every key)"


def _all_keys(cls, prefix=""):
    for name, t in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(t):
            yield from _all_keys(t, f"{prefix}{name}.")
        else:
            yield prefix + name


def _build(cls, values, prefix):
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix.rstrip('.')!r} must be a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(_unknown_key(prefix + sorted(unknown)[0], [prefix + n for n in hints]))
    kwargs = {}
    for name, t in hints.items():
        if name not in values:
            continue
        v = values[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, v, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, v, t)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'}: {e}") from None
    return obj


def _check_type(key, v, t):
    origin, args = typing.get_origin(t), typing.get_args(t)
    if v is True and bool not in (args if origin in (typing.Union, types.UnionType) else (t,)):
        raise ConfigError(f"config key {key!r} needs a value: write --{key}=VALUE")  # a bare --key
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and v is None:
                return None
        for a in args:
            if a is not type(None):
                try:
                    return _check_type(key, v, a)
                except ConfigError:
                    pass
        raise ConfigError(f"config key {key!r}: {v!r} is not a valid {t}")
    if origin is typing.Literal:
        if v not in args:
            raise ConfigError(f"config key {key!r}: {v!r} is not one of {list(args)}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {v!r}")
        return type(v)(_check_type(key, x, args[0]) for x in v) if args else v
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t is float and isinstance(v, str):
        try:
            return float(v)  # YAML reads "5e-5" (no dot) as a string
        except ValueError:
            pass
    if t is str and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # YAML reads --batch_sizes=8 as a number; a string key takes its text
    if t in (int, float, str, bool) and not (isinstance(v, t) and not (t is int and isinstance(v, bool))):
        raise ConfigError(f"config key {key!r}: expected {t.__name__}, got {v!r}")
    return v


# ---- --help: every key, its type, its default and its meaning --------------------------------
# The meaning of a key is the comment written beside its field in the config dataclass: the
# dataclasses are the documentation, and --help prints them.

def config_help(cls, positional: str = "") -> str:
    """What `--help` prints: the script's title and example commands (its docstring), then every
    key of the config `cls`, grouped by section, with its type, default and meaning."""
    path = os.path.relpath(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else "SCRIPT.py"
    folder, _, name = path.rpartition(os.sep)
    prog = f"python -m {folder}.{name[:-3]}" if folder == "tools" else f"python {path}"
    arg = f" [{positional.upper()}]" if positional else ""
    doc = [p for p in (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip("\n").split("\n\n")]
    out = [f"usage: {prog} [CONFIG.yaml]{arg} [--key=value ...]"]
    for paragraph in doc[:2]:
        out += ["", paragraph.rstrip()]
    out += ["", "Every key can be set in the YAML file (sections as nested mappings) or on the command line as",
            "--section.key=value (a key that exists in one section only may drop the section); a bare --flag",
            "means --flag=true. Defaults are this script's own."]
    _help_lines(cls, cls(), "", out)
    return "\n".join(out)


def _help_lines(cls, value, prefix: str, out: list[str]):
    import textwrap
    hints = typing.get_type_hints(cls)
    class_note, notes = _field_notes(cls)
    for base in cls.__mro__[1:]:  # a config that extends another (tools/rho1_probe.py) shows its fields' notes too
        if dataclasses.is_dataclass(base):
            notes = _field_notes(base)[1] | notes
    scalars = [n for n, t in hints.items() if not dataclasses.is_dataclass(t)]
    if scalars:
        title = prefix.rstrip(".") or "(top level)"
        out += ["", f"{title}:" + (f"  ({class_note})" if class_note else "")]
    for name in scalars:
        default = getattr(value, name)
        shown = '""' if default == "" else default if isinstance(default, str) else repr(default)
        out.append(f"  --{prefix}{name}  {_type_name(hints[name])} = {shown}")
        meaning = " ".join(x for x in notes.get(name, ("", "")) if x)
        out += textwrap.wrap(meaning, 100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    for name, t in hints.items():
        if dataclasses.is_dataclass(t):
            _help_lines(t, getattr(value, name), f"{prefix}{name}.", out)


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return "one of " + "|".join('""' if a == "" else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(t, "__name__", str(t))


def _field_notes(cls) -> tuple[str, dict[str, tuple[str, str]]]:
    """The comments of a config dataclass's source -> (the comment on its `class` line, {field:
    (the comment lines just above it, its trailing comment and the comment lines that continue
    it, indented further)})."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return "", {}
    comments, code = {}, set()
    for tk in tokenize.generate_tokens(io.StringIO(src).readline):
        if tk.type == tokenize.COMMENT:
            comments[tk.start[0]] = (tk.start[1], tk.string.lstrip("#").strip())
        elif tk.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code.add(tk.start[0])
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
    notes = {}
    for f in (n for n in node.body if isinstance(n, ast.AnnAssign)):
        above, ln = [], f.lineno - 1
        while ln in comments and ln not in code and comments[ln][0] == f.col_offset:
            above.insert(0, comments[ln][1])
            ln -= 1
        after, ln = [comments[f.end_lineno][1]] if f.end_lineno in comments else [], f.end_lineno + 1
        while ln in comments and ln not in code and comments[ln][0] > f.col_offset:
            after.append(comments[ln][1])
            ln += 1
        notes[f.target.id] = (" ".join(above), " ".join(after))
    return (comments[node.lineno][1] if node.lineno in comments else ""), notes
