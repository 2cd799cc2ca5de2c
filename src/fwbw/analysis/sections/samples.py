"""Samples: greedy continuations of held-out prompts by the first seed of each setting that has a
samples.json, the bw model's text before the prompt and the fw model's text after, beside the held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fwbw.analysis.figures import arm_label, size_label
from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.stats import SETTING
from fwbw.study.sweep_dir import RUNS
from fwbw.training.run_dir import SAMPLES

TITLE = "Samples"
SAMPLE_PROMPTS = 3  # prompts shown per run
NO_BW_SAMPLE = "(none: this mask reads its own labels)"


def _samples_frame(samples: dict) -> pd.DataFrame:
    rows = [(s["held_out_before"], NO_BW_SAMPLE if s["bw"] is None else s["bw"], s["prompt"], s["fw"],
             s["held_out_after"]) for s in samples["samples"][:SAMPLE_PROMPTS]]
    return pd.DataFrame(rows, columns=["held-out text before", "bw model: text before", "prompt",
                                       "fw model: text after", "held-out text after"])


def sample_blocks(runs: pd.DataFrame, sweep_dir: Path) -> list[tuple]:
    """For the first seed of each setting that has a samples.json: its prompts with the model's bw
    continuation before and fw continuation after, beside the held-out text."""
    done = runs[runs.status == "done"].sort_values(["num_params", "p_bw", "seed"])
    sampled = done[[(Path(sweep_dir) / RUNS / r / SAMPLES).is_file() for r in done.run_id]]
    blocks = []
    for run in sampled.drop_duplicates(subset=SETTING).to_dict("records"):
        path = Path(sweep_dir) / RUNS / run["run_id"] / SAMPLES
        samples = json.loads(path.read_text(encoding="utf-8"))
        blocks += [("h3", f"{size_label(run['depth'], run['width'])}, {arm_label(run)}, seed {run['seed']} "
                          f"({run['run_id']})"),
                   ("table", f"samples-{run['run_id']}", _samples_frame(samples), "text")]
    return blocks


def section(inputs: Inputs) -> tuple[str, list[tuple]] | None:
    """The sample blocks; none where no run has samples."""
    if not inputs.samples:
        return None
    return (TITLE, [
        ("p", "Greedy continuations of held-out prompts (validation text, never trained on) by the first seed "
              "of each setting: the bw model writes the text before the prompt, the fw model the text after; "
              "the held-out text is what really surrounds the prompt."),
        *inputs.samples,
    ])
