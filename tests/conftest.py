"""Shared fixtures: tiny random-weight models saved to disk, sample text, a tiny store.

Session-scoped, so every test file reuses the same few directories. Other test files
rely on these names: ``tiny_gpt2_dir``, ``tiny_llama_dir``, ``text_dir``, ``tiny_store``.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A 2-layer, d_model=32 GPT-2 with its tokenizer, saved with save_pretrained."""
    from llm_sae.lm.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny_gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer, d_model=32 Llama with its tokenizer, saved with save_pretrained."""
    from llm_sae.lm.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny_llama", "llama")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """docs.txt (one document) and docs.jsonl (200 documents, column "text")."""
    from llm_sae.lm.testing import write_text_files

    return write_text_files(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_gpt2_dir, text_dir):
    """2,000 rows of tiny_gpt2 blocks.0.hook_resid_post (d_in=32, float32, context 32)."""
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    out = tmp_path_factory.mktemp("stores") / "tiny_store"
    harvest(HarvestConfig(
        model=str(tiny_gpt2_dir), hook=["blocks.0.hook_resid_post"], dataset=str(text_dir / "docs.jsonl"),
        tokens=2000, out=str(out), context_length=32, batch_size=16, device="cpu",
        shard_rows=512, progress=False,
    ))
    return out


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. Its tensors are tiny: intra-op threads only add
    synchronisation, which on a busy machine costs orders of magnitude more than the math."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
