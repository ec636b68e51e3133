"""Interop: SAELens and sparsify directories load exactly, exports match the peers' formats.

The fixtures in tests/data/peers/ were written by SAELens and sparsify themselves
(scripts/make_peer_fixtures.py), each with the peer's own outputs on random inputs. Tests
marked ``peers`` run the peer libraries live: SAELens installed beside llm_sae where it is,
else .peers/ (``bash scripts/setup_peers.sh``); they skip with neither (tests/peers_util.py).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from peers_util import PEERS_PY, needs_peers, skip_unless_written
from safetensors.torch import load_file, save_file

from llm_sae.config import ConfigError
from llm_sae.errors import CheckpointError
from llm_sae.interop.export import ExportConfig, export
from llm_sae.interop.neuronpedia import export_neuronpedia
from llm_sae.interop.saelens import export_saelens
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.formats.peers import peer_format
from llm_sae.sae.formats.weights import InteropError, log_threshold
from llm_sae.sae.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).parent / "data" / "peers"
D, N, K = 8, 16, 4

# fixture → (peer format, llm_sae arch it must import as)
FIXTURES = {
    "saelens/standard": ("saelens", "relu_l1"),
    "saelens/standard_no_bdec": ("saelens", "relu_l1"),
    "saelens/topk": ("saelens", "topk"),
    "saelens/topk_checkpoint": ("saelens", "topk"),
    "saelens/jumprelu": ("saelens", "jumprelu"),
    "saelens/batchtopk": ("saelens", "jumprelu"),
    "sparsify/layers.0": ("sparsify", "topk"),
    "sparsify/layers.1": ("sparsify", "topk"),
}
# our arch → the SAELens fixture whose format its export must have
EXPORTS = {
    "topk": "topk",
    "relu_l1": "standard",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "wta": "jumprelu",
}
TOL = 1e-5  # float32 rounding of a re-associated matmul on O(1) values


def random_sae(arch: str, seed: int = 0, d_in: int = D, n: int = N):
    """An eval-mode SAE of ``arch`` with awkward random weights (biases, thresholds set)."""
    g = torch.Generator().manual_seed(seed)
    sae = REGISTRY[arch](SAEConfig(arch=arch, d_in=d_in, n_latents=n, k=K))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d_in, generator=g))
        if arch == "relu_l1":  # its decoder rows are not unit norm
            sae.W_dec.mul_(0.5 + torch.rand(n, 1, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.05 + 0.5 * torch.rand(n, generator=g))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
        if arch == "wta":
            sae.threshold.copy_(0.4 * torch.rand(n, generator=g))
            sae.threshold[0] = -1.0  # never estimated: acts as 0
    return sae.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ import (no peers needed)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_import_reproduces_the_peer_outputs(name):
    fmt, arch = FIXTURES[name]
    path = PEERS / name
    assert peer_format(path) == fmt
    sae = load_sae(path)
    assert sae.cfg.arch == arch and (sae.d_in, sae.n_latents) == (D, N)
    ref = load_file(str(path / "reference.safetensors"))
    with torch.no_grad():
        z_BN = sae.encode(ref["x"])
        x_hat_BD = sae.decode(ref["encoded"])
    assert torch.equal(z_BN > 0, ref["encoded"] > 0), "a different set of latents fired"
    assert max_err(z_BN, ref["encoded"]) < TOL
    assert max_err(x_hat_BD, ref["decoded"]) < TOL
    if hasattr(sae, "encode_topk"):  # the sparse path that analyze uses agrees too
        vals_BK, idx_BK = sae.encode_topk(ref["x"])
        sparse_BN = torch.zeros_like(z_BN).scatter_(-1, idx_BK, vals_BK)
        assert max_err(sparse_BN, ref["encoded"]) < TOL


def test_a_sparsify_run_directory_asks_which_hookpoint():
    assert peer_format(PEERS / "sparsify") == "sparsify-run"
    with pytest.raises(
        CheckpointError, match=r"one SAE per hookpoint \(layers\.0, layers\.1\).*sparsify/layers\.0"
    ):
        load_sae(PEERS / "sparsify")


def test_our_own_saves_are_not_mistaken_for_a_peers(tmp_path):
    sae = random_sae("topk")
    sae.save(tmp_path)
    assert peer_format(tmp_path) is None
    assert torch.equal(load_sae(tmp_path).W_enc, sae.W_enc)


def _copy_with_cfg(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg.update(changes)
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("src", "changes", "message"),
    [
        (
            "saelens/standard",
            {"normalize_activations": "layer_norm"},
            "rescales each token at run time",
        ),
        (
            "saelens/standard",
            {"normalize_activations": "expected_average_only_in"},
            "fold_activation_norm_scaling_factor",
        ),
        ("saelens/standard", {"architecture": "gated"}, "can import"),
        ("sparsify/layers.0", {"activation": "groupmax"}, "'groupmax'"),
    ],
)
def test_what_cannot_be_converted_exactly_is_refused(tmp_path, src, changes, message):
    path = _copy_with_cfg(PEERS / src, tmp_path / "sae", **changes)
    with pytest.raises(InteropError, match=message):
        load_sae(path)


def test_pre_6_saelens_saves_load_as_saelens_reads_them(tmp_path):
    """SAELens < 6 named the TopK through activation_fn and kept JumpReLU's log θ."""
    old_topk = tmp_path / "topk"
    shutil.copytree(PEERS / "saelens" / "topk", old_topk)
    cfg = json.loads((old_topk / "cfg.json").read_text())
    for key in ("architecture", "metadata", "k", "rescale_acts_by_decoder_norm"):
        cfg.pop(key)
    cfg.update(
        activation_fn="topk", activation_fn_kwargs={"k": K}, hook_point="blocks.0.hook_resid_post"
    )
    (old_topk / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(old_topk)
    assert sae.cfg.arch == "topk" and sae.cfg.k == K

    old_jump = tmp_path / "jumprelu"
    shutil.copytree(PEERS / "saelens" / "jumprelu", old_jump)
    w = load_file(str(old_jump / "sae_weights.safetensors"))
    log_N = torch.log(w.pop("threshold").clamp_min(1e-3))
    save_file({**w, "log_threshold": log_N}, str(old_jump / "sae_weights.safetensors"))
    assert torch.equal(load_sae(old_jump).threshold, log_N.exp())


def test_export_takes_hook_and_model_from_the_training_store(tmp_path, tiny_store):
    random_sae("topk", d_in=32, n=64).save(tmp_path / "sae")
    (tmp_path / "sae" / "train_cfg.json").write_text(json.dumps({"store": str(tiny_store)}))
    out = export_saelens(tmp_path / "sae", tmp_path / "out")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.0.hook_resid_post" and meta["context_size"] == 32
    assert meta["model_name"].endswith("tiny_gpt2")


def test_log_threshold_reproduces_thresholds_through_exp():
    g = torch.Generator().manual_seed(0)
    near_one_N = 0.4 + 2.1 * torch.rand(5000, generator=g)
    far_N = 1e-3 + 100 * torch.rand(5000, generator=g) ** 4
    # Within [1/e, e] the float32 logs are denser than the thresholds, so θ is hit exactly
    # wherever torch's float32 exp rounds correctly; its vectorised exp is not correctly
    # rounded on every CPU (1 θ of 5000 is out of reach on some), and there one ulp remains.
    back_N = log_threshold(near_one_N).exp()
    assert (back_N != near_one_N).sum() <= 5
    assert ((back_N - near_one_N).abs() / near_one_N).max().item() < 1.2e-7
    # Further out exp cannot reach every float32 θ; the nearest is at most ~|log θ|·2⁻²⁴ away.
    back_N = log_threshold(far_N).exp()
    assert ((back_N - far_N).abs() / far_N).max().item() < 5e-7
    plain_N = far_N.log().exp()
    assert (back_N == far_N).sum() >= (plain_N == far_N).sum()
    # θ ≤ 0: SAELens acts as a ReLU there, and so does exp(-inf) = 0.
    assert torch.equal(log_threshold(torch.tensor([0.0, -0.5])), torch.full((2,), float("-inf")))


# ------------------------------------------------------------------ export (no peers needed)


@pytest.mark.parametrize("arch", sorted(EXPORTS))
def test_export_has_the_files_keys_and_fields_saelens_writes(tmp_path, arch):
    out = export_saelens(
        random_sae(arch), tmp_path, hook_name="blocks.0.hook_resid_post", model_name="m"
    )
    ref_dir = PEERS / "saelens" / EXPORTS[arch]
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    ref_cfg, cfg = (
        json.loads((ref_dir / "cfg.json").read_text()),
        json.loads((out / "cfg.json").read_text()),
    )
    assert set(cfg) == set(ref_cfg)
    core = {
        "sae_lens_version",
        "model_name",
        "hook_name",
        "hook_head_index",
        "context_size",
        "prepend_bos",
        "seqpos_slice",
        "model_from_pretrained_kwargs",
    }
    assert core <= set(cfg["metadata"]) and core <= set(ref_cfg["metadata"])
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
    ):
        assert cfg[key] == ref_cfg[key], key
    ref_w, w = (
        load_file(str(ref_dir / "sae_weights.safetensors")),
        load_file(str(out / "sae_weights.safetensors")),
    )
    assert {k: (v.shape, v.dtype) for k, v in w.items()} == {
        k: (v.shape, v.dtype) for k, v in ref_w.items()
    }


