"""The activation store: sharded memory-mapped files and one JSON manifest.

Writes are atomic and a killed harvest resumes byte-identically; readers shuffle with
bounded memory. The format is documented in docs/internals.md.
"""

from llm_sae.common.dtypes import dtype_name, torch_dtype
from llm_sae.store.format import settings_diff
from llm_sae.store.reader import StoreReader
from llm_sae.store.store import Store, open_store
from llm_sae.store.verify import store_info, verify_store
from llm_sae.store.writer import StoreWriter

__all__ = ["open_store", "Store", "StoreReader", "StoreWriter", "verify_store", "store_info",
           "settings_diff", "dtype_name", "torch_dtype"]
