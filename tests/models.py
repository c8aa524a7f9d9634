"""Small random LLaMA models and inputs shared by the method and training tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed=0, vocab=128, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=None, window=64,
               **config):
    """A seeded, randomly initialised LlamaForCausalLM in eval mode with the original RoPE (base 10000)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=window,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def random_ids(n, vocab, seed=1):
    """A [1, n] batch of token ids drawn with a fixed seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


def stdlib_tokenizer(vocab=512, modules=("argparse.py", "typing.py", "inspect.py")):
    """(a byte-level BPE trained on a few standard-library modules, their texts): a small real tokenizer
    and haystack corpus, available offline on every machine."""
    import sysconfig
    from pathlib import Path

    from workflow import data

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in modules]
    tokenizer, _ = data.train_tokenizer(texts, vocab, 2, None)
    return tokenizer, texts
