"""Score an explanation on held-out examples: detection and fuzzing (delphi's definitions).

Both ask the chat model yes/no questions about a shuffled mix of positive and negative
items, ``batch`` items per prompt, and report the balanced accuracy, (TPR + TNR) / 2: 0.5
is chance whatever the class balance, 1.0 is perfect.

- **detection**: given the explanation, which of these contexts activate the feature?
  Positives are held-out activating examples, negatives store windows where the feature
  is zero on every token. Tests whether the explanation says *where* the feature fires.
- **fuzzing**: given the explanation, are the marked tokens the activating ones?
  Positives are held-out activating examples marked correctly; negatives the same kind of
  examples with as many marks put on tokens where the feature is zero. Tests whether the
  explanation says *which token* fires, given a context that does.

An answer that cannot be parsed counts its items as wrong: a scorer that cannot answer
has not shown that the explanation works. When no answer of a feature parses, its score
is None (reported with ``parse_failures``), since that says nothing about the explanation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llm_sae.explain.client import ChatBackend, Message
from llm_sae.explain.examples import Window, feature_rng
from llm_sae.explain.prompts import (
    DETECTION_VERSION,
    FUZZING_VERSION,
    activating,
    detection_messages,
    fuzzing_messages,
    parse_labels,
)


def balanced_accuracy(labels: Sequence[int], preds: Sequence[int | None]) -> float | None:
    """(TPR + TNR) / 2, a missing prediction counted wrong; None without both classes."""
    pos = [p == 1 for lab, p in zip(labels, preds, strict=True) if lab == 1]
    neg = [p == 0 for lab, p in zip(labels, preds, strict=True) if lab == 0]
    if not pos or not neg:
        return None
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def _ask(backend: ChatBackend, build: Callable[[list[Any]], list[Message]], items: list[Any],
         labels: list[int], rng: Any, batch: int, max_tokens: int) -> dict[str, Any]:
    order = list(range(len(items)))
    rng.shuffle(order)  # positives and negatives mixed, in an order fixed by the seed
    preds: list[int | None] = [None] * len(items)
    failures, spent = 0, {"prompt_tokens": 0, "completion_tokens": 0}
    for a in range(0, len(order), max(1, batch)):
        chunk = order[a : a + batch]
        reply = backend.complete(build([items[i] for i in chunk]), max_tokens=max_tokens, temperature=0.0)
        spent["prompt_tokens"] += reply.prompt_tokens
        spent["completion_tokens"] += reply.completion_tokens
        got = parse_labels(reply.text, len(chunk))
        if got is None:
            failures += 1
            continue
        for i, p in zip(chunk, got, strict=True):
            preds[i] = p
    # No answer parsed at all says nothing about the explanation: no score, not zero.
    ba = balanced_accuracy(labels, preds) if any(p is not None for p in preds) else None
    counts = {"tp": 0, "tn": 0, "fp": 0, "fn": 0}
    for lab, p in zip(labels, preds, strict=True):
        hit = p == lab
        counts[("t" if hit else "f") + ("p" if (lab == 1) == hit else "n")] += 1
    return {"balanced_accuracy": None if ba is None else round(ba, 4), **counts,
            "n": len(items), "parse_failures": failures, "usage": spent}


def detection(backend: ChatBackend, explanation: str, positives: list[Window], negatives: list[Window],
              *, feature: int, seed: int, batch: int = 10, max_tokens: int = 256) -> dict[str, Any]:
    """Detection score of ``explanation``: can the model tell activating contexts apart?"""
    items = [w.tokens for w in positives] + [w.tokens for w in negatives]
    labels = [1] * len(positives) + [0] * len(negatives)
    out = _ask(backend, lambda chunk: detection_messages(explanation, chunk), items, labels,
               feature_rng(seed, feature, "detection"), batch, max_tokens)
    return {**out, "prompt": DETECTION_VERSION}


def mis_mark(w: Window, rng: Any) -> list[bool] | None:
    """As many marks as ``w`` has activating tokens, put on tokens where it is zero."""
    n = sum(activating(w.acts))
    zeros = [i for i, a in enumerate(w.acts) if a is not None and a == 0]
    if not zeros:
        return None
    pick = set(rng.sample(zeros, min(n, len(zeros))))
    return [i in pick for i in range(len(w.tokens))]


def fuzzing(backend: ChatBackend, explanation: str, held_out: list[Window], *, feature: int, seed: int,
            batch: int = 10, max_tokens: int = 256) -> dict[str, Any]:
    """Fuzzing score of ``explanation``: can the model tell correct marks from random ones?

    The first half of the held-out examples is marked correctly, the second half wrongly
    (an example with no zero token to mark stays correct).
    """
    rng = feature_rng(seed, feature, "fuzzing")
    items: list[tuple[list[str], list[bool]]] = []
    labels: list[int] = []
    half = len(held_out) // 2
    for j, w in enumerate(held_out):
        wrong = mis_mark(w, rng) if j >= half else None
        items.append((w.tokens, wrong if wrong is not None else activating(w.acts)))
        labels.append(0 if wrong is not None else 1)
    out = _ask(backend, lambda chunk: fuzzing_messages(explanation, chunk), items, labels, rng, batch, max_tokens)
    return {**out, "prompt": FUZZING_VERSION}


SCORERS = ("detection", "fuzzing")