@pytest.mark.parametrize("arch", sorted(EXPORTS))
def test_export_then_import_gives_back_the_same_sae(tmp_path, arch):
    sae = random_sae(arch, seed=1)
    back = load_sae(export_saelens(sae, tmp_path))
    x_BD = 2.0 * torch.randn(256, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_BN, z2_BN = sae.encode(x_BD), back.encode(x_BD)
        assert torch.equal(z_BN > 0, z2_BN > 0)
        assert max_err(z_BN, z2_BN) < TOL
        assert max_err(sae.decode(z_BN), back.decode(z_BN)) < TOL


@pytest.mark.parametrize("arch,why", [("kl_sigmoid", "sigmoids"), ("lista", "unrolled ISTA")])
def test_export_refuses_archs_saelens_lacks(tmp_path, arch, why):
    with pytest.raises(InteropError, match=f"no counterpart.*{arch}.*{why}"):
        export_saelens(random_sae(arch), tmp_path)


def test_cli_export_saelens(tmp_path):
    from llm_sae.cli import main

    random_sae("topk").save(tmp_path / "sae")
    rc = main(
        [
            "export",
            "--format",
            "saelens",
            "--sae",
            str(tmp_path / "sae"),
            "--out",
            str(tmp_path / "out"),
            "--hook-name",
            "blocks.1.hook_mlp_out",
        ]
    )
    assert rc == 0
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (
        cfg["architecture"] == "topk"
        and cfg["k"] == K
        and cfg["metadata"]["hook_name"] == "blocks.1.hook_mlp_out"
    )
    assert (
        main(["export", "--format", "saelens", "--out", str(tmp_path / "x")]) == 2
    )  # no --sae: an error


# ------------------------------------------------- imported SAEs through the pipeline, unchanged


def _peer_dir_like(src: Path, dst: Path, d_in: int, n: int) -> Path:
    """A copy of a peer fixture resized to d_in × n: same cfg fields, same tensor names."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "cfg.json").read_text())
    cfg.update({"d_in": d_in, "d_sae": n} if "d_sae" in cfg else {"d_in": d_in, "num_latents": n})
    (dst / "cfg.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    weights = next(p for p in src.glob("*.safetensors") if p.name != "reference.safetensors")
    tensors = {}
    for key, t in load_file(str(weights)).items():
        shape = [d_in if s == D else n if s == N else s for s in t.shape]
        tensors[key] = 0.3 * torch.randn(*shape, generator=g) + (0.1 if key == "threshold" else 0.0)
    save_file(tensors, str(dst / weights.name))
    return dst


@pytest.fixture(scope="module")
def imported_analyses(tiny_store, tmp_path_factory):
    """The tiny store analysed with a SAELens and a sparsify SAE, through the plain analyze call."""
    from llm_sae.analyze.config import AnalyzeConfig
    from llm_sae.analyze.run import analyze

    root = tmp_path_factory.mktemp("interop")
    out = {}
    for name in ("saelens/jumprelu", "sparsify/layers.0"):
        sae_dir = _peer_dir_like(PEERS / name, root / name / "sae", d_in=32, n=64)
        analyze(
            AnalyzeConfig(
                sae=str(sae_dir),
                store=str(tiny_store),
                out=str(root / name / "analysis"),
                progress=False,
                batch_size=512,
                shard_size=20,
            )
        )
        out[name] = (sae_dir, root / name / "analysis")
    return out


@pytest.mark.parametrize("name", ["saelens/jumprelu", "sparsify/layers.0"])
def test_imported_saes_run_through_analyze_and_eval(imported_analyses, tiny_store, name):
    from llm_sae.common.analysis_files import load_feature, load_summary
    from llm_sae.evaluate.config import EvalConfig
    from llm_sae.evaluate.run import evaluate

    sae_dir, analysis = imported_analyses[name]
    summary = load_summary(analysis)
    assert summary["n_features"] == 64 and summary["n_dead"] < 64
    live = next(i for i in range(64) if load_feature(analysis, i)["count"] > 0)
    assert load_feature(analysis, live)["top_examples"]
    report = evaluate(
        EvalConfig(
            sae=[str(sae_dir)],
            store=str(tiny_store),
            downstream=False,
            eval_rows=256,
            amortization=False,
            progress=False,
        )
    )
    (result,) = report["saes"].values()
    assert result["reconstruction"]["rows"] == 256


def test_serve_live_view_encodes_text_with_an_imported_sae(imported_analyses, tiny_gpt2_dir):
    from llm_sae.serve.live import LiveEncoder

    sae_dir, _ = imported_analyses["sparsify/layers.0"]
    # sparsify records neither model nor TransformerLens hook: given as flags, as for any SAE.
    live = LiveEncoder(sae_dir, model=str(tiny_gpt2_dir), hook="blocks.0.hook_resid_post")
    out = live.encode("def add(a, b): return a + b", feature=0)
    assert live.info()["n_latents"] == 64 and len(out["tokens"]) == len(out["acts"]) > 1
    assert any(row for row in out["top"])


# --------------------------------------------------------------------------- Neuronpedia

# The fields of Neuronpedia's Feature and Activation records (neuronpedia-utils db_models,
# written by its convert-saedashboard-to-neuronpedia-export.py): see docs/interop.md.
NP_FEATURE = {
    "modelId": str,
    "layer": str,
    "index": str,
    "creatorId": str,
    "createdAt": str,
    "maxActApprox": (int, float),
    "hasVector": bool,
    "vector": list,
    "vectorLabel": type(None),
    "vectorDefaultSteerStrength": (int, float),
    "hookName": type(None),
    "topkCosSimIndices": list,
    "topkCosSimValues": list,
    "neuron_alignment_indices": list,
    "neuron_alignment_values": list,
    "neuron_alignment_l1": list,
    "correlated_neurons_indices": list,
    "correlated_neurons_pearson": list,
    "correlated_neurons_l1": list,
    "correlated_features_indices": list,
    "correlated_features_pearson": list,
    "correlated_features_l1": list,
    "neg_str": list,
    "neg_values": list,
    "pos_str": list,
    "pos_values": list,
    "frac_nonzero": (int, float),
    "freq_hist_data_bar_heights": list,
    "freq_hist_data_bar_values": list,
    "logits_hist_data_bar_heights": list,
    "logits_hist_data_bar_values": list,
    "decoder_weights_dist": list,
}
NP_ACTIVATION = {
    "id": str,
    "tokens": list,
    "index": str,
    "layer": str,
    "modelId": str,
    "maxValue": (int, float),
    "maxValueTokenIndex": int,
    "minValue": (int, float),
    "values": list,
    "creatorId": str,
    "dataSource": type(None),
    "dataIndex": type(None),
    "dfaValues": list,
    "dfaTargetIndex": type(None),
    "dfaMaxValue": type(None),
    "createdAt": str,
    "lossValues": list,
    "logitContributions": type(None),
    "binMin": (int, float, type(None)),
    "binMax": (int, float, type(None)),
    "binContains": (int, float, type(None)),
    "qualifyingTokenIndex": int,
}


def _jsonl_gz(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    ]


def _check(record: dict, schema: dict) -> None:
    assert set(record) == set(schema)
    for key, tp in schema.items():
        assert isinstance(record[key], tp), (key, record[key])


def test_neuronpedia_export_has_neuronpedias_schema(imported_analyses, tmp_path):
    from llm_sae.common.analysis_files import load_feature

    _, analysis = imported_analyses["sparsify/layers.0"]
    src = export_neuronpedia(analysis, tmp_path, features_per_batch=25)
    assert src == tmp_path / src.parent.name / "0-llm-sae"  # blocks.0.* → layer 0
    for name in ("release", "model", "sourceset", "source"):
        (line,) = (src / f"{name}.jsonl").read_text().splitlines()
        assert isinstance(json.loads(line), dict)
    batches = sorted(p.name for p in (src / "features").iterdir())
    assert batches == [
        "batch-0.jsonl.gz",
        "batch-1.jsonl.gz",
        "batch-2.jsonl.gz",
    ]  # 64 = 25 + 25 + 14
    features = [f for b in batches for f in _jsonl_gz(src / "features" / b)]
    activations = [a for b in batches for a in _jsonl_gz(src / "activations" / b)]
    assert [f["index"] for f in features] == [str(i) for i in range(64)]
    for f in features:
        _check(f, NP_FEATURE)
        assert f["layer"] == "0-llm-sae"
    assert activations and len({a["id"] for a in activations}) == len(activations)
    for a in activations:
        _check(a, NP_ACTIVATION)
        assert len(a["values"]) == len(a["tokens"]) and a["maxValue"] == max(a["values"])
    live = next(f for f in features if f["maxActApprox"] > 0)
    rec = load_feature(analysis, int(live["index"]))
    mine = [a for a in activations if a["index"] == live["index"]]
    assert len(mine) == len(rec["top_examples"]) + sum(
        len(b["examples"]) for b in rec["interval_examples"]
    )
    assert mine[0]["tokens"] == rec["top_examples"][0]["tokens"]


def test_cli_export_neuronpedia(imported_analyses, tmp_path):
    _, analysis = imported_analyses["saelens/jumprelu"]
    src = export(
        ExportConfig(
            format="neuronpedia",
            analysis=str(analysis),
            out=str(tmp_path),
            model_name="tiny/gpt2",
            source_set="res-test",
        )
    )
    assert src == tmp_path / "tiny-gpt2" / "0-res-test"
    with pytest.raises(ConfigError, match="--analysis"):
        export(ExportConfig(format="neuronpedia", out=str(tmp_path)))


# ------------------------------------------------------------- live: the peer libraries load ours

PEER_SCRIPT = r"""
import importlib.util, json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
for d in json.loads(sys.argv[1]):
    sae = SAE.load_from_disk(d, device="cpu")
    x = load_file(d + "/x.safetensors")["x"]
    with torch.no_grad():
        z = sae.encode(x)
        save_file({"encoded": z.contiguous(), "decoded": sae.decode(z).contiguous()}, d + "/peer_out.safetensors")
# In the same process (importing SAELens is the slow part): the fixtures, regenerated.
spec = importlib.util.spec_from_file_location("make_peer_fixtures", sys.argv[2])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.argv = [sys.argv[2], "--out", sys.argv[3]]
mod.main()
"""

PEER_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    """One run of the peers' interpreter: SAELens loads and runs our export of every arch it
    can express, and the fixtures are regenerated with the installed peer versions."""
    root = tmp_path_factory.mktemp("peers_live")
    x_BD = 2.0 * torch.randn(512, 64, generator=torch.Generator().manual_seed(4))
    dirs, saes = [], {}
    for arch in sorted(EXPORTS):
        saes[arch] = random_sae(arch, seed=5, d_in=64, n=256)
        d = export_saelens(
            saes[arch], root / arch, hook_name="blocks.0.hook_resid_post", model_name="m"
        )
        save_file({"x": x_BD}, str(d / "x.safetensors"))
        dirs.append(str(d))
    script = ROOT / "scripts" / "make_peer_fixtures.py"
    argv = [str(PEERS_PY), "-c", PEER_SCRIPT, json.dumps(dirs), str(script), str(root / "fixtures")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=PEER_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = {arch: load_file(str(root / arch / "peer_out.safetensors")) for arch in saes}
    return x_BD, saes, outs, root / "fixtures"


@pytest.mark.peers
@needs_peers
@pytest.mark.parametrize("arch", sorted(EXPORTS))
def test_saelens_loads_our_export_and_computes_the_same(peer_run, arch):
    x_BD, saes, outs, _ = peer_run
    with torch.no_grad():
        z_BN = saes[arch].encode(x_BD)
        x_hat_BD = saes[arch].decode(z_BN)
    peer = outs[arch]
    mismatched = (z_BN > 0).ne(peer["encoded"] > 0).sum().item()
    enc, dec = max_err(z_BN, peer["encoded"]), max_err(x_hat_BD, peer["decoded"])
    print(
        f"{arch}: encode max|Δ| {enc:.3g}, decode max|Δ| {dec:.3g}, support mismatches {mismatched}"
    )
    assert mismatched == 0 and enc < TOL and dec < TOL


@pytest.mark.peers
@needs_peers
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixtures_are_what_the_installed_peers_write(peer_run, name):
    """The installed peers still write the committed fixtures' format, and our import agrees."""
    fresh, committed = peer_run[3] / name, PEERS / name
    skip_unless_written(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in committed.iterdir())
    fresh_cfg, committed_cfg = (
        json.loads((d / "cfg.json").read_text()) for d in (fresh, committed)
    )
    assert set(fresh_cfg) == set(committed_cfg)
    ref = load_file(str(fresh / "reference.safetensors"))
    with torch.no_grad():
        z_BN = load_sae(fresh).encode(ref["x"])
    assert torch.equal(z_BN > 0, ref["encoded"] > 0) and max_err(z_BN, ref["encoded"]) < TOL
