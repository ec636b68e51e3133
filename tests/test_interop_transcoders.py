"""Transcoder interop: SAELens's and sparsify's transcoders import exactly, ours export to
SAELens's transcoder classes (checked live with SAELens's own loader).

Fixtures in tests/data/peers/transcoders/ were written by the peers themselves
(scripts/make_transcoder_fixtures.py); tests marked ``peers`` run them live, with SAELens
installed beside llm_sae or from .peers/ (tests/peers_util.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from peers_util import PEERS_PY, needs_peers, skip_unless_written
from safetensors.torch import load_file, save_file

from llm_sae.interop.saelens import export_saelens
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.formats.peers import peer_format
from llm_sae.sae.formats.weights import InteropError
from llm_sae.sae.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "peers" / "transcoders"
SCRIPT = ROOT / "scripts" / "make_transcoder_fixtures.py"
D, E, N = 8, 6, 16
TOL = 1e-5

# fixture → (our arch, skip); sparsify transcoders write d_out = d_in.
IMPORTS = {
    "saelens/transcoder": ("relu_l1", False),
    "saelens/skip_transcoder": ("relu_l1", True),
    "saelens/jumprelu_transcoder": ("jumprelu", False),
    "saelens/jumprelu_skip_transcoder": ("jumprelu", True),
    "sparsify/transcoder": ("topk", False),
    "sparsify/skip_transcoder": ("topk", True),
    "sparsify/skip_sae": ("topk", True),
}
# (our arch, skip) → the SAELens class that must load its export
EXPORTS = {
    ("relu_l1", False): "Transcoder",
    ("relu_l1", True): "SkipTranscoder",
    ("jumprelu", False): "JumpReLUTranscoder",
    ("jumprelu", True): "JumpReLUSkipTranscoder",
    ("batchtopk", True): "JumpReLUSkipTranscoder",
    ("matryoshka", False): "JumpReLUTranscoder",
}


def random_transcoder(arch: str, skip: bool, seed: int = 0, d: int = D, e: int = E, n: int = N):
    """An eval-mode transcoder with awkward random weights (biases, thresholds, skip)."""
    g = torch.Generator().manual_seed(seed)
    sae = REGISTRY[arch](SAEConfig(arch=arch, d_in=d, n_latents=n, k=4, d_out=e, skip=skip))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g) / d**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(e, generator=g))
        if skip:
            sae.W_skip.copy_(0.3 * torch.randn(e, d, generator=g))
        if arch == "relu_l1":
            sae.W_dec.mul_(0.5 + torch.rand(n, 1, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.05 + 0.5 * torch.rand(n, generator=g))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
    return sae.eval()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_outputs(sae, x_BD, encoded_BN, predicted_BE):
    with torch.no_grad():
        z_BN, y_BE = sae.encode(x_BD), sae.predict(x_BD)
    assert torch.equal(z_BN > 0, encoded_BN > 0), "a different set of latents fired"
    assert _err(z_BN, encoded_BN) < TOL and _err(y_BE, predicted_BE) < TOL


@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_peer_transcoders_import_exactly(name):
    arch, skip = IMPORTS[name]
    path = FIXTURES / name
    assert peer_format(path) == name.split("/")[0]
    sae = load_sae(path)
    e = D if name.startswith("sparsify") else E
    assert (sae.cfg.arch, sae.cfg.skip, sae.d_in, sae.d_out, sae.n_latents) == (arch, skip, D, e, N)
    ref = load_file(str(path / "reference.safetensors"))
    assert_same_outputs(sae, ref["x"], ref["encoded"], ref["predicted"])


@pytest.mark.parametrize("arch,skip", sorted(EXPORTS))
def test_export_has_saelens_transcoder_layout(tmp_path, arch, skip):
    """Same cfg fields, tensor names, shapes and dtypes as SAELens's own save of that class."""
    sae = random_transcoder(arch, skip)
    out = export_saelens(sae, tmp_path, hook_name="blocks.0.ln2.hook_normalized",
                         hook_name_out="blocks.0.hook_mlp_out")
    cfg = json.loads((out / "cfg.json").read_text())
    ref_dir = FIXTURES / "saelens" / cfg["architecture"]
    ref_cfg = json.loads((ref_dir / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_" if arch != "relu_l1" else "") + ("skip_" if skip else "") + "transcoder"
    assert set(cfg) == set(ref_cfg)
    for key in ("d_in", "d_sae", "d_out", "dtype", "apply_b_dec_to_input", "normalize_activations"):
        assert cfg[key] == ref_cfg[key], key
    assert cfg["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    w, ref_w = (load_file(str(d / "sae_weights.safetensors")) for d in (out, ref_dir))
    assert {k: (v.shape, v.dtype) for k, v in w.items()} == {k: (v.shape, v.dtype) for k, v in ref_w.items()}
    back = load_sae(out)  # and our import of it computes the same
    x_BD = 2.0 * torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_outputs(back, x_BD, sae.encode(x_BD), sae.predict(x_BD))


def test_topk_transcoder_export_is_refused_naming_the_alternative(tmp_path):
    with pytest.raises(InteropError, match="no TopK transcoder.*--arch batchtopk"):
        export_saelens(random_transcoder("topk", True), tmp_path)
    assert not (tmp_path / "cfg.json").exists()


# ------------------------------------------------------------------ live, with the peers


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    """One run of the peers' interpreter: SAELens loads our exports; fixtures regenerated."""
    root = tmp_path_factory.mktemp("tc_peers")
    x_BD = 2.0 * torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    dirs, ours = [], {}
    for arch, skip in sorted(EXPORTS):
        ours[arch, skip] = random_transcoder(arch, skip, seed=5, d=64, e=48, n=256)
        d = export_saelens(ours[arch, skip], root / f"{arch}-{skip}", hook_name="blocks.0.ln2.hook_normalized")
        save_file({"x": x_BD}, str(d / "x.safetensors"))
        dirs.append(str(d))
    argv = [str(PEERS_PY), str(SCRIPT), "--out", str(root / "fixtures"), "--load", *dirs]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return x_BD, ours, root


@pytest.mark.peers
@needs_peers
@pytest.mark.parametrize("arch,skip", sorted(EXPORTS))
def test_saelens_loads_our_transcoders_and_computes_the_same(peer_run, arch, skip):
    x_BD, ours, root = peer_run
    d = root / f"{arch}-{skip}"
    assert (d / "peer_class.txt").read_text().strip() == EXPORTS[arch, skip]
    peer = load_file(str(d / "peer_out.safetensors"))
    assert_same_outputs(ours[arch, skip], x_BD, peer["encoded"], peer["predicted"])


@pytest.mark.peers
@needs_peers
@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_installed_peers_still_write_the_fixtures_format(peer_run, name):
    fresh = peer_run[2] / "fixtures" / name
    skip_unless_written(fresh)
    assert set(json.loads((fresh / "cfg.json").read_text())) == set(
        json.loads((FIXTURES / name / "cfg.json").read_text()))
    ref = load_file(str(fresh / "reference.safetensors"))
    assert_same_outputs(load_sae(fresh), ref["x"], ref["encoded"], ref["predicted"])
