"""``llm-sae store info|verify``."""

from __future__ import annotations

import argparse
from pathlib import Path

from llm_sae.store.format import MANIFEST
from llm_sae.store.store import open_store
from llm_sae.store.verify import store_info, verify_store


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = sub.add_parser("info", help="Print what a store holds (from its manifest).")
    p.add_argument("path", help="store directory")
    p = sub.add_parser("verify", help="Check checksums, row counts and NaN/Inf in every shard.")
    p.add_argument("path", help="store directory")
    p.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan of the values")


def _expand(path: str) -> list[Path]:
    """A harvest with several hooks writes one store per hook; accept the parent too."""
    p = Path(path)
    if not (p / MANIFEST).exists() and p.is_dir():
        subs = sorted(q.parent for q in p.glob(f"*/{MANIFEST}"))
        if subs:
            return subs
    return [p]


def run_cli(args: argparse.Namespace) -> int:
    status = 0
    for p in _expand(args.path):
        if args.store_command == "info":
            print(store_info(p))
        else:
            problems = verify_store(p, scan_values=not args.no_scan)
            if problems:
                print(f"{p}: {len(problems)} problem(s)")
                for pr in problems:
                    print(f"  {pr}")
                status = 1
            else:
                n = open_store(p, allow_incomplete=True)
                print(f"{p}: OK ({n.n_rows:,} rows in {len(n.shards)} shards)")
    return status
