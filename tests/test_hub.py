"""SAEs from the hub (hf://, saelens://) through a hub cache laid out as huggingface_hub
lays it out, offline; and pushing our SAEs to the hub (HfApi mocked: no network)."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_sae.sae import load_sae
from llm_sae.sae.formats.weights import InteropError

PEERS = Path(__file__).parent / "data" / "peers"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """put(repo_id, {path_in_repo: source file or bytes}) into an offline hub cache."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo_id: str, files: dict[str, Path | bytes]) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(REV)
        snap = repo / "snapshots" / REV
        for name, src in files.items():
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                (snap / name).write_bytes(src)
            else:
                shutil.copy(src, snap / name)
        return snap

    return put


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("local,files", [
    ("saelens/topk", ("cfg.json", "sae_weights.safetensors")),
    ("saelens/jumprelu", ("cfg.json", "sae_weights.safetensors")),
    ("sparsify/layers.1", ("cfg.json", "sae.safetensors")),
])
def test_hf_repos_load_exactly_as_the_local_folder(hub, local, files):
    hub("org/saes", {f"{local}/{f}": PEERS / local / f for f in files})
    assert same_weights(load_sae(f"hf://org/saes/{local}"), load_sae(PEERS / local))


def gemmascope_params(seed=0, d=12, n=40) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        "W_enc": (g.standard_normal((d, n)) / d**0.5).astype(np.float32),
        "W_dec": g.standard_normal((n, d)).astype(np.float32),
        "b_enc": (0.1 * g.standard_normal(n)).astype(np.float32),
        "b_dec": (0.3 * g.standard_normal(d)).astype(np.float32),
        "threshold": (0.05 + 0.3 * g.random(n)).astype(np.float32),
    }


def npz_bytes(tmp_path, arrays, **kw) -> bytes:
    np.savez(tmp_path / "p.npz", **arrays, **kw)
    return (tmp_path / "p.npz").read_bytes()


def test_gemma_scope_params_npz_computes_what_gemma_scope_computes(hub, tmp_path):
    p = gemmascope_params()
    hub("google/gemma-scope-x", {"layer_3/width_16k/average_l0_9/params.npz": npz_bytes(tmp_path, p)})
    sae = load_sae("hf://google/gemma-scope-x/layer_3/width_16k/average_l0_9")
    assert sae.cfg.arch == "jumprelu" and (sae.d_in, sae.n_latents) == (12, 40)
    x = np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)
    # Gemma Scope's own JumpReLU: no b_dec subtracted before encoding.
    pre = x.astype(np.float64) @ p["W_enc"] + p["b_enc"]
    acts = pre * (pre > p["threshold"])
    recon = acts @ p["W_dec"] + p["b_dec"]
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x))
        x_hat = sae.decode(z)
    assert torch.equal(z > 0, torch.from_numpy(acts > 0))
    assert np.abs(z.numpy() - acts).max() < 1e-4 and np.abs(x_hat.numpy() - recon).max() < 1e-4


def test_pickled_npz_and_missing_or_bare_repos_are_refused(hub, tmp_path):
    p = gemmascope_params()
    p["W_enc"] = np.array([object()] * 3, dtype=object)  # loading it would need pickle
    hub("google/evil", {"a/params.npz": npz_bytes(tmp_path, p)})
    with pytest.raises(InteropError, match="cannot read"):
        load_sae("hf://google/evil/a")
    with pytest.raises(InteropError, match="not in the hub cache"):
        load_sae("hf://org/never-downloaded")
    hub("org/many", {"layers.1/cfg.json": PEERS / "sparsify/layers.1/cfg.json",
                     "layers.1/sae.safetensors": PEERS / "sparsify/layers.1/sae.safetensors"})
    with pytest.raises(InteropError, match="SAE folders here: layers.1"):
        load_sae("hf://org/many")
    with pytest.raises(InteropError, match="hf://ORG/REPO"):
        load_sae("hf://justone")


