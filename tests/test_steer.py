"""Steering on the embedded model: the logit effect it predicts, exactness, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from llm_sae.sae.splice import Intervention, Steerer, SteerError
from llm_sae.serve.steer import parse_interventions

HOOK_LAST = "blocks.3.hook_resid_post"  # tiny-stdlib has 4 blocks: only ln_final follows
PROMPT = "def add(a, b):\n    return"


def test_parse_interventions():
    ivs = parse_interventions(["12=4", "3=-1.5"], ["7=0"], [5])
    assert ivs == [Intervention(12, "add", 4.0), Intervention(3, "add", -1.5),
                   Intervention(7, "clamp", 0.0), Intervention(5, "ablate", 0.0)]
    for bad in (["12"], ["x=1"]):
        with pytest.raises(SteerError, match="FEATURE=STRENGTH"):
            parse_interventions(bad)
    with pytest.raises(SteerError, match="out of range"):
        Intervention(64).check(64)
    with pytest.raises(SteerError, match="finite"):
        Intervention(1, "add", float("nan")).check(64)


@pytest.fixture(scope="module")
def steerer(tmp_path_factory):
    from llm_sae.lm.models import load_bridge
    from llm_sae.sae import REGISTRY, SAEConfig

    torch.manual_seed(0)
    sae_dir = tmp_path_factory.mktemp("steer") / "sae"
    sae = REGISTRY["topk"](SAEConfig(d_in=128, n_latents=256, k=8))
    (sae_dir).mkdir()
    sae.save(sae_dir)
    bridge = load_bridge("tiny-stdlib")
    return Steerer(sae.eval(), bridge, HOOK_LAST), sae_dir


def _final_residual(s, toks):
    got: dict = {}

    def grab(a, hook):
        got["x"] = a[0, -1].detach().clone()
        return a

    s.model.run_with_hooks(torch.tensor([toks]), return_type=None, fwd_hooks=[(HOOK_LAST, grab)])
    return got["x"]


@pytest.mark.slow
def test_adding_a_feature_raises_p_of_its_promoted_token_by_the_predicted_amount(steerer):
    """At the last block, logits = h·W_U_eff / σ(h) + const (final LayerNorm; W_U_eff as the
    analysis computes logit effects): adding α·W_dec[f] must give exactly that P(T)."""
    import copy

    from llm_sae.analyze.effects import logit_effects, unembedding

    base, _ = steerer
    W_U_DV, kind, _ = unembedding("tiny-stdlib", 128)
    assert kind == "layernorm"
    toks = base.token_ids(PROMPT)
    plain = base.logits(toks)[-1]
    x = _final_residual(base, toks)

    def predicted(W_dec, f, alpha):
        def sigma(h):
            return torch.sqrt(h.var(unbiased=False) + 1e-5)
        h = x + alpha * W_dec[f]
        return plain - x @ W_U_DV / sigma(x) + h @ W_U_DV / sigma(h)

    # (a) the random SAE's feature whose logit effect (as `analyze` reports it) is largest;
    # (b) a feature written along token T's unembedding: a feature that "means T next".
    sae = copy.deepcopy(base.sae)
    vals, ids, _, _ = logit_effects(sae.W_dec.detach(), W_U_DV, 1)
    f_a = int(vals[:, 0].argmax())
    T_b = int(plain.argsort(descending=True)[20])  # the 21st most likely next token
    with torch.no_grad():
        sae.W_dec[0] = W_U_DV[:, T_b] / W_U_DV[:, T_b].norm()
    s = Steerer(sae, base.model, HOOK_LAST)
    for f, T, alphas in ((f_a, int(ids[f_a, 0]), (2.5, 5.0)), (0, T_b, (1.0, 2.0, 4.0))):
        p0 = float(plain.softmax(-1)[T])
        for alpha in alphas:
            p1 = float(s.logits(toks, [Intervention(f, "add", alpha)])[-1].softmax(-1)[T])
            p_pred = float(predicted(sae.W_dec.detach(), f, alpha).softmax(-1)[T])
            print(f"feature {f} promotes token {T}: add {alpha}: P(T) {p0:.4g} -> {p1:.4g} (predicted {p_pred:.4g})")
            assert p1 > p0
            assert p1 == pytest.approx(p_pred, rel=1e-4, abs=1e-7)
    assert p1 > 0.5  # the aligned feature at strength 4 makes T the likely next token


@pytest.mark.slow
def test_unsteered_is_the_plain_model_and_clamp_zero_is_ablation(steerer):
    s, _ = steerer
    toks = s.token_ids(PROMPT)
    x = torch.tensor([toks])
    plain = s.model(x, return_type="logits")[0]
    assert torch.equal(s.logits(toks), plain)
    assert torch.equal(s.logits(toks, [Intervention(3, "add", 0.0)]), plain)  # error term kept exactly
    acts = torch.tensor(s.activations(toks, list(range(256))))
    f = int(acts.sum(0).argmax())  # a feature active on this prompt
    assert acts[:, f].max() > 0
    ablated = s.logits(toks, [Intervention(f, "ablate")])
    assert torch.equal(ablated, s.logits(toks, [Intervention(f, "clamp", 0.0)]))
    assert not torch.allclose(ablated, plain)
    # Unsteered greedy generation is the HF model's own greedy generation.
    from transformers import AutoModelForCausalLM

    from llm_sae.lm.models import resolve_model

    hf = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-stdlib")).eval()
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                      pad_token_id=0)[0, len(toks):].tolist()
    ours = s.generate(PROMPT, max_new_tokens=6)["ids"]
    assert ours == ref[: len(ours)] and len(ours) >= 1


@pytest.mark.slow
def test_steered_generation_is_deterministic_for_a_seed(steerer):
    s, _ = steerer
    ivs = [Intervention(10, "add", 6.0), Intervention(20, "clamp", 2.0)]
    a = s.generate(PROMPT, ivs, max_new_tokens=5, temperature=1.0, seed=3)
    b = s.generate(PROMPT, ivs, max_new_tokens=5, temperature=1.0, seed=3)
    c = s.generate(PROMPT, ivs, max_new_tokens=5, temperature=1.0, seed=4)
    assert a == b and a["ids"] != c["ids"]
    with pytest.raises(SteerError, match="context"):
        s.generate("x " * 120, max_new_tokens=32)


@pytest.mark.slow
def test_steer_cli(steerer, capsys):
    from llm_sae.cli import main

    _, sae_dir = steerer
    flags = ["--model", "tiny-stdlib", "--hook", HOOK_LAST]
    assert main(["steer", "--sae", str(sae_dir), "--prompt", PROMPT, "--add", "5=8", "--ablate", "7",
                 "--max-new-tokens", "6", "--json", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["steered"]["ids"]) <= 6 and out["unsteered"] is not None
    assert out["interventions"][0] == {"feature": 5, "mode": "add", "value": 8.0}
    assert main(["steer", "--sae", str(sae_dir), "--prompt", "x", "--add", "999=1", *flags]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["steer", "--sae", str(sae_dir), "--prompt", "x", "--add", "1=1"]) == 2
    assert "--model and --hook" in capsys.readouterr().err


def test_reads_model_and_hook_from_a_saelens_folder():
    from pathlib import Path

    from llm_sae.sae.formats.meta import recorded_model_and_hook

    got = recorded_model_and_hook(Path(__file__).parent / "data" / "peers" / "saelens" / "topk")
    assert got == ("tiny-peer-model", "blocks.0.hook_resid_post")


# ---------------------------------------------------------------------------- the live view's endpoint
@pytest.mark.slow
def test_steer_endpoint_is_bounded_and_compares_with_the_plain_model(steerer, tmp_path):
    import http.client
    import threading

    from browser_util import write_analysis

    from llm_sae.dashboard import DashboardConfig, build_dashboard
    from llm_sae.serve import ServeConfig
    from llm_sae.serve.live import LiveEncoder
    from llm_sae.serve.server import make_server
    from llm_sae.serve.steer_api import STEER_MAX_FEATURES

    _, sae_dir = steerer
    site = tmp_path / "site"
    build_dashboard(DashboardConfig(analysis=str(write_analysis(tmp_path / "a", n_features=5)), out=str(site)))
    live = LiveEncoder(sae_dir, "tiny-stdlib", HOOK_LAST)
    servers = [make_server(ServeConfig(site=str(site)), live=live, quiet=True),
               make_server(ServeConfig(site=str(site)), quiet=True)]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def post(body, srv=servers[0], ctype="application/json", host=None):
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
        headers = {"Content-Type": ctype} | ({"Host": host} if host else {})
        conn.request("POST", "/api/steer", body=json.dumps(body).encode(), headers=headers)
        r = conn.getresponse()
        data = r.read()
        out = r.status, json.loads(data) if "json" in (r.getheader("Content-Type") or "") else data
        conn.close()
        return out

    try:
        assert servers[0].server_address[0] == "127.0.0.1"
        req = {"prompt": PROMPT, "features": [{"id": 9, "mode": "add", "value": 20}, {"id": 4, "mode": "ablate"}],
               "max_new_tokens": 5}
        status, got = post(req)
        assert status == 200 and got["features"] == [4, 9]
        for run in (got["steered"], got["unsteered"]):
            assert len(run["acts"]) == len(run["tokens"]) and len(run["acts"][0]) == 2
            assert "".join(run["tokens"][1 : run["n_prompt"]]) == PROMPT
        s = Steerer(live.sae, live.bridge, HOOK_LAST)
        assert got["unsteered"]["text"] == s.generate(PROMPT, max_new_tokens=5)["text"]
        assert got["steered"]["text"] == s.generate(PROMPT, parse_interventions(["9=20"], [], [4]), max_new_tokens=5)["text"]
        status, same = post({"prompt": PROMPT, "features": [], "max_new_tokens": 3})
        assert status == 200 and same["steered"]["tokens"] == same["unsteered"]["tokens"]

        too_many = [{"id": i, "value": 1} for i in range(STEER_MAX_FEATURES + 1)]
        for bad, why in (({"prompt": "x", "features": too_many}, "at most"),
                         ({"prompt": "x", "max_new_tokens": 65}, "max_new_tokens"),
                         ({"prompt": "x " * 300}, "at most"),
                         ({"prompt": "x", "features": [{"id": 1, "mode": "boost", "value": 1}]}, "mode"),
                         ({"prompt": "x", "features": [{"id": 256, "value": 1}]}, "out of range"),
                         ({"prompt": "x", "features": [{"id": 1, "value": 1e9}]}, "strengths"),
                         ({"prompt": 3}, "string")):
            status, err = post(bad)
            assert status == 400 and why in err["error"], (bad, err)
        assert post(req, ctype="text/plain")[0] == 415
        assert post(req, host="evil.example")[0] == 403
        assert post(req, srv=servers[1])[0] == 404  # no --sae: no steering
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
