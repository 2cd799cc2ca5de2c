"""The report's sections, (title, blocks), as one self-contained HTML page (inline CSS, figures as base64
data URIs) or as markdown (figures linked). A block is ("p", text), ("ul", items), ("h3", text),
("table", id, frame[, css class]) or ("figures", [(png path, caption)][, css class])."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd

COLLAPSE_ROWS = 12  # a longer table is shown collapsed (complete in its CSV)
TABLE_CSV = {"ratios_compute": "ratios", "ratios_cut": "ratios"}  # HTML table id -> its CSV, where they differ
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; } th { background: #f2f2f2; }
.scroll { overflow-x: auto; } figure { margin: 0; } img { width: 100%; height: auto; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 520px), 1fr)); gap: 1.5em 2em;
           margin: 1em 0 1.5em; }
figcaption { color: #555; font-size: 13px; } li { margin: .35em 0; }
table.text td, table.text th { text-align: left; vertical-align: top; min-width: 12em; }
table.answer { font-size: 14px; } table.answer td, table.answer th { text-align: left; vertical-align: top; }
table.answer td:nth-child(3), table.answer td:nth-child(4) { text-align: right; }
table.answer td:nth-child(-n+5):not(:nth-child(2)) { white-space: nowrap; }
.figures.answer { grid-template-columns: repeat(auto-fill, minmax(min(100%, 520px), 1fr)); }
"""


def cell(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{int(value)}" if float(value).is_integer() else f"{value:.4g}"
    return str(value)


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: frame[c].map(cell) for c in frame.columns}, columns=frame.columns)


def _long(table_block: tuple) -> bool:
    return len(table_block[2]) > COLLAPSE_ROWS


def _collapsed(table_block: tuple) -> str:
    """The summary line of a collapsed table."""
    name = table_block[1]
    csv = TABLE_CSV.get(name, name)
    return f"{name}: {len(table_block[2])} rows (click to show; complete in {csv}.csv where written)"


def _html_block(block: tuple) -> str:
    kind = block[0]
    if kind == "p":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in block[1]) + "</ul>"
    if kind == "h3":
        return f"<h3>{html.escape(block[1])}</h3>"
    if kind == "table":
        body = _display(block[2]).to_html(index=False, table_id=block[1], na_rep="", border=0, classes=block[3:])
        shown = f'<div class="scroll">{body}</div>'
        return f"<details><summary>{html.escape(_collapsed(block))}</summary>{shown}</details>" if _long(block) else shown
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem)}: {html.escape(caption)}</figcaption></figure>"
        for p, caption in block[1]
    )
    return f'<div class="{" ".join(["figures", *block[2:]])}">{images}</div>'


def render_html(title: str, sections: list[tuple[str, list[tuple]]]) -> str:
    body = "".join(f"<h2>{html.escape(name)}</h2>" + "".join(map(_html_block, blocks)) for name, blocks in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def md(text) -> str:
    """Plain text in report.md: markdown's special characters backslash-escaped, on one line."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\r", " ").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(no rows)_"
    shown = _display(frame)
    lines = ["| " + " | ".join(map(md, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(map(md, row)) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def _md_block(block: tuple, out_dir: Path) -> str:
    kind = block[0]
    if kind == "p":
        return md(block[1])
    if kind == "ul":
        return "\n".join(f"- {md(s)}" for s in block[1])
    if kind == "h3":
        return f"### {md(block[1])}"
    if kind == "table":
        shown = _md_table(block[2])
        return f"<details><summary>{md(_collapsed(block))}</summary>\n\n{shown}\n\n</details>" if _long(block) else shown
    return "\n\n".join(
        f"![{md(p.stem)}]({p.relative_to(out_dir).as_posix()})\n\n_{md(p.stem)}: {md(caption)}_"
        for p, caption in block[1]
    )


def render_markdown(title: str, sections: list[tuple[str, list[tuple]]], out_dir: Path) -> str:
    parts = [f"# {md(title)}"]
    for name, blocks in sections:
        parts += [f"## {md(name)}", *(_md_block(b, out_dir) for b in blocks)]
    return "\n\n".join(parts) + "\n"
