"""The live view's steering endpoint (``POST /api/steer``): bounded requests in, steered
and unsteered continuations out, on the model and SAE the live view already holds."""

from __future__ import annotations

from typing import Any

from llm_sae.sae.splice import Intervention, Steerer
from llm_sae.serve.live import LiveEncoder

#: Bounds of one steering request: every request costs at most this much model time.
STEER_MAX_FEATURES = 8
STEER_MAX_NEW_TOKENS = 64
STEER_MAX_PROMPT_TOKENS = 256
STEER_MAX_STRENGTH = 1e4


def live_steerer(live: LiveEncoder) -> Steerer:
    """The live view's Steerer: the model and SAE already loaded, and the same lock."""
    if live.steerer is None:
        live.steerer = Steerer(live.sae, live.bridge, live.hook, device=live.device, lock=live.lock)
    return live.steerer


def parse_request(req: dict[str, Any], n_latents: int) -> tuple[str, list[Intervention], dict[str, Any]]:
    """(prompt, interventions, generation settings) of a request; ValueError or SteerError
    for anything outside the bounds, before the model runs."""
    prompt, feats = req.get("prompt", ""), req.get("features") or []
    if not isinstance(prompt, str) or not isinstance(feats, list):
        raise ValueError("prompt must be a string and features a list of {id, mode, value}")
    if len(feats) > STEER_MAX_FEATURES:
        raise ValueError(f"at most {STEER_MAX_FEATURES} features per request (got {len(feats)})")
    n_new = int(req.get("max_new_tokens", 24))
    if not 1 <= n_new <= STEER_MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be 1..{STEER_MAX_NEW_TOKENS}")
    temperature = float(req.get("temperature", 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise ValueError("temperature must be in 0..2")
    ivs = []
    for f in feats:
        if not isinstance(f, dict):
            raise ValueError("each feature must be an object {id, mode, value}")
        iv = Intervention(int(f.get("id")), str(f.get("mode", "add")), float(f.get("value", 0.0)))
        if abs(iv.value) > STEER_MAX_STRENGTH:
            raise ValueError(f"strengths must lie within ±{STEER_MAX_STRENGTH:g}")
        iv.check(n_latents)
        ivs.append(iv)
    return prompt, ivs, {"max_new_tokens": n_new, "temperature": temperature, "seed": int(req.get("seed", 0))}


def steer_request(live: LiveEncoder, req: dict[str, Any]) -> dict[str, Any]:
    """Steered and unsteered continuations of ``req["prompt"]``, with the chosen features'
    activation on every token.

    ``req``: {"prompt": str, "features": [{"id": int, "mode": "add"|"clamp"|"ablate",
    "value": float}, …], "max_new_tokens": int, "temperature": float, "seed": int}.
    """
    prompt, ivs, kw = parse_request(req, int(live.sae.n_latents))
    s = live_steerer(live)
    ids = s.token_ids(prompt, min(STEER_MAX_PROMPT_TOKENS, live.max_tokens))
    shown = sorted({iv.feature for iv in ivs})
    out: dict[str, Any] = {"features": shown}
    for name, use in (("steered", ivs), ("unsteered", [])):
        g = s.generate(ids, use, **kw)
        out[name] = {"tokens": g["tokens"], "n_prompt": g["n_prompt"], "text": g["text"],
                     "acts": s.activations(ids + g["ids"], shown) if shown else []}
    return out
