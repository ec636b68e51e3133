"""What a dashboard build is asked to do."""

from __future__ import annotations

from dataclasses import dataclass

from llm_sae.errors import LlmSaeError


class DashboardError(LlmSaeError):
    """Analysis output that cannot be rendered, or an output folder that cannot be used."""


@dataclass
class DashboardConfig:
    analysis: str
    """The analysis output directory written by `llm-sae analyze`."""
    out: str
    """Where to write the site (a new or empty directory, or a site built before)."""
    top_tokens: int = 5
    """Top tokens per feature shown in the index table."""
    max_examples: int = 20
    """Top-activating examples per feature page (at most what the analysis kept)."""
    max_interval_examples: int = 10
    """Examples from activation intervals per feature page, over all intervals."""
    max_logits: int = 10
    """Promoted and suppressed tokens listed per feature."""
    max_neighbours: int = 10
    """Nearest features listed per feature."""
    digits: int = 3
    """Significant digits kept for activations (smaller files; tooltips show these)."""
    max_feature_kb: float = 30.0
    """Size budget of one feature's data file; example windows are cut around their peak
    token until the file fits."""
    explanations: str | None = None
    """Output of `llm-sae explain` to show (default: ANALYSIS/explanations when it exists)."""
