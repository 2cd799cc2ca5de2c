"""Where the study's figures (figures.make_figures) are shown: the answer's figures first, each other kind
in its question's section, a kind without one under "More figures"; with their captions."""

from __future__ import annotations

from pathlib import Path

from fwbw.analysis.sections.inputs import Figures, Inputs

MORE_TITLE = "More figures"
CAPTIONS = {
    "loss_curves": "Validation loss and accuracy over nominal epochs, p_bw = 0 against p_bw = x; line: mean over "
                   "seeds, band: min–max.",
    "compute_curves": "fw validation loss over training FLOPs (bw steps cost FLOPs too), p_bw = 0 against "
                      "p_bw = x; line: mean over seeds, band: min–max. At equal compute, lower is better.",
    "ratio1_curves": "Ratio 1 (fw loss at p_bw = 0 / at p_bw = x) over nominal epochs and over fw tokens seen, per "
                     "model size; line: mean over seeds, band: its 95% t interval. Above 1: the bw task helped.",
    "ratio1_violins": "Ratio 1 (fw loss at p_bw = 0 / at p_bw = x) at every validation point, by parameter count, "
                      "by depth and by width, per epoch window; red bar: mean, white dot: median. Above 1: the bw "
                      "task helped the fw task.",
    "layer_cut": "Ratio 1 (ppl) and ratio 2 (loss) over the fraction of depth remaining as transformer blocks are "
                 "removed from the back; band: 95% interval over seeds; dashed: the p_bw = 0 runs' ratio 2.",
    "ratio1_scatter": "Ratio 1 of final fw loss against parameter count, coloured by width and by depth.",
    "overfitting": "fw loss over epochs on validation and on the fixed training-split windows, and validation fw "
                   "loss over training FLOPs; line: mean over seeds, band: its 95% t interval, dot: the lowest mean "
                   "validation loss; each panel shows a fixed span of loss above its lowest mean (the first epochs are cut "
                   "off). Bands are over runs, not paired by seed: the overfitting table's intervals are. Where "
                   "validation rises while the training split falls, the model memorises.",
}
HEADLINE_FIGURES = ("overfitting", "loss_fw", "loss_fw_flops")  # the answer's figures (file stems)
FIGURE_SECTIONS = {"loss_curves": "equal_data", "ratio1_curves": "equal_data", "compute_curves": "equal_compute",
                   "ratio1_violins": "scaling", "ratio1_scatter": "scaling", "layer_cut": "layer_cut"}


def place(figures: dict[str, list[Path]]) -> dict[str, Figures]:
    """The figures with their captions by section key ("answer" first, any kind without a section under
    "more"); each figure appears once."""
    placed: dict[str, Figures] = {}
    for kind, paths in figures.items():
        for path in paths:
            where = "answer" if path.stem in HEADLINE_FIGURES else FIGURE_SECTIONS.get(kind, "more")
            placed.setdefault(where, []).append((path, CAPTIONS.get(kind, "")))
    return placed


def figure_block(figures: Figures, *css: str) -> list[tuple]:
    """The figures as one block (with its css classes), or none."""
    return [("figures", figures, *css)] if figures else []


def shown(inputs: Inputs, where: str) -> list[tuple]:
    """The block of the figures placed at `where`, or none."""
    return figure_block(inputs.figures.get(where, []))


def more_section(inputs: Inputs) -> tuple[str, list[tuple]] | None:
    """The figures of kinds no section shows."""
    return (MORE_TITLE, shown(inputs, "more")) if "more" in inputs.figures else None
