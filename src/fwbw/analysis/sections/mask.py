"""The bw mask and the leak probes: per bw mask, how hard bw is against fw (a leaking mask makes bw far
easier) and what the leak probes found, with the mask summary and the per-run audit."""

from __future__ import annotations

import math

import pandas as pd

from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import num
from fwbw.analysis.stats import Analysis

TITLE = "The bw mask and the leak probes"
QUESTION = "bw leak"
LEAK_RATIO = 0.8  # bw/fw final loss below this: bw far easier than fw (leak-free bw is within a few % of fw)


def _loss_statement(row: dict) -> str:
    ratio = (f"bw/fw final loss ratio {num(row['bw_fw_loss_ratio'], 2)} for {row['bw_mask']} runs "
             f"(n = {row['runs']}, p_bw > 0)")
    if row["bw_fw_loss_ratio"] < LEAK_RATIO and row["leaks_labels"]:
        return f"{ratio}: bw is far easier than fw; the bw task leaks its labels (the config flags this mask)."
    if row["bw_fw_loss_ratio"] < LEAK_RATIO:
        return f"{ratio}: bw is far easier than fw although the mask should not leak; suspect a leak."
    if row["leaks_labels"]:
        return (f"{ratio}: bw about as hard as fw or harder, although the config flags this mask as "
                "leaking labels: the losses do not show the leak.")
    return f"{ratio}: bw about as hard as fw or harder, no sign of a label leak in the losses."


def _probe_statement(row: dict) -> str:
    if row["probe_leaks"]:
        return (f"The leak probes (model and training path) found bw outputs depending on tokens they must not see in "
                f"{row['probe_leaks']} of {row['probed']} probed {row['bw_mask']} runs: {row['probe_leak_runs']}.")
    return f"The leak probes (model and training path) found no leak in {row['probed']} probed {row['bw_mask']} runs."


def statements(analysis: Analysis) -> list[str]:
    """Per mask: its bw/fw loss ratio where bw was evaluated, and its leak probes where it was probed."""
    out = []
    for row in analysis.mask_summary.to_dict("records"):
        out += [_loss_statement(row)] if pd.notna(row["bw_fw_loss_ratio"]) else []
        out += [_probe_statement(row)] if row["probed"] else []
    return out


def skipped(analysis: Analysis) -> list[dict]:
    """The masks without a bw loss or without a leak probe."""
    out = []
    for row in analysis.mask_summary.to_dict("records"):
        out += [skip(QUESTION, "no bw validation loss (eval_bw false)", row)] if pd.isna(row["bw_fw_loss_ratio"]) else []
        out += [skip(f"{QUESTION} probes", "no leak-probe result", row)] if not row["probed"] else []
    return out


def _verdict(row: dict, leaking: set[str]) -> str:
    if row["bw_mask"] in leaking:
        return "leaks by design: its runs are left out of the answers"
    if row["probe_leaks"]:
        return f"suspect: leak probes found a leak in {row['probe_leaks']} of {row['probed']} runs"
    if row["bw_fw_loss_ratio"] < LEAK_RATIO:
        return "suspect: bw far easier than fw"
    return "leak-free (probed)" if row["probed"] else "no leak in the losses, not probed"


def answer_rows(analysis: Analysis, leaking: set[str]) -> list[dict]:
    """Per mask with a bw loss or a probe: its bw/fw final loss ratio and what it says of a leak."""
    return [answer_row(QUESTION, f"{row['bw_mask']} mask: bw/fw final loss ratio", "ratio", row["bw_fw_loss_ratio"],
                       (math.nan, math.nan), row["runs"], "run", _verdict(row, leaking))
            for row in analysis.mask_summary.to_dict("records") if pd.notna(row["bw_fw_loss_ratio"]) or row["probed"]]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    analysis = inputs.analysis
    return (TITLE, [
        ("ul", statements(analysis)),
        ("p", f"A leak-free bw task is about as hard as fw; a bw/fw loss ratio below {LEAK_RATIO} means bw "
              "is far easier, as a leaking mask makes it."),
        ("table", "mask_summary", analysis.mask_summary),
        ("table", "mask_audit", analysis.mask_audit),
    ])
