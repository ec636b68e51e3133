"""Transcoders at several layers of one harvest: `llm-sae eval` on transcoder runs (the
replacement model per layer and all at once)."""

from __future__ import annotations

import json

import pytest

from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train

PAIRS = [(f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out") for i in (0, 1)]


@pytest.fixture(scope="module")
def layer_pairs(tmp_path_factory, tiny_gpt2_dir, text_dir):
    """Both layers' (MLP input, MLP output) stores from one harvest of tiny_gpt2."""
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    out = tmp_path_factory.mktemp("stores") / "layers"
    dirs = harvest(HarvestConfig(
        model=str(tiny_gpt2_dir), hook=[o for _, o in PAIRS], pair=[f"{i}:{o}" for i, o in PAIRS],
        dataset=str(text_dir / "docs.jsonl"), tokens=1500, out=str(out), context_length=32, batch_size=16,
        device="cpu", shard_rows=512, progress=False,
    ))
    return [(dirs[i], dirs[o]) for i, o in PAIRS]


def test_cli_eval_reports_the_replacement_model(layer_pairs, tmp_path, one_thread, capsys):
    from llm_sae.cli import main
    from llm_sae.errors import LlmSaeError

    runs = []
    for layer, (d_in, d_out) in enumerate(layer_pairs):
        runs.append(str(train(TrainConfig(
            store=str(d_in), target_store=str(d_out), out=str(tmp_path / f"tc{layer}"), arch="topk", k=8,
            expansion=4, skip=layer == 1, batch_size=64, tokens=64 * 60, device="cpu"))))
    assert main(["eval", "--sae", ",".join(runs), "--out", str(tmp_path / "ev"), "--n-contexts", "4",
                 "--eval-rows", "512", "--model-batch-size", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "replacement model over" in table and "all" in table
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rep = report["replacement"]["replaced"]
    assert set(rep) == {"tc0", "tc1", "all"} and rep["all"]["transcoders"] == ["tc0", "tc1"]
    for name in ("tc0", "tc1"):
        e = report["saes"][name]
        assert e["out_hook"] == f"blocks.{name[-1]}.hook_mlp_out" and e["reconstruction"]["rows"] == 512
        assert 0 < e["reconstruction"]["fvu"] < 1  # of the MLP output, not of the input
        assert e["replacement"] == rep[name]
    for row in rep.values():
        assert row["loss_recovered_with_error"] == pytest.approx(1.0, abs=1e-4)
        assert row["kl"] > row["kl_with_error"]  # (a random tiny model: LR itself is noisy)
    # An SAE among transcoders is refused before any work.
    sae_run = train(TrainConfig(store=str(layer_pairs[0][1]), out=str(tmp_path / "sae"), k=4, expansion=2,
                                batch_size=64, tokens=64 * 2, device="cpu"))
    from llm_sae.evaluate.config import EvalConfig
    from llm_sae.evaluate.run import evaluate

    with pytest.raises(LlmSaeError, match="separate runs"):
        evaluate(EvalConfig(sae=[runs[0], str(sae_run)]))


# ------------------------------------------------------------------ cross-layer transcoders


def _planted_clt_run(out, steps, *, B=256, checkpoint_every=0):
    import torch

    from llm_sae.sae.clt import CLTConfig, CrossLayerTranscoder
    from llm_sae.sources.layers import PlantedLayers
    from llm_sae.sources.synthetic import SyntheticConfig
    from llm_sae.train.clt import CLTTrainConfig, fit_clt

    planted = PlantedLayers(2, SyntheticConfig(d_in=32, n_features=48, mean_active=3, seed=0), d_out=24)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=32, d_out=24, n_latents=128, k=3))
    cfg = CLTTrainConfig(pair=[], out=str(out), k=3, batch_size=B, tokens=B * steps, lr=1e-2,
                         checkpoint_every=B * checkpoint_every, device="cpu", progress=False)
    summary = fit_clt(clt, planted, cfg, s_in_L=[1.0, 1.0], s_out_L=[1.0, 1.0])
    return planted, clt, summary


@pytest.mark.slow
def test_clt_recovers_planted_cross_layer_features(tmp_path, one_thread):
    """Ground truth: a 2-layer linear system whose layer-0 features write to both outputs;
    each CLT layer's decoders (over all the layers a latent writes to) find ≥ 90% of that
    layer's planted features at cos > 0.9, and eval mode (the JumpReLU thresholds, not the
    batch top-k) predicts both outputs at FVU < 0.2."""
    import torch

    from llm_sae.sae.clt import load_clt
    from llm_sae.sources.synthetic import recovery_metrics

    planted, clt, summary = _planted_clt_run(tmp_path, 500)
    for h in range(2):
        m = recovery_metrics(planted.out_features[h].flatten(1), clt.W_dec[h].detach().flatten(1))
        assert m.frac_recovered >= 0.9, (h, m)
    x_BLD, y_BLE = planted.batch(10**6, 2048)
    with torch.no_grad():
        err_L = (y_BLE - clt.predict(x_BLD)).pow(2).sum((0, 2))
        fvu_L = err_L / (y_BLE - y_BLE.mean(0)).pow(2).sum((0, 2))
        assert (fvu_L < 0.2).all(), fvu_L
        assert torch.equal(load_clt(tmp_path).predict(x_BLD), clt.predict(x_BLD))
    assert summary["memory_bytes_per_layer"] == [16 * 128 * (33 + 2 * 24), 16 * 128 * (33 + 24)]


def test_clt_resumes_exactly(tmp_path, one_thread, monkeypatch):
    """Killed after its step-20 checkpoint and resumed, a run ends bit-identical to the
    uninterrupted one."""
    import torch

    from llm_sae.sae import clt as clt_mod
    from llm_sae.sae.clt import load_clt

    _planted_clt_run(tmp_path / "full", 40, checkpoint_every=20)
    real, calls = clt_mod.CrossLayerTranscoder.constrain_weights, {"n": 0}

    def dies_at_30(self):
        calls["n"] += 1
        if calls["n"] == 31:  # one from __init__, then one per step
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(clt_mod.CrossLayerTranscoder, "constrain_weights", dies_at_30)
    with pytest.raises(KeyboardInterrupt):
        _planted_clt_run(tmp_path / "half", 40, checkpoint_every=20)
    monkeypatch.setattr(clt_mod.CrossLayerTranscoder, "constrain_weights", real)
    assert _planted_clt_run(tmp_path / "half", 40, checkpoint_every=20)[2]["resumed_at"] == 20
    full, half = load_clt(tmp_path / "full").state_dict(), load_clt(tmp_path / "half").state_dict()
    for k, v in full.items():
        assert torch.equal(v, half[k]), k


def test_clt_exports_in_circuit_tracers_layout(tmp_path):
    """circuit-tracer's load_clt reads W_enc_i/W_dec_i files; computing its forward from them
    (z = f·[f > θ], decoders summed into later layers) gives our predictions."""
    import torch
    from safetensors.torch import load_file

    from llm_sae.errors import LlmSaeError
    from llm_sae.interop.circuit_tracer import export_circuit_tracer
    from llm_sae.sae.clt import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(0)
    L, N, D = 3, 16, 8
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_in=D, d_out=D, n_latents=N, k=2)).eval()
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        clt.b_dec.normal_(0, 0.2)
        clt.threshold.copy_(torch.tensor([0.1, -1.0, 0.3]))  # one never estimated: a ReLU
    out = export_circuit_tracer(clt, tmp_path / "ct")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"W_enc_{i}.safetensors" for i in range(L)] + [f"W_dec_{i}.safetensors" for i in range(L)])
    enc = [load_file(str(out / f"W_enc_{i}.safetensors")) for i in range(L)]
    dec = [load_file(str(out / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(L)]
    assert [d.shape for d in dec] == [(N, L - i, D) for i in range(L)]
    x_LBD = torch.randn(L, 64, D)
    f_LBN = torch.einsum("lbd,lfd->lbf", x_LBD, torch.stack([e[f"W_enc_{i}"] for i, e in enumerate(enc)]))
    f_LBN = f_LBN + torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)])[:, None]
    theta_L1N = torch.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)])[:, None]
    z_LBN = f_LBN * (f_LBN > theta_L1N)
    y_LBD = torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)])[:, None].repeat(1, 64, 1)
    for i in range(L):
        y_LBD[i:] += torch.einsum("bn,njd->jbd", z_LBN[i], dec[i])
    with torch.no_grad():
        torch.testing.assert_close(y_LBD.transpose(0, 1), clt.predict(x_LBD.transpose(0, 1)), rtol=1e-5, atol=1e-5)
    wide = CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=8, d_out=6, n_latents=16, k=2))
    with pytest.raises(LlmSaeError, match="one width"):
        export_circuit_tracer(wide, tmp_path / "wide")


