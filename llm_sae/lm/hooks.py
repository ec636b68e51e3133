"""Running a model to its hook points: hook-name checks, where to stop, one forward."""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch

from llm_sae.common.dtypes import dtype_name
from llm_sae.errors import ModelError
from llm_sae.lm.models import load_bridge


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load an HF causal LM as a TransformerBridge (``lm.models.load_bridge``, the one
    loader); a store dtype name such as "bf16" is accepted; ModelError says how to fix a
    failure."""
    return load_bridge(name, device=device, dtype=torch_model_dtype(dtype))


def torch_model_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name(name)]


def check_hooks(model: Any, hooks: list[str], model_name: str = "") -> None:
    """ModelError for any hook the model lacks, with the closest valid names first."""
    valid = set(model.hook_dict)
    for h in hooks:
        if h in valid:
            continue
        close = difflib.get_close_matches(h, sorted(valid), n=5, cutoff=0.6)
        n_layers = model.cfg.n_layers
        per_block = sorted({v.split(".", 2)[2] for v in valid if v.startswith("blocks.0.")})
        other = sorted(v for v in valid if not v.startswith("blocks."))
        raise ModelError(
            f"model {model_name!r} has no hook {h!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" Valid names: blocks.L.<name> for L in 0..{n_layers - 1} with <name> one of "
            + ", ".join(per_block)
            + (f"; and {', '.join(other)}" if other else "")
        )


def stop_layer(model: Any, hooks: list[str]) -> int | None:
    """The block index after which nothing we need is computed (None: run it all)."""
    layers = []
    for h in hooks:
        m = re.match(r"blocks\.(\d+)\.", h)
        if m is None:
            return None  # embeddings are cheap to reach, final-norm hooks need everything
        layers.append(int(m.group(1)))
    stop = max(layers) + 1
    return stop if stop < model.cfg.n_layers else None


def run_to_hooks(model: Any, tokens_BL: torch.Tensor, hooks: list[str], stop: int | None) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def make(name):
        def fn(x, hook):
            # Aliased hook points share one HookPoint, so key by the name we asked for.
            got[name] = x.detach()
            return x

        return fn

    with torch.inference_mode():
        model.run_with_hooks(
            tokens_BL, fwd_hooks=[(h, make(h)) for h in hooks], stop_at_layer=stop, return_type=None
        )
    missing = [h for h in hooks if h not in got]
    if missing:
        raise ModelError(f"hook(s) {missing} never fired on this model; pick another hook point")
    return got


def logits_with_edits(model: Any, tokens_BL: torch.Tensor, edits: list[tuple[str, Any]]) -> torch.Tensor:
    """Logits [B, L, V] of a forward pass in which each ``(hook, fn)`` of ``edits`` may
    replace the activation at its hook (``fn(act, hook) -> act``). With no edits no hook
    is attached at all, so the result is the plain model's, bit for bit."""
    with torch.inference_mode():
        if not edits:
            return model(tokens_BL, return_type="logits")
        return model.run_with_hooks(tokens_BL, fwd_hooks=edits, return_type="logits")


def special_token_ids(tokenizer: Any) -> list[int]:
    """BOS/EOS/pad ids. Training data leaves their positions out: the activations there
    are outliers (an attention sink's norm is often 10-100x the rest) that dominate an SAE."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({t for t in ids if t is not None})


def keep_mask(tokens_BL: torch.Tensor, special: list[int]) -> torch.Tensor:
    """Bool [B, L]: the positions whose token is not one of ``special``."""
    return ~torch.isin(tokens_BL, torch.tensor(special, dtype=torch.long, device=tokens_BL.device))
