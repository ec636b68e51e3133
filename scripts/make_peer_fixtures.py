"""Write tests/data/peers/: tiny SAEs saved by SAELens and sparsify themselves, with outputs.

Run with a Python that has SAELens (and sparsify, for its folders): .peers/'s (see
scripts/setup_peers.sh), or one where SAELens is installed beside llm_sae:

    .peers/bin/python scripts/make_peer_fixtures.py [--out tests/data/peers]

Each fixture directory is exactly what the peer library writes when it saves a trained SAE
(SAELens: ``TrainingSAE.save_inference_model``, the call its training runner ends with;
sparsify: ``SparseCoder.save_to_disk`` into one folder per hookpoint), plus
``reference.safetensors`` with random inputs ``x`` and what the peer's own loader computes
from the saved files: ``encoded`` (dense latents [B, N]) and ``decoded`` ([B, D]). The
weights are random but made awkward on purpose (non-unit decoder rows, nonzero biases, a
zero threshold) so that every convention the import has to convert is exercised.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

D, N, K, B = 8, 16, 4, 32
SEED = 0


def _random_weights(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Encoder [D, N] (SAELens layout), decoder rows of norms 0.5..2, small nonzero biases."""
    W_dec_ND = torch.randn(N, D, generator=g)
    norms_N = 0.5 + 1.5 * torch.rand(N, generator=g)
    W_dec_ND *= (norms_N / W_dec_ND.norm(dim=1))[:, None]
    return {
        "W_enc_DN": torch.randn(D, N, generator=g) / D**0.5,
        "W_dec_ND": W_dec_ND,
        "b_enc_N": 0.1 * torch.randn(N, generator=g),
        "b_dec_D": 0.2 * torch.randn(D, generator=g),
    }


def _set(sae: torch.nn.Module, w: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc_DN"])
        sae.W_dec.copy_(w["W_dec_ND"])
        sae.b_enc.copy_(w["b_enc_N"])
        sae.b_dec.copy_(w["b_dec_D"])


def _metadata():
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(
        model_name="tiny-peer-model",
        hook_name="blocks.0.hook_resid_post",
        hook_head_index=None,
        context_size=32,
        prepend_bos=True,
        seqpos_slice=[None],
        model_from_pretrained_kwargs={},
    )


def _saelens_reference(path: Path, x_BD: torch.Tensor) -> None:
    """Load the saved directory with SAELens's own loader and record its outputs."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        z_BN = sae.encode(x_BD)
        x_hat_BD = sae.decode(z_BN)
    save_file(
        {"x": x_BD, "encoded": z_BN.contiguous(), "decoded": x_hat_BD.contiguous()},
        str(path / "reference.safetensors"),
    )


def make_saelens(out: Path, g: torch.Generator, x_BD: torch.Tensor) -> None:
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    common = dict(d_in=D, d_sae=N, dtype="float32", device="cpu")
    made = {
        "standard": StandardTrainingSAE(StandardTrainingSAEConfig(**common, metadata=_metadata())),
        # Some SAELens SAEs do not subtract b_dec from the input: the import must move it.
        "standard_no_bdec": StandardTrainingSAE(
            StandardTrainingSAEConfig(**common, apply_b_dec_to_input=False, metadata=_metadata())
        ),
        # SAELens's TopK default: pre-activations scaled by the decoder row norms.
        "topk": TopKTrainingSAE(
            TopKTrainingSAEConfig(
                **common, k=K, rescale_acts_by_decoder_norm=True, metadata=_metadata()
            )
        ),
        "jumprelu": JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, metadata=_metadata())),
        # Saved as a JumpReLU whose threshold is the learned global one, for every latent.
        "batchtopk": BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                **common, k=K, rescale_acts_by_decoder_norm=False, metadata=_metadata()
            )
        ),
    }
    # A training checkpoint (SAELens's trainer saves those with save_model): decoder norms
    # not folded yet, so the import must fold rescale_acts_by_decoder_norm itself.
    made["topk_checkpoint"] = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            **common, k=K, rescale_acts_by_decoder_norm=True, metadata=_metadata()
        )
    )
    for name, sae in made.items():
        _set(sae, _random_weights(g))
        with torch.no_grad():
            if name == "jumprelu":
                theta_N = 0.05 + 0.4 * torch.rand(N, generator=g)
                theta_N[0] = 0.0  # SAELens allows θ = 0 (then it is a plain ReLU)
                sae.threshold.copy_(theta_N)
            if name == "batchtopk":
                sae.topk_threshold = torch.tensor(0.15, dtype=torch.double)
        path = out / "saelens" / name
        if name == "topk_checkpoint":
            sae.save_model(str(path))
        else:
            sae.save_inference_model(str(path))
        _saelens_reference(path, x_BD)


def make_sparsify(out: Path, g: torch.Generator, x_BD: torch.Tensor) -> None:
    """A sparsify run directory: one SAE folder per hookpoint, as its trainer writes it."""
    from sparsify import SparseCoder, SparseCoderConfig

    for hookpoint in ("layers.0", "layers.1"):
        sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K))
        w = _random_weights(g)
        with torch.no_grad():
            sae.encoder.weight.copy_(w["W_enc_DN"].T)
            sae.encoder.bias.copy_(w["b_enc_N"])
            sae.W_dec.copy_(w["W_dec_ND"] / w["W_dec_ND"].norm(dim=1, keepdim=True))
            sae.b_dec.copy_(w["b_dec_D"])
        path = out / "sparsify" / hookpoint
        sae.save_to_disk(path)
        loaded = SparseCoder.load_from_disk(path)
        with torch.no_grad():
            top_acts_BK, top_idx_BK, _ = loaded.encode(x_BD)
            z_BN = torch.zeros(B, N).scatter_(-1, top_idx_BK, top_acts_BK)
            x_hat_BD = loaded.decode(top_acts_BK, top_idx_BK)
        save_file(
            {"x": x_BD, "encoded": z_BN, "decoded": x_hat_BD.contiguous()},
            str(path / "reference.safetensors"),
        )


def _installed(name: str) -> bool:
    try:
        return bool(metadata.version(name))
    except metadata.PackageNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "tests/data/peers"))
    out = Path(parser.parse_args().out)
    g = torch.Generator().manual_seed(SEED)
    x_BD = 2.0 * torch.randn(B, D, generator=g)
    make_saelens(out, g, x_BD)
    # sparsify is optional beside SAELens (CI's co-install venv has none): its folders are
    # then left out, and the tests that compare them skip. It draws from g after SAELens.
    if importlib.util.find_spec("sparsify") is not None:
        make_sparsify(out, g, x_BD)
    else:
        print("sparsify is not installed: its fixtures are left out")
    installed = [n for n in ("sae-lens", "eai-sparsify", "torch") if _installed(n)]
    versions = {name: metadata.version(name) for name in installed}
    (out / "versions.json").write_text(json.dumps({**versions, "seed": SEED}, indent=2) + "\n")
    print(f"wrote fixtures to {out}: {versions}")


if __name__ == "__main__":
    main()
