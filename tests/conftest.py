"""Shared fixtures: tiny models built in-process from a config (no hub, no weights on disk)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels (gpu_kernels/) run in Triton's interpreter, set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton is imported (transformers' models import it)


def tiny_llama(vocab=97, layers=3, hidden=32, tie=False, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(vocab=97, layers=3, hidden=32, dtype=torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture
def llama():
    return tiny_llama()


def char_tokenizer(path):
    """A character-level tokenizer built in-process and saved as a normal HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(str(path))
    return tok


def tiny_model_json(path, layers=2, hidden=32):
    """A model-config JSON that `model_io.load_model_and_tokenizer` builds with random weights."""
    import json
    cfg = {"model_type": "llama", "vocab_size": 128, "hidden_size": hidden,
           "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


def counting_jsonl(path, n=64, seed=0):
    """A toy task a tiny model learns in a few dozen steps: continue a counting sequence."""
    import json
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            s = rng.randint(0, 5)
            f.write(json.dumps({"prompt": f"count from {s}:", "completion": " " + " ".join(
                str((s + i) % 10) for i in range(12))}) + "\n")
    return str(path)


def tiny_files(tmp, n_train=64, n_eval=8):
    """What a tiny training run reads, written into `tmp`: a character tokenizer, a model-config
    JSON (random weights) and counting-task train / held-out JSONL -> their paths."""
    char_tokenizer(tmp / "tok")
    return (tmp / "tok", tiny_model_json(tmp / "model.json"), counting_jsonl(tmp / "train.jsonl", n_train, seed=0),
            counting_jsonl(tmp / "eval.jsonl", n_eval, seed=1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs on the real SmolLM2-135M (minutes)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation, and on a shared, busy
    machine it makes every small matmul wait for a free core (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
