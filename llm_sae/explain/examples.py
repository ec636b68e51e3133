"""Which examples the explainer sees, which are held out for scoring, and the negatives.

A score is only honest on examples the explainer did not see. The explainer gets every
other top example (the strongest one included); the held-out activating examples are
drawn from the rest of the top examples and from the interval (quantile) examples, so
scoring also asks about weak activations, as delphi does.

Detection also needs contexts where the feature does *not* fire. The analysis output only
records the feature's activations inside its own examples, so the negatives come from the
activation store: random windows of consecutive rows of one sequence, encoded once by the
SAE for all features together; a feature's negatives are windows where it is zero on every
token. Everything is drawn from seeded generators keyed by the feature id, so a resumed
run scores a feature on exactly the examples an uninterrupted run would have used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_sae.errors import ExplainError


@dataclass
class Window:
    """A context window and this feature's activation on each token (None: no row)."""

    tokens: list[str]
    acts: list[float | None]
    row: int | None = None


def _window(ex: dict[str, Any]) -> Window:
    return Window([str(t) for t in ex.get("tokens", [])], list(ex.get("acts", [])), ex.get("row"))


def feature_rng(seed: int, feature: int, purpose: str) -> random.Random:
    """A generator for one feature and one purpose, independent of run order."""
    return random.Random(f"{seed}/{feature}/{purpose}")


def split_examples(rec: dict[str, Any], n_explain: int, n_score: int, seed: int) -> tuple[list[Window], list[Window]]:
    """(examples for the explainer, held-out activating examples for the scorers)."""
    top = [_window(e) for e in rec.get("top_examples") or []]
    shown = top[::2][: max(1, n_explain)]
    seen = {w.row for w in shown}
    pool: list[Window] = [w for w in top if w not in shown]
    for b in rec.get("interval_examples") or []:
        pool += [_window(e) for e in b.get("examples") or []]
    held, rows = [], set(seen)
    for w in pool:  # one window per store row, none the explainer saw
        if w.row is None or w.row not in rows:
            held.append(w)
            rows.add(w.row)
    held = [w for w in held if any(a is not None and a > 0 for a in w.acts)]
    rng = feature_rng(seed, int(rec["id"]), "held-out")
    return shown, rng.sample(held, min(n_score, len(held)))


def vocab_strings(analysis: str | Path) -> list[str] | None:
    """The analysis's token strings (vocab.json), the same ones its examples use."""
    import json

    p = Path(analysis) / "vocab.json"
    if not p.is_file():
        return None
    return list(json.loads(p.read_text(encoding="utf-8"))["tokens"])


class NegativeContexts:
    """Random store windows of ``width`` tokens, and for each asked-for feature which of
    them it fires in. Built once per run: one read and one encode of ``n_windows·width``
    rows, whatever the number of features."""

    def __init__(self, store: Any, sae: Any, features: list[int], *, width: int, n_windows: int,
                 seed: int, vocab: list[str] | None = None, device: str = "cpu") -> None:
        import numpy as np
        import torch

        self.width, self.vocab = int(width), vocab
        n = store.n_rows
        if n < self.width:
            raise ExplainError(f"the store has {n} rows, fewer than one window of {self.width}; "
                               "lower --window or harvest more tokens")
        rng = np.random.default_rng(seed)
        starts: list[int] = []
        for s in rng.integers(0, n - self.width + 1, size=4 * n_windows).tolist():
            pos = store.positions(s, s + self.width)
            if (pos[:, 0] == pos[0, 0]).all() and int(pos[-1, 1] - pos[0, 1]) == self.width - 1:
                starts.append(int(s))  # one sequence, consecutive positions
            if len(starts) == n_windows:
                break
        if not starts:
            raise ExplainError("found no store window of consecutive tokens for negatives; "
                               "lower --window")
        self.token_ids = [store.token_ids(s, s + self.width).tolist() for s in starts]
        self.features = {f: i for i, f in enumerate(features)}
        cols = torch.tensor(features, dtype=torch.long, device=device)
        param = next(sae.parameters())
        fires = []
        per = max(1, (1 << 22) // max(1, sae.n_latents * self.width))  # windows per encode
        with torch.no_grad():
            for a in range(0, len(starts), per):
                x = torch.cat([store.acts(s, s + self.width) for s in starts[a : a + per]])
                z = sae.encode(x.to(device=device, dtype=param.dtype))[:, cols]
                fires.append((z > 0).view(-1, self.width, len(features)).any(1).cpu())
        self.fires_WF = torch.cat(fires)  # [windows, asked features]

    def _text(self, ids: list[int]) -> list[str]:
        v = self.vocab
        return [v[i] if v is not None and 0 <= i < len(v) else f"<id {i}>" for i in ids]

    def for_feature(self, feature: int, n: int, seed: int) -> list[Window]:
        """Up to ``n`` windows where ``feature`` fires on no token."""
        col = self.fires_WF[:, self.features[feature]]
        free = (~col).nonzero().flatten().tolist()
        pick = feature_rng(seed, feature, "negatives").sample(free, min(n, len(free)))
        return [Window(self._text(self.token_ids[w]), [0.0] * self.width) for w in pick]
