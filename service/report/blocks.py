"""The report's document model and its two renderers.

A report is one list of blocks (heading, paragraph, table, image, list): the Markdown and the
HTML are rendered from the same list, so they always say the same thing. report.html embeds its
PNGs as base64 data URIs and needs no other file; report.md links the PNGs written beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass


@dataclass
class H:
    level: int
    text: str


@dataclass
class P:
    text: str
    warn: bool = False


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Img:
    filename: str
    png: bytes
    alt: str


@dataclass
class Items:
    items: list[str]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(items: list) -> str:
    lines: list[str] = []
    for b in items:
        if isinstance(b, H):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, P):
            lines += [("> **Warning:** " if b.warn else "") + b.text, ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Img):
            lines += [f"![{b.alt}]({b.filename})", ""]
        elif isinstance(b, Items):
            lines += [f"- {i}" for i in b.items] + [""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:0.5em 1em}
img{max-width:100%}
"""


def to_html(items: list, title: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in items:
        if isinstance(b, H):
            parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, P):
            cls = ' class="warn"' if b.warn else ""
            parts.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Img):
            data = base64.b64encode(b.png).decode()
            parts.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Items):
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
