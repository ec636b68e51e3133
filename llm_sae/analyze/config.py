"""What an analysis pass is asked to do."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AnalyzeConfig:
    """Analyse an SAE over an activation store: per-feature statistics and examples."""

    sae: str
    """The SAE: a saved folder (ours, SAELens, sparsify, Gemma Scope), hf://ORG/REPO[/SUBFOLDER] or saelens://RELEASE/SAE_ID."""
    store: str
    """Activation store directory to run the SAE over."""
    out: str
    """Output directory (see docs/analysis-format.md)."""
    tokens: int | None = None
    """Analyse only the first N rows of the store (default: all)."""
    top_k: int = 20
    """Top-activating examples kept per feature."""
    context_before: int = 10
    """Tokens of context shown before each example's token."""
    context_after: int = 5
    """Tokens of context shown after each example's token."""
    n_bins: int = 10
    """Equal-width activation bins (0..max) for the interval examples."""
    per_bin: int = 3
    """Random examples per interval bin."""
    hist_bins: int = 32
    """Bins of each feature's activation histogram."""
    exclude_bos: bool = False
    """Leave out rows whose token is a special token of the tokenizer (BOS/EOS/PAD)."""
    exclude_positions: list[int] = field(default_factory=list)
    """Leave out rows at these positions in their sequence, e.g. 0,1."""
    model: str | None = None
    """Model (hub name or directory) for token strings and logit effects; default: the store's model."""
    logits: bool = True
    """Compute logit effects (W_dec · W_U through the final norm); needs the model's weights."""
    n_logits: int = 10
    """Promoted and suppressed tokens listed per feature."""
    n_neighbours: int = 10
    """Nearest features by decoder cosine listed per feature."""
    dense_threshold: float = 0.1
    """A feature firing on more than this fraction of tokens is reported dense."""
    shard_size: int = 1000
    """Features per output shard file."""
    batch_size: int = 4096
    """Rows encoded at once."""
    device: str | None = None
    """torch device (default: cuda if available, else cpu)."""
    seed: int = 0
    """Seed of the interval-example sampling (a hash of row and feature: order-independent)."""
    progress: bool = True
    """Show progress bars."""
