"""The report's block model and its two renderers: the Markdown and HTML files are rendered from the same list of
blocks (heading, table, code, image, bullets, alert, paragraph), so both always hold the same sections. The HTML page
is self-contained: CSS inline, every picture embedded as base64.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    """A section heading."""

    text: str
    level: int = 2


@dataclass
class Table:
    """A table of already formatted cells (plain text; escaping happens when rendering)."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Code:
    """A preformatted block, e.g. the config as YAML."""

    text: str
    lang: str = ""


@dataclass
class Image:
    """A picture: ``ref`` is what Markdown links to, ``path`` is the file the HTML embeds."""

    title: str
    ref: str
    path: Path


@dataclass
class Bullets:
    """A bullet list."""

    items: list[str] = field(default_factory=list)


@dataclass
class Alert:
    """A prominent error box: a short title over the (possibly multi-line) message."""

    title: str
    text: str


@dataclass
class Para:
    """A plain paragraph."""

    text: str


Block = Heading | Table | Code | Image | Bullets | Alert | Para


# --------------------------------------------------------------------------------------------------- Markdown


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as one Markdown document."""
    return "\n\n".join(_markdown_block(block) for block in blocks) + "\n"


def _markdown_block(block: Block) -> str:
    """One block as Markdown."""
    if isinstance(block, Heading):
        return f"{'#' * block.level} {_md_inline(block.text)}"
    if isinstance(block, Table):
        return _markdown_table(block)
    if isinstance(block, Code):
        fence = _fence(block.text)
        return f"{fence}{block.lang}\n{block.text}\n{fence}"
    if isinstance(block, Image):
        return f"![{_md_inline(block.title)}]({block.ref.replace(' ', '%20')})"
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_inline(item)}" for item in block.items)
    if isinstance(block, Alert):
        return _markdown_alert(block)
    return _md_inline(block.text)


def _markdown_alert(alert: Alert) -> str:
    """A quoted bold title over the message in a code block, so tracebacks keep their lines."""
    fence = _fence(alert.text)
    lines = [f"**{_md_inline(alert.title)}**", "", f"{fence}text", *alert.text.splitlines(), fence]
    return "\n".join(f"> {line}".rstrip() for line in lines)


def _markdown_table(table: Table) -> str:
    """A GitHub-style pipe table."""
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "|".join("---" for _ in table.headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _md_inline(text: str) -> str:
    """Text made inert for Markdown renderers that pass HTML through; newlines kept as line breaks."""
    return html.escape(str(text), quote=False).replace("\r\n", "\n").replace("\n", "<br>")


def _md_cell(text: str) -> str:
    """A table cell: HTML escaped, pipes escaped, newlines as <br>."""
    return _md_inline(text).replace("|", "\\|")


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside the text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


# --------------------------------------------------------------------------------------------------- HTML


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top;
         white-space: pre-wrap; word-break: break-word; max-width: 40rem; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .8rem; overflow-x: auto;
      font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; }
.alert { background: #ffebe9; border: 2px solid #cf222e; color: #82071e; padding: .8rem 1rem;
         border-radius: 6px; font-size: 1.05rem; }
.alert pre { background: #fff5f5; border-color: #cf222e; color: #82071e; white-space: pre-wrap; }
figure { margin: 1rem 0; } figcaption { color: #57606a; font-size: .9rem; }
img { max-width: 100%; border: 1px solid #d0d7de; }
.missing { color: #9a6700; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """The blocks as one self-contained HTML page."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    """One block as HTML."""
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, Image):
        return _html_image(block)
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Alert):
        title, text = html.escape(block.title), html.escape(block.text)
        return f"<div class=\"alert\"><strong>{title}</strong><pre>{text}</pre></div>"
    return f"<p>{html.escape(block.text)}</p>"


def _html_table(table: Table) -> str:
    """An HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_image(image: Image) -> str:
    """A figure with the picture embedded as base64, or a note when the file cannot be read."""
    caption = f"<figcaption>{html.escape(image.title)}</figcaption>"
    try:
        data = base64.b64encode(image.path.read_bytes()).decode("ascii")
    except OSError:
        return f"<figure><p class=\"missing\">Missing image: {html.escape(str(image.path))}</p>{caption}</figure>"
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}.get(
        image.path.suffix.lower(), "image/png")
    alt = html.escape(image.title)
    return f"<figure><img src=\"data:{mime};base64,{data}\" alt=\"{alt}\">{caption}</figure>"
