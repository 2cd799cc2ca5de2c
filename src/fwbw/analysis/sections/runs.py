"""Setup and Runs: sweep.json with the run counts and total compute, how ratios are defined, and every run
with its status (the unfinished and diverged ones named: they are left out of every statistic)."""

from __future__ import annotations

import json

import pandas as pd

from fwbw.analysis.figures import arm_label, size_label
from fwbw.analysis.sections.inputs import Inputs, finished
from fwbw.analysis.stats import ARM, CONTEXT, SETTING, SIZE, Analysis, select

SETUP_TITLE, RUNS_TITLE = "Setup", "Runs"
RUN_COLUMNS = ["run_id", *CONTEXT, *SIZE, "num_params", *ARM, "seed", "status", "tokens", "epoch", "seconds", "error"]


def _setup_value(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def setup_table(sweep: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """sweep.json as key/value rows, plus run counts and total compute from the table."""
    rows = [(key, _setup_value(value)) for key, value in sweep.items()]
    seconds = runs.seconds.sum()
    rows += [
        ("runs", f"{len(runs)} ({(runs.status == 'done').sum()} done)"),
        ("total tokens trained (sum of each run's last tokens)", f"{runs.tokens.sum():,.0f}"),
        ("total wall time (sum of each run's last seconds)", f"{seconds:,.0f} s = {seconds / 3600:.2f} h"),
    ]
    return pd.DataFrame(rows, columns=["setting", "value"])


def status_statement(runs: pd.DataFrame) -> str:
    counts = runs.status.value_counts()
    others = ", ".join(f"{status}: {n}" for status, n in counts.items() if status != "done")
    done = int(counts.get("done", 0))
    if not others:
        return f"All {len(runs)} runs finished."
    return (f"{len(runs) - done} of {len(runs)} runs did not finish ({others}); they are listed below and "
            "left out of every statistic.")


def no_statistics(runs: pd.DataFrame) -> str:
    """What the report says where no run has finished."""
    return f"No run has finished (status done): there are no statistics or figures yet. {status_statement(runs)}"


def _diverged_statements(diverged: pd.DataFrame) -> list[str]:
    return [
        f"{len(runs)} run(s) diverged (non-finite loss in training or validation) at "
        f"{size_label(setting['depth'], setting['width'])}, {arm_label(setting)}: {' '.join(sorted(runs.run_id))}; "
        "left out of every statistic and counted in final_losses.n_diverged."
        for setting, runs in ((r, select(diverged, r)) for r in diverged[SETTING].drop_duplicates().to_dict("records"))
    ]


def statements(analysis: Analysis) -> list[str]:
    if not finished(analysis):
        return [no_statistics(analysis.runs)]
    return [status_statement(analysis.runs), *_diverged_statements(analysis.diverged)]


def setup_section(inputs: Inputs) -> tuple[str, list[tuple]]:
    return (SETUP_TITLE, [
        ("p", "ratio 1 = fw metric at p_bw = 0 / at p_bw = x, same model size (above 1: the bw task helped "
              "fw); ratio 2 = fw metric / bw metric at the same setting. mean_then_ratio: mean over the seeds "
              "present in both arms, then the ratio; ratio_then_mean: ratio per run pair, then the geometric mean; "
              "ci_low, ci_high: 95% t interval of the per-seed log ratio, exponentiated. Epoch windows average "
              "each run over the window first. Only finished, non-diverged runs count. The method: "
              "docs/method.md."),
        ("table", "setup", inputs.setup),
    ])


def runs_section(inputs: Inputs) -> tuple[str, list[tuple]]:
    analysis = inputs.analysis
    unfinished = analysis.unfinished[RUN_COLUMNS]
    listed = [("p", "Runs that failed or have not finished:"), ("table", "unfinished", unfinished)] if len(unfinished) else []
    return (RUNS_TITLE, [("ul", statements(analysis)), *listed, ("table", "runs", analysis.runs[RUN_COLUMNS])])
