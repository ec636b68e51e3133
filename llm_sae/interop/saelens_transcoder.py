"""Which SAELens class loads one of our transcoders, and why some cannot be exported.

SAELens 6 loads transcoders it did not train: ``transcoder`` (ReLU), ``skip_transcoder``,
``jumprelu_transcoder`` and ``jumprelu_skip_transcoder``. Their encoders read the raw
input (``apply_b_dec_to_input`` must be false; b_dec lives in the output space), as ours
do for a transcoder, so the weights carry over as they are; only W_enc is transposed.
"""

from __future__ import annotations

from llm_sae.sae.base import SAE
from llm_sae.sae.formats.weights import InteropError

# Ours → SAELens's transcoder family. batchtopk, matryoshka and wta are thresholded ReLUs at
# inference, so JumpReLU transcoders exactly (as for SAEs).
OURS_TO_SAELENS_TRANSCODER = {
    "relu_l1": "transcoder",
    "jumprelu": "jumprelu_transcoder",
    "batchtopk": "jumprelu_transcoder",
    "matryoshka": "jumprelu_transcoder",
    "wta": "jumprelu_transcoder",
}


def saelens_transcoder_arch(sae: SAE) -> str:
    """SAELens's architecture name for the transcoder ``sae``; InteropError if it has none.

    A TopK transcoder is refused rather than approximated: SAELens has no TopK transcoder,
    and top-k selection is not a fixed threshold, so no JumpReLU computes it exactly.
    """
    arch = sae.cfg.arch
    if arch == "topk":
        raise InteropError(
            "SAELens has no TopK transcoder (its transcoders are ReLU or JumpReLU, and a "
            "per-token top-k is no fixed threshold); train it with --arch batchtopk (exported "
            "exactly as jumprelu_transcoder) or --arch jumprelu, or load this folder with "
            "llm_sae's load_sae"
        )
    if arch not in OURS_TO_SAELENS_TRANSCODER:
        raise InteropError(
            f"SAELens has no transcoder counterpart of llm_sae's {arch!r}; export one of "
            f"{sorted(OURS_TO_SAELENS_TRANSCODER)}"
        )
    name = OURS_TO_SAELENS_TRANSCODER[arch]
    return name.replace("transcoder", "skip_transcoder") if sae.cfg.skip else name
