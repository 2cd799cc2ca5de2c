"""The sections of a sweep's report (fwbw.analysis.report), one module each, in the report's order: answer
(the answer table), efficiency, equal_data, many_epochs, equal_compute, scaling, mask, layer_cut, arrow,
retrieval, figure_blocks ("More figures"), samples, skipped ("Not analysed, and why") and runs (Setup, Runs);
order.py lists them. Beneath them: inputs (what a section is built from), tables (the answer's and skipped
table's rows), text (how numbers read) and render (the sections as HTML and markdown); findings gathers every
section's sentences."""
