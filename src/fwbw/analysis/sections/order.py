"""The report's sections in their order, each built by its own module: the answer, data efficiency, the
study's questions (equal data, many epochs, equal compute, scaling, the bw mask, layer cut, arrow of time),
retrieval, more figures, samples, what was not analysed, setup and runs. A section absent from a sweep
(no data-efficiency arms, no retrieval results, no samples, nothing skipped) is left out."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.sections import (
    answer,
    arrow,
    efficiency,
    equal_compute,
    equal_data,
    figure_blocks,
    layer_cut,
    many_epochs,
    mask,
    retrieval,
    runs,
    samples,
    scaling,
    skipped,
)
from fwbw.analysis.sections.inputs import Inputs

BODY = (efficiency.section, equal_data.section, many_epochs.section, equal_compute.section, scaling.section,
        mask.section, layer_cut.section, arrow.section, retrieval.section, figure_blocks.more_section,
        samples.section)  # between the answer and the skipped table, in order
TAIL = (runs.setup_section, runs.runs_section)


def report_tables(inputs: Inputs) -> dict[str, pd.DataFrame]:
    """The report's own tables, by CSV name: the answer and what was not analysed."""
    return {"answer": answer.answer_table(inputs), "skipped": skipped.skipped_table(inputs)}


def sections(inputs: Inputs, tables: dict[str, pd.DataFrame]) -> list[tuple[str, list[tuple]]]:
    """The report as (title, blocks) (render's blocks), the answer first; `tables` is report_tables(inputs)."""
    built = [answer.section(inputs, tables["answer"], len(tables["skipped"])), *(build(inputs) for build in BODY),
             skipped.section(tables["skipped"]), *(build(inputs) for build in TAIL)]
    return [section for section in built if section is not None]
