"""What the scripts that publish an experiment's results where the README can cite them share
(scripts/publish_efficiency.py, scripts/publish_retrieval.py): the summary.md they write and their command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from fwbw.analysis.report import render_markdown
from fwbw.files import atomic_write_text

SUMMARY = "summary.md"


def write_summary(title: str, blocks: list[tuple], out_dir: Path) -> Path:
    """out_dir's summary.md: the title, then a Results section of `blocks` (report.render_markdown); its path."""
    atomic_write_text(out_dir / SUMMARY, render_markdown(title, [("Results", blocks)], out_dir))
    return out_dir / SUMMARY


def publisher_main(publish: Callable[[Path, Path], Path], what: str, default_out: Path) -> None:
    """`SCRIPT SWEEP [OUT]`: publish(SWEEP, OUT), printing the summary's path; a sweep it cannot
    publish, one line and exit status 2."""
    parser = argparse.ArgumentParser(description=f"Write {what} and summary.md where the README can cite them.")
    parser.add_argument("sweep", type=Path, help="the sweep's folder (with its results tables)")
    parser.add_argument("out", type=Path, nargs="?", default=default_out, help=f"default: {default_out}")
    args = parser.parse_args()
    try:
        print(publish(args.sweep, args.out))
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
