"""HTML pieces of the run report: every string that reaches the page passes through `esc` (domain,
expert and file names come from users' data), images travel inline as base64 PNG, and the page's
Content-Security-Policy lets it load nothing from anywhere: it is one file that opens offline."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2430;background:#fafbfc}
main{max-width:1400px;margin:0 auto;padding:1.2em 1.6em 3em}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #d5dbe3;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.02em;margin:1.2em 0 .4em}
nav{font-size:.92em;margin:.6em 0 1em}nav a{margin-right:1em;color:#2a5db0;text-decoration:none}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.88em;background:#fff}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #d5dbe3;padding:.25em .55em;text-align:left;white-space:nowrap}
td.n,td.best,td.flag{text-align:right}thead th{background:#eef2f7}
tr.sum td{border-top:2px solid #9aa7b8;font-weight:600}
td.best{background:#dff3e4;font-weight:600}td.flag{color:#b3261e;font-weight:600}
.scroll{overflow-x:auto}.note{color:#5b6573;font-size:.9em}
.absent{background:#fff6e0;border:1px solid #f0d58c;padding:.5em .8em;border-radius:4px}
img{max-width:100%;height:auto;border:1px solid #e3e7ed;background:#fff}
ul.findings li{margin:.2em 0}code{background:#eef2f7;padding:0 .25em;border-radius:3px}
"""
# nothing may be fetched: no scripts at all, images and styles only from the page itself
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def slug(text: str) -> str:
    """An id for an anchor: letters, digits and dashes only (it is made from names users chose)."""
    out = "".join(c if c.isascii() and c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in out.split("-") if p) or "section"


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) < 1e9 else f"{v:.4e}"
    if isinstance(v, float):
        return f"{v:.4e}" if v and (abs(v) >= 1e9 or abs(v) < 1e-3) else f"{v:.{digits}f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def table(
    table_id: str,
    caption: str,
    header: Sequence[str],
    rows: Iterable[Sequence],
    sums: Iterable[Sequence] = (),
    classes: dict[tuple[int, int], str] | None = None,
) -> str:
    """A table with a caption (the report's tests find tables by id and caption). Cells are plain
    values, escaped here; `sums` rows are set apart below a rule; `classes` marks cells (row, col)
    of the body, counted over rows then sums."""
    classes = classes or {}
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, (row, cls) in enumerate([(r, "") for r in rows] + [(r, "sum") for r in sums]):
        cells = "".join(
            f"<td{_cls(classes.get((i, j)) or _numeric(v))}>{esc(fmt(v))}</td>" for j, v in enumerate(row)
        )
        body.append(f"<tr{_cls(cls)}>{cells}</tr>")
    return (
        f'<div class="scroll"><table id="{esc(table_id)}"><caption>{esc(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _numeric(v) -> str:
    """Numbers (and the FLOPs-ratio marks) align right, names left."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "n"
    return "n" if isinstance(v, str) and v.rstrip("!").replace(".", "", 1).isdigit() else ""


def _cls(name: str | None) -> str:
    return f' class="{esc(name)}"' if name else ""


def image(png: bytes, alt: str, img_id: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{esc(img_id)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def para(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{esc(text)}</p>'


def bullets(items: Iterable[str], cls: str = "") -> str:
    lis = "".join(f"<li>{esc(x)}</li>" for x in items)
    return f'<ul class="{cls}">{lis}</ul>' if cls else f"<ul>{lis}</ul>"


def absent(items: Sequence[str], section_id: str = "absent") -> str:
    if not items:
        return ""
    return (
        f'<div class="absent" id="{esc(section_id)}"><strong>Not in this report</strong>'
        f"{bullets(items)}</div>"
    )


def section(section_id: str, title: str, body: Sequence[str]) -> str:
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{"".join(body)}</section>'


def page(title: str, subtitle: Sequence[str], sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: (id, title, html) per section, a contents line linking to each."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(t)}</a>' for sid, t, _ in sections)
    sub = "".join(para(s) for s in subtitle)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main><h1>{esc(title)}</h1>{sub}<nav>{nav}</nav>\n"
        + "\n".join(body for _, _, body in sections)
        + "\n</main></body></html>\n"
    )