def test_cli_train_clt_from_one_harvest(layer_pairs, tmp_path, one_thread, capsys):
    from llm_sae.cli import main
    from llm_sae.sae.clt import load_clt

    spec = ",".join(f"{i}:{o}" for i, o in layer_pairs)
    assert main(["train-clt", "--pair", spec, "--out", str(tmp_path / "clt"), "--expansion", "2", "--k", "4",
                 "--batch-size", "128", "--tokens", "1280", "--no-progress"]) == 0
    clt = load_clt(tmp_path / "clt")
    assert (clt.cfg.n_layers, clt.cfg.d_in, clt.cfg.d_out, clt.cfg.n_latents) == (2, 32, 32, 64)
    assert [p["out_hook"] for p in json.loads((tmp_path / "clt" / "train_cfg.json").read_text())["pairs"]] == [
        o for _, o in PAIRS]
    (i0, o0), (i1, o1) = layer_pairs
    # Layer 1's pair swapped: one line naming the fix, before any training.
    assert main(["train-clt", "--pair", f"{i0}:{o0},{o1}:{i1}", "--out", str(tmp_path / "bad")]) != 0
    assert "--pair IN_HOOK:OUT_HOOK" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "clt.safetensors").exists()


# ------------------------------------------------------------ the CLT's replacement model


