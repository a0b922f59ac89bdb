"""Tables as Markdown, LaTeX, CSV or one self-contained HTML page (figures embedded as data URIs).

Best and second-best means per column: Markdown ``**x**`` and ``<u>x</u>``, LaTeX ``\\textbf{x}`` and
``\\underline{x}``, HTML ``<b>x</b>`` and ``<u>x</u>``; the mark covers the mean, as in the paper. Markers
after the cell: ``*`` significant against the reference, ``†`` fewer runs than the table's most common n.

CSV is for programs: one line per row, the row-header columns, then per table column ``<col>_mean``,
``<col>_std`` (sample std, ddof=1), ``<col>_n``, ``<col>_rank`` (1 best = bold elsewhere, 2 second best =
underlined, empty otherwise) and ``<col>_flag`` (``†`` or empty), plus ``<col>_p`` (Welch p-value) and
``<col>_sig`` (``*`` or empty) with a reference. Values are the logged fractions (not × 100), at full
precision. Several tables (``modality``) share one file with a leading ``table`` column.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .report import DAGGER, SIGNIFICANT, Cell, Table

FORMATS = ("md", "latex", "csv", "html")
SUFFIXES = {".md": "md", ".markdown": "md", ".tex": "latex", ".csv": "csv", ".html": "html", ".htm": "html"}


@dataclass
class FigureFile:
    path: Path
    caption: str


def _marks(cell: Cell) -> str:
    return (SIGNIFICANT if cell.significant else "") + (DAGGER if cell.flagged else "")


def _groups(table: Table) -> list[tuple[str, int]]:
    """Consecutive header groups (title, span)."""
    out: list[tuple[str, int]] = []
    for column in table.columns:
        if out and out[-1][0] == column.group:
            out[-1] = (column.group, out[-1][1] + 1)
        else:
            out.append((column.group, 1))
    return out


# ---- Markdown


def markdown(table: Table) -> str:
    header = [*table.row_header, *(c.title for c in table.columns)]
    align = ["---"] * len(table.row_header) + ["---:"] * len(table.columns)
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for i, row in enumerate(table.rows):
        cells = list(row.header)
        for j in range(len(table.columns)):
            cell = table.cells.get((i, j))
            if cell is None:
                cells.append("–")
                continue
            mean = table.number(cell.mean)
            mean = f"**{mean}**" if cell.rank == 1 else f"<u>{mean}</u>" if cell.rank == 2 else mean
            std = "" if math.isnan(cell.std) else f" ± {table.number(cell.std)}"
            cells.append(f"{mean}{std}{_marks(cell)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"{note}  " for note in table.notes)]
    lines[-1] = lines[-1].rstrip()
    return "\n".join(lines)


# ---- LaTeX

_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "×": r"$\times$",
    "λ": r"$\lambda$",
    "α": r"$\alpha$",
    "†": r"$^\dagger$",
    "✓": r"\checkmark{}",
    "✗": r"$\times$",
    "–": "--",
    "≥": r"$\geq$",
    "←": r"$\leftarrow$",
    "`": "",
}


def tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(table: Table) -> str:
    k = len(table.row_header)
    spec = "l" * k + "r" * len(table.columns)
    lines = [
        r"% midasbench report; needs \usepackage{booktabs} and \usepackage{amssymb}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{tex(table.title)}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
    ]
    groups = _groups(table)
    if any(g for g, _ in groups):
        spans, rules, start = [], [], k + 1
        for title, span in groups:
            spans.append(rf"\multicolumn{{{span}}}{{c}}{{{tex(title)}}}" if span > 1 else tex(title))
            if title:
                rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
            start += span
        lines.append(" & ".join([""] * k + spans) + r" \\")
        lines.append(" ".join(rules))
        labels = [c.label for c in table.columns]
    else:
        labels = [c.title for c in table.columns]
    lines.append(" & ".join([tex(h) for h in table.row_header] + [tex(x) for x in labels]) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        cells = [tex(h) for h in row.header]
        for j in range(len(table.columns)):
            cell = table.cells.get((i, j))
            if cell is None:
                cells.append("--")
                continue
            mean = table.number(cell.mean)
            mean = (
                rf"\textbf{{{mean}}}"
                if cell.rank == 1
                else rf"\underline{{{mean}}}"
                if cell.rank == 2
                else mean
            )
            std = "" if math.isnan(cell.std) else rf" $\pm$ {table.number(cell.std)}"
            marks = ("*" if cell.significant else "") + (r"\dagger" if cell.flagged else "")
            cells.append(f"{mean}{std}" + (f"$^{{{marks}}}$" if marks else ""))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip", r"{\footnotesize"]
    lines += [tex(note) + r"\par" for note in table.notes]
    lines += ["}", r"\end{table}"]
    return "\n".join(lines)


# ---- CSV


def csv_text(tables: Sequence[Table]) -> str:
    several = len(tables) > 1
    header: list[str] = ["table"] if several else []
    records = []
    reference = any(t.reference for t in tables)
    for table in tables:
        for name in table.row_header:
            if name not in header:
                header.append(name)
        for column in table.columns:
            fields = ["mean", "std", "n", "rank", "flag", *(["p", "sig"] if reference else [])]
            for f in fields:
                if f"{column.title}_{f}" not in header:
                    header.append(f"{column.title}_{f}")
        for i, row in enumerate(table.rows):
            record = {"table": table.title} if several else {}
            record.update(dict(zip(table.row_header, row.header, strict=True)))
            for j, column in enumerate(table.columns):
                cell = table.cells.get((i, j))
                if cell is None:
                    continue
                t = column.title
                record[f"{t}_mean"] = repr(cell.mean)
                record[f"{t}_std"] = "" if math.isnan(cell.std) else repr(cell.std)
                record[f"{t}_n"] = str(cell.n)
                record[f"{t}_rank"] = str(cell.rank or "")
                record[f"{t}_flag"] = DAGGER if cell.flagged else ""
                if reference:
                    record[f"{t}_p"] = "" if cell.p_value is None else repr(cell.p_value)
                    record[f"{t}_sig"] = SIGNIFICANT if cell.significant else ""
            records.append(record)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


# ---- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 1em 0 0.5em; }
th, td { padding: 0.25em 0.7em; }
thead tr:last-child th { border-bottom: 1px solid #222; }
table { border-top: 2px solid #222; border-bottom: 2px solid #222; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.group { border-bottom: 1px solid #888; }
p.note { font-size: 0.85em; margin: 0.2em 0; color: #444; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #444; }
"""


