"""Text in, fixed-length token contexts out: the input side of harvest (and of evaluation).

A dataset is an HF ``datasets`` hub name (with config and split), a local ``.txt`` /
``.jsonl`` / ``.json`` / ``.parquet`` file or a folder of them, or, from Python, a list /
iterable of strings or a callable returning one. Documents are tokenized one at a time
(so the result does not depend on any batching), joined with EOS, and cut into contexts
of ``context_length`` tokens that each start with BOS. Where the stream is, is a
``(document index, token offset)`` pair, which is all a resumed harvest needs to continue.

Conversation datasets (a ``messages`` column of ``{"role", "content"}`` turns) become
documents through the model's own chat template (``chat_renderer``); the template's
special tokens are then told apart by ``template_special_ids`` so harvest can leave them
out of the store, as it leaves out BOS and EOS.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_sae.errors import DataError

#: The short dataset name of the offline default corpus (see llm_sae.corpus).
STDLIB = "stdlib"

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

TextSource = str | Path | Iterable[str] | Callable[[], Iterable[str]]


def dataset_spec(
    dataset: TextSource, *, config: str | None = None, split: str = "train", text_column: str = "text"
) -> dict[str, Any]:
    """What identifies a dataset, for the store manifest (a resumed run must match it)."""
    if isinstance(dataset, str | Path):
        name: Any = str(dataset)
    else:
        name = f"<python {type(dataset).__name__}>"
    return {"name": name, "config": config, "split": split, "text_column": text_column}


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
        if not files:
            raise DataError(
                f"folder {path} holds no {'/'.join(LOCAL_BUILDERS)} files; point --dataset at "
                "a folder of text files, one file, or a hub dataset name"
            )
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"dataset {path} is empty or too short: its files hold no text; give a file with text")
    kinds = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{path} mixes file types ({', '.join(sorted(kinds))}); keep one kind per dataset")
    return files


def iter_documents(
    dataset: TextSource,
    *,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = True,
    render: Callable[[Any], str] | None = None,
) -> Iterator[str]:
    """Yield the documents of a dataset as strings, always in the same order.

    ``render`` turns each row's ``text_column`` value (or each item of a Python iterable)
    into text, e.g. a conversation through a chat template."""
    if callable(dataset) and not isinstance(dataset, str | Path):
        yield from _check_strings(map(render or _same, dataset()), "the callable's result")
        return
    if not isinstance(dataset, str | Path):
        yield from _check_strings(map(render or _same, dataset), "the iterable")
        return
    path = Path(dataset).expanduser()
    if str(dataset) == STDLIB and not path.exists():
        # The offline default corpus: the standard library's own source (llm_sae.corpus).
        from llm_sae.lm.corpus import iter_documents as stdlib_documents

        yield from (doc.text for doc in stdlib_documents(split))
        return
    import datasets

    try:
        if path.exists():
            files = _local_files(path)
            builder = LOCAL_BUILDERS[files[0].suffix]
            kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", streaming=streaming, **kwargs
            )
        else:
            ds = datasets.load_dataset(str(dataset), config, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"cannot load dataset {str(dataset)!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Give a local file/folder, or a hub dataset that is "
            "cached (HF_HUB_OFFLINE=1) or reachable, with --dataset-config/--split as needed"
        ) from None
    first = True
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a streamed dataset only opens its files here
            raise DataError(f"cannot read dataset {str(dataset)!r}: {type(e).__name__}: {e}") from None
        if first:
            if text_column not in row:
                raise DataError(
                    f"dataset {str(dataset)!r} has no column {text_column!r}; its columns are "
                    f"{sorted(row)}; pass --text-column with one of them"
                )
            first = False
        text = row[text_column] if render is None else render(row[text_column])
        if not isinstance(text, str):
            raise DataError(f"column {text_column!r} of {str(dataset)!r} holds {type(text).__name__}, not text")
        yield text


def _same(x: Any) -> Any:
    return x


def chat_renderer(tokenizer: Any) -> Callable[[Any], str]:
    """A conversation (list of ``{"role", "content"}``) → text, by the tokenizer's own chat
    template. DataError before any work when the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat "
            "template; use an instruct/chat model, or drop --chat-template for plain text"
        )

    def render(messages: Any) -> str:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise DataError(
                "--chat-template expects each row to hold a list of {role, content} messages "
                f"(got {type(messages).__name__}); pass --text-column with the messages column"
            )
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return render


def template_special_ids(tokenizer: Any) -> list[int]:
    """Ids of every special token the tokenizer knows (BOS/EOS/pad and the added special
    tokens chat templates are made of, e.g. <|im_start|>, <start_of_turn>)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return sorted(ids)


def _check_strings(items: Iterable[Any], what: str) -> Iterator[str]:
    for x in items:
        if not isinstance(x, str):
            raise DataError(f"{what} yielded a {type(x).__name__}; it must yield strings")
        yield x


@dataclass(frozen=True)
class StreamPos:
    """Where in the token stream the next context starts."""

    doc: int = 0
    """Index of the document holding the next token."""
    offset: int = 0
    """Tokens of that document (counting its trailing EOS) already used."""


def pack_contexts(
    documents: Iterable[str],
    tokenizer: Any,
    context_length: int,
    *,
    start: StreamPos = StreamPos(),
    docs_per_call: int = 256,
) -> Iterator[tuple[np.ndarray, StreamPos]]:
    """Yield ``(tokens_L, position after it)`` for consecutive packed contexts.

    ``documents`` must be the dataset from its first document; ``start`` skips ahead
    without tokenizing the documents before it. Each context is BOS followed by
    ``context_length - 1`` tokens of the stream of documents joined by EOS.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if context_length < 2:
        raise DataError(f"context_length must be at least 2 (BOS + one token), got {context_length}")
    body = context_length - 1 if bos is not None else context_length
    prefix = [bos] if bos is not None else []
    # Pending token segments: (doc index, tokens incl. EOS, first unused offset).
    segs: list[list[Any]] = []
    pending = 0
    doc_iter = itertools.islice(documents, start.doc, None)
    doc_idx = start.doc
    first = True
    exhausted = False
    while True:
        while pending < body and not exhausted:
            block = list(itertools.islice(doc_iter, docs_per_call))
            if not block:
                exhausted = True
                break
            ids = tokenizer(block, add_special_tokens=False)["input_ids"]
            for toks in ids:
                arr = np.asarray(list(toks) + ([eos] if eos is not None else []), np.int64)
                off = start.offset if first else 0
                first = False
                if off < len(arr):
                    segs.append([doc_idx, arr, off])
                    pending += len(arr) - off
                doc_idx += 1
        if pending < body:
            return
        out = list(prefix)
        need = body
        while need:
            seg = segs[0]
            take = min(need, len(seg[1]) - seg[2])
            out.extend(seg[1][seg[2] : seg[2] + take].tolist())
            seg[2] += take
            need -= take
            if seg[2] == len(seg[1]):
                segs.pop(0)
        pending -= body
        after = StreamPos(segs[0][0], segs[0][2]) if segs else StreamPos(doc_idx, 0)
        yield np.asarray(out, np.int64), after
