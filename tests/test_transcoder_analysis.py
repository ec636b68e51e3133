"""`llm-sae analyze` and the dashboard on a transcoder: a feature reads the MLP's input, so
its contexts come from the input store; its decoder writes into the MLP output and so into
the residual stream, so its logit effects are W_dec · W_U (of the output width, which here
differs from the input's)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train

IN, OUT = "blocks.0.mlp.hook_pre", "blocks.0.hook_mlp_out"  # d_mlp 128 → d_model 32


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory, tiny_gpt2_dir, text_dir):
    """A TopK transcoder from tiny_gpt2's MLP pre-activations to its MLP output."""
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    root = tmp_path_factory.mktemp("tc_analysis")
    dirs = harvest(HarvestConfig(
        model=str(tiny_gpt2_dir), hook=[OUT], pair=[f"{IN}:{OUT}"], dataset=str(text_dir / "docs.jsonl"),
        tokens=1024, out=str(root / "stores"), context_length=32, batch_size=16, device="cpu",
        shard_rows=512, progress=False,
    ))
    torch.set_num_threads(1)
    run = train(TrainConfig(store=str(dirs[IN]), target_store=str(dirs[OUT]), out=str(root / "tc"), arch="topk",
                            k=4, n_latents=48, batch_size=64, tokens=64 * 20, device="cpu"))
    return root, dirs, run


def _payload(path):
    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r"(?:window\.\w+=|LLM_SAE_FEATURE\(\d+,)(.*?)\)?;\n", text, flags=re.S)
    return json.loads(m.group(1))


def test_analyze_and_dashboard_on_a_transcoder(transcoder_run, tiny_gpt2_dir, one_thread, capsys):
    from transformers import AutoModelForCausalLM

    from llm_sae.cli import main
    from llm_sae.common.analysis_files import load_feature, load_summary
    from llm_sae.dashboard.records import feature_relpath
    from llm_sae.sae.formats.native import load_sae
    from llm_sae.store.store import open_store

    root, dirs, run = transcoder_run
    an, site = root / "an", root / "site"
    assert main(["analyze", "--sae", str(run), "--store", str(dirs[IN]), "--out", str(an), "--top-k", "5",
                 "--n-logits", "5", "--device", "cpu", "--no-progress"]) == 0
    assert main(["dashboard", "--analysis", str(an), "--out", str(site)]) == 0
    summary = load_summary(an)
    assert summary["logits"]["available"], summary["logits"]  # d_in 128 is not d_model: W_dec's width is
    assert summary["transcoder"] == {"d_out": 32, "out_hook": OUT}
    meta = _payload(site / "data" / "meta.js")
    assert meta["hook"] == f"{IN} → {OUT}"

    sae = load_sae(run)
    store = open_store(dirs[IN])
    with torch.no_grad():
        z_RN = sae.encode(store.acts(0, store.n_rows).float())
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    W_U_VE, g_E = hf.lm_head.weight.detach(), hf.transformer.ln_f.weight.detach()
    live = [f for f in range(48) if z_RN[:, f].max() > 0]
    assert len(live) >= 5
    for f in live[:5]:
        rec = load_feature(an, f)
        # Contexts: rows where the feature fires most on the input store (any of tied rows).
        top = z_RN[:, f].topk(5)
        assert [e["act"] for e in rec["top_examples"]] == pytest.approx(top.values.tolist(), rel=1e-3)
        assert [float(z_RN[e["row"], f]) for e in rec["top_examples"]] == pytest.approx(top.values.tolist(), rel=1e-3)
        # Logit effects: the decoder row (MLP-output space) through the final norm and W_U.
        a_E = sae.W_dec[f].detach()
        eff_V = W_U_VE @ (g_E * (a_E - a_E.mean()))
        eff_V -= eff_V.mean()
        assert [p["id"] for p in rec["logits"]["promoted"]] == eff_V.topk(5).indices.tolist()
        assert [p["value"] for p in rec["logits"]["promoted"]] == pytest.approx(eff_V.topk(5).values.tolist(), rel=1e-3)
        assert [p["id"] for p in rec["logits"]["suppressed"]] == (-eff_V).topk(5).indices.tolist()
        page = _payload(site / feature_relpath(f))
        assert [x[1] for x in page["logits"]["pos"]] == pytest.approx(eff_V.topk(5).values.tolist(), rel=1e-2)
        assert [e["v"] for e in page["top"]] == pytest.approx(top.values.tolist(), rel=1e-2)
    # The output store is not what the features read: refused, naming the input hook.
    capsys.readouterr()
    assert main(["analyze", "--sae", str(run), "--store", str(dirs[OUT]), "--out", str(root / "bad"),
                 "--device", "cpu", "--no-progress"]) == 2
    assert IN in capsys.readouterr().err
