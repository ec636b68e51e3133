"""Transcoders: paired harvest and source, every encoder writing another width, the planted
MLP's features recovered, folding, resume and bf16."""

from __future__ import annotations

import json

import pytest
import torch

from llm_sae.errors import StoreError
from llm_sae.sae import REGISTRY, SAEConfig, load_sae
from llm_sae.sources.paired import PairedStoreSource
from llm_sae.sources.planted_mlp import PlantedMLP
from llm_sae.sources.synthetic import SyntheticConfig, recovery_metrics
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import build_sae, train
from llm_sae.train.trainer import Trainer

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory, tiny_gpt2_dir, text_dir):
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    out = tmp_path_factory.mktemp("stores") / "pair"
    dirs = harvest(HarvestConfig(
        model=str(tiny_gpt2_dir), hook=[OUT], pair=[f"{IN}:{OUT}"], dataset=str(text_dir / "docs.jsonl"),
        tokens=1500, out=str(out), context_length=32, batch_size=16, device="cpu", shard_rows=512,
        progress=False,
    ))
    return dirs[IN], dirs[OUT]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu_l1", "jumprelu", "matryoshka"])
def test_every_encoder_is_a_transcoder_and_folds_both_scales(arch):
    torch.manual_seed(0)
    sae = REGISTRY[arch](SAEConfig(arch=arch, d_in=16, n_latents=64, k=4, d_out=24, skip=True))
    x_BD, y_BE = torch.randn(32, 16), torch.randn(32, 24)
    out = sae(x_BD, target_BE=y_BE, dead_mask_N=torch.ones(64, dtype=torch.bool))
    assert out.x_hat_BD.shape == (32, 24) and torch.isfinite(out.loss)
    out.loss.backward()
    assert sae.W_skip.grad is not None and sae.W_dec.grad.shape == (64, 24)
    with pytest.raises(ValueError, match="target_BE"):
        sae(x_BD)
    sae.eval()
    with torch.no_grad():
        sae.W_skip.normal_()
        want_BE = sae.predict(2.0 * x_BD) / 3.0
        sae.fold_input_scale(2.0, 3.0)
        torch.testing.assert_close(sae.predict(x_BD), want_BE, rtol=1e-4, atol=1e-4)


def test_planted_mlp_features_recovered(one_thread):
    """Ground truth: the TopK transcoder's decoder rows find ≥ 90% of the planted output
    directions at cos > 0.9."""
    torch.manual_seed(0)
    mlp = PlantedMLP(SyntheticConfig(d_in=32, n_features=64, mean_active=4, seed=0), d_out=48)
    steps, B = 400, 256
    cfg = TrainConfig(store="-", out="-", arch="topk", k=4, n_latents=256, lr=4e-3, batch_size=B,
                      tokens=steps * B)
    tr = Trainer(build_sae(cfg, 32, 48), cfg, total_steps=steps)
    tr.init_from_sample(*mlp.batch(10**6, 4096))
    tr.fit(mlp.batches(B), progress=False)
    tr.sae.fold_input_scale(tr.input_scale, tr.output_scale)
    m = recovery_metrics(mlp.out_features_FE, tr.sae.W_dec)
    assert m.frac_recovered >= 0.9, m
    x_BD, y_BE = mlp.batch(10**6 + 1, 2048)
    with torch.no_grad():
        fvu = (y_BE - tr.sae.predict(x_BD)).pow(2).sum() / (y_BE - y_BE.mean(0)).pow(2).sum()
    assert fvu < 0.2


def test_paired_harvest_names_partners_and_rows_align(pair_dirs, tiny_store):
    d_in, d_out = pair_dirs
    m_in = json.loads((d_in / "manifest.json").read_text())["pair"]
    m_out = json.loads((d_out / "manifest.json").read_text())["pair"]
    assert m_in["role"] == "input" and m_in["partner_hook"] == OUT
    assert m_out["role"] == "output" and m_out["partner_hook"] == IN
    assert (d_in / m_in["partner"]).resolve() == d_out.resolve()
    src = PairedStoreSource(d_in, d_out)
    src.check()
    x_BD, rows_B, y_BE = next(iter(src.batches(64, seed=0, start_batch=3, device=torch.device("cpu"),
                                               dtype=torch.float32, batch_slice=None)))
    torch.testing.assert_close(x_BD, src.inputs.store.acts_at(rows_B.numpy()).float())
    torch.testing.assert_close(y_BE, src.targets.store.acts_at(rows_B.numpy()).float())
    for a, b in ((d_in, tiny_store), (d_out, d_in)):  # not a pair; the pair swapped
        with pytest.raises(StoreError, match="--pair"):
            PairedStoreSource(a, b).check()


