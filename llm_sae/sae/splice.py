"""Splice an SAE into its model to steer it: add a multiple of a feature's decoder
direction, clamp a feature, or ablate it, at the SAE's hook.

At the hook the activation ``x`` is replaced by ``x + Σ_f (z'_f − z_f) · W_dec[f]``, where
``z = encode(x)`` and ``z'`` is ``z`` with the chosen features changed: ``add v`` makes
``z'_f = z_f + v`` (so ``x`` moves by exactly ``v · W_dec[f]``, whatever the encoder
says), ``clamp v`` makes ``z'_f = v``, ``ablate`` makes ``z'_f = 0`` (clamp 0). Writing
the change as a difference keeps the SAE's error term ``x − decode(z)``: what the SAE
fails to reconstruct still reaches the later layers, so a run with no intervention is the
plain model, bit for bit (no hook is even attached), and a steered run differs from it only
by what the features changed. Every position is steered, the prompt's and the generated
ones', as Neuronpedia does.

Generation reruns the whole sequence each step (no KV cache): the hook then sees every
position every step, and prompts here are short and bounded. Sampling draws from a
``torch.Generator`` seeded per call, so a seed gives the same text every time.

Used by ``llm-sae steer`` and by the live view of ``llm-sae serve``; it lives below the
stages so both share it. The model comes from the one loader of ``llm_sae.lm``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_sae.errors import LlmSaeError
from llm_sae.lm.hooks import check_hooks, load_model, logits_with_edits, run_to_hooks, stop_layer
from llm_sae.sae.formats.meta import recorded_model_and_hook

MODES = ("add", "clamp", "ablate")


class SteerError(LlmSaeError):
    """A steering request that cannot run (feature, mode, strength, prompt length)."""


@dataclass(frozen=True)
class Intervention:
    """One change to one feature: ``add`` ``value`` to it, ``clamp`` it to ``value``, or ``ablate`` it."""

    feature: int
    mode: str = "add"
    value: float = 0.0

    def check(self, n_latents: int) -> None:
        """SteerError unless this can run on an SAE of ``n_latents`` features."""
        if self.mode not in MODES:
            raise SteerError(f"unknown steering mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not 0 <= int(self.feature) < n_latents:
            raise SteerError(f"feature {self.feature} is out of range: this SAE has features 0..{n_latents - 1}")
        if not math.isfinite(float(self.value)):
            raise SteerError(f"strength {self.value} of feature {self.feature} is not a finite number")


def steering_hook(sae: Any, interventions: Sequence[Intervention]) -> Any:
    """The hook function that applies ``interventions`` to an activation [..., D]."""
    feats = sorted({iv.feature for iv in interventions})
    col = {f: j for j, f in enumerate(feats)}
    W_dec_FD = sae.W_dec[feats].detach()
    needs_z = any(iv.mode != "add" for iv in interventions)  # add needs no encode

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        x_MD = act.reshape(-1, act.shape[-1])
        if needs_z:
            z_MF = sae.encode(x_MD.to(W_dec_FD.dtype))[:, feats]
        else:
            z_MF = torch.zeros(x_MD.shape[0], len(feats), dtype=W_dec_FD.dtype, device=W_dec_FD.device)
        new_MF = z_MF.clone()
        for iv in interventions:
            j = col[iv.feature]
            if iv.mode == "add":
                new_MF[:, j] += iv.value
            else:
                new_MF[:, j] = 0.0 if iv.mode == "ablate" else iv.value
        delta_MD = (new_MF - z_MF) @ W_dec_FD
        return act + delta_MD.view_as(act).to(act.dtype)

    return fn


class Steerer:
    """A model and an SAE at one of its hooks: steered logits, generations and activations.

    ``lock`` serialises forward passes; the live view passes its own, so encoding and
    steering requests never run the model at once.
    """

    def __init__(self, sae: Any, model: Any, hook: str, *, device: str = "cpu",
                 lock: threading.Lock | None = None) -> None:
        check_hooks(model, [hook])
        self.sae, self.model, self.hook, self.device = sae, model, hook, device
        self.tokenizer = model.tokenizer
        self.lock = lock or threading.Lock()
        self.n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0) or None

    @classmethod
    def load(cls, sae_dir: str | Path, model: str | None = None, hook: str | None = None,
             device: str = "cpu") -> Steerer:
        """Load the SAE and the model it records (or ``model``/``hook``) through the
        loader harvest uses."""
        from llm_sae.sae.formats.native import load_sae

        rec_model, rec_hook = recorded_model_and_hook(sae_dir)
        model, hook = model or rec_model, hook or rec_hook
        if not model or not hook:
            missing = "model" if not model else "hook"
            raise SteerError(f"the SAE in {sae_dir} does not record its {missing}; pass --model and --hook")
        sae = load_sae(sae_dir, device=device)
        return cls(sae, load_model(model, device=device), hook, device=device)

    def token_ids(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BOS (as harvest's contexts start) then the text's tokens; SteerError past the limit."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        ids = ([bos] if bos is not None else []) + ids
        limits = [x for x in (max_tokens, self.n_ctx) if x]
        if limits and len(ids) > min(limits):
            raise SteerError(f"the prompt is {len(ids)} tokens; at most {min(limits)} fit: shorten it")
        return ids

    def logits(self, ids: Sequence[int], interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """Next-token logits [T, V] for ``ids`` with the interventions applied."""
        for iv in interventions:
            iv.check(self.sae.n_latents)
        x_1T = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        edits = [(self.hook, steering_hook(self.sae, interventions))] if interventions else []
        with self.lock:
            return logits_with_edits(self.model, x_1T, edits)[0]

    def activations(self, ids: Sequence[int], features: Sequence[int]) -> list[list[float]]:
        """The SAE's activations [T][F] of ``features`` at the hook (before any steering)."""
        feats = [int(f) for f in features]
        for f in feats:
            Intervention(f).check(self.sae.n_latents)
        x_1T = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with self.lock:
            x_TD = run_to_hooks(self.model, x_1T, [self.hook], stop_layer(self.model, [self.hook]))[self.hook][0]
            with torch.inference_mode():
                z_TF = self.sae.encode(x_TD.to(self.sae.W_dec.dtype))[:, feats]
        return [[round(float(v), 4) for v in row] for row in z_TF.float().tolist()]

    def generate(self, prompt: str | Sequence[int], interventions: Sequence[Intervention] = (), *,
                 max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 max_prompt_tokens: int | None = None) -> dict[str, Any]:
        """A continuation of ``prompt``: greedy at temperature 0, else sampled with ``seed``."""
        ids = self.token_ids(prompt, max_prompt_tokens) if isinstance(prompt, str) else list(prompt)
        if self.n_ctx and len(ids) + max_new_tokens > self.n_ctx:
            raise SteerError(f"{len(ids)} prompt tokens + {max_new_tokens} new exceed the model's "
                             f"context of {self.n_ctx}; shorten the prompt or ask for fewer tokens")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        new: list[int] = []
        for _ in range(int(max_new_tokens)):
            last_V = self.logits(ids + new, interventions)[-1].float().cpu()
            if temperature <= 0:
                nxt = int(last_V.argmax())
            else:
                probs_V = torch.softmax(last_V / float(temperature), dim=-1)
                nxt = int(torch.multinomial(probs_V, 1, generator=gen))
            new.append(nxt)
            if nxt == eos:
                break
        dec = self.tokenizer.decode
        return {"prompt_ids": ids, "ids": new, "text": dec(new),
                "tokens": [dec([i]) for i in ids + new], "n_prompt": len(ids)}
