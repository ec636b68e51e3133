"""Harvest: run a language model over text and stream hook-point activations into stores.

The model is any HF causal LM (hub name or local ``save_pretrained`` directory) seen
through TransformerLens 4's ``TransformerBridge``, so hook names are TransformerLens
names (``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``, ...). The forward pass
stops after the last block a requested hook needs. Each hook gets its own store; a
killed harvest rerun with the same command continues where its stores stop, and ends
byte-identical to an uninterrupted run. Under ``torchrun`` each rank harvests a disjoint
share of the contexts into the same store.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.config import add_arguments, from_args
from llm_sae.data import StreamPos, dataset_spec, iter_documents, pack_contexts
from llm_sae.errors import DataError, ModelError, StoreError
from llm_sae.store import (
    MANIFEST,
    NonFiniteError,
    StoreWriter,
    dtype_name,
    iter_in_background,
    settings_diff,
    write_json_atomic,
)


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
    """Column that holds the text."""
    streaming: bool = True
    """Stream the dataset rather than download and cache it whole first."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 32
    """Contexts per forward pass."""
    device: str = "auto"
    """Device for the model: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Store dtype: float32, float16 or bfloat16."""
    model_dtype: str = "float32"
    """Dtype the model runs in: float32, float16 or bfloat16."""
    skip_special: bool = True
    """Leave positions whose token is BOS/EOS/pad out of the store (their activations are outliers that dominate SAE training)."""
    shard_rows: int | None = None
    """Rows per shard (default: about 256 MB of activations per shard)."""
    progress: bool = True
    """Show a progress bar."""
    async_write: bool = True
    """Append to the stores on a background thread (on GPU: rows copied to pinned host
    buffers asynchronously), so the model never waits on the disk; --no-async-write appends
    in the harvest loop."""
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    """Free-form notes copied into the manifest (Python only)."""


# Timing of the last harvest loop in this process (model loading excluded), for benchmarks.
LAST_RUN: dict[str, float] = {}


# ---------------------------------------------------------------------------------------
# Model