def test_clt_replacement_sums_every_earlier_layers_decoders(tiny_gpt2_dir, one_thread):
    """Each MLP output t is replaced by Σ_{l ≤ t} decoders of encoders that read the
    replaced stream: against the same model run by hand, one layer at a time, with the
    batched ``clt.predict`` (another code path than the splice's per-layer encode)."""
    from functools import partial

    import torch

    from llm_sae.evaluate.replacement import CLTLayer, replacement_metrics
    from llm_sae.lm.hooks import load_model
    from llm_sae.sae.clt import CLTConfig, CrossLayerTranscoder

    model = load_model(str(tiny_gpt2_dir))
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=32, d_out=32, n_latents=48, k=4)).eval()
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.1)
        clt.threshold.copy_(torch.tensor([0.3, 0.1]))
        for W in clt.W_dec:
            W.mul_(3.0)  # large enough to move the loss far from the clean model's
    ins, outs = [i for i, _ in PAIRS], [o for _, o in PAIRS]
    reps = {f"L{t}": CLTLayer(clt, t, tuple(ins), outs[t]) for t in range(2)}
    toks = torch.randint(0, model.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    rep = replacement_metrics(model, reps, toks, batch_size=2)

    def by_hand(replace: list[int]) -> float:
        """CE with the MLPs in ``replace`` swapped for clt.predict on the inputs seen so far."""
        seen: dict[str, torch.Tensor] = {}

        def grab(x, hook, name):
            seen[name] = x
            return x

        def put(y, hook, t):
            x_BTLD = torch.stack([seen.get(h, torch.zeros_like(seen[ins[0]])) for h in ins], 2)
            y_BTLE = clt.predict(x_BTLD.reshape(-1, 2, 32)).reshape(*y.shape[:2], 2, 32)
            return y_BTLE[:, :, t]  # layer t's output needs only the inputs of layers ≤ t

        with torch.no_grad():
            logits = model.run_with_hooks(toks, return_type="logits", fwd_hooks=[(h, partial(grab, name=h)) for h in ins]
                                          + [(outs[t], partial(put, t=t)) for t in replace])
            logp = logits[:, :-1].log_softmax(-1)
            return float(-logp.gather(-1, toks[:, 1:, None]).mean())

    for group, layers in (("L0", [0]), ("L1", [1]), ("all", [0, 1])):
        row = rep["replaced"][group]
        assert row["ce"] == pytest.approx(by_hand(layers), rel=1e-5), group
        assert abs(row["ce"] - rep["ce_clean"]) > 0.01  # the test could tell a wrong splice
        assert row["ce_with_error"] == pytest.approx(rep["ce_clean"], abs=1e-5)
        assert row["kl_with_error"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_cli_eval_on_a_clt_folder(tmp_path, one_thread, capsys):
    """`llm-sae eval --sae CLT_DIR`: each layer's FVU of its MLP output (decoders of layers
    ≤ t summed) and the replacement model; with the error term all layers replaced give the
    clean loss, without it a trained CLT beats zero-ablating the same MLPs. On the shipped
    tiny-stdlib, whose MLPs carry its loss (tiny_gpt2's random ones barely move it, so its
    loss recovered is noise)."""
    import torch

    from llm_sae.cli import main
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest
    from llm_sae.sae.clt import load_clt
    from llm_sae.store.store import open_store

    pairs = [(f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out") for i in (0, 1)]
    dirs = harvest(HarvestConfig(model="tiny-stdlib", dataset="stdlib", tokens=2560, out=str(tmp_path / "st"),
                                 hook=[o for _, o in pairs], pair=[f"{i}:{o}" for i, o in pairs],
                                 context_length=64, device="cpu", progress=False))
    layer_pairs = [(dirs[i], dirs[o]) for i, o in pairs]
    spec = ",".join(f"{i}:{o}" for i, o in layer_pairs)
    clt_dir = tmp_path / "clt"
    assert main(["train-clt", "--pair", spec, "--out", str(clt_dir), "--expansion", "2", "--k", "8",
                 "--batch-size", "128", "--tokens", str(128 * 40), "--lr", "3e-3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(clt_dir), "--out", str(tmp_path / "ev"), "--n-contexts", "4",
                 "--eval-rows", "512", "--model-batch-size", "2", "--no-progress"]) == 0
    assert "clt/L1" in capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rep = report["replacement"]["replaced"]
    assert set(rep) == {"clt/L0", "clt/L1", "all"}
    all_ = rep["all"]
    assert all_["ce_with_error"] == pytest.approx(report["replacement"]["ce_clean"], abs=1e-4)
    assert all_["loss_recovered_with_error"] == pytest.approx(1.0, abs=1e-3)
    assert all_["ce"] < all_["ce_zero_ablation"] and all_["kl"] < all_["kl_zero_ablation"]
    assert all_["loss_recovered"] > 0.2  # an untrained CLT's is below 0
    # FVU of each layer's output from the CLT's own batched predict on the stores' last rows.
    clt = load_clt(clt_dir)
    n = open_store(layer_pairs[0][0]).n_rows
    x_BLD = torch.stack([open_store(a).acts(n - 512, n).float() for a, _ in layer_pairs], 1)
    y_BLE = torch.stack([open_store(b).acts(n - 512, n).float() for _, b in layer_pairs], 1)
    with torch.no_grad():
        err_L = (y_BLE - clt.predict(x_BLD)).pow(2).sum((0, 2))
    fvu_L = err_L / (y_BLE - y_BLE.mean(0)).pow(2).sum((0, 2))
    for t in range(2):
        e = report["saes"][f"clt/L{t}"]
        assert e["out_hook"] == pairs[t][1] and e["replacement"] == rep[f"clt/L{t}"]
        assert e["reconstruction"]["fvu"] == pytest.approx(float(fvu_L[t]), rel=1e-4)
    # A CLT beside anything else is refused before any work.
    assert main(["eval", "--sae", f"{clt_dir},{clt_dir}", "--out", str(tmp_path / "ev2")]) == 2
    assert "evaluate it alone" in capsys.readouterr().err
    assert not (tmp_path / "ev2").exists()
