"""The live view: encode typed text with the SAE and show the features."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from llm_sae.errors import LlmSaeError
from llm_sae.lm.hooks import load_model
from llm_sae.sae.formats.meta import recorded_model_and_hook
from llm_sae.serve.config import ServeError


class LiveEncoder:
    """Tokenize text, run the model to the SAE's hook, and encode with the SAE."""

    def __init__(
        self,
        sae_dir: str | Path,
        model: str | None = None,
        hook: str | None = None,
        device: str = "cpu",
        max_tokens: int = 1024,
    ):
        from llm_sae.sae.formats.hub import resolve_sae
        from llm_sae.sae.formats.native import load_sae

        sae_dir = resolve_sae(sae_dir)  # hf:// and saelens:// too
        rec_model, rec_hook = recorded_model_and_hook(sae_dir)
        self.model_name = model or rec_model
        self.hook = hook or rec_hook
        if not self.model_name:
            raise ServeError(
                f"the SAE in {sae_dir} does not record its model; pass --model NAME_OR_DIR"
            )
        if not self.hook:
            raise ServeError(
                f"the SAE in {sae_dir} does not record its hook point; pass --hook "
                "(e.g. blocks.1.hook_resid_post)"
            )
        from llm_sae.common.device import resolve_device

        self.device = str(resolve_device(device))  # a missing GPU: an error before the model loads
        self.max_tokens = max_tokens
        self.sae = load_sae(sae_dir, device=device)
        self.bridge = _load_model(self.model_name, device)
        self.tokenizer = self.bridge.tokenizer
        self.lock = threading.Lock()
        self.steerer: Any = None  # made on the first /api/steer request (serve/steer_api.py)
        self.encode("")  # fail at start-up, not on the first request, if hook or width is wrong

    def info(self) -> dict[str, Any]:
        return {
            "live": True,
            "model": str(self.model_name),
            "hook": self.hook,
            "n_latents": int(self.sae.n_latents),
        }

    def encode(self, text: str, feature: int | None = None, k: int = 5) -> dict[str, Any]:
        import torch

        n = int(self.sae.n_latents)
        if feature is not None and not 0 <= feature < n:
            raise ValueError(f"feature {feature} is out of range: this SAE has {n} features")
        k = max(1, min(int(k), 50, n))
        ids = self._token_ids(text)
        with self.lock, torch.no_grad():
            tokens_1T = torch.tensor([ids], dtype=torch.long, device=self.device)
            x_TD = run_to_hook(self.bridge, tokens_1T, self.hook)[0].float()
            if x_TD.shape[-1] != self.sae.d_in:
                raise ServeError(
                    f"hook {self.hook!r} of {self.model_name!r} is {x_TD.shape[-1]} wide but the "
                    f"SAE reads d_in={self.sae.d_in}; pass the --model and --hook it was trained on"
                )
            z_TN = self.sae.encode(x_TD.to(next(self.sae.parameters()).dtype)).float()
            vals_TK, idx_TK = z_TN.topk(k, dim=-1)
            acts_T = z_TN[:, feature] if feature is not None else None
        pieces = [self.tokenizer.decode([i]) for i in ids]
        top = [
            [[int(j), round(float(v), 5)] for v, j in zip(vr, ir, strict=True) if v > 0]
            for vr, ir in zip(vals_TK.tolist(), idx_TK.tolist(), strict=True)
        ]
        return {
            "tokens": pieces,
            "top": top,
            "feature": feature,
            "acts": None if acts_T is None else [round(float(a), 5) for a in acts_T.tolist()],
        }

    def _token_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        # Harvest contexts start with BOS, so the SAE saw activations that followed one.
        if bos is not None:
            ids = [bos] + ids
        limit = self.max_tokens
        n_ctx = getattr(getattr(self.bridge, "cfg", None), "n_ctx", None)
        if isinstance(n_ctx, int) and n_ctx > 0:
            limit = min(limit, n_ctx)
        return ids[:limit]


def _load_model(model: str, device: str) -> Any:
    try:
        return load_model(model, device=device)
    except LlmSaeError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's model path
        raise ServeError(f"cannot load model {model!r} for the live view: {e}") from e


def run_to_hook(bridge: Any, tokens_1T: Any, hook: str) -> Any:
    """Activations [1, T, D] at ``hook``, stopping the forward pass after its block."""
    import re

    got: dict[str, Any] = {}

    def grab(act: Any, hook: Any = None) -> Any:
        got["x"] = act.detach()
        return act

    m = re.match(r"blocks\.(\d+)\.", hook)
    n_layers = getattr(getattr(bridge, "cfg", None), "n_layers", None)
    stop = int(m.group(1)) + 1 if m else None
    if stop is not None and isinstance(n_layers, int) and stop >= n_layers:
        stop = None
    try:
        bridge.run_with_hooks(tokens_1T, fwd_hooks=[(hook, grab)], stop_at_layer=stop, return_type=None)
    except (KeyError, ValueError, AttributeError) as e:
        raise ServeError(f"the model has no hook point {hook!r} ({e}); pass --hook with a valid one") from e
    if "x" not in got:
        raise ServeError(f"hook {hook!r} never fired on this model; pass --hook with a valid one")
    return got["x"]