def resolve_model(name: str) -> str:
    """Short names (the embedded model) resolve through llm_sae.models when it exists."""
    try:
        from llm_sae.models import resolve_model as _resolve
    except ImportError:
        return name
    return str(_resolve(name))


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load an HF causal LM as a TransformerBridge; ModelError says how to fix a failure."""
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_model(name)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        model = TransformerBridge.boot_transformers(path, device=device, dtype=_torch_model_dtype(dtype))
    except Exception as e:
        raise ModelError(
            f"cannot load model {name!r} ({type(e).__name__}: {e}); give a local save_pretrained "
            "directory or a hub name that is cached (offline) or reachable"
        ) from None
    model.eval()
    return model


def _torch_model_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name(name)]


def check_hooks(model: Any, hooks: list[str], model_name: str = "") -> None:
    """ModelError for any hook the model lacks, with the closest valid names first."""
    valid = set(model.hook_dict)
    for h in hooks:
        if h in valid:
            continue
        close = difflib.get_close_matches(h, sorted(valid), n=5, cutoff=0.6)
        n_layers = model.cfg.n_layers
        per_block = sorted({v.split(".", 2)[2] for v in valid if v.startswith("blocks.0.")})
        other = sorted(v for v in valid if not v.startswith("blocks."))
        raise ModelError(
            f"model {model_name!r} has no hook {h!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" Valid names: blocks.L.<name> for L in 0..{n_layers - 1} with <name> one of "
            + ", ".join(per_block)
            + (f"; and {', '.join(other)}" if other else "")
        )


def _stop_layer(model: Any, hooks: list[str]) -> int | None:
    """The block index after which nothing we need is computed (None: run it all)."""
    layers = []
    for h in hooks:
        m = re.match(r"blocks\.(\d+)\.", h)
        if m is None:
            return None  # embeddings are cheap to reach, final-norm hooks need everything
        layers.append(int(m.group(1)))
    stop = max(layers) + 1
    return stop if stop < model.cfg.n_layers else None


def _forward(model: Any, tokens_BL: torch.Tensor, hooks: list[str], stop: int | None) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def make(name):
        def fn(x, hook):
            # Aliased hook points share one HookPoint, so key by the name we asked for.
            got[name] = x.detach()
            return x

        return fn

    with torch.inference_mode():
        model.run_with_hooks(
            tokens_BL, fwd_hooks=[(h, make(h)) for h in hooks], stop_at_layer=stop, return_type=None
        )
    missing = [h for h in hooks if h not in got]
    if missing:
        raise ModelError(f"hook(s) {missing} never fired on this model; pick another hook point")
    return got


# ---------------------------------------------------------------------------------------
# Distributed


def _device(cfg: HarvestConfig, world: int) -> str:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and world > 1:
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return dev


def merge_rank_manifests(out: Path, world: int) -> dict[str, Any]:
    """Rank 0's job at the end of a distributed harvest: one manifest for all ranks' shards."""
    parts = [json.loads((out / f"manifest.rank{r}.json").read_text()) for r in range(world)]
    m = dict(parts[0])
    m["shards"] = [s for p in parts for s in p["shards"]]
    m["n_rows"] = sum(p["n_rows"] for p in parts)
    m["n_sequences"] = sum(p["n_sequences"] for p in parts)
    m["next_sequence_id"] = max(p["next_sequence_id"] for p in parts)
    # Where the text was left: the rank that took the last batch got furthest.
    furthest = max((p["progress"] for p in parts), key=lambda q: q.get("contexts", 0))
    m["progress"] = {**furthest, "ranks": [p["progress"] for p in parts]}
    count = sum(p["stats"]["count"] for p in parts)
    sum_norm = sum(p["stats"]["sum_norm"] for p in parts)
    sum_x = np.sum([np.asarray(p["stats"]["sum"]) for p in parts], axis=0)
    m["stats"] = {
        "count": count, "sum_norm": sum_norm, "sum": sum_x.tolist(),
        "mean_norm": sum_norm / max(count, 1), "mean": (sum_x / max(count, 1)).tolist(),
    }
    m["complete"] = all(p["complete"] for p in parts)
    write_json_atomic(out / MANIFEST, m)
    return m


# ---------------------------------------------------------------------------------------
# Harvest


def store_dirs(cfg: HarvestConfig) -> dict[str, Path]:
    """Where each hook's store goes: ``out`` itself for one hook, ``out/<hook>`` for several."""
    hooks = _hooks(cfg)
    out = Path(cfg.out)
    return {hooks[0]: out} if len(hooks) == 1 else {h: out / h for h in hooks}


def _hooks(cfg: HarvestConfig) -> list[str]:
    hooks = [cfg.hook] if isinstance(cfg.hook, str) else list(cfg.hook)
    hooks = [h for part in hooks for h in part.split(",") if h]
    if not hooks:
        raise ModelError("no hook given; pass --hook blocks.L.hook_resid_post (or another hook point)")
    if len(set(hooks)) != len(hooks):
        raise ModelError(f"hook names repeat in {hooks}; give each once")
    return hooks


def _settings(cfg: HarvestConfig, world: int) -> dict[str, Any]:
    """Settings that decide what a store holds; a resumed run must match them."""
    return {
        "tokens": int(cfg.tokens),
        "skip_special": bool(cfg.skip_special),
        "model_dtype": dtype_name(cfg.model_dtype),
        "world_size": world,
    }


def _existing(dirs: dict[str, Path], metas: dict[str, dict], manifest_name: str) -> dict[str, dict]:
    """Manifests already on disk; StoreError naming any setting that differs."""
    found = {}
    for h, d in dirs.items():
        p = d / manifest_name
        if not p.exists():
            continue
        m = json.loads(p.read_text())
        diffs = settings_diff(m, metas[h])
        if diffs:
            raise StoreError(
                f"{d} holds a store made with other settings: {'; '.join(diffs)}. Rerun with "
                "the original settings to resume it, or choose another --out"
            )
        found[h] = m
    return found


