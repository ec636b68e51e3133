"""What a feature does downstream: logit effects and decoder neighbours."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch


def token_strings(tokenizer: Any) -> list[str]:
    """Each vocabulary id decoded on its own, whitespace kept as real characters."""
    V = len(tokenizer)
    raw = tokenizer.convert_ids_to_tokens(list(range(V)))
    sentencepiece = sum(1 for t in raw if t and t.startswith("▁")) > 0.05 * max(1, V)
    out = []
    for i, t in enumerate(raw):
        if t is None:
            out.append(f"<id {i}>")
        elif sentencepiece and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            b = int(t[3:5], 16)
            out.append(chr(b) if b < 128 else "\ufffd")
        elif sentencepiece:
            out.append(t.replace("▁", " "))
        else:
            try:
                out.append(tokenizer.convert_tokens_to_string([t]))
            except Exception:  # a tokenizer without a byte-level decoder
                out.append(t)
    return out


def load_tokenizer(name: str | None) -> Any:
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        from llm_sae.lm.models import resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(name))
    except Exception as e:  # noqa: BLE001 - any failure means: no token strings
        warnings.warn(f"analyze: no tokenizer from {name!r} ({type(e).__name__}: {e}); "
                      "tokens are written as <id N>; pass --model to fix", stacklevel=2)
        return None


def unembedding(model_name: str, d_in: int) -> tuple[torch.Tensor | None, str | None, str]:
    """(W_U_eff [D, V] with the final norm's scale folded in, norm kind, reason if None).
    ``d_in`` is the width of the decoder rows it will multiply (a transcoder's output width).

    For LayerNorm models the rows are centred over D too (the norm centres the residual
    before scaling), so a decoder atom's component along the all-ones direction, which the
    norm removes, has no effect.
    """
    try:
        from transformers import AutoModelForCausalLM

        from llm_sae.lm.models import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name))
    except Exception as e:  # noqa: BLE001
        return None, None, f"could not load model {model_name!r} ({type(e).__name__}: {e})"
    emb = model.get_output_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        return None, None, f"model {model_name!r} has no unembedding"
    W_U_VD = emb.weight.detach().float()
    if W_U_VD.shape[1] != d_in:
        return None, None, (f"the decoder's width {d_in} is not the model's d_model {W_U_VD.shape[1]} "
                            "(it writes to a hook outside the residual stream)")
    base = getattr(model, "base_model", model)
    norm = None
    for name in ("ln_f", "norm", "final_layer_norm", "final_norm", "ln_final"):
        norm = getattr(base, name, None) or getattr(model, name, None)
        if norm is not None:
            break
    kind = "none"
    W_U_DV = W_U_VD.T.clone()
    if norm is not None and getattr(norm, "weight", None) is not None:
        g_D = norm.weight.detach().float()
        cls = type(norm).__name__
        if "Gemma" in cls:
            g_D = g_D + 1.0  # Gemma's RMSNorm scales by (1 + weight)
        kind = "layernorm" if isinstance(norm, torch.nn.LayerNorm) else "rmsnorm"
        W_U_DV = g_D[:, None] * W_U_DV
        if kind == "layernorm":
            W_U_DV = W_U_DV - W_U_DV.mean(0, keepdim=True)
    del model
    return W_U_DV, kind, "ok"


def _chunk(n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, n_cols))


def logit_effects(W_dec_ND: torch.Tensor, W_U_DV: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Top-n promoted / suppressed (values, ids) per feature, centred over the vocabulary."""
    N, V = W_dec_ND.shape[0], W_U_DV.shape[1]
    n = min(n, V)
    pv, pi, sv, si = [], [], [], []
    c = _chunk(V)
    for a in range(0, N, c):
        l_CV = W_dec_ND[a : a + c].float() @ W_U_DV
        l_CV -= l_CV.mean(1, keepdim=True)
        t = l_CV.topk(n, dim=1)
        b = (-l_CV).topk(n, dim=1)
        pv.append(t.values), pi.append(t.indices), sv.append(-b.values), si.append(b.indices)
    return torch.cat(pv), torch.cat(pi), torch.cat(sv), torch.cat(si)


def decoder_neighbours(W_dec_ND: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n other features by decoder cosine, in blocks (never an N×N matrix)."""
    N = W_dec_ND.shape[0]
    n = min(n, N - 1)
    if n <= 0:
        return torch.zeros(N, 0), torch.zeros(N, 0, dtype=torch.long)
    U_ND = W_dec_ND.float() / W_dec_ND.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    vals, idx = [], []
    c = _chunk(N)
    for a in range(0, N, c):
        s_CN = U_ND[a : a + c] @ U_ND.T
        ar = torch.arange(a, min(N, a + c), device=s_CN.device)
        s_CN[ar - a, ar] = -math.inf
        t = s_CN.topk(n, dim=1)
        vals.append(t.values), idx.append(t.indices)
    return torch.cat(vals), torch.cat(idx)
