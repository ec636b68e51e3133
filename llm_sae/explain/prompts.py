"""The prompts, versioned, and how an example is shown to the model.

An example is a window of tokens. Tokens are joined as they are (they carry their own
spaces); a newline shows as ``\\n`` and a tab as ``\\t`` so one example stays on one line.
Activating tokens are wrapped in ``<<`` and ``>>``, a run of neighbouring ones in one pair,
the convention of delphi (EleutherAI) and of OpenAI's automated interpretability work,
so explanations and scores here compare with theirs.

Every prompt has a version string. It is written into each result, and a run refuses to
resume with different versions: change a prompt's text, bump its version (docs/explain.md
keeps the history).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llm_sae.explain.client import Message

EXPLAIN_VERSION = "explain-v1"
DETECTION_VERSION = "detection-v1"
FUZZING_VERSION = "fuzzing-v1"
VERSIONS = {"explain": EXPLAIN_VERSION, "detection": DETECTION_VERSION, "fuzzing": FUZZING_VERSION}

OPEN, CLOSE = "<<", ">>"


def show_token(tok: str) -> str:
    return str(tok).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def format_example(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """One window on one line, the ``marked`` tokens wrapped in ``<<…>>`` (runs merged)."""
    out: list[str] = []
    inside = False
    for i, tok in enumerate(tokens):
        m = bool(marked[i]) if marked is not None else False
        if m and not inside:
            out.append(OPEN)
        elif not m and inside:
            out.append(CLOSE)
        inside = m
        out.append(show_token(tok))
    if inside:
        out.append(CLOSE)
    return "".join(out)


def activating(acts: Sequence[float | None]) -> list[bool]:
    """Which tokens of a window activate the feature (``null``, no activation, is not)."""
    return [a is not None and a > 0 for a in acts]


EXPLAIN_SYSTEM = f"""[{EXPLAIN_VERSION}] You are a meticulous AI researcher studying one \
feature (a neuron-like unit) of a language model. You are shown text examples where the \
feature is active. In each example the tokens on which it activates are marked between \
{OPEN} and {CLOSE}; after each example its activating tokens are listed with their \
activation on a 0-10 scale (10 = this feature's strongest activation).

Find what the marked tokens have in common, and what in the surrounding text predicts \
them. Be concise and specific: name the tokens or the kind of token, and the context if \
it matters. Do not list the examples; do not mention the markers.

Think briefly, then end your answer with one final line of the form
[EXPLANATION]: <a short description, at most one sentence>"""


def explain_messages(examples: Sequence[tuple[Sequence[str], Sequence[float | None]]],
                     max_act: float) -> list[Message]:
    """The explainer's prompt for one feature: its examples (tokens, activations)."""
    lines = []
    scale = 10.0 / max_act if max_act > 0 else 0.0
    for n, (tokens, acts) in enumerate(examples, 1):
        marks = activating(acts)
        lines.append(f"Example {n}: {format_example(tokens, marks)}")
        tops = [f'("{show_token(t)}", {round(float(a) * scale)})'
                for t, a, m in zip(tokens, acts, marks, strict=True) if m]
        lines.append("Activations: " + ", ".join(tops))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "\n".join(lines)}]


def parse_explanation(text: str) -> str:
    """The text after the last ``[EXPLANATION]:``; else the last non-empty line."""
    tail = text.rsplit("[EXPLANATION]:", 1)
    found = tail[1] if len(tail) == 2 else next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
    found = " ".join(found.split())
    if len(found) > 1 and found[0] == found[-1] == '"':
        found = found[1:-1].strip()  # the whole explanation in quotes
    return found


DETECTION_SYSTEM = f"""[{DETECTION_VERSION}] You are an intelligent and meticulous \
linguistics researcher. You are given an explanation of a feature of a language model, \
and numbered text examples. Decide, for each example, whether the feature would activate \
somewhere in it, given the explanation. Some examples activate it and some do not.

Answer with only a list of 0s and 1s, one per example in order (1 = activates), e.g. \
[1, 0, 0, 1] for four examples."""


def detection_messages(explanation: str, contexts: Sequence[Sequence[str]]) -> list[Message]:
    """The detection scorer's prompt: the explanation and unmarked contexts."""
    body = [f"Explanation: {explanation}", ""]
    body += [f"Example {n}: {format_example(toks)}" for n, toks in enumerate(contexts, 1)]
    return [{"role": "system", "content": DETECTION_SYSTEM}, {"role": "user", "content": "\n".join(body)}]


FUZZING_SYSTEM = f"""[{FUZZING_VERSION}] You are an intelligent and meticulous \
linguistics researcher. You are given an explanation of a feature of a language model, \
and numbered text examples in which some tokens are marked between {OPEN} and {CLOSE}. \
In some examples the marked tokens are exactly the ones the feature activates on; in \
others they were marked at random. Decide, for each example, whether its marked tokens \
are correctly marked, given the explanation.

Answer with only a list of 0s and 1s, one per example in order (1 = correctly marked), \
e.g. [1, 0, 0, 1] for four examples."""


def fuzzing_messages(explanation: str, examples: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> list[Message]:
    """The fuzzing scorer's prompt: the explanation and contexts with marks, some wrong."""
    body = [f"Explanation: {explanation}", ""]
    body += [f"Example {n}: {format_example(toks, marks)}" for n, (toks, marks) in enumerate(examples, 1)]
    return [{"role": "system", "content": FUZZING_SYSTEM}, {"role": "user", "content": "\n".join(body)}]


_LIST = re.compile(r"\[\s*([01](?:\s*,\s*[01])*)\s*\]")


def parse_labels(text: str, n: int) -> list[int] | None:
    """The last list of exactly ``n`` 0/1 values in ``text``; None when there is none."""
    for m in reversed(_LIST.findall(text)):
        vals = [int(v) for v in m.replace(" ", "").split(",")]
        if len(vals) == n:
            return vals
    return None
