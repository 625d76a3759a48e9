"""What the benchmarks' command lines share: `--seed` and `--out`, a list of names checked against
the known ones, a measurement's progress line, and the report written and printed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def add_seed_and_out(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """`--seed` (of the random pacing; unless `seed` is false) and `--out`, the report's
    directory."""
    if seed:
        parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))


def check_names(
    parser: argparse.ArgumentParser, chosen: Sequence[str], known: Sequence[str], what: str
) -> None:
    """Exit with a usage error unless every name `chosen` is one of `known`."""
    unknown = set(chosen) - set(known)
    if unknown:
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))}")


def progress(result: DataclassInstance) -> None:
    """One finished measurement, as a JSON line on stderr while the run goes on."""
    print(json.dumps(asdict(result)), file=sys.stderr, flush=True)


def write_report(
    report: DataclassInstance,
    path: Path,
    tables: str,
    targets: dict[str, Any] | None = None,
) -> None:
    """`report` as JSON at `path` (its directory made if need be); then its Markdown tables and
    its targets, if any, on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(tables)
    if targets is not None:
        print(json.dumps(targets, indent=2))