def test_train_skip_transcoder_from_pair_resumes_and_loads(pair_dirs, tmp_path, one_thread, monkeypatch):
    d_in, d_out = pair_dirs
    kw = dict(store=str(d_in), target_store=str(d_out), arch="topk", k=4, expansion=4, skip=True,
              batch_size=64, tokens=64 * 30, checkpoint_every=64 * 15, log_every=10, device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "full"), **kw))
    # A run stopped after its step-15 checkpoint and resumed ends with the same weights.
    step = Trainer.step

    def dies_at_20(self, *a):
        if self.batches_seen == 20:
            raise KeyboardInterrupt
        return step(self, *a)

    monkeypatch.setattr(Trainer, "step", dies_at_20)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "half"), **kw))
    monkeypatch.setattr(Trainer, "step", step)
    resumed = train(TrainConfig(out=str(tmp_path / "half"), **kw))
    a, b = load_sae(full), load_sae(resumed)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)
    assert a.cfg.d_out == 32 and a.cfg.skip and a.W_skip.shape == (32, 32)
    src = PairedStoreSource(d_in, d_out)
    x_BD, y_BE = src.sample_pairs(512, seed=1)
    with torch.no_grad():
        fvu = float((y_BE - a.predict(x_BD)).pow(2).sum() / (y_BE - y_BE.mean(0)).pow(2).sum())
    assert fvu < 0.9  # raw activations in, raw MLP outputs out: the scales are folded


def test_bf16_transcoder_steps(one_thread):
    mlp = PlantedMLP(SyntheticConfig(d_in=32, n_features=64, mean_active=4, seed=0), d_out=48)
    cfg = TrainConfig(store="-", out="-", arch="topk", k=4, n_latents=128, batch_size=128,
                      tokens=128 * 5, precision="bf16", device="cpu")
    tr = Trainer(build_sae(cfg, 32, 48), cfg, total_steps=5)
    tr.fit(mlp.batches(128), progress=False)
    assert tr.step_idx == 5 and tr.output_scale != tr.input_scale


def test_skip_without_target_is_a_config_error():
    from llm_sae.config import ConfigError

    with pytest.raises(ConfigError, match="--target-store"):
        SAEConfig(d_in=8, n_latents=32, k=2, skip=True).resolved()


def test_replacement_model_loss_recovered(pair_dirs, tiny_gpt2_dir, tmp_path, one_thread):
    """A transcoder predicting zeros recovers nothing; with the clean error term any
    transcoder gives back the clean model; a trained one lands between."""
    from llm_sae.evaluate.replacement import Replacement, replacement_from_run, replacement_metrics
    from llm_sae.lm.hooks import load_model

    d_in, d_out = pair_dirs
    run = train(TrainConfig(store=str(d_in), target_store=str(d_out), out=str(tmp_path / "tc"), arch="topk",
                            k=8, expansion=4, batch_size=64, tokens=64 * 40, device="cpu"))
    model = load_model(str(tiny_gpt2_dir))
    rep = replacement_from_run(run, load_sae(run))
    assert (rep.in_hook, rep.out_hook) == (IN, OUT)

    class Zeros:
        def predict(self, x_BD):
            return torch.zeros(x_BD.shape[0], 32)

    l1 = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    ctx_CL = PairedStoreSource(d_in, d_out).inputs.store.sequence_tokens([0, 1, 2, 3])
    res = replacement_metrics(model, {"tc0": rep, "zeros1": Replacement(Zeros(), *l1)}, ctx_CL, batch_size=2)
    r = res["replaced"]
    assert set(r) == {"tc0", "zeros1", "all"} and res["tokens"] == 4 * 31
    assert r["zeros1"]["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    for row in r.values():
        assert row["loss_recovered_with_error"] == pytest.approx(1.0, abs=1e-4)
        assert row["kl_with_error"] == pytest.approx(0.0, abs=1e-4)
    assert r["tc0"]["kl"] > 0 and r["tc0"]["ce"] != res["ce_clean"]