def html_table(table: Table) -> str:
    e = html.escape
    groups = _groups(table)
    two_levels = any(g for g, _ in groups)
    out = [f"<h2>{e(table.title)}</h2>", "<table>", "<thead>"]
    if two_levels:
        first = [f'<th rowspan="2">{e(h)}</th>' for h in table.row_header]
        first += [f'<th class="group" colspan="{span}">{e(title)}</th>' for title, span in groups]
        out.append("<tr>" + "".join(first) + "</tr>")
        out.append("<tr>" + "".join(f"<th>{e(c.label)}</th>" for c in table.columns) + "</tr>")
    else:
        titles = [*table.row_header, *(c.title for c in table.columns)]
        out.append("<tr>" + "".join(f"<th>{e(t)}</th>" for t in titles) + "</tr>")
    out += ["</thead>", "<tbody>"]
    for i, row in enumerate(table.rows):
        cells = [f"<td>{e(h)}</td>" for h in row.header]
        for j in range(len(table.columns)):
            cell = table.cells.get((i, j))
            if cell is None:
                cells.append('<td class="num">–</td>')
                continue
            mean = e(table.number(cell.mean))
            mean = f"<b>{mean}</b>" if cell.rank == 1 else f"<u>{mean}</u>" if cell.rank == 2 else mean
            std = "" if math.isnan(cell.std) else f" ± {e(table.number(cell.std))}"
            marks = _marks(cell)
            cells.append(
                f'<td class="num">{mean}{std}' + (f"<sup>{e(marks)}</sup>" if marks else "") + "</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>", *(f'<p class="note">{e(note)}</p>' for note in table.notes)]
    return "\n".join(out)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_document(tables: Sequence[Table], figures: Sequence[FigureFile], heading: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{e(heading)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(heading)}</h1>",
        *(html_table(t) for t in tables),
    ]
    if figures:
        parts.append("<h2>Figures</h2>")
        for figure in figures:
            parts.append(
                f'<figure><img src="{data_uri(figure.path)}" alt="{e(figure.caption)}">'
                f"<figcaption>{e(figure.caption)}</figcaption></figure>"
            )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def render(tables: Sequence[Table], fmt: str, figures: Sequence[FigureFile] = (), heading: str = "") -> str:
    if fmt == "md":
        return "\n\n".join(markdown(t) for t in tables) + "\n"
    if fmt == "latex":
        return "\n\n".join(latex(t) for t in tables) + "\n"
    if fmt == "csv":
        return csv_text(tables)
    if fmt == "html":
        return html_document(tables, figures, heading or "midasbench report")
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
