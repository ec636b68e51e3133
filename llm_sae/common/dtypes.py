"""dtype names: one spelling for every stage, with their numpy and torch types."""

from __future__ import annotations

import numpy as np
import torch

from llm_sae.errors import StoreError

# On-disk numpy dtype and torch dtype for each store dtype name.
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise ``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` etc. to a store dtype name."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                "float": "float32"}.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise StoreError(f"unsupported store dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[dtype_name(name)][1]
