"""Chaos check of a sweep under kill -9 (issue 21): a small sweep trained by `fwbw sweep --workers 2`,
its whole process group killed with SIGKILL at random moments, then run to the end; and the same sweep
run once without interruption. Prints one table: kills, runs, runs lost (not done), duplicate result
rows, runs whose metrics differ from the uninterrupted sweep's.

  python scripts/chaos_sweep.py [--kills 8] [--seeds 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

GRID = ["--data", "wiki-sample", "--tokenizer", "bpe:512", "--depths", "1", "--widths", "16", "--p-bw", "0", "0.5",
        "--seq-len", "32", "--train-tokens", "12000", "--eval-tokens", "1024", "--eval-every", "0.25",
        "--tokens-per-microbatch", "256", "--checkpoint-every", "3", "--dtype", "fp32", "--device", "cpu",
        "--no-progress"]
KEYS = ["run_id", "phase", "step", "direction", "blocks_remaining"]  # one result row each


def sweep(out: Path, seeds: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "fwbw", "sweep", *GRID, "--seeds", str(seeds), "--out", str(out), *flags]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def killed_repeatedly(out: Path, seeds: int, kills: int, rng: random.Random) -> int:
    """Start the sweep and SIGKILL its process group `kills` times at random moments; the kills done."""
    done = 0
    for _ in range(kills):
        process = sweep(out, seeds, "--workers", "2")
        time.sleep(rng.uniform(2.0, 8.0))
        if process.poll() is not None:
            break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        done += 1
    return done


def final_losses(out: Path) -> dict[str, list[float]]:
    """Each run's validation fw losses, point by point."""
    losses = {}
    for run in sorted((out / "runs").iterdir()):
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[run.name] = [point["fw_loss"] for point in points if "fw_loss" in point]
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--out", type=Path, help="folder for the two sweeps (default: a temporary one)")
    args = parser.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="fwbw-chaos-"))
    chaotic, calm = folder / "killed", folder / "whole"
    kills = killed_repeatedly(chaotic, args.seeds, args.kills, random.Random(0))
    for out in (chaotic, calm):
        if sweep(out, args.seeds).wait() != 0:
            print(f"{out}: the sweep did not finish", file=sys.stderr)
            return 1
    statuses = [json.loads((run / "status.json").read_text())["status"] for run in (chaotic / "runs").iterdir()]
    table = pd.read_parquet(chaotic / "results.parquet")
    killed, whole = final_losses(chaotic), final_losses(calm)
    counts = {"kills (SIGKILL to the sweep's process group)": kills, "runs": len(statuses),
              "runs lost (not done)": sum(status != "done" for status in statuses),
              "duplicate result rows": int(table.duplicated([k for k in KEYS if k in table]).sum()),
              "runs whose fw losses differ from the uninterrupted sweep's": sum(killed[r] != whole.get(r) for r in killed)}
    print("| measure | count |\n|---|---|")
    for name, count in counts.items():
        print(f"| {name} | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
