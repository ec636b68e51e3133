"""Writing a cross-layer transcoder in the layout circuit-tracer loads.

circuit-tracer's ``load_clt(dir)`` (``circuit_tracer/transcoder/cross_layer_transcoder.py``)
reads, for each layer i, ``W_enc_{i}.safetensors`` holding ``W_enc_{i}`` [N, D],
``b_enc_{i}`` [N], ``b_dec_{i}`` [D] and, for a JumpReLU, ``threshold_{i}`` [N]; and
``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` [N, L − i, D]. It computes
``f = x·W_encᵀ + b_enc``, ``z = f·[f > θ]`` and sums the decoders into every later layer,
which is our CLT in eval mode with θ_i = max(its BatchTopK threshold, 0) for every latent:
the same function, weight for weight. Its d_model is both widths, so d_in must equal d_out.
"""

from __future__ import annotations

from pathlib import Path

from llm_sae.common.atomic import atomic_write_bytes
from llm_sae.sae.clt import CrossLayerTranscoder, load_clt
from llm_sae.sae.formats.weights import InteropError


def export_circuit_tracer(clt: CrossLayerTranscoder | str | Path, out_dir: str | Path) -> Path:
    """Write ``clt`` (or a saved CLT's folder) as circuit-tracer's per-layer safetensors."""
    from safetensors.torch import save

    if isinstance(clt, (str, Path)):
        clt = load_clt(clt)
    cfg = clt.cfg
    if cfg.d_in != cfg.d_out:
        raise InteropError(
            f"circuit-tracer's CLT reads and writes one width (d_model); this CLT reads {cfg.d_in} "
            f"and writes {cfg.d_out}: train it on hooks of the residual width (e.g. "
            "blocks.L.ln2.hook_normalized → blocks.L.hook_mlp_out)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    theta_L = clt.threshold.detach().clamp_min(0).float().cpu()
    for i in range(cfg.n_layers):
        enc = {
            f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i],
            f"threshold_{i}": theta_L[i].expand(cfg.n_latents),
        }
        atomic_write_bytes(out / f"W_enc_{i}.safetensors",
                           save({k: v.detach().float().cpu().contiguous() for k, v in enc.items()}))
        atomic_write_bytes(out / f"W_dec_{i}.safetensors",
                           save({f"W_dec_{i}": clt.W_dec[i].detach().float().cpu().contiguous()}))
    return out
