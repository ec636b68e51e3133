"""Write tests/data/peers/transcoders/: tiny transcoders saved by SAELens and sparsify.

Run with a Python that has SAELens (and sparsify, for its folders): .peers/'s (see
scripts/setup_peers.sh), or one where SAELens is installed beside llm_sae:

    .peers/bin/python scripts/make_transcoder_fixtures.py [--out tests/data/peers/transcoders]
    .peers/bin/python scripts/make_transcoder_fixtures.py --out TMP --load DIR...  # and ours

Each fixture folder is what the peer writes (SAELens: ``save_model`` of its transcoder
classes; sparsify: ``SparseCoder.save_to_disk`` with ``transcode``/``skip_connection``),
plus ``reference.safetensors``: random inputs ``x`` [B, D], the peer's latents ``encoded``
[B, N] and its full output ``predicted`` [B, E] (decode plus the skip path), computed by
the peer from the saved files. With ``--load``, each of our exported folders is loaded by
``sae_lens.SAE.load_from_disk`` and gets ``peer_out.safetensors`` (same keys, on the
folder's ``x.safetensors``) and ``peer_class.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

D, E, N, K, B = 8, 6, 16, 4, 32
SEED = 0


def _random(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=g)


def _saelens_outputs(path: Path, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        y_BE, z_BN = sae.forward_with_activations(x_BD)
    (path / "peer_class.txt").write_text(type(sae).__name__ + "\n")
    return {"x": x_BD, "encoded": z_BN.contiguous(), "predicted": y_BE.contiguous()}


def make_saelens(out: Path, g: torch.Generator, x_BD: torch.Tensor) -> None:
    from sae_lens.saes import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=D, d_sae=N, d_out=E, dtype="float32", device="cpu", apply_b_dec_to_input=False)
    made = {
        "transcoder": Transcoder(TranscoderConfig(**common)),
        "skip_transcoder": SkipTranscoder(SkipTranscoderConfig(**common)),
        "jumprelu_transcoder": JumpReLUTranscoder(JumpReLUTranscoderConfig(**common)),
        "jumprelu_skip_transcoder": JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(**common)),
    }
    for name, sae in made.items():
        sae.cfg.metadata = SAEMetadata(model_name="tiny-peer-model", hook_name="blocks.0.ln2.hook_normalized",
                                       hook_name_out="blocks.0.hook_mlp_out")
        with torch.no_grad():
            sae.W_enc.copy_(_random(g, D, N, scale=D**-0.5))
            sae.W_dec.copy_(_random(g, N, E) * (0.5 + torch.rand(N, 1, generator=g)))
            sae.b_enc.copy_(_random(g, N, scale=0.1))
            sae.b_dec.copy_(_random(g, E, scale=0.2))
            if hasattr(sae, "W_skip"):
                sae.W_skip.copy_(_random(g, E, D, scale=0.3))
            if hasattr(sae, "threshold"):
                theta_N = 0.05 + 0.4 * torch.rand(N, generator=g)
                theta_N[0] = 0.0
                sae.threshold.copy_(theta_N)
        path = out / "saelens" / name
        sae.save_model(str(path))
        save_file(_saelens_outputs(path, x_BD), str(path / "reference.safetensors"))
        (path / "peer_class.txt").unlink()


def make_sparsify(out: Path, g: torch.Generator, x_BD: torch.Tensor) -> None:
    """sparsify transcoders write the input's width (d_out = d_in): a transcoder, a skip
    transcoder, and an SAE with a skip connection (it subtracts b_dec first)."""
    from sparsify import SparseCoder, SparseCoderConfig

    kinds = {
        "transcoder": dict(transcode=True),
        "skip_transcoder": dict(transcode=True, skip_connection=True),
        "skip_sae": dict(skip_connection=True),
    }
    for name, flags in kinds.items():
        sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, **flags))
        with torch.no_grad():
            sae.encoder.weight.copy_(_random(g, N, D, scale=D**-0.5))
            sae.encoder.bias.copy_(_random(g, N, scale=0.1))
            W_dec_ND = _random(g, N, D)
            sae.W_dec.copy_(W_dec_ND / W_dec_ND.norm(dim=1, keepdim=True))
            sae.b_dec.copy_(_random(g, D, scale=0.2))
            if sae.W_skip is not None:
                sae.W_skip.copy_(_random(g, D, D, scale=0.3))
        path = out / "sparsify" / name
        sae.save_to_disk(path)
        loaded = SparseCoder.load_from_disk(path)
        with torch.no_grad():
            acts_BK, idx_BK, _ = loaded.encode(x_BD)
            y_BD = loaded.forward(x_BD).sae_out
        z_BN = torch.zeros(B, N).scatter_(-1, idx_BK, acts_BK)
        save_file({"x": x_BD, "encoded": z_BN, "predicted": y_BD.contiguous()},
                  str(path / "reference.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "tests/data/peers/transcoders"))
    parser.add_argument("--load", nargs="*", default=None, help="our exported folders for SAELens to load")
    args = parser.parse_args()
    if args.load is not None:
        for d in map(Path, args.load):
            save_file(_saelens_outputs(d, load_file(str(d / "x.safetensors"))["x"]),
                      str(d / "peer_out.safetensors"))
    out = Path(args.out)
    g = torch.Generator().manual_seed(SEED)
    x_BD = 2.0 * torch.randn(B, D, generator=g)
    make_saelens(out, g, x_BD)
    if importlib.util.find_spec("sparsify") is not None:  # optional beside SAELens
        make_sparsify(out, g, x_BD)
    else:
        print("sparsify is not installed: its fixtures are left out")
    print(f"wrote transcoder fixtures to {out}")


if __name__ == "__main__":
    main()
