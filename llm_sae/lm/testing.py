"""Tiny models and text for tests and examples: random weights, built from a config.

Nothing here touches a hub. Each model is saved with ``save_pretrained`` into a plain
directory, exactly as a user's own model would be, so every model path of the toolkit
(local directory → TransformerBridge) is exercised by the tests.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "# a comment about the quick brown fox\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "for i in range(10):\n    print(i, 'hello world')\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(0)\n",
    "Sparse autoencoders find features in the residual stream of a language model.\n",
    "x = [1, 2, 3]\ny = {'a': 1, 'b': (2, 3)}\n",
]

BOS = "<|endoftext|>"


def make_text(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Deterministic small documents with some structure (code-like and prose)."""
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        parts = rng.sample(SAMPLE_TEXT, k=rng.randint(1, 4))
        docs.append(f"# doc {i}\n" + "".join(parts))
    return docs


def make_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS, pad_token=BOS
    )


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "gpt2",
    *,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 2,
    context: int = 64,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-weight causal LM of ``arch`` (gpt2, llama, neox) plus tokenizer to ``out_dir``."""
    import torch
    import transformers as tf

    out_dir = Path(out_dir)
    tokenizer = make_tokenizer(make_text(), vocab_size=vocab_size)
    vocab = len(tokenizer)
    bos = tokenizer.bos_token_id
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_positions=context, n_embd=d_model, n_layer=n_layers,
            n_head=n_heads, bos_token_id=bos, eos_token_id=bos,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
            max_position_embeddings=context, bos_token_id=bos, eos_token_id=bos,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "neox":
        cfg = tf.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            max_position_embeddings=context, bos_token_id=bos, eos_token_id=bos,
        )
        model = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use gpt2, llama or neox")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_text_files(out_dir: str | Path, n_docs: int = 200, seed: int = 0) -> Path:
    """Write ``make_text`` documents as a .txt, a .jsonl and a folder of files; returns out_dir."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = make_text(n_docs, seed)
    (out_dir / "docs.txt").write_text("\n\n".join(docs))
    with open(out_dir / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return out_dir
