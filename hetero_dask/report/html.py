"""Self-contained HTML reports: one file, images inline as base64 data URIs, no scripts.

A report is a title and a list of ``Section``s; a section is a heading and a list of
blocks: ``Paragraph``, ``KeyValues`` (a parameter table), ``Table`` (e.g. one row per
iteration) and ``Image`` (a PNG/JPEG/SVG file embedded inline). For convenience a
plain ``str`` block is a paragraph, a ``Path`` an image and a mapping a key-value table.
All text is HTML-escaped. The file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Image",
    "KeyValues",
    "Paragraph",
    "Section",
    "Table",
    "format_value",
    "render_html",
    "write_html_report",
]


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class KeyValues:
    """A two-column table of named values (parameters, summary figures)."""

    items: Mapping[str, Any]
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """A data table: column names and rows of values (one value per column)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], caption: str = "") -> Table:
        """Rows from dicts (e.g. one per iteration); columns in first-seen key order, missing
        values shown as "—"."""
        columns = list(dict.fromkeys(k for r in records for k in r))
        return cls(columns, [[r.get(c, "") for c in columns] for r in records], caption)


@dataclass(frozen=True)
class Image:
    """An image file embedded inline (PNG, JPEG or SVG, told by its suffix)."""

    path: str | os.PathLike
    caption: str = ""
    alt: str = ""


Block = Paragraph | KeyValues | Table | Image | str | Path | Mapping


@dataclass(frozen=True)
class Section:
    heading: str
    blocks: Sequence[Block] = field(default_factory=list)


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.7em; border-bottom: 2px solid #3b6ea5; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; color: #244a73; }
nav ol { columns: 2; font-size: .95em; }
table { border-collapse: collapse; margin: .8em 0 1.2em; font-size: .9em;
        display: block; max-width: 100%; overflow-x: auto; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #d5dbe5; padding: .25em .7em; text-align: right; }
th { background: #eef2f8; }
table.kv th { text-align: left; font-weight: 500; }
table.kv td { text-align: left; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
              word-break: break-all; }
tbody tr:nth-child(even) { background: #f8f9fb; }
figure { margin: 1em 0 1.5em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
figcaption { font-size: .9em; color: #555; margin-top: .3em; }
footer { margin-top: 3em; font-size: .8em; color: #777; }
"""


def format_value(value: Any) -> str:
    """Text for one table cell: floats to 4 significant digits, sequences comma-separated,
    "—" for nothing (None, an empty string or sequence)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, str | list | tuple) and len(value) == 0):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, np.ndarray | list | tuple):
        return ", ".join(format_value(v) for v in np.asarray(value).ravel().tolist())
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _caption(text: str) -> str:
    return f"<caption>{_e(text)}</caption>" if text else ""


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: suffix must be one of {sorted(_MIME)}")
    if not path.is_file():
        raise FileNotFoundError(f"report image not found: {path}")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _render_block(block: Block) -> str:
    if isinstance(block, str):
        block = Paragraph(block)
    elif isinstance(block, Path):
        block = Image(block)
    elif isinstance(block, Mapping):
        block = KeyValues(block)
    if isinstance(block, Paragraph):
        return f"<p>{_e(block.text)}</p>"
    if isinstance(block, KeyValues):
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(format_value(v))}</td></tr>"
            for k, v in block.items.items()
        )
        return f'<table class="kv">{_caption(block.caption)}<tbody>{rows}</tbody></table>'
    if isinstance(block, Table):
        head = "".join(f"<th>{_e(c)}</th>" for c in block.columns)
        body = []
        for i, row in enumerate(block.rows):
            if len(row) != len(block.columns):
                raise ValueError(
                    f"table row {i} has {len(row)} values for {len(block.columns)} columns"
                )
            body.append("<tr>" + "".join(f"<td>{_e(format_value(v))}</td>" for v in row) + "</tr>")
        return (
            f"<table>{_caption(block.caption)}<thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
        )
    if isinstance(block, Image):
        path = Path(block.path)
        alt = block.alt or block.caption or path.stem
        cap = f"<figcaption>{_e(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="{_data_uri(path)}" alt="{_e(alt)}">{cap}</figure>'
    raise TypeError(f"unsupported report block {type(block).__name__}: {block!r:.80}")


def render_html(title: str, sections: Sequence[Section | Mapping], footer: str = "") -> str:
    """The report as one HTML string (see the module docstring for the blocks); a section
    may also be a mapping ``{"heading": ..., "blocks": [...]}``."""
    sections = [Section(**s) if isinstance(s, Mapping) else s for s in sections]
    toc = "".join(f'<li><a href="#s{i}">{_e(s.heading)}</a></li>' for i, s in enumerate(sections))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if len(sections) > 1:
        parts.append(f"<nav><ol>{toc}</ol></nav>")
    for i, s in enumerate(sections):
        parts.append(f'<section id="s{i}"><h2>{_e(s.heading)}</h2>')
        parts.extend(_render_block(b) for b in s.blocks)
        parts.append("</section>")
    if footer:
        parts.append(f"<footer>{_e(footer)}</footer>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html_report(
    path, title: str, sections: Sequence[Section | Mapping], footer: str = ""
) -> Path:
    """Write a self-contained HTML report to ``path`` atomically and return the path."""
    path = Path(path)
    text = render_html(title, sections, footer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