def harvest(cfg: HarvestConfig) -> dict[str, Path]:
    """Run the harvest; returns {hook: store directory}. Resumes a killed run."""
    hooks = _hooks(cfg)
    if cfg.tokens <= 0:
        raise DataError(f"--tokens must be positive, got {cfg.tokens}")
    from llm_sae.distributed import init_from_env

    rank, world = init_from_env()
    dirs = store_dirs(cfg)
    manifest_name = MANIFEST if world == 1 else f"manifest.rank{rank}.json"
    prefix = "shard" if world == 1 else f"shard-r{rank}"
    say = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)

    # Finished already? Decide before loading the model, which is the slow part.
    if all((d / MANIFEST).exists() for d in dirs.values()):
        done = {h: json.loads((d / MANIFEST).read_text()) for h, d in dirs.items()}
        if all(m.get("complete") for m in done.values()):
            spec = dataset_spec(cfg.dataset, config=cfg.dataset_config, split=cfg.split,
                                text_column=cfg.text_column)
            for h, m in done.items():
                want = {"hook": h, "context_length": cfg.context_length, "dataset": spec,
                        "harvest": _settings(cfg, world), "dtype": dtype_name(cfg.dtype), "model": cfg.model}
                diffs = settings_diff(m, want)
                if diffs:
                    raise StoreError(
                        f"{dirs[h]} holds a finished store made with other settings: "
                        f"{'; '.join(diffs)}. Choose another --out"
                    )
            say(f"harvest: {', '.join(str(d) for d in dirs.values())} already complete "
                f"({cfg.tokens:,} tokens per hook); nothing to do")
            return dirs

    device = _device(cfg, world)
    model = load_model(cfg.model, device=device, dtype=cfg.model_dtype)
    check_hooks(model, hooks, cfg.model)
    tok = model.tokenizer
    if tok is None:
        raise ModelError(f"model {cfg.model!r} has no tokenizer; save one next to the model")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and cfg.context_length > n_ctx:
        raise DataError(f"--context-length {cfg.context_length} exceeds the model's {n_ctx} positions; use at most {n_ctx}")
    stop = _stop_layer(model, hooks)
    special = sorted({t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None})

    # One probe forward tells each hook's width, whatever kind of hook it is.
    probe = _forward(model, torch.tensor([[special[0] if special else 0] * 2], device=device), hooks, stop)
    spec = dataset_spec(cfg.dataset, config=cfg.dataset_config, split=cfg.split, text_column=cfg.text_column)
    metas = {
        h: {
            "d_in": int(probe[h].shape[-1]),
            "dtype": dtype_name(cfg.dtype),
            "model": cfg.model,
            "hook": h,
            "context_length": int(cfg.context_length),
            "tokenizer": getattr(tok, "name_or_path", None),
            "dataset": spec,
            "harvest": _settings(cfg, world),
            "special_token_ids": special,
            **({"extra": cfg.extra} if cfg.extra else {}),
        }
        for h in hooks
    }
    for h, x in probe.items():
        if x.ndim != 3:
            raise ModelError(f"hook {h!r} gives activations of shape {tuple(x.shape)}; only [batch, pos, d] hooks can be stored")
    existing = _existing(dirs, metas, manifest_name)
    if not existing:
        # Fail on unusable text before any store directory is created.
        docs = iter_documents(cfg.dataset, config=cfg.dataset_config, split=cfg.split,
                              text_column=cfg.text_column, streaming=cfg.streaming)
        if next(pack_contexts(docs, tok, cfg.context_length), None) is None:
            raise DataError(
                f"dataset {spec['name']!r} gives no complete context of {cfg.context_length} "
                "tokens: it is empty or too short; give more text or a smaller --context-length"
            )
    writers = {
        h: StoreWriter(dirs[h], metas[h], mode="resume" if h in existing else "new",
                       shard_rows=cfg.shard_rows, prefix=prefix, manifest_name=manifest_name)
        for h in hooks
    }
    try:
        _run(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say)
    except BaseException:
        # Keep every row already appended: committed shards stay, buffered rows are written
        # with their progress so a rerun continues after them.
        for w in writers.values():
            try:
                w.close(complete=False)
            except Exception:
                w.abort()
        raise
    if world > 1:
        torch.distributed.barrier()
        if rank == 0:
            for d in dirs.values():
                merge_rank_manifests(d, world)
        torch.distributed.barrier()
    return dirs


