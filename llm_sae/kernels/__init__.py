"""Kernels: sparse TopK encode/decode whose backward touches only the active latents.

``sparse_ops`` is the leaf the others import; ``topk`` holds the autograd functions,
``screen`` the exact bfloat16-screened CPU encoder (with ``screen_select``, its
candidate selection, and ``screen_buffers``), ``triton`` the GPU kernels, ``auxk``
AuxK's decode in the dead latents' subspace, ``batch_topk`` BatchTopK's kept pairs,
``threshold_pairs`` JumpReLU's pairs above per-latent thresholds, ``dead_pre_act`` its
pre-activation loss on the dead latents.
"""

from llm_sae.kernels import threshold_pairs, topk
from llm_sae.kernels.sparse_ops import DeferredWeightGrads, latent_segments
from llm_sae.kernels.topk import (
    dense_topk_decode,
    dense_topk_encode,
    pair_pre_acts,
    topk_decode,
    topk_encode,
)


def clear_workspace() -> None:
    """Free the kernels' cached buffers: the pre-activation slabs, the screens' bfloat16
    weight copies (TopK's and JumpReLU's), e.g. after training, before analysis."""
    topk.clear_workspace()
    threshold_pairs.clear()


__all__ = ["topk_encode", "topk_decode", "dense_topk_encode", "dense_topk_decode",
           "pair_pre_acts", "DeferredWeightGrads", "clear_workspace", "latent_segments"]
