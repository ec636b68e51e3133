"""Explain features with an LLM and score the explanations (``llm-sae explain``).

- ``client``: talking to a chat model (any OpenAI-compatible endpoint, or a local HF model),
  with bounded concurrency, retries and token counts.
- ``prompts``: the versioned prompts and the way examples are shown (activating tokens
  marked ``<<like this>>``, as delphi does).
- ``examples``: which examples the explainer sees and which are held out for scoring, and
  the non-activating contexts drawn from the activation store.
- ``scorers``: detection and fuzzing, each a balanced accuracy per feature.
- ``run``: the command, with atomic per-feature writes and resume.

See docs/explain.md.
"""

from llm_sae.errors import ExplainError
from llm_sae.explain.client import ChatBackend, ChatClient, HFChatBackend, Usage

__all__ = ["ChatBackend", "ChatClient", "ExplainError", "HFChatBackend", "Usage"]
