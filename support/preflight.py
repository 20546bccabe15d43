"""
preflight.py — the checks every script runs on its config before anything heavy loads: a bad
value or path is one line naming the key and the fix (config.run_main prints it, exit status 2),
in seconds, instead of a traceback after the model has loaded. Each script's check_config(cfg,
world) calls these right after config.parse_config; common.check_train and common.check_policy
hold the checks of the sections both training scripts share.
"""
from __future__ import annotations

import os

from support import model_io
from support.config import ConfigError


def check_min(key: str, value, minimum, strict: bool = False):
    """value >= minimum (> with strict)."""
    if value < minimum or strict and value == minimum:
        op = ">" if strict else ">="
        raise ConfigError(f"config key {key!r} must be {op} {minimum}, got {value}: set --{key}= to a value {op} {minimum}")


def check_range(key: str, value, lo, hi, lo_open=False, hi_open=False):
    """lo <= value <= hi (< with *_open)."""
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"config key {key!r} must be in {interval}, got {value}: set --{key}= to a value in {interval}")


def check_batches(prefix: str, global_batch: int, micro_batch: int, world: int):
    """Batch sizes >= 1, and the global batch made of whole micro-steps of every rank."""
    check_min(f"{prefix}.global_batch", global_batch, 1)
    check_min(f"{prefix}.micro_batch", micro_batch, 1)
    per = micro_batch * world
    if global_batch % per:
        up = -(-global_batch // per) * per
        raise ConfigError(f"config key '{prefix}.global_batch' ({global_batch}) must be a multiple of "
                          f"{prefix}.micro_batch x world size = {micro_batch} x {world} = {per}: set "
                          f"--{prefix}.global_batch={up}, or a {prefix}.micro_batch that divides it")


def check_file(key: str, path: str):
    """A local data file the config names."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"config key {key!r}: file {path!r} {what}; fix --{key}=")


def check_out_dir(key: str, path: str):
    """An output directory that exists or can be created, and is writable -- checked without
    creating anything (a dry run writes nothing)."""
    if not path:
        raise ConfigError(f"config key {key!r} is empty: name an output directory, --{key}=DIR")
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ConfigError(f"config key {key!r}: {path!r} is a file, not a directory; choose another --{key}=DIR")
    parent = p
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"config key {key!r}: cannot create {path!r}, because {parent!r} is a file; "
                          f"choose another --{key}=DIR")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"config key {key!r}: {parent!r} is not writable; choose another --{key}=DIR")


HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"  # a Hugging Face repo id: org/name


def check_model_spec(key: str, spec: str, kind: str = "model"):
    """A model spec (README: hub id, local directory, .gguf, pkg:<package>/<file>, Meta MTP
    directory, model-config .json) that can be loaded: a local one exists and holds a model (or,
    kind="tokenizer", a tokenizer), a hub id is well-formed and in the local cache or on the
    hub (asked with a 10 s timeout; offline, the cache must have it). Nothing is loaded."""
    import json
    import re
    if not spec:
        raise ConfigError(f"config key {key!r} is empty: name a {kind}")
    fix = f"fix --{key}="
    if spec.startswith("pkg:") or spec.endswith(".gguf"):
        try:
            model_io.resolve_model(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config key {key!r}: {e}") from None
        return
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"config key {key!r}: model-config file {spec!r} does not exist; {fix}")
        try:
            with open(spec) as f:
                mc = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key {key!r}: {spec!r} is not a JSON model config ({e}); {fix}") from None
        if not isinstance(mc, dict) or "model_type" not in mc:
            raise ConfigError(f"config key {key!r}: {spec!r} has no 'model_type' (a transformers model config "
                              f"is needed to build a random-init model); {fix}")
        return
    if os.path.isdir(spec):
        files = set(os.listdir(spec))
        want = ({"config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}
                if kind == "tokenizer" else {"config.json", "params.json"})
        if not files & want:
            raise FileNotFoundError(f"config key {key!r}: directory {spec!r} holds no {kind} (none of "
                                    f"{sorted(want)}); {fix}")
        return
    if os.path.exists(spec):
        raise ConfigError(f"config key {key!r}: {spec!r} is a file, not a {kind} directory, .gguf or .json; {fix}")
    first = spec.split("/")[0]
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.path.isdir(first) or not re.fullmatch(HUB_ID, spec):
        hub = "" if spec.count("/") > 1 or spec.startswith((".", "/", "~")) else " and not a hub id (org/name)"
        raise FileNotFoundError(f"config key {key!r}: {spec!r}: no such file or directory{hub}; {fix}")
    _check_hub_id(key, spec, kind)


def _check_hub_id(key: str, spec: str, kind: str):
    from huggingface_hub import try_to_load_from_cache
    for f in ("config.json", "tokenizer_config.json", "params.json"):
        if isinstance(try_to_load_from_cache(spec, f), str):
            return  # in the local cache
    local = "; on a machine without the hub, download it elsewhere and pass the local directory"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", ""):
        raise FileNotFoundError(f"config key {key!r}: {kind} {spec!r}: not a local path, and the Hugging Face hub "
                                f"could not provide it (offline: HF_HUB_OFFLINE is set and the local cache "
                                f"does not have it){local}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        HfApi().model_info(spec, timeout=10)
    except GatedRepoError:
        return  # exists; loading it says what access it needs
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"config key {key!r}: {kind} {spec!r}: not a local path, and the Hugging Face hub "
                                f"has no such repository (or it is private: log in); fix --{key}=") from None
    except Exception as e:  # no network, DNS, timeout, HTTP errors
        raise FileNotFoundError(f"config key {key!r}: {kind} {spec!r}: not a local path, and the Hugging Face hub "
                                f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})"
                                f"{local}") from None


def spec_vocab_size(spec: str) -> int | None:
    """The vocabulary size of a model spec when it can be read without loading the model (a
    model-config .json, a local directory's config.json); else None."""
    import json
    path = spec if spec.endswith(".json") else os.path.join(spec, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            mc = json.load(f)
        return int(mc.get("vocab_size") or mc.get("text_config", {}).get("vocab_size"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_random_init_vocab(key: str, spec: str, policy_vocab: int | None, policy: str):
    """A random-init model-config .json (reference, value backbone) has no tokenizer of its own: it
    reads the policy's token ids, so its vocabulary must be the policy's (else an index error
    mid-forward). policy_vocab None: not known yet (checked again once the policy has loaded)."""
    if spec.endswith(".json") and policy_vocab is not None:
        v = spec_vocab_size(spec)
        if v is not None and v != policy_vocab:
            raise ConfigError(f"config key {key!r}: {spec!r} has vocab_size {v} but the policy {policy!r} has "
                              f"{policy_vocab}; a random-init model shares the policy's tokenizer, so set "
                              f"vocab_size to {policy_vocab} in {spec}")