class _Job:
    """One batch's rows for every hook that still needs it, and what to record with them."""

    def __init__(self, rows: dict[str, torch.Tensor], tok_N, pos_N2, progress, sequences, span) -> None:
        self.rows, self.tok_N, self.pos_N2 = rows, tok_N, pos_N2
        self.progress, self.sequences, self.span = progress, sequences, span
        self.ready: Any = None  # CUDA event recorded after the device→host copies


def _append_job(writers: dict[str, StoreWriter], job: _Job) -> None:
    """The store appends of one batch (on the writer thread, or inline when synchronous)."""
    if job.ready is not None:
        job.ready.synchronize()  # the non_blocking copies into pinned memory have landed
    for h, x_ND in job.rows.items():
        w = writers[h]
        try:
            # The writer checks finiteness after conversion to the store dtype.
            w.append(x_ND, job.tok_N, job.pos_N2, progress=job.progress, sequences=job.sequences)
        except NonFiniteError:
            c, c_end = job.span
            raise ModelError(
                f"hook {h!r} produced NaN/Inf activations in contexts {c}..{c_end - 1} "
                f"(or they overflowed {w.meta['dtype']}); the {len(w.shards)} shards "
                "already written are kept. Run the model in float32 (--model-dtype "
                "float32), store as float32, or check the model's weights"
            ) from None


class StoreSink:
    """Hands each batch's rows to the stores, in order, on a background writer thread.

    A ring of ``depth`` slots bounds what is in flight (the harvest loop waits for a free
    slot, so memory stays bounded when the disk is slower than the model). On CUDA each
    slot holds pinned host buffers: rows are converted to the store dtype on the device,
    copied with ``non_blocking=True`` and a CUDA event is recorded, so the forward pass
    never waits for the copy or the disk; the writer thread waits on the event, then
    appends. ``StoreWriter.append`` copies what it keeps, so a slot is reused as soon as
    its appends return. An exception on the writer thread is re-raised in the harvest loop
    at the next ``put`` or at ``close``; later batches are then never written, and since
    progress is saved with the rows, a rerun resumes exactly after the last one written.
    ``threaded=False`` appends inline (the reference the threaded path is tested against).
    """

    def __init__(self, writers: dict[str, StoreWriter], *, device: Any = "cpu", depth: int = 3,
                 threaded: bool = True) -> None:
        self.writers, self.threaded = writers, threaded
        self.pinned = torch.device(device).type == "cuda"
        self.seconds = 0.0  # time spent appending (on whichever thread does it)
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put({})  # a slot: hook → pinned buffer, grown on demand
        self._work: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="harvest-writer")
            self._thread.start()

    def put(self, job: _Job) -> None:
        """Queue one batch (rows on any device); raises the writer thread's error, if any."""
        self._raise()
        if not self.threaded:
            t = time.perf_counter()
            _append_job(self.writers, job)
            self.seconds += time.perf_counter() - t
            return
        slot = self._take_slot()
        if self.pinned:
            self._copy_to_host(job, slot)
        self._work.put((job, slot))

    def close(self, *, drain: bool = True) -> None:
        """Stop the thread; with ``drain`` write everything queued first. Re-raises its error."""
        if self._thread is not None:
            if not drain and self.error is None:
                self.error = _Stop()
            self._work.put(None)
            self._thread.join()
            self._thread = None
        if drain:
            self._raise()

    def _take_slot(self) -> dict:
        while True:
            self._raise()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _copy_to_host(self, job: _Job, slot: dict) -> None:
        for h, x_ND in job.rows.items():
            x_ND = x_ND.to(self.writers[h].torch_dtype)  # on the device: fewer bytes to copy
            buf = slot.get(h)
            if buf is None or buf.shape[0] < x_ND.shape[0] or buf.dtype != x_ND.dtype:
                buf = slot[h] = self._host_buffer(x_ND.shape, x_ND.dtype)
            host = buf[: x_ND.shape[0]]
            host.copy_(x_ND, non_blocking=True)
            job.rows[h] = host
        job.ready = self._event()
        job.ready.record()

    # Seams for the CPU tests of the copy path (pinned memory and events need CUDA).
    @staticmethod
    def _host_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    @staticmethod
    def _event() -> Any:
        return torch.cuda.Event()

    def _loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            job, slot = item
            try:
                if self.error is None:
                    t = time.perf_counter()
                    _append_job(self.writers, job)
                    self.seconds += time.perf_counter() - t
            except BaseException as e:  # re-raised in the harvest loop
                self.error = e
            finally:
                self._free.put(slot)

    def _raise(self) -> None:
        if self.error is not None and not isinstance(self.error, _Stop):
            raise self.error


