"""``llm-sae steer``: generate from a prompt with SAE features added, clamped or ablated.

The steering itself is ``llm_sae.sae.splice`` (shared with the live view's panel); this is
the command around it: flags in, steered and unsteered continuations out.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_sae.config import add_arguments, from_args
from llm_sae.sae.splice import Intervention, Steerer, SteerError


def parse_interventions(add: Sequence[str] = (), clamp: Sequence[str] = (),
                        ablate: Sequence[int] = ()) -> list[Intervention]:
    """``--add 12=4`` / ``--clamp 7=0`` / ``--ablate 3`` into interventions."""
    out = []
    for mode, specs in (("add", add), ("clamp", clamp)):
        for spec in specs:
            f, sep, v = str(spec).partition("=")
            try:
                if not sep:
                    raise ValueError
                out.append(Intervention(int(f), mode, float(v)))
            except ValueError:
                raise SteerError(f"--{mode} {spec!r}: write FEATURE=STRENGTH, e.g. --{mode} 12=4") from None
    out += [Intervention(int(f), "ablate") for f in ablate]
    return out


@dataclass
class SteerConfig:
    """Generate from a prompt with SAE features added, clamped or ablated at the SAE's hook."""

    sae: str
    """Saved SAE directory."""
    prompt: str
    """Text to continue."""
    add: list[str] = field(default_factory=list)
    """FEATURE=STRENGTH: add STRENGTH × the feature's decoder direction (repeatable)."""
    clamp: list[str] = field(default_factory=list)
    """FEATURE=VALUE: set the feature's activation to VALUE (repeatable)."""
    ablate: list[int] = field(default_factory=list)
    """Features to set to zero."""
    model: str | None = None
    """Model (default: the one the SAE records)."""
    hook: str | None = None
    """Hook point (default: the one the SAE records)."""
    max_new_tokens: int = 32
    """Tokens to generate."""
    temperature: float = 0.0
    """0: greedy; above 0: sampled with --seed."""
    seed: int = 0
    """Sampling seed: the same seed gives the same text."""
    compare: bool = True
    """Also generate without steering, for comparison."""
    json: bool = False
    """Print the result as JSON."""
    device: str = "cpu"
    """Device for the model and the SAE."""


def steer(cfg: SteerConfig) -> dict[str, Any]:
    """Run ``cfg``; returns {"interventions", "steered", "unsteered" (None without --compare)}."""
    ivs = parse_interventions(cfg.add, cfg.clamp, cfg.ablate)
    if not ivs:
        raise SteerError("nothing to steer: give --add F=S, --clamp F=V or --ablate F")
    s = Steerer.load(cfg.sae, cfg.model, cfg.hook, cfg.device)
    for iv in ivs:
        iv.check(s.sae.n_latents)
    kw = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
    return {"interventions": [iv.__dict__ for iv in ivs], "steered": s.generate(cfg.prompt, ivs, **kw),
            "unsteered": s.generate(cfg.prompt, (), **kw) if cfg.compare else None}


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, SteerConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(SteerConfig, args)
    out = steer(cfg)
    if cfg.json:
        print(json.dumps(out))
        return 0
    print(f"steered:   {cfg.prompt}{out['steered']['text']}")
    if out["unsteered"] is not None:
        print(f"unsteered: {cfg.prompt}{out['unsteered']['text']}")
    return 0
