"""Every plain statement of the report, with its numbers, by the question it answers (the sections' own
statements, in the report's order)."""

from __future__ import annotations

from fwbw.analysis.sections import arrow, equal_compute, equal_data, layer_cut, many_epochs, mask, runs, scaling
from fwbw.analysis.sections.inputs import finished
from fwbw.analysis.stats import Analysis

STATEMENTS = {"runs": runs.statements, "equal_data": equal_data.statements, "equal_compute": equal_compute.statements,
              "scaling": scaling.statements, "mask": mask.statements, "layer_cut": layer_cut.statements,
              "arrow": arrow.statements, "overfitting": many_epochs.statements}  # question -> its section's sentences


def findings_by_question(analysis: Analysis) -> dict[str, list[str]]:
    """Plain statements of what the data shows, each with its numbers, by question (STATEMENTS' keys);
    only "runs" where no run has finished."""
    if not finished(analysis):
        return {"runs": runs.statements(analysis)}
    return {question: say(analysis) for question, say in STATEMENTS.items()}


def findings(analysis: Analysis) -> list[str]:
    """Every statement of findings_by_question, in the report's order."""
    return [s for statements in findings_by_question(analysis).values() for s in statements]