class _Stop(Exception):
    """Marks a sink closed without draining: queued batches are dropped, not written."""


def _run(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say) -> None:
    sink = StoreSink(writers, device=device, threaded=cfg.async_write)
    try:
        _harvest_loop(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say, sink)
    except BaseException:
        sink.close(drain=False)  # stop the writer thread before the stores are closed
        raise


def _harvest_loop(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say, sink) -> None:
    B, L, N = int(cfg.batch_size), int(cfg.context_length), int(cfg.tokens)
    # Where each store stands; restart from the one furthest behind. Stores ahead skip
    # batches they already hold (shard ends fall on batch ends, so this lines up exactly).
    prog = {h: w.progress or {"contexts": 0, "doc": 0, "offset": 0, "rows": 0} for h, w in writers.items()}
    if all(w.completed for w in writers.values()):
        say("harvest: already complete; nothing to do")
        return
    start_h = min(prog, key=lambda h: prog[h]["contexts"])
    p0 = prog[start_h]
    if p0["contexts"] % B:
        # Only an interrupted run with another batch size gets here; correct, just realigned.
        say(f"harvest: resuming at context {p0['contexts']}, not a multiple of --batch-size {B}")
    if p0["contexts"]:
        say(f"harvest: resuming after {p0['contexts']:,} contexts ({min(p['rows'] for p in prog.values()):,} tokens)")

    docs = iter_documents(cfg.dataset, config=cfg.dataset_config, split=cfg.split,
                          text_column=cfg.text_column, streaming=cfg.streaming)
    contexts = pack_contexts(docs, tok, L, start=StreamPos(p0["doc"], p0["offset"]))
    special_t = torch.tensor(special, dtype=torch.long)
    c, rows_total = int(p0["contexts"]), int(p0["rows"])
    own_rows = sum(w.n_rows for w in writers.values()) // len(writers)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=N if world == 1 else None, initial=rows_total, unit="tok", unit_scale=True,
                   desc="harvest", dynamic_ncols=True, file=sys.stderr)
    produced_any = c > 0
    t0 = time.perf_counter()
    store_s = 0.0  # time the harvesting thread spends on the store (benchmarks report it)
    # Tokenizing ahead on a thread keeps a GPU busy; on CPU the thread would only compete
    # with the model's own threads for the same cores.
    if str(device).startswith("cpu"):
        batches = iter(lambda: _take(contexts, B) or None, None)
    else:
        batches = _batches_ahead(contexts, B)
    while rows_total < N:
        batch = next(batches, None)
        if batch is None:
            break
        produced_any = True
        tokens_BL = torch.from_numpy(np.stack([t for t, _ in batch]))
        after = batch[-1][1]
        keep_BL = ~torch.isin(tokens_BL, special_t) if cfg.skip_special else torch.ones_like(tokens_BL, dtype=torch.bool)
        # Cut the last batch exactly at the requested number of rows.
        cum = torch.cumsum(keep_BL.reshape(-1).long(), 0).reshape(keep_BL.shape)
        keep_BL &= cum <= N - rows_total
        n_keep = int(keep_BL.sum())
        c_end = c + len(batch)
        new_prog = {"contexts": c_end, "doc": after.doc, "offset": after.offset, "rows": rows_total + n_keep}
        mine = (c // B) % world == rank if c % B == 0 else rank == 0
        if mine and any(prog[h]["contexts"] < c_end for h in hooks):
            acts = _forward(model, tokens_BL.to(device), hooks, stop)
            t_store = time.perf_counter()
            b_idx, p_idx = keep_BL.nonzero(as_tuple=True)
            pos_N2 = torch.stack([b_idx + c, p_idx], 1)
            tok_N = tokens_BL[b_idx, p_idx]
            # Row indices rather than a boolean mask: a mask on the device would make the
            # host wait for the forward to finish just to learn how many rows it selects.
            flat_dev = (b_idx * L + p_idx).to(device, non_blocking=True)
            rows = {
                h: acts[h].reshape(-1, acts[h].shape[-1]).index_select(0, flat_dev)
                for h in hooks if prog[h]["contexts"] < c_end
            }
            seqs = (tokens_BL, torch.arange(c, c_end))
            sink.put(_Job(rows, tok_N, pos_N2, new_prog, seqs, (c, c_end)))
            own_rows += n_keep
            store_s += time.perf_counter() - t_store
        c, rows_total = c_end, rows_total + n_keep
        if bar is not None:
            bar.update(n_keep if world == 1 else 0)
            if world > 1:
                bar.set_postfix_str(f"rank0 {own_rows:,} tok")
    sink.close()  # every queued batch is written; re-raises a writer-thread error
    getattr(batches, "close", lambda: None)()
    if bar is not None:
        bar.close()
    if not produced_any:
        raise DataError(
            f"dataset {cfg.dataset!r} gave no complete context of {L} tokens; it is empty or "
            "too short: give more text or a smaller --context-length"
        )
    if rows_total < N:
        say(f"harvest: the dataset ran out after {rows_total:,} of {N:,} tokens; the stores hold what there was")
    t_close = time.perf_counter()
    for h, w in writers.items():
        final = dict(w.progress or prog[h])
        final["exhausted"] = rows_total < N
        w.progress = final
        w.close(complete=True)
    dt = time.perf_counter() - t0
    LAST_RUN.update(seconds=dt, rows=rows_total, hooks=len(hooks), close_seconds=time.perf_counter() - t_close,
                    store_seconds=store_s + time.perf_counter() - t_close, write_seconds=sink.seconds)
    say(f"harvest: wrote {rows_total:,} tokens per hook for {len(hooks)} hook(s) in {dt:.1f}s")


def _batches_ahead(contexts: Iterable, n: int, depth: int = 4) -> Iterator[list]:
    """Batches of ``n`` contexts, tokenized on a background thread (tokenizers release the
    GIL), so the model never waits on text; order is unchanged."""

    def batches() -> Iterator[list]:
        it = iter(contexts)
        while batch := _take(it, n):
            yield batch

    return iter_in_background(batches(), depth, name="harvest-text")


def _take(it: Iterable, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, HarvestConfig, exclude=("extra",))


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(HarvestConfig, args)
    dirs = harvest(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        for h, d in dirs.items():
            print(f"{h}\t{d}")
    return 0


__all__ = ["HarvestConfig", "harvest", "load_model", "check_hooks", "resolve_model", "store_dirs",
           "merge_rank_manifests"]
