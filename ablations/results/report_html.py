"""report.html: the study report as one self-contained page, figures embedded.

MLflow's artifact viewer renders a .md file as text around `![curves](curves.png)` (the image
link does not resolve inside the viewer) but previews an .html artifact in a sandboxed iframe.
So the report is also written as HTML with every figure inlined as a base64 `data:` URI: one
file, no relative path to break, readable in MLflow, in a browser, or mailed as an attachment.

The converter handles exactly the Markdown that ablations/report.py writes (headings,
paragraphs, `- ` lists two levels deep, pipe tables, images, `**bold**`, `*italic*`, `code`),
not Markdown in general: a new construct in report.md needs a line here, and
tests/test_report.py checks that no Markdown syntax is left in the page.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.2em 2em; color: #1a1a1a; max-width: 1400px }
h1 { font-size: 1.6em } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 1.6em }
h3 { font-size: 1.05em }
table { border-collapse: collapse; margin: .6em 0; font-size: 12.5px }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; text-align: left }
th { background: #f3f3f3 } tr:nth-child(even) td { background: #fafafa }
img { max-width: 100%; border: 1px solid #eee }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px }
nav a { margin-right: 1em }
"""

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$")
_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"<em>\1</em>")]


def inline(text: str) -> str:
    """Escape HTML, then the inline Markdown the report uses. Inside `code` nothing else
    applies (a `*` in code stays a star)."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(f"<code>{html.escape(p[1:-1])}</code>")
            continue
        s = html.escape(p, quote=False).replace("\\|", "|").replace("\\[", "[").replace("\\]", "]")
        for pattern, repl in _INLINE:
            s = pattern.sub(repl, s)
        out.append(s)
    return "".join(out)


def _cells(row: str) -> list[str]:
    row = row.strip().strip("|")
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def _image(src: str, alt: str, folder: Path) -> str:
    path = folder / src
    if not path.is_file():  # a figure the report names but did not draw: say so, no broken image
        return f"<p><em>(figure {html.escape(src)} missing)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure id="fig-{html.escape(alt)}"><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}"></figure>')


def to_html(markdown: str, folder: Path, title: str) -> str:
    """The page for report.md's text; figures are read from `folder`."""
    body: list[str] = []
    lines = markdown.splitlines()
    headings: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"^(#{1,4}) (.*)$", line)
        if m:
            level, text = len(m.group(1)), m.group(2)
            anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
            if level == 2:
                headings.append((anchor, text))
            body.append(f'<h{level} id="{anchor}">{inline(text)}</h{level}>')
            i += 1
            continue
        m = _IMAGE.match(line)
        if m:
            body.append(_image(m.group(2), m.group(1), folder))
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            head, rest = _cells(rows[0]), [r for r in rows[1:] if not re.fullmatch(r"\|[-|: ]+\|?", r.strip())]
            body.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head)
                        + "</tr></thead><tbody>" + "".join(
                            "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in _cells(r)) + "</tr>"
                            for r in rest) + "</tbody></table>")
            continue
        if re.match(r"^\s*- ", line):
            items = []  # (depth, text)
            while i < len(lines) and (re.match(r"^\s*- ", lines[i]) or not lines[i].strip()):
                if lines[i].strip():
                    depth = (len(lines[i]) - len(lines[i].lstrip())) // 2
                    items.append((min(depth, 1), lines[i].strip()[2:]))
                i += 1
            html_items, open_sub = [], False
            for depth, text in items:
                if depth and not open_sub:
                    html_items.append("<ul>")
                    open_sub = True
                elif not depth and open_sub:
                    html_items.append("</ul>")
                    open_sub = False
                html_items.append(f"<li>{inline(text)}</li>")
            if open_sub:
                html_items.append("</ul>")
            body.append("<ul>" + "".join(html_items) + "</ul>")
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,4} |\||\s*- |!\[)",
                                                                    lines[i]):
            para.append(lines[i].strip())
            i += 1
        body.append(f"<p>{inline(' '.join(para))}</p>")
    nav = "<nav>" + "".join(f'<a href="#{a}">{inline(t)}</a>' for a, t in headings) + "</nav>"
    if body and body[0].startswith("<h1"):
        body.insert(1, nav)
    else:
        body.insert(0, nav)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html(md_path: Path) -> Path:
    """report.html beside report.md, its figures (PNG files in the same folder) embedded."""
    text = md_path.read_text()
    first = text.splitlines()[0] if text else ""
    out = md_path.with_suffix(".html")
    out.write_text(to_html(text, md_path.parent, first.lstrip("# ").strip() or "report"))
    return out
