"""dtype names: one spelling for every stage, with their numpy and torch types.

Besides the float dtypes a store can be quantised: ``int8`` keeps one float32 scale per
row (absmax / 127) and ``int8_b<N>`` one per row and block of N columns, about half the
bytes of bfloat16 with a reconstruction error far below what an SAE reaches.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from llm_sae.errors import StoreError

# On-disk numpy dtype and torch dtype for each store dtype name. An int8 store hands out
# float32 rows (dequantised on read).
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "int8": (np.dtype(np.int8), torch.float32),
}

_INT8_BLOCK = re.compile(r"int8_b([1-9][0-9]*)")


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise ``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` etc. to a store dtype name."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                "float": "float32"}.get(str(dtype), str(dtype))
    if name not in DTYPES and not _INT8_BLOCK.fullmatch(name):
        raise StoreError(
            f"unsupported store dtype {dtype!r}; use one of {sorted(DTYPES)} or int8_b<N> "
            "(int8 with one scale per row and block of N columns)"
        )
    return name


def dtypes_of(name: str) -> tuple[np.dtype, torch.dtype]:
    """(on-disk numpy dtype, torch dtype rows are read as) of a store dtype name."""
    name = dtype_name(name)
    return DTYPES["int8"] if quant_block(name) is not None else DTYPES[name]


def quant_block(name: str) -> int | None:
    """None for a float dtype; 0 for ``int8`` (one scale per row); N for ``int8_b<N>``."""
    name = dtype_name(name)
    if name == "int8":
        return 0
    m = _INT8_BLOCK.fullmatch(name)
    return int(m.group(1)) if m else None


def torch_dtype(name: str) -> torch.dtype:
    return dtypes_of(name)[1]
