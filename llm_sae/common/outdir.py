"""Output folders a command owns: a marker file, checked before work, swapped in whole.

Every stage writes into an ``--out`` folder. Two promises hold for all of them:

- **Nothing a user made is touched.** A folder is used only when it is new, empty, or
  carries this toolkit's marker (``.llm-sae.json``, naming the kind of output) or the
  files of an output written before markers existed. Anything else is refused, with the
  fix named, before any work starts.
- **No valid-looking mix.** ``staged`` writes a whole output into a sibling temp folder
  and swaps it in with two renames; a kill at any moment leaves the old output or the new
  one (a kill between the renames leaves the old one under ``.NAME.old``, which the next
  check puts back).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llm_sae.common.atomic import swap_in_folder, write_json_atomic
from llm_sae.errors import LlmSaeError

MARKER = ".llm-sae.json"


class OutputError(LlmSaeError):
    """An --out path that cannot be used: a file, unwritable, or somebody else's folder."""


def _owner(path: Path) -> str | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _aside(out: Path) -> tuple[Path, Path]:
    """The temp and the displaced-old sibling names of ``out``."""
    return out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")


def _recover(out: Path) -> None:
    """Finish what a kill between the two renames of ``staged`` left: put the old back."""
    tmp, old = _aside(out)
    if not out.exists() and old.is_dir() and _owner(old) is not None:
        os.replace(old, out)


def check_output(path: str | Path, kind: str, *, legacy: tuple[str, ...] = ()) -> Path:
    """Refuse an ``--out`` that is a file, unwritable, or holds files this command did not
    make; changes nothing (except putting back an output a kill left aside). ``legacy``:
    names whose presence marks an output written before markers existed."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a new or empty folder path")
    _recover(out)
    if out.is_dir():
        owner = _owner(out)
        if owner is not None and owner != kind:
            raise OutputError(f"--out {out} holds llm-sae {owner} output, not {kind} output; "
                              "choose another folder")
        entries = [p.name for p in out.iterdir()]
        if owner is None and entries and not any((out / n).exists() for n in legacy):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(
                f"--out {out} already holds files not made by llm-sae {kind} ({shown}); choose a "
                "new or empty folder (nothing in it was changed)"
            )
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    try:  # os.access says yes to root on any mount: try it
        tempfile.TemporaryDirectory(dir=probe, prefix=".llm-sae-probe-").cleanup()
    except OSError as e:
        raise OutputError(f"cannot write --out {out} ({e.strerror or e}); choose a folder you can "
                          "write to") from None
    return out


def claim_output(path: str | Path, kind: str, *, legacy: tuple[str, ...] = ()) -> Path:
    """``check_output``, then create the folder and mark it as this command's."""
    out = check_output(path, kind, legacy=legacy)
    out.mkdir(parents=True, exist_ok=True)
    if _owner(out) != kind:
        write_json_atomic(out / MARKER, {"kind": kind})
    return out


@contextlib.contextmanager
def staged(path: str | Path, kind: str, *, legacy: tuple[str, ...] = ()) -> Iterator[Path]:
    """Write a whole output into a temp folder (yielded) and swap it in at the end.

    On an exception the temp folder is removed and ``path`` is as it was.
    """
    out = check_output(path, kind, legacy=legacy)
    tmp, old = _aside(out)
    for stale in (tmp, old):  # ours: named after the output, left by an earlier kill
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(tmp / MARKER, {"kind": kind})
    swap_in_folder(tmp, out, old)
