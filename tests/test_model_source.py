"""Training on the fly: the model's rows are the rows harvest stores (BOS/EOS left out),
the shuffled order is a pure function of the seed (so a resume sees the same batches), and
an SAE trained from the model is as good as one trained from a store of the same text."""

from __future__ import annotations

import itertools

import pytest
import torch

from llm_sae.config import ConfigError
from llm_sae.errors import DataError, ModelError
from llm_sae.sae.formats.native import load_sae
from llm_sae.sources.model import ModelSource
from llm_sae.store.store import open_store
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def source(tiny_gpt2_dir, text_dir):
    return ModelSource(str(tiny_gpt2_dir), str(text_dir / "docs.jsonl"), HOOK, context_length=32,
                       batch_contexts=8, buffer_rows=256, norm_rows=512)


def take(source, n, **kw):
    args = dict(seed=1, start_batch=0, device=torch.device("cpu"), dtype=torch.float32, batch_slice=None)
    return list(itertools.islice(source.batches(64, **{**args, **kw}), n))


def test_rows_are_the_store_rows_shuffled_in_blocks(source, tiny_store):
    store = open_store(tiny_store)  # the same model, text and context length, harvested
    assert source.d_in == store.d_in
    seen = []
    for x_BD, rows_B in take(source, 12):
        keep = rows_B < store.n_rows
        want_BD = torch.stack([store.acts(int(r), int(r) + 1)[0] for r in rows_B[keep]])
        torch.testing.assert_close(x_BD[keep], want_BD, atol=1e-5, rtol=1e-4)
        assert not set(store.token_ids(0, store.n_rows)[rows_B[keep]].tolist()) & set(source.special)
        seen += rows_B.tolist()
    # The first batch comes from the first block (8 contexts of ≤ 31 rows), shuffled.
    assert sorted(seen[:64]) != seen[:64] and max(seen[:64]) < 8 * 31
    assert len(set(seen)) == len(seen)


def test_order_is_the_seed_s_and_resume_skips_exactly(source):
    full = take(source, 9)
    resumed = take(source, 4, start_batch=5)
    for (a, ra), (b, rb) in zip(full[5:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(ra, rb)
    other = take(source, 2, seed=2)
    assert not torch.equal(other[0][1], full[0][1])
    half = take(source, 1, batch_slice=(1, 2))[0]
    assert torch.equal(half[0], full[0][0][32:64])


def test_on_the_fly_matches_store_quality(tiny_gpt2_dir, text_dir, tiny_store, tmp_path):
    common = dict(arch="topk", n_latents=128, k=4, tokens=100 * 128, batch_size=128, device="cpu",
                  log_every=50, init_rows=1024, seed=0)
    from_store = train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "store"), **common))
    from_model = train(TrainConfig(model=str(tiny_gpt2_dir), dataset=str(text_dir / "docs.jsonl"), hook=HOOK,
                                   context_length=32, buffer_rows=1024, out=str(tmp_path / "model"), **common))
    x_BD = open_store(tiny_store).acts(0, 2000).float()
    fvus = []
    for out in (from_store, from_model):
        sae = load_sae(out)
        with torch.no_grad():
            x_hat_BD = sae.decode(sae.encode(x_BD))
        fvus.append(float((x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()))
    assert fvus[0] < 0.5, fvus  # it learned something
    assert abs(fvus[0] - fvus[1]) < 0.25 * fvus[0], fvus  # and the same from either source


def test_source_errors(tiny_gpt2_dir, text_dir, tmp_path):
    with pytest.raises(ConfigError, match="either --store"):
        train(TrainConfig(out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="not both"):
        train(TrainConfig(out=str(tmp_path / "o"), store="s", model="m"))
    with pytest.raises(ModelError, match="no hook"):
        ModelSource(str(tiny_gpt2_dir), str(text_dir / "docs.jsonl"), "blocks.9.hook_nothing")
    empty = tmp_path / "empty.txt"
    empty.write_text("hi")
    with pytest.raises(DataError, match="no complete context"):
        ModelSource(str(tiny_gpt2_dir), str(empty), HOOK, context_length=32).check()
