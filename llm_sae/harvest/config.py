"""What a harvest is asked to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HarvestConfig:
    model: str
    """HF causal LM: hub name (from the local cache when offline), local save_pretrained directory, or a short name the toolkit knows."""
    hook: list[str]
    """TransformerLens hook name(s), e.g. blocks.6.hook_resid_post; repeat or comma-separate for several (one store each)."""
    dataset: Any
    """Text: HF hub dataset name, a local .txt/.jsonl/.json/.parquet file or folder; from Python also a list/iterable of strings or a callable returning one."""
    tokens: int
    """How many activation rows (tokens) to store per hook."""
    out: str
    """Output directory: the store itself for one hook, else one subdirectory per hook (named after it)."""
    dataset_config: str | None = None
    """Config (subset) name of a hub dataset."""
    split: str = "train"
    """Dataset split to read."""
    text_column: str = "text"
    """Column that holds the text (with --chat-template: the messages; "text" then means "messages")."""
    chat_template: bool = False
    """Format a conversation dataset (a column of {role, content} message lists) with the model's own chat template; the template's special tokens are left out of the store."""
    streaming: bool = True
    """Stream the dataset rather than download and cache it whole first."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 32
    """Contexts per forward pass."""
    device: str = "auto"
    """Device for the model: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Store dtype: float32, float16, bfloat16, int8 (one scale per row; about half the bytes of bfloat16, dequantised as it is read) or int8_b<N> (one scale per row and block of N columns)."""
    model_dtype: str = "float32"
    """Dtype the model runs in: float32, float16 or bfloat16."""
    skip_special: bool = True
    """Leave positions whose token is BOS/EOS/pad out of the store (their activations are outliers that dominate SAE training)."""
    max_norm_multiple: float | None = None
    """Leave out rows whose norm exceeds this multiple of the running median norm (attention sinks, massive activations), e.g. 50; they are counted with their token ids in the manifest. Default: keep every row."""
    shard_rows: int | None = None
    """Rows per shard (default: about 256 MB of activations per shard)."""
    progress: bool = True
    """Show a progress bar."""
    async_write: bool = True
    """Append to the stores on a background thread (on GPU: rows copied to pinned host
    buffers asynchronously), so the model never waits on the disk; --no-async-write appends
    in the harvest loop."""
    pair: list[str] = field(default_factory=list)
    """Transcoder pairs IN:OUT, e.g. blocks.1.ln2.hook_normalized:blocks.1.hook_mlp_out (repeat or comma-separate): both hooks are stored row-aligned and each store's manifest names its partner."""
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    """Free-form notes copied into the manifest (Python only)."""

    @property
    def column(self) -> str:
        """The dataset column actually read."""
        return "messages" if self.chat_template and self.text_column == "text" else self.text_column
