"""The text every Python installation carries: the standard library's own ``.py`` source.

It is the corpus of the embedded default model (``tiny-stdlib``) and the default dataset of
the offline demo, so nothing has to be downloaded. Files are read in a fixed order, and a
fixed share of them is held out by a hash of the file's path relative to the stdlib root,
so a file lands in the same split on every machine and every Python version that has it.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_sae.errors import DataError

#: The short dataset name the harvest stage's loader recognises.
DATASET_NAME = "stdlib"

#: Out of 1000 hash buckets, this many are held out as the test split (about 5%).
TEST_PER_MILLE = 50

# Directories whose content is not ordinary library code: test suites (their giant data
# literals and intentionally broken files teach a small model little), the IDLE app,
# third-party packages, demos, generated codec/doc tables, and build configuration.
_SKIP_DIRS = frozenset({
    "test", "tests", "idlelib", "site-packages", "dist-packages", "turtledemo",
    "encodings", "pydoc_data", "lib-dynload", "__pycache__", "__phello__",
})
_SKIP_PREFIXES = ("config-", "_sysconfigdata")

# Generated files (huge tables) would dominate a small corpus; the longest hand-written
# stdlib module (_pydecimal.py) is about 230 kB.
MAX_FILE_BYTES = 400_000

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Document:
    """One source file: its path relative to the stdlib root, and its text."""

    path: str
    text: str


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel_path: str) -> str:
    """``"test"`` or ``"train"``, from a hash of the POSIX relative path (stable everywhere)."""
    bucket = int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 1000
    return "test" if bucket < TEST_PER_MILLE else "train"


def _kept(rel: Path) -> bool:
    parts = rel.parts
    if any(p in _SKIP_DIRS or p.startswith(_SKIP_PREFIXES) for p in parts):
        return False
    return not parts[-1].startswith(_SKIP_PREFIXES)


def list_files(root: str | Path | None = None) -> list[str]:
    """POSIX paths, relative to ``root``, of the kept ``.py`` files, sorted (the corpus order)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(
            f"standard-library directory {root} does not exist; pass the path of a Python "
            "'lib/pythonX.Y' directory, or use another dataset"
        )
    rels = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if _kept(rel) and p.is_file() and p.stat().st_size <= MAX_FILE_BYTES:
            rels.append(rel.as_posix())
    return sorted(rels)


def iter_documents(split: str = "train", root: str | Path | None = None) -> Iterator[Document]:
    """Yield the documents of ``split`` ("train", "test", or "all") in corpus order."""
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown stdlib split {split!r}; use 'train', 'test' or 'all'")
    root = Path(root) if root is not None else stdlib_root()
    for rel in list_files(root):
        if split != "all" and split_of(rel) != split:
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files carry other encodings on purpose; skip, don't guess
        if text.strip():
            yield Document(rel, text)


def load_stdlib_corpus(split: str = "train", root: str | Path | None = None) -> list[str]:
    """The texts of ``split`` of the stdlib corpus, one string per source file, in order."""
    texts = [d.text for d in iter_documents(split, root)]
    if not texts:
        raise DataError(
            f"the stdlib corpus split {split!r} is empty under {root or stdlib_root()}; this "
            "Python ships without its library source (some slim images strip it): install "
            "the full Python, or use a dataset of your own"
        )
    return texts


def write_corpus(out_dir: str | Path, root: str | Path | None = None) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` ({"text", "path"} per line) into ``out_dir``.

    Loadable with ``datasets.load_dataset("json", data_files={...})``. Returns split → path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {s: out_dir / f"{s}.jsonl" for s in SPLITS}
    handles = {s: open(p, "w", encoding="utf-8") for s, p in paths.items()}
    try:
        for doc in iter_documents("all", root):
            line = json.dumps({"text": doc.text, "path": doc.path})
            handles[split_of(doc.path)].write(line + "\n")
    finally:
        for h in handles.values():
            h.close()
    return paths
