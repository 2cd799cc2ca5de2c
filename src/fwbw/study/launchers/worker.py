"""A pull-worker on a prepared sweep (its sweep.json), the process the local launcher starts once
per worker or GPU (fwbw.study.launchers.__main__ runs main):

  python -m fwbw.study.launchers SWEEP [--shard i/n] [--retry-failed] [--execution JSON] [--outcome FILE]

Any number may run at once, on any machines that share SWEEP: each trains the runs no other
worker holds or finished, then rebuilds the results table, and writes its outcome (run id ->
status) to FILE. An error or Ctrl-C ends it in one line, exit code 1 (Ctrl-C's line in FILE.interrupted
when FILE is given: the launcher prints one line for all its workers)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from fwbw.files import atomic_write_json
from fwbw.study.launchers.base import Assignment
from fwbw.study.sweep import Execution, parse_shard


def worker_command(assignment: Assignment, outcome: Path) -> list[str]:
    """The command line of a worker process on `assignment` that writes its outcome to `outcome`."""
    flags = ["--shard", "/".join(map(str, assignment.shard)), "--execution", json.dumps(asdict(assignment.execution)),
             "--outcome", str(outcome)]
    flags += ["--retry-failed"] if assignment.retry_failed else []
    flags += [] if assignment.progress else ["--no-progress"]
    return [sys.executable, "-m", __package__, str(assignment.out), *flags]


def interruption_file(outcome: Path) -> Path:
    """Where a worker that writes its outcome to `outcome` leaves the line saying how Ctrl-C ended it."""
    return outcome.with_name(outcome.name + ".interrupted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwbw-worker", description="a pull-worker on a prepared sweep")
    parser.add_argument("out", type=Path, help="the sweep directory (holds sweep.json)")
    parser.add_argument("--shard", default="0/1", help="i/n: only every n-th run starting at i")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--execution", type=json.loads, default={},
                        help="how each run is executed: fwbw.study.sweep.Execution's fields as JSON")
    parser.add_argument("--outcome", type=Path, help="write {run id: status} here (JSON)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        execution = Execution(**args.execution)
        assignment = Assignment(args.out, parse_shard(args.shard), args.retry_failed, not args.no_progress, execution)
        outcome = assignment.work()
        if args.outcome:
            atomic_write_json(args.outcome, outcome)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"fwbw worker: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        if args.outcome:  # the launcher prints one line for all its workers
            atomic_write_json(interruption_file(args.outcome), str(interrupt) or "interrupted")
        else:
            print(f"fwbw worker: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 1
    return 0
