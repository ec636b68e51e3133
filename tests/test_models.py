import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_sae.errors import ModelError
from llm_sae.lm import corpus, models

SHIPPED = Path(models.ASSETS_DIR) / "tiny-stdlib"


def test_short_names_resolve_to_the_shipped_directory():
    path = models.resolve_model("tiny-stdlib")
    assert Path(path) == SHIPPED
    assert models.resolve_model("tiny") == path
    assert models.list_models() == {"tiny-stdlib": SHIPPED}


def test_other_names_pass_through(tmp_path):
    assert models.resolve_model("gpt2") == "gpt2"
    assert models.resolve_model("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path) == str(tmp_path)


def test_resolve_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="config.json"):
        models.resolve_model(tmp_path)  # a directory, but not a saved model
    monkeypatch.setattr(models, "ASSETS_DIR", tmp_path / "stripped")
    with pytest.raises(ModelError, match="train_tiny_lm.py"):
        models.resolve_model("tiny")
    assert models.list_models() == {}


def test_offline_uncached_hub_name_is_a_model_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        models.load_bridge("llm-sae-test/surely-not-cached-model")
    with pytest.raises(ModelError, match="dtype"):
        models.load_bridge(SHIPPED, dtype="float33")


def _windows(tokenizer, texts, n, context):
    """``n`` BOS-led windows spread over the held-out stream, as the trainer builds them."""
    bos = tokenizer.bos_token_id
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [bos, *ids]
    body = context - 1
    starts = np.linspace(0, len(stream) - body - 1, n).astype(int)
    return torch.tensor([[bos, *stream[s : s + body]] for s in starts])


def test_shipped_model_beats_unigram_on_heldout_stdlib():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model("tiny-stdlib")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32
    assert tokenizer.bos_token == "<|endoftext|>"
    context = model.config.n_positions
    x_WL = _windows(tokenizer, corpus.load_stdlib_corpus("test"), 12, context)
    with torch.no_grad():
        logits = model(x_WL).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), x_WL[:, 1:].reshape(-1)
    ).item()
    # Unigram from a slice of the train split (add-one smoothed), scored on the same targets.
    train = [d.text for d in itertools.islice(corpus.iter_documents("train"), 60)]
    counts = np.ones(len(tokenizer))
    for ids in tokenizer(train, add_special_tokens=False)["input_ids"]:
        counts += np.bincount(ids, minlength=len(tokenizer))
    unigram = float(-np.log(counts / counts.sum())[x_WL[:, 1:].reshape(-1).numpy()].mean())
    assert loss < unigram - 1.5, (loss, unigram)
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["heldout"]["model_loss"] < recipe["heldout"]["bigram_loss"]


def test_shipped_assets_fit_the_size_budget():
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    assert not (SHIPPED / "checkpoint.pt").exists()


@pytest.mark.slow
def test_shipped_model_boots_as_a_bridge_with_residual_hooks():
    from transformers import AutoModelForCausalLM

    bridge = models.load_bridge("tiny", device="cpu")
    tokens = bridge.to_tokens("class A:\n    def f(self):\n        return 'x'  # done\n")
    assert tokens[0, 0].item() == bridge.tokenizer.bos_token_id
    logits, cache = bridge.run_with_cache(tokens)
    n_layers = bridge.cfg.n_layers
    for layer in range(n_layers):
        assert cache[f"blocks.{layer}.hook_resid_post"].shape == (*tokens.shape, bridge.cfg.d_model)
    hf = AutoModelForCausalLM.from_pretrained(models.resolve_model("tiny")).eval()
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_model_that_fails_to_boot_is_a_one_line_model_error(tmp_path):
    """Whatever transformers raises (often several lines) becomes one line naming the fix."""
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture",\n "x": 1}')
    with pytest.raises(ModelError, match="Check the name") as err:
        models.load_bridge(bad)
    assert "\n" not in str(err.value)
