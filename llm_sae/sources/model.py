"""Training batches from a model run on the fly: text → model → device shuffle buffer → SAE.

Nothing touches the disk. The text is packed into contexts exactly as harvest packs it
(``lm.text.pack_contexts``), the model runs to the hook (``lm.hooks``), and BOS/EOS/pad
positions are left out as in a store, so training on the fly sees the rows a store of the
same text would hold.

Shuffling is by blocks: the stream of contexts is cut into blocks of ``buffer_rows //
context_length`` contexts, and the rows of one block (at most ``buffer_rows``, held on the
device) are permuted with a generator seeded by (seed, block index). That bounds memory
and makes the order a pure function of the seed, so a resume needs no saved buffer: it
re-reads and re-tokenizes the text to count the rows of the blocks before its position
(cheap), then runs the model only from the block that holds it. The text is cycled when it
runs out, as a store is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llm_sae.errors import DataError, ModelError
from llm_sae.lm.hooks import (
    check_hooks,
    keep_mask,
    load_model,
    run_to_hooks,
    special_token_ids,
    stop_layer,
)
from llm_sae.lm.text import iter_documents, pack_contexts


class ModelSource:
    """A model's activations at one hook, as an ``ActivationSource``."""

    def __init__(
        self, model: str, dataset: Any, hook: str, *, device: torch.device | str = "cpu",
        context_length: int = 128, batch_contexts: int = 32, buffer_rows: int = 65536,
        model_dtype: str = "float32", dataset_config: str | None = None, split: str = "train",
        text_column: str = "text", norm_rows: int = 16384, lm: Any = None,
    ) -> None:
        if not hook or not dataset:
            raise DataError("training on the fly needs --model, --dataset and --hook; give all three")
        if context_length < 2 or batch_contexts < 1 or buffer_rows < context_length:
            raise DataError(
                f"--context-length {context_length} (≥ 2), --model-batch-size {batch_contexts} (≥ 1) "
                f"and --buffer-rows {buffer_rows} (≥ the context length) are out of range"
            )
        self.name, self.dataset, self.hook = model, dataset, hook
        self.device = torch.device(device)
        self.L, self.batch_contexts, self.buffer_rows = context_length, batch_contexts, buffer_rows
        self.text_args = {"config": dataset_config, "split": split, "text_column": text_column}
        self.norm_rows = norm_rows
        self.model = lm if lm is not None else load_model(model, device=str(self.device), dtype=model_dtype)
        check_hooks(self.model, [hook], model)
        self.tok = self.model.tokenizer
        if self.tok is None:
            raise ModelError(f"model {model!r} has no tokenizer; save one next to the model")
        n_ctx = getattr(self.model.cfg, "n_ctx", None)
        if n_ctx and context_length > n_ctx:
            raise DataError(f"--context-length {context_length} exceeds the model's {n_ctx} positions; use at most {n_ctx}")
        self.stop = stop_layer(self.model, [hook])
        self.special = special_token_ids(self.tok)
        probe = run_to_hooks(self.model, torch.tensor([[self.special[0] if self.special else 0] * 2],
                                                      device=self.device), [hook], self.stop)[hook]
        if probe.ndim != 3:
            raise ModelError(f"hook {hook!r} gives activations of shape {tuple(probe.shape)}; train on a [batch, pos, d] hook")
        self._d_in = int(probe.shape[-1])
        self._head_RD: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device) -> ModelSource:
        """From a TrainConfig's on-the-fly fields."""
        return cls(
            cfg.model, cfg.dataset, cfg.hook, device=device, context_length=cfg.context_length,
            batch_contexts=cfg.model_batch_size, buffer_rows=cfg.buffer_rows, model_dtype=cfg.model_dtype,
            dataset_config=cfg.dataset_config, split=cfg.split, text_column=cfg.text_column,
            norm_rows=cfg.init_rows,
        )

    # ------------------------------------------------------------------ the protocol
    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def mean_norm(self) -> float:
        """Estimated on the first ``norm_rows`` rows of the text (a store uses all of its rows)."""
        return float(self._head(self.norm_rows).norm(dim=1).mean())

    def check(self) -> None:
        if next(self._contexts(cycle=False), None) is None:
            raise DataError(
                f"dataset {self.dataset!r} gives no complete context of {self.L} tokens: it is "
                "empty or too short; give more text or a smaller --context-length"
            )

    def sample(self, n: int, seed: int) -> Tensor:
        """``n`` rows drawn with ``seed`` from the first rows of the text (at most ``norm_rows``
        more than n are never needed: the trainer asks for its --init-rows)."""
        head_RD = self._head(max(n, self.norm_rows))
        perm = torch.randperm(head_RD.shape[0], generator=torch.Generator().manual_seed(seed))
        return head_RD[perm[:n]].float().cpu()

    def batches(
        self, batch_size: int, *, seed: int, start_batch: int, device: torch.device,
        dtype: torch.dtype, batch_slice: tuple[int, int] | None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        if batch_slice is not None and batch_size % batch_slice[1]:
            raise DataError(f"--batch-size {batch_size} does not split into {batch_slice[1]} equal parts")
        skip = start_batch * batch_size  # rows of the shuffled stream already trained on
        per_block = max(1, self.buffer_rows // self.L)
        contexts = self._contexts(cycle=True)
        row0, b = 0, 0  # the first row of block b, in stream order
        while True:
            block = list(itertools.islice(contexts, per_block))
            n = sum(self._n_kept(t_L) for t_L in block)
            if row0 + n > skip:
                break
            row0, b = row0 + n, b + 1  # skipped by counting tokens: the model never runs
        pending_x: list[Tensor] = []
        pending_rows: list[Tensor] = []
        have = 0
        while True:
            x_RD = self._rows(block, dtype)
            n = x_RD.shape[0]
            perm_R = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
            x_RD, rows_R = x_RD[perm_R.to(x_RD.device)], row0 + perm_R
            if skip > row0:  # resuming inside this block
                x_RD, rows_R = x_RD[skip - row0 :], rows_R[skip - row0 :]
            pending_x.append(x_RD)
            pending_rows.append(rows_R)
            have += x_RD.shape[0]
            while have >= batch_size:
                x_all, rows_all = torch.cat(pending_x), torch.cat(pending_rows)
                pending_x, pending_rows = [x_all[batch_size:]], [rows_all[batch_size:]]
                have -= batch_size
                x_BD, rows_B = x_all[:batch_size], rows_all[:batch_size]
                if batch_slice is not None:  # the i-th of n equal parts, as a store reader cuts it
                    i, n_parts = batch_slice
                    part = batch_size // n_parts
                    x_BD, rows_B = x_BD[i * part : (i + 1) * part], rows_B[i * part : (i + 1) * part]
                yield x_BD.to(device), rows_B
            row0, b = row0 + n, b + 1
            block = list(itertools.islice(contexts, per_block))

    # ------------------------------------------------------------------ the parts
    def _contexts(self, *, cycle: bool) -> Iterator[np.ndarray]:
        """Packed contexts (tokens_L) from the start of the text; endless with ``cycle``."""
        while True:
            docs = iter_documents(self.dataset, streaming=True, **self.text_args)
            any_ = False
            for tokens_L, _ in pack_contexts(docs, self.tok, self.L):
                any_ = True
                yield tokens_L
            if not cycle or not any_:
                return

    def _n_kept(self, tokens_L: np.ndarray) -> int:
        return int(np.isin(tokens_L, self.special, invert=True).sum())

    @torch.no_grad()
    def _rows(self, contexts: list[np.ndarray], dtype: torch.dtype) -> Tensor:
        """The activations [R, D] at the hook of the non-special positions, on the device."""
        out = []
        for i in range(0, len(contexts), self.batch_contexts):
            tokens_BL = torch.from_numpy(np.stack(contexts[i : i + self.batch_contexts]))
            acts_BLD = run_to_hooks(self.model, tokens_BL.to(self.device), [self.hook], self.stop)[self.hook]
            b_idx, p_idx = keep_mask(tokens_BL, self.special).nonzero(as_tuple=True)
            flat = (b_idx * tokens_BL.shape[1] + p_idx).to(self.device)
            out.append(acts_BLD.reshape(-1, acts_BLD.shape[-1]).index_select(0, flat).to(dtype))
        return torch.cat(out) if out else torch.empty(0, self._d_in, device=self.device, dtype=dtype)

    def _head(self, n: int) -> Tensor:
        """The first ``n`` rows of the text in stream order (fewer if it is shorter); kept,
        as the input scale and the initialisation sample both read them."""
        if self._head_RD is not None and self._head_RD.shape[0] >= n:
            return self._head_RD[:n]
        got, have = [], 0
        contexts = self._contexts(cycle=False)
        while have < n:
            block = list(itertools.islice(contexts, self.batch_contexts))
            if not block:
                break
            got.append(self._rows(block, torch.float32))
            have += got[-1].shape[0]
        if not got:
            raise DataError(f"dataset {self.dataset!r} gives no rows for {self.hook}; give more text")
        self._head_RD = torch.cat(got)[:n]
        return self._head_RD