def fake_registry(monkeypatch, releases: dict) -> None:
    """A stand-in for SAELens's pretrained registry module (SAELens need not be installed)."""
    mod = types.ModuleType("sae_lens.loading.pretrained_saes_directory")
    mod.get_pretrained_saes_directory = lambda: releases
    for name in ("sae_lens", "sae_lens.loading"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)


def test_saelens_release_resolves_through_the_registry(hub, monkeypatch, tmp_path):
    hub("google/gemma-scope-x", {"layer_3/w/params.npz": npz_bytes(tmp_path, gemmascope_params())})
    lookup = types.SimpleNamespace(repo_id="google/gemma-scope-x", conversion_func="gemma_2",
                                   saes_map={"layer_3/w": "layer_3/w"})
    fake_registry(monkeypatch, {"gemma-scope-x-res": lookup})
    got = load_sae("saelens://gemma-scope-x-res/layer_3/w")
    assert same_weights(got, load_sae("hf://google/gemma-scope-x/layer_3/w"))
    with pytest.raises(InteropError, match="no SAE 'layer_9/w'"):
        load_sae("saelens://gemma-scope-x-res/layer_9/w")
    with pytest.raises(InteropError, match="no release"):
        load_sae("saelens://nope/x")


def test_saelens_registry_of_the_installed_saelens(hub, tmp_path):
    """The real registry, where SAELens is installed (its peer venv, or beside llm_sae)."""
    pytest.importorskip("sae_lens.loading.pretrained_saes_directory")
    sae_id = "layer_20/width_16k/average_l0_71"
    hub("google/gemma-scope-2b-pt-res", {f"{sae_id}/params.npz": npz_bytes(tmp_path, gemmascope_params())})
    sae = load_sae(f"saelens://gemma-scope-2b-pt-res/{sae_id}")
    assert sae.cfg.arch == "jumprelu" and sae.n_latents == 40


class FakeHfApi:
    """HfApi at its boundary: records what would be sent, sends nothing."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.calls.append(("create_commit", repo_id, files))


def test_export_push_to_hub_uploads_saelens_layout_with_a_card(hub, tmp_path, monkeypatch):
    import huggingface_hub

    from llm_sae.cli import main
    from llm_sae.sae import REGISTRY, SAEConfig

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    sae = REGISTRY["topk"](SAEConfig(arch="topk", d_in=12, n_latents=40, k=4)).eval()
    sae.save(tmp_path / "sae")
    assert main(["export", "--format", "saelens", "--sae", str(tmp_path / "sae"), "--out",
                 str(tmp_path / "out"), "--hook-name", "blocks.1.hook_mlp_out", "--model-name",
                 "gpt2", "--push-to-hub", "me/my-saes"]) == 0
    (_, repo, kw), (_, repo2, files) = FakeHfApi.calls
    assert repo == repo2 == "me/my-saes" and kw["exist_ok"]
    sub = "blocks.1.hook_mlp_out"
    assert set(files) == {"README.md", f"{sub}/cfg.json", f"{sub}/sae_weights.safetensors"}
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: saelens") and "base_model: gpt2" in card
    assert f"hf://me/my-saes/{sub}" in card and "| k | 4 |" in card
    # What was uploaded loads back through the hub cache as the same SAE.
    hub("me/my-saes", {k: v for k, v in files.items()})
    assert same_weights(load_sae(f"hf://me/my-saes/{sub}"), sae)


def test_push_to_hub_needs_an_org_and_name_and_an_sae_format(tmp_path):
    from llm_sae.config import ConfigError
    from llm_sae.interop.export import ExportConfig, export

    with pytest.raises(ConfigError, match="--format saelens"):
        export(ExportConfig(format="neuronpedia", out=str(tmp_path), analysis="a", push_to_hub="me/x"))
    from llm_sae.interop.hub import push_saelens_folder

    with pytest.raises(InteropError, match="ORG/NAME"):
        push_saelens_folder(tmp_path, "justname")
